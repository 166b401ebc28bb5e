"""The run's metadata: device, versions, the git commit of the measured tree, the date."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

from resaspp_ops.backend.precision import tf32_convolutions

# The checkout the package was imported from (an editable install), if it is one.
SOURCE_TREE = Path(__file__).resolve().parents[2]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    """A file-name-safe short name: the GPU's name, or "cpu"."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def _git(*args: str) -> Optional[str]:
    # An installed copy, not a checkout, has no commit to name; a copy of a checkout whose repository is
    # elsewhere names it in GIT_DIR (benchmarks/gpu/validate.sh does, on a GPU machine).
    if not (SOURCE_TREE / ".git").exists() and not os.environ.get("GIT_DIR"):
        return None
    try:
        res = subprocess.run(["git", "-C", str(SOURCE_TREE), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_commit() -> tuple[Optional[str], Optional[bool]]:
    """(HEAD's sha, whether the tree differs from it outside benchmarks/results/).

    A copy of the tree without its .git (as shipped to a benchmark machine) names its commit in
    RESASPP_BENCH_COMMIT; the dirty flag is then unknown (None).
    """
    sha = _git("rev-parse", "HEAD")
    if sha is None:
        return os.environ.get("RESASPP_BENCH_COMMIT") or None, None
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return sha, None if status is None else bool(status)


def triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def metadata(device: torch.device, command: str) -> dict:
    sha, dirty = git_commit()
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "commit": sha,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "cpu_threads": torch.get_num_threads(),
        "cudnn_allow_tf32": tf32_convolutions(),
    }
