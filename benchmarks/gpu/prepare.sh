#!/usr/bin/env bash
# On the workstation, before a device call: puts into .gpu_tools/ (git-ignored; name it in the call's carry)
# what the GPU image lacks, since nothing can be downloaded there:
#   aspp_gpu_check.py  the independent check script, from ../shared/tools
#   git/               a copy of .git, so that `git rev-parse HEAD` there (the suite's meta.commit and meta.dirty,
#                      the check script's "commit") names the measured commit
#   wheels/            nvidia-cutlass (CUTLASS's headers for the sm_90a kernels, pinned as in pyproject.toml),
#                      setuptools >= 77 (pyproject.toml's build) and < 82 (torch 2.11's pin), and
#                      segmentation-models-pytorch (the separable module-level baselines; its own dependencies
#                      are on the image). validate.sh installs them offline into /tmp/resaspp_site.
# Prints the device command. --allow-dirty: prepare an uncommitted tree (for benchmarks/gpu/rehearse.sh only:
# results must name what ran, so a real call is prepared from a commit).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
allow_dirty=0
[[ "${1:-}" == --allow-dirty ]] && allow_dirty=1
if (( ! allow_dirty )) && [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
  echo "prepare: the tree has uncommitted changes; commit first, so that the results name what ran" >&2
  exit 1
fi
CUTLASS_PIN=$(sed -n 's/^CUTLASS_PIN = "\([^"]*\)".*/\1/p' setup.py)
WHEELS=("nvidia-cutlass==$CUTLASS_PIN" "setuptools>=77,<82" "segmentation-models-pytorch==0.6.0")
mkdir -p .gpu_tools
check=${ASPP_GPU_CHECK:-../shared/tools/aspp_gpu_check.py}
if [[ -f "$check" ]]; then
  install -m 0644 "$check" .gpu_tools/aspp_gpu_check.py
else
  echo "prepare: $check not found: the check phase will report it missing" >&2
fi
rm -rf .gpu_tools/git
cp -r "$(git rev-parse --git-dir)" .gpu_tools/git
# Pure-Python wheels (any platform); kept between runs when they are already there.
mkdir -p .gpu_tools/wheels
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu_tools/wheels "${WHEELS[@]}"
for name in nvidia_cutlass setuptools segmentation_models_pytorch; do
  n=$(ls .gpu_tools/wheels/"$name"-*.whl 2>/dev/null | wc -l)
  if (( n != 1 )); then
    echo "prepare: expected one $name wheel in .gpu_tools/wheels, found $n: remove the stale ones" >&2
    exit 1
  fi
done
du -sh .gpu_tools >&2
echo "device call: carry [\".gpu_tools\"], timeout_s 600, command:"
echo "  VALIDATE_BUDGET_S=540 RESASPP_BENCH_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu/validate.sh session"
