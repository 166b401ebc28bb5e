"""Build script: the Python package, plus the CUDA extension `resaspp_ops._C` whenever nvcc is found.

Environment (all optional):
  TORCH_CUDA_ARCH_LIST     archs to build, honoured as given ("9.0", "8.0;9.0+PTX", ...).
                           Unset and no GPU visible: "8.0;9.0+PTX".
  CUDA_HOME                the CUDA toolkit. Unset: found from the nvcc on PATH (nvcc --dryrun
                           prints the real toolkit, which also works when nvcc is a wrapper script).
  MAX_JOBS                 parallel nvcc jobs. Unset: picked from cores and memory.
  RESASPP_SKIP_CUDA_BUILD=1  pure-Python install (no _C).
  RESASPP_FORCE_CUDA=1       fail if the extension cannot be built (no nvcc).
  RESASPP_PTXAS_VERBOSE=1    pass -Xptxas -v to nvcc (registers, spills).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"[resaspp_ops setup] {msg}", file=sys.stderr, flush=True)


def _toolkit_from_nvcc(nvcc):
    """The toolkit root behind `nvcc`, read from its dry run (robust to wrapper scripts)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cu"
        src.write_text("__global__ void probe() {}\n")
        try:
            res = subprocess.run([nvcc, "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
    match = re.search(r"TOP=(\S+)", res.stdout + res.stderr)
    return os.path.realpath(match.group(1)) if match else None


def _find_cuda_home():
    """(cuda_home, how it was found), or (None, why not)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"], "CUDA_HOME"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "no nvcc on PATH and CUDA_HOME is unset"
    home = _toolkit_from_nvcc(nvcc)
    if home is None:
        home = os.path.realpath(os.path.join(os.path.dirname(os.path.realpath(nvcc)), ".."))
        return home, f"parent of {nvcc}"
    return home, f"nvcc --dryrun ({nvcc})"


def _max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    # nvcc on a templated kernel file peaks around 2 GiB.
    return max(1, min(cores, int(mem_gib // 2)))


def _cuda_extension():
    """Returns (ext_modules, cmdclass); an empty list when the extension is not built."""
    if _flag("RESASPP_SKIP_CUDA_BUILD"):
        _log("RESASPP_SKIP_CUDA_BUILD=1: pure-Python install, no resaspp_ops._C")
        return [], {}, None
    cuda_home, how = _find_cuda_home()
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        msg = f"CUDA toolkit not found ({how}); installing without resaspp_ops._C"
        if _flag("RESASPP_FORCE_CUDA"):
            raise RuntimeError(f"RESASPP_FORCE_CUDA=1 but {msg.split(';')[0]}")
        _log(msg)
        return [], {}, None
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPU's")
    if not os.environ.get("MAX_JOBS"):
        os.environ["MAX_JOBS"] = str(_max_jobs())

    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if _flag("RESASPP_PTXAS_VERBOSE"):
        nvcc_flags += ["-Xptxas", "-v"]
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c*")
                     if p.suffix in (".cpp", ".cu"))
    ext = CUDAExtension(
        name="resaspp_ops._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    _log(f"building resaspp_ops._C | CUDA_HOME={cuda_home} (from {how}) | torch {torch.__version__} "
         f"(CUDA {torch.version.cuda}) | TORCH_CUDA_ARCH_LIST={arch_list} | MAX_JOBS={os.environ['MAX_JOBS']} "
         f"| {len(sources)} sources")
    build_config = {"cuda_home": cuda_home, "arch_list": arch_list, "torch": torch.__version__,
                    "torch_cuda": torch.version.cuda}
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, build_config


def _write_build_config(config):
    """Records what _C was built for, so `resaspp info` can say it without a GPU."""
    path = ROOT / "resaspp_ops" / "_build_config.py"
    path.write_text("# Written by setup.py; not tracked.\nBUILD_CONFIG = " + repr(config) + "\n")


ext_modules, cmdclass, build_config = _cuda_extension()
_write_build_config(build_config)
setup(ext_modules=ext_modules, cmdclass=cmdclass)
