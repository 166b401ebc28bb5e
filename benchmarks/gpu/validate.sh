#!/usr/bin/env bash
# GPU validation in phases that each fit one device call (10 minutes). Run from the repo root on the
# lent machine; results land under $OUT (the device tool brings them back) and get committed under
# benchmarks/results/.
#
#   bash benchmarks/gpu/validate.sh build-test   build _C, pytest -m cuda, compute-sanitizer, whole suite
#   bash benchmarks/gpu/validate.sh bench [ARGS]  the benchmark suite (ARGS go to `resaspp bench`)
#   bash benchmarks/gpu/validate.sh check        ../shared/tools/aspp_gpu_check.py (carried as .gpu_tools/)
#
# The device machine gets a copy of the tree without .git: name the measured commit with
# RESASPP_BENCH_COMMIT=$(git rev-parse HEAD) in the device command (the suite records it).
# Before `check`, on the workstation: mkdir -p .gpu_tools && cp ../shared/tools/aspp_gpu_check.py .gpu_tools/
# and pass carry=[".gpu_tools"] to the device call.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export RESASPP_BENCH_COMMIT=${RESASPP_BENCH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
summary="$OUT/summary.txt"
step() {  # step NAME LOGFILE CMD...: runs CMD, logs its output, records the exit status and time
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  "$@" > "$OUT/$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - t0)) s, log $log)" | tee -a "$summary"
  return $rc
}

ensure_built() {
  python -c "import resaspp_ops._C" 2>/dev/null && return 0
  step build build.log env RESASPP_FORCE_CUDA=1 RESASPP_PTXAS_VERBOSE=1 \
    pip install --no-build-isolation --no-deps -e .
}

case "${1:-}" in
  build-test)
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    echo "$RESASPP_BENCH_COMMIT" > "$OUT/commit.txt"
    ensure_built || exit 1
    python -m resaspp_ops.cli info > "$OUT/info.txt" 2>&1
    step pytest-cuda pytest_cuda.log python -m pytest tests -m cuda -q -p no:cacheprovider -rs
    step pytest-cuda-simt pytest_cuda_simt.log env RESASPP_CUDA_KERNEL=simt python -m pytest tests -m cuda -q -p no:cacheprovider
    step memcheck memcheck.log compute-sanitizer --tool memcheck --error-exitcode 3 python benchmarks/gpu/sanitize_case.py
    step racecheck racecheck.log compute-sanitizer --tool racecheck --error-exitcode 3 python benchmarks/gpu/sanitize_case.py
    step pytest-all pytest_all.log python -m pytest tests -q -p no:cacheprovider -x
    ;;
  bench)
    shift
    ensure_built || exit 1
    step bench bench.log python -m resaspp_ops.cli bench --device cuda --out-dir "$OUT/results" "$@"
    ;;
  check)
    ensure_built || exit 1
    step aspp-gpu-check aspp_gpu_check.log python .gpu_tools/aspp_gpu_check.py
    ;;
  *)
    echo "usage: bash benchmarks/gpu/validate.sh {build-test|bench [ARGS]|check}" >&2
    exit 2
    ;;
esac
