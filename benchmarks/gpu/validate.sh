#!/usr/bin/env bash
# GPU validation in phases, each bounded so that a device call (10 minutes at most) always ends with its
# summary written. Run from the repo root on the lent machine; everything lands under $OUT (the device
# tool brings it back); results get committed under benchmarks/results/. See benchmarks/README.md
# ("On a lent GPU") for the planned calls and their expected times.
#
#   bash benchmarks/gpu/validate.sh PHASE [PHASE...] [bench ARGS...]
#
#   session    the whole plan of a GPU session in ONE call (a session has 15 minutes of device time):
#              build; then at once, for SESSION_GROUP_S seconds (default 200): pytest -m cuda (xdist),
#              compute-sanitizer, and bench-first's cases with --check-only (their correctness on every
#              provider, and warm Triton / Inductor compile caches for the timed run); then alone on the
#              GPU: check, and bench-first; last, pytest -m "not cuda" with what is left of the deadline
#   env        versions, nvidia-smi, the toolkit found, pip list (seconds; every phase starts with it)
#   build      build resaspp_ops._C (pip install -e, else setup.py build_ext --inplace)
#   test-cuda  pytest -m cuda (the device-parametrised tests' cuda cases carry the marker), then
#              pytest -m cuda again with RESASPP_CUDA_KERNEL=simt
#   sanitize   compute-sanitizer memcheck, then racecheck, on benchmarks/gpu/sanitize_case.py (every backend, kernel family and design, both ops)
#   test-all   the whole pytest suite (no -x: every failure is listed; xdist where installed)
#   check      ../shared/tools/aspp_gpu_check.py, carried as .gpu_tools/ (writes $OUT/aspp_gpu_check.json)
#   hbm        Nsight Compute's dram__bytes_read of one bf16 forward per provider at voc-os16 and cityscapes-os8
#              (benchmarks/gpu/hbm_bytes.py): $OUT/hbm_bytes.json, the HBM bytes against those of x + weights
#   bench ARGS the benchmark suite, `resaspp bench --device cuda --out-dir $OUT/results ARGS`; must be the
#              last phase named (everything after it goes to the suite)
#   bench-first  the first benchmark run's argument set (FIRST_BENCH_ARGS below), files tagged bf16-module
#   bench-second the branch level's run (SECOND_BENCH_ARGS), for a short second call on the warm machine
#
# VALIDATE_BENCH_DEVICE=cpu runs the bench phases on the CPU: a dry run of this script where no GPU is.
#
# Phases share one deadline, VALIDATE_BUDGET_S seconds (default 560) from the start: each step gets what
# is left (or its own cap), is stopped by `timeout` when it runs over, and the rest are reported as
# skipped. At the end every log goes into $OUT/logs.tar.gz: the device tool brings back at most 8 files,
# and what comes back is summary.txt, logs.tar.gz, aspp_gpu_check.json and the bench's results/*.
#
# Before the device call, on the workstation: `bash benchmarks/gpu/prepare.sh` (copies the check script and
# .git into .gpu_tools/, prints the command) and pass carry=[".gpu_tools"] to the call. The device copy of
# the tree has no .git of its own; RESASPP_BENCH_COMMIT=<sha> in the command names the commit too.
set -uo pipefail
T_START=$SECONDS
BUDGET=${VALIDATE_BUDGET_S:-560}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export OUT
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# benchmarks/gpu/prepare.sh carries a copy of .git as .gpu_tools/git (the device copy of the tree has none):
# through it git there names the measured commit, for the suite (meta.commit, meta.dirty) and the check script.
if [[ ! -e .git && -d .gpu_tools/git ]]; then
  export GIT_DIR="$PWD/.gpu_tools/git" GIT_WORK_TREE="$PWD"
  # The copy may belong to another user than the one running here: git would refuse it as unsafe.
  export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*'
fi
export RESASPP_BENCH_COMMIT=${RESASPP_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# The checkout first on the import path: scripts run by path (sanitize_case.py, the check) import the
# package from here even where `pip install -e` did not happen (a fresh machine with a carried .so).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Logs written as they come: a step stopped by `timeout` keeps everything it printed.
export PYTHONUNBUFFERED=1
# Triton keeps its autotuning choices on disk: a later phase or call on the same machine reuses them.
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
summary="$OUT/summary.txt"
failed_mark="$OUT/.failed"  # a file, so that steps run in the background can report failure too
rm -f "$failed_mark"
GROUP_END=""  # while set: the end (in $SECONDS) of the concurrent group under way

left() {  # seconds left of the deadline, or of the concurrent group under way if that ends sooner
  local l=$((BUDGET - (SECONDS - T_START)))
  if [[ -n "$GROUP_END" ]] && (( GROUP_END - SECONDS < l )); then l=$((GROUP_END - SECONDS)); fi
  echo "$l"
}

mark_failed() { touch "$failed_mark"; }

# Every log and file under $OUT except the ones meant to come back goes into logs.tar.gz (at exit,
# however the script ends): the device tool returns at most 8 files.
pack_logs() {
  local keep=(summary.txt logs.tar.gz aspp_gpu_check.json hbm_bytes.json results)
  local f files=()
  for f in "$OUT"/* "$OUT"/.[!.]*; do
    [[ -e "$f" ]] || continue
    [[ " ${keep[*]} " == *" $(basename "$f") "* ]] && continue
    files+=("$(basename "$f")")
  done
  (( ${#files[@]} )) || return 0
  tar -czf "$OUT/logs.tar.gz" -C "$OUT" "${files[@]}" && (cd "$OUT" && rm -rf "${files[@]}")
}
trap 'pack_logs' EXIT

step() {  # step NAME LOGFILE CAP_S CMD...: runs CMD under timeout, logs it, records rc and time
  local name=$1 log=$2 cap=$3; shift 3
  local budget; budget=$(left)
  if (( budget < 20 )); then
    echo "$name: skipped (deadline: $budget s left)" | tee -a "$summary"
    mark_failed
    return 124
  fi
  (( cap > budget - 5 )) && cap=$((budget - 5))
  local t0=$SECONDS
  # SIGINT first: pytest then still prints the failures it has seen, and the suite exits as on Ctrl-C
  # (its last checkpoint stands); whatever is still running 20 s later is killed.
  timeout --signal=INT --kill-after=20 "$cap" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  local what="rc=$rc"
  (( rc == 124 || rc == 137 )) && what="rc=$rc (stopped after its $cap s: see the end of the log)"
  echo "$name: $what ($((SECONDS - t0)) s, log $log)" | tee -a "$summary"
  (( rc != 0 )) && mark_failed
  return $rc
}

find_cuda_home() {  # exports CUDA_HOME (and PATH) when nvcc is not on PATH; the toolkit matching torch first
  if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then return 0; fi
  if command -v nvcc > /dev/null; then return 0; fi
  local want d
  want=$(python -c "import torch; print(torch.version.cuda or '')" 2>/dev/null)
  for d in "/usr/local/cuda-$want" /usr/local/cuda /usr/local/cuda-*; do
    if [[ -x "$d/bin/nvcc" ]]; then
      export CUDA_HOME=$d PATH="$d/bin:$PATH"
      return 0
    fi
  done
  return 1
}

find_sanitizer() {  # prints the compute-sanitizer to use, or nothing
  local c
  c=$(command -v compute-sanitizer 2>/dev/null) && { echo "$c"; return; }
  for c in ${CUDA_HOME:+"$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer"} \
           /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer; do
    [[ -x "$c" ]] && { echo "$c"; return; }
  done
}

phase_env() {
  [[ -s "$OUT/env.txt" ]] && return 0
  find_cuda_home
  {
    echo "commit: $RESASPP_BENCH_COMMIT"
    echo "python: $(command -v python) $(python --version 2>&1)"
    echo "CUDA_HOME=${CUDA_HOME:-} nvcc=$(command -v nvcc || echo none) compute-sanitizer=$(find_sanitizer || true)"
    python - <<'EOF'
import importlib
for name in ("torch", "triton", "torchvision", "numpy", "scipy", "matplotlib", "tqdm", "pytest", "setuptools",
             "ninja", "pybind11"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', 'present')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: MISSING ({type(exc).__name__}: {exc})")
import torch
print("cuda:", torch.version.cuda, "| available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
EOF
    echo "--- nvidia-smi"; nvidia-smi 2>&1
    echo "--- pip list"; python -m pip list 2>&1
  } > "$OUT/env.txt" 2>&1
  echo "$RESASPP_BENCH_COMMIT" > "$OUT/commit.txt"
  sed -n '/^--- nvidia-smi/q;p' "$OUT/env.txt" | tee -a "$summary"
}

have_c() { python -c "import resaspp_ops._C" 2>/dev/null; }

ensure_setuptools() {  # pyproject.toml needs setuptools >= 77; prepare.sh carries a wheel for an older image
  python -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null && return 0
  local whl; whl=$(ls .gpu_tools/wheels/setuptools-*.whl 2>/dev/null | head -n 1)
  if [[ -z "$whl" ]]; then
    echo "build: setuptools < 77 here and no carried wheel (benchmarks/gpu/prepare.sh): the build will fail" \
      | tee -a "$summary"
    return 1
  fi
  python -m pip install -q --no-index --no-deps --target /tmp/resaspp_setuptools "$whl" \
    && export PYTHONPATH="/tmp/resaspp_setuptools:$PYTHONPATH" \
    && echo "build: the image's setuptools is < 77: using the carried $(basename "$whl")" | tee -a "$summary"
}

phase_build() {
  if have_c; then
    echo "build: resaspp_ops._C already importable, not rebuilt" | tee -a "$summary"
  else
    find_cuda_home || echo "build: no nvcc on PATH or under /usr/local/cuda*: the build will fail" | tee -a "$summary"
    ensure_setuptools
    step build build.log 480 env RESASPP_FORCE_CUDA=1 RESASPP_PTXAS_VERBOSE=1 \
      python -m pip install --no-build-isolation --no-deps --no-index -e . \
      || { have_c || step build-inplace build_inplace.log 300 env RESASPP_FORCE_CUDA=1 \
             python setup.py build_ext --inplace; }
  fi
  if have_c; then
    python -m resaspp_ops.cli info > "$OUT/info.txt" 2>&1
    return 0
  fi
  echo "build: resaspp_ops._C cannot be imported; the cuda backend's tests will fail or skip" | tee -a "$summary"
  mark_failed
  return 1
}

phase_test_cuda() {
  step pytest-cuda pytest_cuda.log 300 env RESASPP_TRITON_AUTOTUNE=${RESASPP_TRITON_AUTOTUNE:-0} \
    python -m pytest tests -m cuda -q -p no:cacheprovider -rs --durations=15
  # (The "cuda" cases of tests parametrised over the `device` fixture carry the marker: tests/conftest.py.)
  # The SIMT kernels under the other files' GPU tests (test_cuda_kernels.py picks its kernel per test).
  step pytest-cuda-simt pytest_cuda_simt.log 150 env RESASPP_CUDA_KERNEL=simt RESASPP_TRITON_AUTOTUNE=${RESASPP_TRITON_AUTOTUNE:-0} \
    python -m pytest tests -m cuda -k "not test_cuda_kernels and not test_triton_cuda" -q -p no:cacheprovider -rs
}

phase_sanitize() {
  local cs; cs=$(find_sanitizer)
  if [[ -z "$cs" ]]; then
    echo "sanitize: no compute-sanitizer on PATH or under /usr/local/cuda*: skipped" | tee -a "$summary"
    mark_failed
    return 1
  fi
  # The heuristic Triton configs: autotuning under the sanitizer would time every config, slowly. One
  # process a tool (the sanitizer's start-up with torch is the slow part); reports name the kernel.
  local tool
  for tool in memcheck racecheck; do
    step "$tool" "$tool.log" 150 env RESASPP_TRITON_AUTOTUNE=0 \
      "$cs" --tool "$tool" --error-exitcode 3 python benchmarks/gpu/sanitize_case.py cuda triton triton-v1 triton-separable cuda-separable
  done
}

xdist_args() {  # pytest-xdist's -n where it is installed (the GPU image has it): Triton compiles in parallel
  python -c "import xdist" 2>/dev/null && echo "-n ${PYTEST_WORKERS:-8}"
}

# Tests run the heuristic Triton configs unless they ask for autotuning themselves (test_triton_cuda.py's one
# autotuned test does): tuning every test shape would cost minutes and test nothing more.
phase_test_all() {  # phase_test_all [MARKER EXPRESSION]: the whole suite, or the tests the expression selects
  local select=() name=pytest-all log=pytest_all.log
  if [[ -n "${1:-}" ]]; then
    select=(-m "$1")
    name="pytest-m-${1// /-}"
    log="pytest_m_${1// /_}.log"
  fi
  # shellcheck disable=SC2046
  step "$name" "$log" 540 env RESASPP_TRITON_AUTOTUNE=${RESASPP_TRITON_AUTOTUNE:-0} \
    python -m pytest tests "${select[@]}" -q -p no:cacheprovider -rs --durations=25 $(xdist_args)
}

phase_check() {
  if [[ ! -f .gpu_tools/aspp_gpu_check.py ]]; then
    echo "check: .gpu_tools/aspp_gpu_check.py missing (copy it and carry .gpu_tools)" | tee -a "$summary"
    mark_failed
    return 1
  fi
  have_c || echo "check: resaspp_ops._C missing: its cuda rows will fail" | tee -a "$summary"
  step aspp-gpu-check aspp_gpu_check.log 300 env RESASPP_TRITON_AUTOTUNE="${CHECK_TRITON_AUTOTUNE:-0}" \
    python .gpu_tools/aspp_gpu_check.py
}

find_ncu() {  # prints the Nsight Compute CLI to use, or nothing
  local c
  c=$(command -v ncu 2>/dev/null) && { echo "$c"; return; }
  for c in ${CUDA_HOME:+"$CUDA_HOME/bin/ncu"} /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do
    [[ -x "$c" ]] && { echo "$c"; return; }
  done
}

HBM_PRESETS="voc-os16 cityscapes-os8"
HBM_PROVIDERS="torchvision-eager-cl fused-triton fused-triton-v1 fused-cuda"

phase_hbm() {  # HBM bytes one bf16 forward reads, per provider (benchmarks/gpu/hbm_bytes.py): $OUT/hbm_bytes.json
  local ncu; ncu=$(find_ncu)
  if [[ -z "$ncu" ]]; then
    echo "hbm: no ncu (Nsight Compute) found: skipped" | tee -a "$summary"
    mark_failed
    return 1
  fi
  mkdir -p "$OUT/hbm"
  local preset provider
  for preset in $HBM_PRESETS; do
    for provider in $HBM_PROVIDERS; do
      step "hbm-$preset-$provider" "hbm/$preset-$provider.log" 60 env RESASPP_TRITON_AUTOTUNE=0 \
        "$ncu" --profile-from-start off --metrics dram__bytes_read.sum --csv \
        --log-file "$OUT/hbm/$preset-$provider.csv" \
        python benchmarks/gpu/hbm_bytes.py run "$provider" "$preset" "$OUT/hbm/$preset-$provider.json"
    done
  done
  python benchmarks/gpu/hbm_bytes.py collect "$OUT/hbm" "$OUT/hbm_bytes.json" | tee -a "$summary"
}

phase_bench() {  # phase_bench NAME OUTDIR ARGS...
  local name=$1 out_dir=$2; shift 2
  have_c || echo "$name: resaspp_ops._C missing: fused-cuda will be skipped" | tee -a "$summary"
  # The suite stops starting providers at its --time-budget (given here unless ARGS name one: what is left
  # of the deadline less a margin for the provider under way), and rewrites its .json/.md after every
  # case, so even a run stopped by `timeout` leaves them.
  local budget=()
  [[ " $* " == *" --time-budget"* ]] || budget=(--time-budget $(( $(left) - 60 )))
  step "$name" "$name.log" 580 python -m resaspp_ops.cli bench --device "${VALIDATE_BENCH_DEVICE:-cuda}" --out-dir "$out_dir" \
    "${budget[@]}" "$@"
}

# The first benchmark run (benchmarks/README.md, "On a lent GPU"): bf16, module level, fwd and fwd+bwd, the
# presets of issue 8's targets with both rate sets, all seven providers. Two settings make it fit a session
# (recorded in the JSON's meta): the Triton kernels run their heuristic configs (RESASPP_TRITON_AUTOTUNE=0:
# autotuning costs tens of seconds a kernel and shape), and torch.compile runs mode "reduce-overhead"
# (CUDA graphs, as max-autotune has, but no template search: minutes per case across 16 cases otherwise).
FIRST_BENCH_PRESETS="voc-os16 voc-os8 cityscapes-os8 unet-stare"
FIRST_BENCH_ARGS=(--levels module --dtypes bfloat16 --modes fwd,fwd+bwd --rate-sets default,paper
  --presets "${FIRST_BENCH_PRESETS// /,}"
  --providers torchvision-eager,torchvision-eager-cl,torchvision-compile,fused-triton,fused-triton-v1,fused-cuda,fused-auto,fused-auto-compile
  --compile-mode reduce-overhead --tag bf16-module)

phase_bench_first() {  # phase_bench_first [--check-only]: the timed run, or its correctness sweep
  if [[ "${1:-}" == --check-only ]]; then
    # One process a preset: torch.compile's front end is single-threaded, so the compiles (one per compiled
    # provider and case, what the timed run would otherwise wait for) go four at a time. A later --presets
    # or --tag overrides the one in FIRST_BENCH_ARGS.
    # Four such processes next to pytest's workers: Inductor's pool of compile workers kept to 4 each.
    local preset pids=()
    for preset in $FIRST_BENCH_PRESETS; do
      TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4} \
      RESASPP_TRITON_AUTOTUNE=${RESASPP_TRITON_AUTOTUNE:-0} phase_bench "bench-check-$preset" "$OUT/check_only" \
        "${FIRST_BENCH_ARGS[@]}" --presets "$preset" --tag "check-$preset" --check-only &
      pids+=($!)
    done
    wait "${pids[@]}"
  else
    RESASPP_TRITON_AUTOTUNE=${RESASPP_TRITON_AUTOTUNE:-0} phase_bench bench-first "$OUT/results" \
      "${FIRST_BENCH_ARGS[@]}"
  fi
}

# A second, short run for a warm machine right after `session` (device time left: see the README): the branch
# convolutions alone, the kernels' own speed against 1+B cuDNN convs.
# v3plus-os16: the separable op's kernels against the separable branch convolutions (sepconv-*).
SECOND_BENCH_ARGS=(--levels branches --dtypes bfloat16 --modes fwd,fwd+bwd --rate-sets default
  --presets voc-os16,voc-os8,cityscapes-os8,unet-stare,v3plus-os16
  --providers conv2d-eager,conv2d-eager-cl,conv2d-compile,sepconv-eager,sepconv-eager-cl,sepconv-compile,fused-triton,fused-triton-v1,fused-cuda,fused-auto
  --compile-mode reduce-overhead --tag bf16-branches)

phase_session() {
  phase_build
  # The concurrent group: correctness work only, nothing timed. Each member gets the group's end as its
  # deadline; the compile caches the check-only sweep fills (~/.triton, /tmp/torchinductor_*) are on disk,
  # so the timed run's compiles after it are mostly cache hits.
  GROUP_END=$((SECONDS + ${SESSION_GROUP_S:-200}))
  phase_test_all cuda &
  local p_test=$!
  phase_sanitize &
  local p_san=$!
  phase_bench_first --check-only &
  local p_warm=$!
  wait "$p_test" "$p_san" "$p_warm"
  GROUP_END=""
  # Alone on the GPU from here: these time (or count) things.
  phase_check
  phase_bench_first
  phase_hbm
  # The rest of the suite (CI runs it too, without a GPU) with whatever time is left.
  phase_test_all "not cuda"
}

if (( $# == 0 )); then
  sed -n '2,40p' "$0" >&2
  exit 2
fi
phase_env
while (( $# > 0 )); do
  phase=$1; shift
  case "$phase" in
    env) ;;
    build) phase_build ;;
    test-cuda) phase_test_cuda ;;
    sanitize) phase_sanitize ;;
    test-all) phase_test_all ;;
    check) phase_check ;;
    hbm) phase_hbm ;;
    session) phase_session ;;
    bench) phase_bench bench "$OUT/results" "$@"; break ;;
    bench-first) phase_bench_first ;;
    bench-second) RESASPP_TRITON_AUTOTUNE=${RESASPP_TRITON_AUTOTUNE:-0} phase_bench bench-second "$OUT/results" \
                    "${SECOND_BENCH_ARGS[@]}" ;;
    *) echo "unknown phase $phase; see the top of $0" >&2; exit 2 ;;
  esac
done
# The numbers last, where the device tool's reply (the end of the output) shows them.
python benchmarks/gpu/digest.py "$OUT" 2>&1 | tee "$OUT/digest.txt"
echo "total: $((SECONDS - T_START)) s" | tee -a "$summary"
[[ -e "$failed_mark" ]] && exit 1
exit 0
