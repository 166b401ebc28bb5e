"""The build's pieces that need no compiler: the CUTLASS pin named alike everywhere, and setup.py's arch
list rule (9.0 built as sm_90a, 9.0+PTX keeping compute_90 PTX)."""
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


@pytest.mark.parametrize("asked,want,extra,has90", [
    ("9.0", "9.0a", [], True),
    ("8.0;9.0+PTX", "8.0;9.0a", ["-gencode=arch=compute_90,code=compute_90"], True),
    ("9.0a", "9.0a", [], True),
    ("8.0 8.6", "8.0;8.6", [], False),
    ("9.0;9.0a", "9.0a", [], True),
])
def test_arch_list_builds_9_0_as_sm90a(asked, want, extra, has90):
    assert _setup_function("_arch_list_for_sm90")(asked) == (want, extra, has90)
