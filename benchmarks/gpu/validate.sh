#!/usr/bin/env bash
# GPU validation in phases, each bounded so that a device call always ends with its summary written. Run from
# the repo root on the lent machine; everything lands under $OUT (the device tool brings it back); results get
# committed under benchmarks/results/. See benchmarks/README.md ("On a lent GPU") for the plan, the expected
# time of each phase (measured by benchmarks/gpu/rehearse.sh) and what to do with the results.
#
#   bash benchmarks/gpu/validate.sh PHASE [PHASE...] [bench ARGS...]
#
#   session    the first call of a GPU session (VALIDATE_BUDGET_S, default 540 s), in priority order, each step
#              alone on the GPU: build; pytest -m cuda; the independent check; bench-first
#   session2   the second call, on the still-warm machine, if the first left device time: sanitize, hbm,
#              bench-second, then pytest -m "not cuda" with what is left
#   env        versions, nvidia-smi, the toolkit found, pip list (seconds; every phase starts with it)
#   tools      install what prepare.sh carried in .gpu_tools/wheels (nvidia-cutlass, setuptools,
#              segmentation-models-pytorch) into /tmp/resaspp_site (RESASPP_SITE_DIR), offline (every phase
#              starts with it)
#   build      build resaspp_ops._C for TORCH_CUDA_ARCH_LIST (default 9.0: sm_90a), with the carried CUTLASS
#   test-cuda  pytest -m cuda (the device-parametrised tests' cuda cases carry the marker), xdist where present
#   test-cpu   pytest -m "not cuda" (what CI runs; the rehearsal runs it on the CPU)
#   test-all   the whole pytest suite
#   sanitize   compute-sanitizer memcheck, then racecheck, on benchmarks/gpu/sanitize_case.py (every backend,
#              kernel family and design, both ops)
#   check      ../shared/tools/aspp_gpu_check.py, carried as .gpu_tools/ (writes $OUT/aspp_gpu_check.json)
#   hbm        Nsight Compute's dram__bytes_read of one bf16 forward per provider at voc-os16 and cityscapes-os8
#              (benchmarks/gpu/hbm_bytes.py): $OUT/hbm_bytes.json, the HBM bytes against those of x + weights
#   bench-first   the module-level bf16 run (FIRST_BENCH_ARGS below), files tagged bf16-module
#   bench-second  the branch level (SECOND_BENCH_ARGS), files tagged bf16-branches
#   bench ARGS the benchmark suite, `resaspp bench --device cuda --out-dir $OUT/results ARGS`; must be the
#              last phase named (everything after it goes to the suite)
#
# VALIDATE_BENCH_DEVICE=cpu runs the bench phases on the CPU: a dry run of this script where no GPU is.
#
# The image this runs on may lack `python` (only python3, /opt/torch/.venv/bin/python3), git, CUTLASS and
# segmentation-models-pytorch, and reaches no network: the interpreter is found here (the first of python3,
# python, /opt/torch/.venv/bin/python3 that imports torch; `python` then names it for every child process),
# a git stand-in answers `rev-parse HEAD` from RESASPP_BENCH_COMMIT, and the wheels come from .gpu_tools/.
#
# Phases share one deadline, VALIDATE_BUDGET_S seconds from the start: each step gets what is left (or its own
# cap), is stopped by `timeout` when it runs over, and the rest are reported as skipped. At the end every log
# goes into $OUT/logs.tar.gz: the device tool brings back at most 8 files, and what comes back is summary.txt,
# logs.tar.gz, aspp_gpu_check.json, hbm_bytes.json and the bench's results/*.
#
# Before the device call, on the workstation: `bash benchmarks/gpu/prepare.sh` (fills .gpu_tools/, prints the
# command) and pass carry=[".gpu_tools"] to the call.
set -uo pipefail
T_START=$SECONDS
BUDGET=${VALIDATE_BUDGET_S:-540}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export OUT
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
summary="$OUT/summary.txt"
failed_mark="$OUT/.failed"  # a file, so that steps run in the background can report failure too
rm -f "$failed_mark"
SHIMS=${RESASPP_SHIMS_DIR:-/tmp/resaspp_shims}  # stand-ins for `python` and `git` where the image has none
SITE=${RESASPP_SITE_DIR:-/tmp/resaspp_site}     # the carried wheels, installed offline
mkdir -p "$SHIMS" "$SITE"

find_python() {  # the interpreter that holds torch
  local c
  for c in "${RESASPP_PYTHON:-}" python3 python /opt/torch/.venv/bin/python3; do
    [[ -n "$c" ]] || continue
    c=$(command -v "$c" 2>/dev/null) || continue
    "$c" -c "import torch" 2>/dev/null && { echo "$c"; return 0; }
  done
  return 1
}
PY=$(find_python) || { echo "validate: no python3 / python / /opt/torch/.venv/bin/python3 imports torch" | tee -a "$summary"; exit 1; }
export PATH="$SHIMS:$PATH"
if [[ "$(command -v python 2>/dev/null)" != "$PY" ]]; then
  printf '#!/bin/sh\nexec %s "$@"\n' "$PY" > "$SHIMS/python" && chmod +x "$SHIMS/python"
fi
PY_BIN=$(dirname "$PY")  # pip-installed scripts (resaspp) land beside the interpreter
export PATH="$SHIMS:$PY_BIN:${PATH#"$SHIMS:"}"

# benchmarks/gpu/prepare.sh carries a copy of .git as .gpu_tools/git (the device copy of the tree has none):
# through it git there names the measured commit, for the suite (meta.commit, meta.dirty) and the check script.
if [[ ! -e .git && -d .gpu_tools/git ]]; then
  export GIT_DIR="$PWD/.gpu_tools/git" GIT_WORK_TREE="$PWD"
  # The copy may belong to another user than the one running here: git would refuse it as unsafe.
  export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*'
fi
if ! command -v git > /dev/null; then
  # No git on the image: `rev-parse HEAD` answers RESASPP_BENCH_COMMIT; anything else fails, so callers fall back
  # to "unknown" (the suite then records dirty = null).
  cat > "$SHIMS/git" <<'EOF'
#!/bin/sh
if [ "$1" = rev-parse ] && [ "$2" = HEAD ] && [ -n "$RESASPP_BENCH_COMMIT" ]; then echo "$RESASPP_BENCH_COMMIT"; exit 0; fi
echo "git: not installed here (a stand-in that answers only rev-parse HEAD)" >&2
exit 1
EOF
  chmod +x "$SHIMS/git"
fi
export RESASPP_BENCH_COMMIT=${RESASPP_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# The checkout first on the import path: scripts run by path (sanitize_case.py, the check) import the
# package from here even where `pip install -e` did not happen; then the carried wheels.
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Logs written as they come: a step stopped by `timeout` keeps everything it printed.
export PYTHONUNBUFFERED=1
# Triton keeps its autotuning choices on disk: a later phase or call on the same machine reuses them.
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
# Nothing can be downloaded there: pip must not try (and wait on) an index.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

left() {  # seconds left of the deadline
  echo $((BUDGET - (SECONDS - T_START)))
}

mark_failed() { touch "$failed_mark"; }

# Every log and file under $OUT except the ones meant to come back goes into logs.tar.gz (at exit,
# however the script ends): the device tool returns at most 8 files.
pack_logs() {
  local keep=(summary.txt logs.tar.gz aspp_gpu_check.json hbm_bytes.json results)
  local f files=()
  # An earlier run's logs in the same $OUT (a second validate.sh in one call, the rehearsal's phases) are kept
  # beside this run's (a log of the same name: this run's).
  [[ -f "$OUT/logs.tar.gz" ]] && tar -xzf "$OUT/logs.tar.gz" -C "$OUT" --skip-old-files
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
    echo "python: $PY ($("$PY" --version 2>&1)); python on PATH: $(command -v python); git: $(command -v git)"
    echo "CUDA_HOME=${CUDA_HOME:-} nvcc=$(command -v nvcc || echo none) compute-sanitizer=$(find_sanitizer || true)"
    python - <<'EOF'
import importlib
for name in ("torch", "triton", "torchvision", "numpy", "scipy", "matplotlib", "tqdm", "pytest", "setuptools",
             "ninja", "pybind11", "segmentation_models_pytorch", "timm"):
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

carried_wheel() {  # carried_wheel NAME: the wheel prepare.sh put in .gpu_tools/wheels, or nothing
  ls .gpu_tools/wheels/"$1"-*.whl 2>/dev/null | head -n 1
}

python_has() {  # python_has MODULE [MIN_MAJOR MAX_MAJOR_EXCL]: importable (and its major version in range)
  python - "$@" <<'EOF' 2>/dev/null
import importlib, sys
mod = importlib.import_module(sys.argv[1])
if len(sys.argv) > 2:
    major = int(mod.__version__.split(".")[0])
    sys.exit(0 if int(sys.argv[2]) <= major < int(sys.argv[3]) else 1)
EOF
}

install_carried() {  # install_carried NAME: the carried wheel into $SITE, offline, without its dependencies
  local whl; whl=$(carried_wheel "$1")
  if [[ -z "$whl" ]]; then
    echo "tools: no carried $1 wheel in .gpu_tools/wheels (benchmarks/gpu/prepare.sh)" | tee -a "$summary"
    return 1
  fi
  python -m pip install -q --no-index --no-deps --no-compile --target "$SITE" --upgrade "$whl" > "$OUT/tools_$1.log" 2>&1 \
    && echo "tools: $(basename "$whl") -> $SITE" | tee -a "$summary"
}

phase_tools() {  # what the image lacks, from the wheels prepare.sh carried
  [[ -n "${TOOLS_DONE:-}" ]] && return 0
  TOOLS_DONE=1
  # setup.py builds with setuptools >= 70.1 (older ones need the wheel package); torch 2.11 pins < 82.
  python_has setuptools 71 82 || install_carried setuptools || mark_failed
  if [[ -z "${RESASPP_CUTLASS_DIR:-}" ]] && ! python_has cutlass_library; then
    install_carried nvidia_cutlass || mark_failed
  fi
  if [[ -z "${RESASPP_CUTLASS_DIR:-}" && -d "$SITE/cutlass_library/source/include" ]]; then
    export RESASPP_CUTLASS_DIR="$SITE/cutlass_library/source/include"
  fi
  # smp: the separable module-level baselines (bench) and the separable converter tests.
  python_has segmentation_models_pytorch || install_carried segmentation_models_pytorch || true
}

have_c() { python -c "import resaspp_ops._C" 2>/dev/null; }

phase_build() {
  phase_tools
  if have_c; then
    echo "build: resaspp_ops._C already importable, not rebuilt" | tee -a "$summary"
  else
    find_cuda_home || echo "build: no nvcc on PATH or under /usr/local/cuda*: the build will fail" | tee -a "$summary"
    # In place (setup.py build_ext): the checkout is on PYTHONPATH, so nothing needs installing, and pip cannot
    # reach for an index. The ninja log (per-file compile times) comes back in the logs.
    step build build.log "${BUILD_CAP_S:-300}" env RESASPP_FORCE_CUDA=1 RESASPP_PTXAS_VERBOSE=1 \
      python setup.py -q build_ext --inplace
    cp build/temp*/.ninja_log "$OUT/ninja_log.txt" 2>/dev/null
  fi
  if have_c; then
    python -m resaspp_ops.cli info > "$OUT/info.txt" 2>&1
    return 0
  fi
  echo "build: resaspp_ops._C cannot be imported; the cuda backend's tests will fail or skip" | tee -a "$summary"
  mark_failed
  return 1
}

xdist_args() {  # pytest-xdist's -n where it is installed (the GPU image has it): Triton compiles in parallel
  python -c "import xdist" 2>/dev/null && echo "-n ${PYTEST_WORKERS:-8}"
}

# Tests run the heuristic Triton configs unless they ask for autotuning themselves (test_triton_cuda.py's one
# autotuned test does): tuning every test shape would cost minutes and test nothing more.
run_pytest() {  # run_pytest NAME LOG CAP [PYTEST ARGS...]
  local name=$1 log=$2 cap=$3; shift 3
  # shellcheck disable=SC2046
  step "$name" "$log" "$cap" env RESASPP_TRITON_AUTOTUNE=${RESASPP_TRITON_AUTOTUNE:-0} \
    python -m pytest tests -q -p no:cacheprovider -rs --durations=25 $(xdist_args) "$@"
}

phase_test_cuda() { run_pytest pytest-cuda pytest_cuda.log "${TEST_CUDA_CAP_S:-180}" -m cuda; }
phase_test_cpu() { run_pytest pytest-cpu pytest_cpu.log "${TEST_CPU_CAP_S:-540}" -m "not cuda"; }
phase_test_all() { run_pytest pytest-all pytest_all.log 540; }

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

phase_check() {
  if [[ ! -f .gpu_tools/aspp_gpu_check.py ]]; then
    echo "check: .gpu_tools/aspp_gpu_check.py missing (copy it and carry .gpu_tools)" | tee -a "$summary"
    mark_failed
    return 1
  fi
  have_c || echo "check: resaspp_ops._C missing: its cuda rows will fail" | tee -a "$summary"
  step aspp-gpu-check aspp_gpu_check.log "${CHECK_CAP_S:-120}" env RESASPP_TRITON_AUTOTUNE="${CHECK_TRITON_AUTOTUNE:-0}" \
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
# presets of the targets with both rate sets, every fused kernel version beside the baselines. Two settings make
# it fit a session (recorded in the JSON's meta): the Triton kernels run their heuristic configs
# (RESASPP_TRITON_AUTOTUNE=0: autotuning costs tens of seconds a kernel and shape), and torch.compile runs mode
# "reduce-overhead" (CUDA graphs, as max-autotune has, but no template search: minutes per case otherwise). The
# suite runs the compiled providers last, so a budget cut leaves every eager row.
FIRST_BENCH_PRESETS="voc-os16 voc-os8 cityscapes-os8 unet-stare v3plus-os16"
FIRST_BENCH_ARGS=(--levels module --dtypes bfloat16 --modes fwd,fwd+bwd --rate-sets default,paper
  --presets "${FIRST_BENCH_PRESETS// /,}"
  --providers torchvision-eager,torchvision-eager-cl,torchvision-compile,smp-eager,smp-eager-cl,smp-compile,fused-triton,fused-triton-v1,fused-triton-unrolled,fused-cuda,fused-auto,fused-auto-compile
  --compile-mode reduce-overhead --tag bf16-module)

# The branch level (the kernels alone against 1+B cuDNN convs, and the separable kernels against the separable
# branch convolutions at v3plus-os16), for the second call.
SECOND_BENCH_ARGS=(--levels branches --dtypes bfloat16 --modes fwd,fwd+bwd --rate-sets default
  --presets voc-os16,voc-os8,cityscapes-os8,unet-stare,v3plus-os16
  --providers conv2d-eager,conv2d-eager-cl,conv2d-compile,sepconv-eager,sepconv-eager-cl,sepconv-compile,fused-triton,fused-triton-v1,fused-triton-unrolled,fused-cuda,fused-cuda-sm90,fused-auto
  --compile-mode reduce-overhead --tag bf16-branches)

phase_bench_first() {
  RESASPP_TRITON_AUTOTUNE=${RESASPP_TRITON_AUTOTUNE:-0} phase_bench bench-first "$OUT/results" "${FIRST_BENCH_ARGS[@]}"
}

phase_bench_second() {
  RESASPP_TRITON_AUTOTUNE=${RESASPP_TRITON_AUTOTUNE:-0} phase_bench bench-second "$OUT/results" "${SECOND_BENCH_ARGS[@]}"
}

phase_session() {  # the first call: what must come back from a session, most important first
  phase_build
  phase_test_cuda
  phase_check
  phase_bench_first
}

phase_session2() {  # the second call, on the warm machine (the build and the compile caches are still there)
  phase_build
  phase_sanitize
  phase_hbm
  phase_bench_second
  phase_test_cpu
}

if (( $# == 0 )); then
  sed -n '2,45p' "$0" >&2
  exit 2
fi
phase_env
phase_tools
while (( $# > 0 )); do
  phase=$1; shift
  case "$phase" in
    env|tools) ;;
    build) phase_build ;;
    test-cuda) phase_test_cuda ;;
    test-cpu) phase_test_cpu ;;
    test-all) phase_test_all ;;
    sanitize) phase_sanitize ;;
    check) phase_check ;;
    hbm) phase_hbm ;;
    session) phase_session ;;
    session2) phase_session2 ;;
    bench) phase_bench bench "$OUT/results" "$@"; break ;;
    bench-first) phase_bench_first ;;
    bench-second) phase_bench_second ;;
    *) echo "unknown phase $phase; see the top of $0" >&2; exit 2 ;;
  esac
done
# The numbers last, where the device tool's reply (the end of the output) shows them.
python benchmarks/gpu/digest.py "$OUT" 2>&1 | tee "$OUT/digest.txt"
echo "total: $((SECONDS - T_START)) s" | tee -a "$summary"
[[ -e "$failed_mark" ]] && exit 1
exit 0
