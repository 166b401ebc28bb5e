#!/usr/bin/env bash
# On the workstation, before a device call: puts into .gpu_tools/ (git-ignored; name it in the call's carry)
# what the device copy of the tree lacks: the independent check script from ../shared/tools, and a copy of
# .git, so that `git rev-parse HEAD` there (the suite's meta.commit and meta.dirty, the check script's
# "commit") names the measured commit. Prints the device command.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
  echo "prepare: the tree has uncommitted changes; commit first, so that the results name what ran" >&2
  exit 1
fi
mkdir -p .gpu_tools
check=${ASPP_GPU_CHECK:-../shared/tools/aspp_gpu_check.py}
if [[ -f "$check" ]]; then
  install -m 0644 "$check" .gpu_tools/aspp_gpu_check.py
else
  echo "prepare: $check not found: the check phase will report it missing" >&2
fi
rm -rf .gpu_tools/git
cp -r "$(git rev-parse --git-dir)" .gpu_tools/git
# pyproject.toml needs setuptools >= 77 and the GPU image cannot download: a wheel travels, and validate.sh
# installs it there only if the image's setuptools is older.
rm -rf .gpu_tools/wheels
if ! python -m pip download -q --no-deps --only-binary=:all: "setuptools>=77" -d .gpu_tools/wheels; then
  echo "prepare: no setuptools wheel could be fetched; the build there relies on the image's setuptools" >&2
fi
du -sh .gpu_tools >&2
echo "device call: carry [\".gpu_tools\"], timeout_s 600, command:"
echo "  RESASPP_BENCH_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu/validate.sh session"
