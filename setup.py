"""Build script: the Python package, plus the CUDA extension `resaspp_ops._C` whenever nvcc is found.

The extension compiles against the torch already installed (hence `pip install --no-build-isolation`: an
isolated build would compile against another torch). What else the build needs and the environment lacks, it
fetches into build/_deps (logged): the pinned CUTLASS headers (the nvidia-cutlass wheel's) and ninja. pybind11
comes with torch's headers. Metadata and sdist commands need none of it, torch included.

Environment (all optional):
  TORCH_CUDA_ARCH_LIST     archs to build ("9.0", "8.0;9.0+PTX", ...). 9.0 is built as 9.0a (sm_90a:
                           the warpgroup-MMA kernels need it; the rest runs there as on sm_90), 9.0+PTX
                           as 9.0a plus compute_90 PTX. Numbers only, not names ("Hopper"). Unset: the
                           visible GPUs', or "8.0;9.0+PTX".
  RESASPP_CUTLASS_DIR      CUTLASS's include directory (holding cute/ and cutlass/) for the sm_90a
                           kernels. Unset: an installed nvidia-cutlass wheel's, else the pinned wheel's
                           headers fetched into build/_deps (CUTLASS_PIN; pyproject.toml names the same).
  CUDA_HOME                the CUDA toolkit. Unset: found from the nvcc on PATH (nvcc --dryrun
                           prints the real toolkit, which also works when nvcc is a wrapper script).
  MAX_JOBS                 parallel nvcc jobs. Unset: picked from cores and memory.
  RESASPP_SKIP_CUDA_BUILD=1  pure-Python install (no _C).
  RESASPP_FORCE_CUDA=1       fail if the extension cannot be built (no nvcc), or if the arch list names 9.0
                             and no CUTLASS headers are found (else _C is built without the sm_90a kernels).
  RESASPP_PTXAS_VERBOSE=1    pass -Xptxas -v to nvcc (registers, spills).
  RESASPP_NO_FETCH=1         never download (CUTLASS, ninja): what is missing is reported instead.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
CUTLASS_PIN = "4.2.0.0"  # the nvidia-cutlass wheel the sm_90a kernels were written against (pyproject.toml)
SM90_SOURCES = "sm90_"   # csrc files of the sm_90a kernels (built only with CUTLASS and 9.0 in the arch list)
DEPS_DIR = ROOT / "build" / "_deps"  # what the build fetched (CUTLASS's headers, ninja)
# The setup.py commands that compile; metadata (egg_info, dist_info) and sdist do not, and need no torch.
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "install", "develop", "editable_wheel"}


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


def _pip_download(requirement, dest):
    """The wheel `pip download` fetched for requirement into dest, or (None, why not)."""
    if _flag("RESASPP_NO_FETCH"):
        return None, "RESASPP_NO_FETCH=1"
    dest.mkdir(parents=True, exist_ok=True)
    _log(f"fetching {requirement} into {dest}")
    try:
        res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "-d", str(dest), requirement], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"pip download {requirement} failed: {exc}"
    name = re.split(r"[=<>]", requirement)[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-*.whl"))
    if res.returncode != 0 or not wheels:
        return None, f"pip download {requirement} failed: {(res.stderr or res.stdout).strip()[-300:]}"
    return wheels[-1], None


def _fetched_cutlass():
    """(include dir, how) of the pinned CUTLASS headers in build/_deps, fetched now if absent; (None, why not)."""
    inc = DEPS_DIR / f"cutlass-{CUTLASS_PIN}" / "include"
    how = f"nvidia-cutlass=={CUTLASS_PIN} fetched into {inc.parent}"
    if (inc / "cutlass" / "version.h").is_file():
        return inc, how
    wheel, why = _pip_download(f"nvidia-cutlass=={CUTLASS_PIN}", DEPS_DIR / "wheels")
    if wheel is None:
        return None, why
    prefix = "cutlass_library/source/include/"
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                target = inc / member[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
    return inc, how


def _find_cutlass():
    """(include dir, version, how found), or (None, None, why not)."""
    if os.environ.get("RESASPP_CUTLASS_DIR"):
        root = Path(os.environ["RESASPP_CUTLASS_DIR"])
        inc, how = (root if (root / "cute").is_dir() else root / "include"), "RESASPP_CUTLASS_DIR"
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is not None and spec.submodule_search_locations:
            inc, how = Path(list(spec.submodule_search_locations)[0]) / "source" / "include", "the nvidia-cutlass wheel"
        else:
            inc, how = _fetched_cutlass()
            if inc is None:
                return None, None, (f"no CUTLASS headers ({how}): pip install nvidia-cutlass=={CUTLASS_PIN}, or set "
                                    "RESASPP_CUTLASS_DIR")
    needed = ("cute/tensor.hpp", "cute/atom/mma_traits_sm90_gmma.hpp", "cutlass/pipeline/sm90_pipeline.hpp",
              "cutlass/version.h")
    missing = [f for f in needed if not (inc / f).is_file()]
    if missing:
        return None, None, f"CUTLASS headers at {inc} ({how}) lack {', '.join(missing)}"
    text = (inc / "cutlass" / "version.h").read_text()
    parts = [re.search(rf"#define CUTLASS_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    version = ".".join(p.group(1) for p in parts if p) or "unknown"
    if how == "the nvidia-cutlass wheel":
        from importlib.metadata import PackageNotFoundError, version as dist_version
        try:
            how += f" nvidia-cutlass=={dist_version('nvidia-cutlass')}"
        except PackageNotFoundError:
            pass
    return str(inc), version, how


def _gencode_flags(arch_list):
    """(arch list with 9.0 as 9.0a, every nvcc -gencode flag of the build, whether 9.0 is in it).

    The flags are complete: torch's BuildExtension adds no arch flag of its own once any nvcc flag names an
    arch, so the compute_90 PTX that 9.0+PTX asks for cannot be one extra flag beside torch's (that built a
    _C of PTX alone). Entries are numbers as torch takes them ("8.6", "9.0a", "8.0+PTX").
    """
    entries = [e for e in re.split(r"[;\s]+", arch_list) if e]
    out, flags, has90 = [], [], False
    for e in entries:
        m = re.fullmatch(r"(\d+)\.(\d)(a?)(\+PTX)?", e)
        if m is None:
            raise RuntimeError(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: name each arch by its number, as in "
                               f"'8.0;9.0+PTX' ({e!r} is not one)")
        num, suffix, ptx = m.group(1) + m.group(2), m.group(3), m.group(4)
        if num == "90":  # the warpgroup-MMA kernels need sm_90a; the rest runs there as on sm_90
            has90, suffix = True, "a"
        out.append(f"{m.group(1)}.{m.group(2)}{suffix}")
        flags.append(f"-gencode=arch=compute_{num}{suffix},code=sm_{num}{suffix}")
        if ptx:  # arch-neutral PTX, which later GPUs compile; the sm_90a kernels compile to a trap in it
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not out:
        raise RuntimeError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no arch")
    return ";".join(dict.fromkeys(out)), list(dict.fromkeys(flags)), has90


def _max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8.0
    # nvcc on a templated kernel file peaks around 2 GiB.
    return max(1, min(cores, int(mem_gib // 2)))


def _ensure_ninja():
    """Puts a ninja on PATH for torch's BuildExtension (fetched into build/_deps when there is none): without it
    torch compiles the sources one after another."""
    if shutil.which("ninja"):
        return
    target = DEPS_DIR / "ninja"
    found = sorted(p for p in target.rglob("ninja") if p.is_file() and os.access(p, os.X_OK)) if target.is_dir() else []
    if not found:
        wheel, why = _pip_download("ninja", DEPS_DIR / "wheels")
        if wheel is None:
            _log(f"no ninja ({why}): torch compiles the sources one at a time (slower)")
            return
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
        found = sorted(p for p in target.rglob("ninja") if p.is_file())
        for p in found:
            p.chmod(0o755)
    if found:
        os.environ["PATH"] = f"{found[0].parent}{os.pathsep}{os.environ.get('PATH', '')}"
        _log(f"ninja: {found[0]}")


def _cuda_extension():
    """Returns (ext_modules, cmdclass, build config); no extension when it is not built."""
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

    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            f"resaspp_ops compiles its CUDA extension against the torch installed in this environment, and none "
            f"can be imported here ({exc}). Install torch first, then `pip install --no-build-isolation ...` (an "
            "isolated build environment has no torch), or set RESASPP_SKIP_CUDA_BUILD=1 for a pure-Python "
            "install") from exc
    _ensure_ninja()

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    requested = os.environ["TORCH_CUDA_ARCH_LIST"]
    arch_list, gencode, has90 = _gencode_flags(requested)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    if not os.environ.get("MAX_JOBS"):
        os.environ["MAX_JOBS"] = str(_max_jobs())

    cutlass_inc, cutlass_version, cutlass_how = _find_cutlass()
    if not has90:
        sm90 = {"built": False, "reason": f"the arch list ({requested}) does not name 9.0"}
    elif cutlass_inc is None:
        if _flag("RESASPP_FORCE_CUDA"):
            raise RuntimeError(f"RESASPP_FORCE_CUDA=1 and the arch list names 9.0, but {cutlass_how}")
        sm90 = {"built": False, "reason": cutlass_how}
    else:
        sm90 = {"built": True, "reason": f"sm_90a, CUTLASS {cutlass_version} from {cutlass_how} ({cutlass_inc})"}
    sm90.update(cutlass_version=cutlass_version, cutlass_dir=cutlass_inc)

    code = [re.search(r",code=(\w+)", f).group(1) for f in gencode]
    define = [f"-DRESASPP_WITH_SM90={1 if sm90['built'] else 0}"]
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + define + gencode
    if _flag("RESASPP_PTXAS_VERBOSE"):
        nvcc_flags += ["-Xptxas", "-v"]
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c*")
                     if p.suffix in (".cpp", ".cu") and (sm90["built"] or not p.name.startswith(SM90_SOURCES)))
    ext = CUDAExtension(
        name="resaspp_ops._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")] + ([cutlass_inc] if sm90["built"] else []),
        extra_compile_args={"cxx": ["-O3"] + define, "nvcc": nvcc_flags},
    )
    _log(f"building resaspp_ops._C | CUDA_HOME={cuda_home} (from {how}) | torch {torch.__version__} "
         f"(CUDA {torch.version.cuda}) | TORCH_CUDA_ARCH_LIST={arch_list} (asked: {requested}; code: "
         f"{', '.join(code)}) | MAX_JOBS={os.environ['MAX_JOBS']} | {len(sources)} sources | sm_90a kernels: "
         f"{'yes, ' if sm90['built'] else 'no: '}{sm90['reason']}")
    build_config = {"cuda_home": cuda_home, "arch_list": arch_list, "code": code, "torch": torch.__version__,
                    "torch_cuda": torch.version.cuda, "sm90": sm90}
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, build_config


def _write_build_config(config):
    """Records what _C was built for, so `resaspp info` can say it without a GPU."""
    path = ROOT / "resaspp_ops" / "_build_config.py"
    path.write_text("# Written by setup.py; not tracked.\nBUILD_CONFIG = " + repr(config) + "\n")


def _check_setuptools():
    """setuptools before 70.1 builds wheels (editable ones too) only with the `wheel` package, which pip does not
    install under --no-build-isolation: say so instead of setuptools' "invalid command 'bdist_wheel'"."""
    import setuptools

    version = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        raise RuntimeError(f"setuptools {setuptools.__version__} here builds wheels only with the `wheel` package: "
                           "pip install -U setuptools (or pip install wheel), then install again")


_check_setuptools()
if BUILD_COMMANDS & set(sys.argv[1:]):
    ext_modules, cmdclass, build_config = _cuda_extension()
    _write_build_config(build_config)
else:  # metadata or an sdist: nothing is compiled, and the last build's record stays
    ext_modules, cmdclass = [], {}
setup(ext_modules=ext_modules, cmdclass=cmdclass)
