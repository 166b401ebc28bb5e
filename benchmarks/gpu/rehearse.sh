#!/usr/bin/env bash
# Rehearses a GPU call on a CPU machine, so that the first lent GPU call works the first time:
#   1. the GPU image's Python environment (Python 3.12, torch 2.11.0 with its Triton 3.6.0, torchvision 0.26.0,
#      NumPy 2.5.2, pytest and the image's other test packages; no CUTLASS, no segmentation-models-pytorch),
#      made once in $RESASPP_REHEARSE_VENV (default ~/.cache/resaspp_rehearse/venv) and reused;
#   2. benchmarks/gpu/prepare.sh, then the tree copied as a device call carries it (tracked and untracked-but-
#      not-ignored files plus .gpu_tools; no .git), checked against the 64 MiB limit;
#   3. the plan's phases in that copy, the way the image runs them: only `python3` on PATH (no `python`), no git,
#      no network (pip offline, proxies pointing nowhere), nvcc not on PATH (found under /usr/local/cuda*); `validate.sh build` (with the
#      carried CUTLASS), `pytest -m cuda --collect-only` (the GPU tests import and collect), `validate.sh
#      test-cpu` (the CPU tests), and the bench phase's argument set as a CPU dry run (VALIDATE_BENCH_DEVICE=cpu);
#   4. a summary: each phase's status and time, the build's per-file compile times (ninja log) with the
#      estimate for the GPU machine's 16 cores, and what would fail.
#
#   bash benchmarks/gpu/rehearse.sh [--quick]     (--quick: the CPU tests of a few fast files, not all)
#
# Exit status 0 when everything the rehearsal can run passed. Needs network the first time (the venv);
# Python 3.12 from python3.12 on PATH, pyenv, or uv.
set -euo pipefail
repo=$(git rev-parse --show-toplevel)
cd "$repo"
quick=0
[[ "${1:-}" == --quick ]] && quick=1

IMAGE_PYTHON=3.12
IMAGE_PINS=(torch==2.11.0 torchvision==0.26.0 triton==3.6.0 numpy==2.5.2)
# What the image holds besides (KINDS.md's package list) that the plan or the tests use.
IMAGE_EXTRAS=(pytest pytest-xdist scipy matplotlib tqdm pillow timm huggingface_hub safetensors
  onnx==1.23.1 onnxscript==0.7.2 onnxruntime==1.30.0 ninja pybind11 "setuptools<82" wheel)
VENV=${RESASPP_REHEARSE_VENV:-$HOME/.cache/resaspp_rehearse/venv}
GPU_CORES=16

say() { echo "rehearse: $*"; }

find_python312() {
  local c
  for c in "$(command -v python$IMAGE_PYTHON 2>/dev/null)" \
           "$(pyenv prefix $IMAGE_PYTHON 2>/dev/null | head -n 1)/bin/python$IMAGE_PYTHON" \
           "$HOME"/.pyenv/versions/$IMAGE_PYTHON*/bin/python$IMAGE_PYTHON \
           "$(uv python find $IMAGE_PYTHON 2>/dev/null)"; do
    [[ -n "$c" && -x "$c" ]] && "$c" -c "import sys" 2>/dev/null && { echo "$c"; return 0; }
  done
  return 1
}

make_venv() {
  local want="${IMAGE_PINS[*]} ${IMAGE_EXTRAS[*]}"
  if [[ -x "$VENV/bin/python3" && "$(cat "$VENV/.rehearse-pins" 2>/dev/null)" == "$want" ]]; then
    say "venv $VENV (reused)"
  else
    if [[ ! -x "$VENV/bin/python3" ]]; then
      local py; py=$(find_python312) || { say "no Python $IMAGE_PYTHON (python3.12, pyenv or uv)"; exit 1; }
      say "making $VENV from $py (torch is a few GB: minutes)"
      "$py" -m venv "$VENV"
      "$VENV/bin/python3" -m pip install -q --upgrade pip
    fi
    "$VENV/bin/python3" -m pip install -q "${IMAGE_PINS[@]}" "${IMAGE_EXTRAS[@]}"
    echo "$want" > "$VENV/.rehearse-pins"
  fi
  # The image has neither: the plan must bring them.
  "$VENV/bin/python3" -m pip uninstall -q -y nvidia-cutlass segmentation-models-pytorch resaspp_ops 2>/dev/null || true
  "$VENV/bin/python3" - <<'EOF'
import torch, triton, numpy
print(f"rehearse: image versions here: torch {torch.__version__} (CUDA {torch.version.cuda}), triton "
      f"{triton.__version__}, numpy {numpy.__version__}")
EOF
}

copy_tree() {  # $1: destination; the files a device call carries
  mkdir -p "$1"
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$1"
  cp -r .gpu_tools "$1/.gpu_tools"
  local kib; kib=$(du -sk "$1" | cut -f1)
  say "travelling tree: $((kib / 1024)) MiB of the 64 MiB a call may carry"
  (( kib < 64 * 1024 )) || { say "FAIL: the tree is over the device tool's 64 MiB"; return 1; }
}

image_path() {  # $1: a bin dir to fill; PATH as the image has it: python3 (only), no git, nvcc, the rest of /usr
  local farm=$1 d f n
  mkdir -p "$farm"
  for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
    for f in "$d"/*; do
      n=${f##*/}
      case "$n" in git|git-*|python|python[0-9]*|pip|pip[0-9]*|pytest|resaspp|nvcc) continue ;; esac
      [[ -e "$farm/$n" ]] || ln -s "$f" "$farm/$n"
    done
  done
  # A wrapper, not a link: the venv is found from the path the interpreter is started by.
  printf '#!/bin/sh\nexec %s "$@"\n' "$VENV/bin/python3" > "$farm/python3"
  chmod +x "$farm/python3"
}

phase() {  # phase NAME CMD...: runs CMD, records rc and seconds
  local name=$1; shift
  local t0=$SECONDS rc=0
  "$@" || rc=$?
  results+=("$(printf '%-22s rc=%-3s %4s s' "$name" "$rc" "$((SECONDS - t0))")")
  (( rc == 0 )) || failed+=("$name")
}

make_venv
bash benchmarks/gpu/prepare.sh --allow-dirty > /dev/null
work=$(mktemp -d /tmp/resaspp_rehearse.XXXXXX)
copy_tree "$work/repo"
image_path "$work/bin"
commit=$(git rev-parse HEAD)

# The image's environment: no index, no proxy that answers, nothing of this shell's PATH or Python.
run_there() {
  (cd "$work/repo" && env -i HOME="$work/home" TMPDIR=/tmp LANG=C.UTF-8 PATH="$work/bin" \
     PIP_NO_INDEX=1 HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 \
     RESASPP_SHIMS_DIR="$work/shims" RESASPP_SITE_DIR="$work/site" OUT="$work/out" RESASPP_BENCH_COMMIT="$commit" "$@")
}
mkdir -p "$work/home" "$work/out"
results=() failed=()

# This machine's few cores may take far longer than the GPU machine's 16: no cap here, the estimate comes from
# the per-file times below.
phase build run_there env BUILD_CAP_S=3600 VALIDATE_BUDGET_S=3600 bash benchmarks/gpu/validate.sh build
phase collect-cuda-tests run_there python3 -m pytest tests -m cuda --collect-only -q -p no:cacheprovider
if (( quick )); then
  phase test-cpu-quick run_there python3 -m pytest -q -p no:cacheprovider -x tests/test_ops.py tests/test_rates.py \
    tests/test_triton_lowering.py tests/test_cuda_kernels.py
else
  # As many xdist workers as this machine has cores (the GPU machine's 8 would starve a small one, and its
  # tests with a time budget would then fail for want of CPU, not of correctness).
  phase test-cpu run_there env PYTEST_WORKERS="$(nproc)" TEST_CPU_CAP_S=3000 VALIDATE_BUDGET_S=3600 \
    bash benchmarks/gpu/validate.sh test-cpu
fi
# The bench phase's path on the CPU (scaled-down presets, a short budget): the suite's arguments parse, its
# providers build, its files are written.
phase bench-dry-run run_there env VALIDATE_BENCH_DEVICE=cpu VALIDATE_BUDGET_S=300 \
  bash benchmarks/gpu/validate.sh bench-first

echo
say "summary (work dir $work; validate.sh's logs in $work/out/logs.tar.gz):"
printf '  %s\n' "${results[@]}"
if [[ -f "$work/out/logs.tar.gz" ]]; then
  tar -xzf "$work/out/logs.tar.gz" -C "$work/out" 2>/dev/null || true
fi
ninja_log=$(ls "$work"/repo/build/temp*/.ninja_log 2>/dev/null | head -n 1)
if [[ -n "$ninja_log" ]]; then
  # Per-file compile times: on the GPU machine's cores the build takes about max(longest file, sum / cores).
  awk -v cores=$GPU_CORES 'NR > 1 { t = ($2 - $1) / 1000; sum += t; if (t > max) { max = t; f = $4 } }
    END { est = sum / cores; if (max > est) est = max;
          printf "  build: %d files, %.0f s of compiling in all, longest %.0f s (%s): about %.0f s on %d cores\n",
                 NR - 1, sum, max, f, est, cores }' "$ninja_log"
fi
if (( ${#failed[@]} )); then
  say "WOULD FAIL on the GPU machine: ${failed[*]} (see the logs above and in $work)"
  exit 1
fi
say "every phase the CPU can run passed"
