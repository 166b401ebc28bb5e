"""The build's pieces that need no compiler: the CUTLASS pin named alike everywhere, and setup.py's arch
list rule (9.0 built as sm_90a, 9.0+PTX keeping compute_90 PTX, every arch's -gencode flag written by
setup.py)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_function(name):
    """One function of setup.py, without running setup.py (it builds on import)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"re": re}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace[name]


def test_cutlass_pin_agrees():
    """setup.py's CUTLASS_PIN is the version the build fetches (and the GPU plan carries); every other mention
    of an nvidia-cutlass version in the tree names the same one."""
    pin = re.search(r'CUTLASS_PIN = "([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    mentions = {}
    for path in [*ROOT.glob("*.md"), *ROOT.glob("*.toml"), *(ROOT / "docs").glob("*.md"), ROOT / ".ci" / "run",
                 *(ROOT / "benchmarks").rglob("*.md"), *(ROOT / "benchmarks" / "gpu").glob("*.sh")]:
        for version in re.findall(r"nvidia-cutlass==([0-9][0-9.]*[0-9])", path.read_text()):
            mentions.setdefault(version, []).append(path.relative_to(ROOT).as_posix())
    assert set(mentions) <= {pin}, mentions
    assert mentions, "the docs name the pinned CUTLASS nowhere"


SM80, SM90A, PTX90 = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                      "-gencode=arch=compute_90,code=compute_90")


@pytest.mark.parametrize("asked,want,flags,has90", [
    ("9.0", "9.0a", [SM90A], True),
    ("8.0;9.0+PTX", "8.0;9.0a", [SM80, SM90A, PTX90], True),
    ("9.0a", "9.0a", [SM90A], True),
    ("8.0 8.6+PTX", "8.0;8.6", [SM80, "-gencode=arch=compute_86,code=sm_86",
                                "-gencode=arch=compute_86,code=compute_86"], False),
    ("9.0;9.0a", "9.0a", [SM90A], True),
    ("10.0a", "10.0a", ["-gencode=arch=compute_100a,code=sm_100a"], False),
])
def test_arch_list_builds_9_0_as_sm90a(asked, want, flags, has90):
    """Every arch asked gets its machine code, and +PTX arch-neutral PTX besides. The flags must be the
    whole list: torch adds none of its own once one nvcc flag names an arch (a lone compute_90 flag beside
    torch's once gave a _C of PTX alone)."""
    assert _setup_function("_gencode_flags")(asked) == (want, flags, has90)


@pytest.mark.parametrize("asked", ["Hopper", "8.0;sm_90", "", " ; "])
def test_arch_list_not_a_number_is_an_error(asked):
    with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST"):
        _setup_function("_gencode_flags")(asked)


def test_torch_adds_no_arch_flag_beside_ours():
    """Why _gencode_flags returns the whole list: torch's BuildExtension drops its own arch flags when an
    extension's nvcc flags name one. If a torch stops doing so, the build would carry both lists."""
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    assert cpp_extension._get_cuda_arch_flags([SM90A]) == []
