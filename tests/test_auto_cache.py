"""backend="auto"'s decisions on disk (autotune/cache.py): a second process reuses them without measuring; a
corrupt or foreign file is ignored with a warning; two processes writing at once lose nothing; the file is kept
apart per environment."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resaspp_ops import autotune
from resaspp_ops.autotune import cache as C
from resaspp_ops.autotune.decision import CACHE, MEASURED, Decision, Trial
from resaspp_ops.autotune.key import ProblemKey, environment, kernels_fingerprint

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# One op call with RESASPP_AUTO=measure on CPU tensors, forward and backward; prints the work done and the
# decisions as JSON.
CALL = textwrap.dedent("""
    import json, torch
    from resaspp_ops import autotune, multi_rate_conv2d
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 11, generator=g, requires_grad=True)
    w1 = torch.randn(4, 8, 1, 1, generator=g, requires_grad=True)
    w3 = torch.randn(2, 4, 8, 3, 3, generator=g, requires_grad=True)
    multi_rate_conv2d(x, w1, w3, (1, 2)).sum().backward()
    print(json.dumps({"counts": autotune.COUNTS,
                      "decisions": {d.key.direction: [d.chosen, d.source] for d in autotune.auto_choices()}}))
""")


def _run(code: str, cache_dir: Path, **env) -> subprocess.Popen:
    environ = dict(os.environ, RESASPP_AUTO="measure", RESASPP_CACHE_DIR=str(cache_dir),
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]), **env)
    return subprocess.Popen([sys.executable, "-c", code], env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RESASPP_CACHE_DIR", str(tmp_path))
    autotune.reset()
    yield tmp_path
    autotune.reset()


def test_a_second_process_with_the_cache_file_measures_nothing(tmp_path):
    """The choice costs nothing once cached: the second process's first call makes no verification and no
    timing run (counted, not timed), and runs what the first decided."""
    first, _ = _result(_run(CALL, tmp_path))
    assert first["counts"]["measurements"] == 3  # forward, input grad, weight grad
    assert first["counts"]["timed_runs"] >= 3
    assert {v[1] for v in first["decisions"].values()} == {MEASURED}
    second, _ = _result(_run(CALL, tmp_path))
    assert second["counts"] == {"measurements": 0, "candidate_runs": 0, "timed_runs": 0}
    assert {k: v[0] for k, v in second["decisions"].items()} == {k: v[0] for k, v in first["decisions"].items()}
    assert {v[1] for v in second["decisions"].values()} == {CACHE}


def _decision(i: int, chosen: str = "reference") -> Decision:
    key = ProblemKey("cpu (test)", "multi_rate_conv2d", "forward", "float32", 1, 4, 5, 5 + i, 3, 1, (1,), ("nchw",))
    return Decision(key, chosen, "planted", MEASURED, (Trial(chosen, "chosen", 1.0, "ok"),), "now")


@pytest.mark.parametrize("content, why", [("{not json", "not JSON"),
                                          ('{"format": "something else", "entries": []}', "not a"),
                                          ('[1, 2, 3]', "not a"),
                                          (None, "a malformed decision")])
def test_a_corrupt_or_foreign_file_is_ignored_with_one_warning_then_replaced(cache_dir, content, why):
    path = cache_dir / C.FILE_NAME
    if content is None:  # our format, one decision broken
        content = json.dumps({"format": C.FORMAT, "environments": {environment(): {"k": {"key": {}}}}})
    path.write_text(content)
    with pytest.warns(UserWarning, match=f"ignoring the backend='auto' cache file .*{why}") as caught:
        assert C.DecisionStore().lookup(_decision(0).key.text()) is None
        store = C.DecisionStore()
        assert store.lookup("anything") is None
        store.lookup("anything else")
    assert len([w for w in caught if "ignoring" in str(w.message)]) == 2  # once per store (process), not per lookup
    store.record(_decision(1), persist=True)
    fresh = C.DecisionStore()
    assert fresh.lookup(_decision(1).key.text()).chosen == "reference"  # the file was replaced by a valid one


def test_two_processes_writing_at_once_lose_nothing(cache_dir):
    writer = textwrap.dedent("""
        import sys, time
        from test_auto_cache import _decision
        from resaspp_ops.autotune.cache import DecisionStore
        start, first = float(sys.argv[1]), int(sys.argv[2])
        while time.time() < start:
            pass
        store = DecisionStore()
        for i in range(first, first + 40):
            store.record(_decision(i), persist=True)
        print("{}")
    """)
    import time

    start = f"{time.time() + 3:.3f}"
    processes = [_run(writer.replace("sys.argv[1]", start).replace("sys.argv[2]", str(first)), cache_dir)
                 for first in (0, 1000)]
    for process in processes:
        _result(process)
    doc = json.loads((cache_dir / C.FILE_NAME).read_text())
    entries = doc["environments"][environment()]
    assert len(entries) == 80
    assert not list(cache_dir.glob("*.tmp"))


def test_decisions_of_another_environment_are_kept_but_not_used(cache_dir):
    other = "resaspp_ops 0.0.1, torch 1.0, triton none, CUDA none"
    text = _decision(0).key.text()
    (cache_dir / C.FILE_NAME).write_text(json.dumps(
        {"format": C.FORMAT, "environments": {other: {text: _decision(0, "triton:v1").as_dict()}}}))
    store = C.DecisionStore()
    assert store.lookup(text) is None
    store.record(_decision(0), persist=True)
    environments = json.loads((cache_dir / C.FILE_NAME).read_text())["environments"]
    assert environments[other][text]["chosen"] == "triton:v1" and environments[environment()][text]["chosen"] == \
        "reference"


def test_an_unwritable_cache_directory_keeps_decisions_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("RESASPP_CACHE_DIR", str(blocker / "cache"))  # a directory under a file: cannot exist
    store = C.DecisionStore()
    with pytest.warns(UserWarning) as caught:
        store.record(_decision(0), persist=True)
        store.record(_decision(1), persist=True)  # each said once
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "cannot read it" in messages[0]
    assert "cannot write the backend='auto' cache file" in messages[1]
    assert store.lookup(_decision(1).key.text()).chosen == "reference"


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("RESASPP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert C.cache_path() == tmp_path / "xdg" / "resaspp_ops" / C.FILE_NAME
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert C.cache_dir() == Path.home() / ".cache" / "resaspp_ops"
    monkeypatch.setenv("RESASPP_CACHE_DIR", str(tmp_path / "mine"))
    assert C.cache_dir() == tmp_path / "mine"


def test_the_environment_names_the_versions_and_the_kernels(tmp_path):
    """An edited kernel (an editable install keeps its version) starts a new environment: no decision that
    verified the old kernel vouches for the new one."""
    import torch

    assert environment().startswith("resaspp_ops ") and f"torch {torch.__version__}" in environment()
    assert f"kernels {kernels_fingerprint()}" in environment()
    (tmp_path / "backend" / "triton").mkdir(parents=True)
    kernel = tmp_path / "backend" / "triton" / "forward_v2.py"
    kernel.write_text("BLOCK = 64\n")
    before = kernels_fingerprint(tmp_path)
    kernel.write_text("BLOCK = 128\n")
    assert kernels_fingerprint(tmp_path) != before
    (tmp_path / "_C.so").write_bytes(b"x")
    assert kernels_fingerprint(tmp_path) not in (before, kernels_fingerprint(tmp_path.parent))


def test_the_file_keeps_the_most_recent_environments(cache_dir):
    old = {f"env {i}": {f"k{i}": dict(_decision(i).as_dict(), measured_at=f"2026-01-{i + 10:02d}")}
           for i in range(C.KEPT_ENVIRONMENTS + 2)}
    (cache_dir / C.FILE_NAME).write_text(json.dumps({"format": C.FORMAT, "environments": old}))
    C.write_merged(cache_dir / C.FILE_NAME, {_decision(0).key.text(): _decision(0)})
    kept = json.loads((cache_dir / C.FILE_NAME).read_text())["environments"]
    assert len(kept) == C.KEPT_ENVIRONMENTS and environment() in kept
    assert not {"env 0", "env 1", "env 2"} & set(kept) and f"env {C.KEPT_ENVIRONMENTS + 1}" in kept


def test_speed_switches_make_another_environment(monkeypatch):
    """A decision timed with Triton's autotuning or dgrad loop switched one way is not reused the other way: the
    switches that are set are part of the environment the file's decisions hold for."""
    from resaspp_ops.autotune.key import SPEED_SWITCHES, environment

    for name in SPEED_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    plain = environment()
    monkeypatch.setenv("RESASPP_TRITON_DGRAD_SEGMENTS", "loads")
    loads = environment()
    monkeypatch.setenv("RESASPP_TRITON_AUTOTUNE", "1")
    assert len({plain, loads, environment()}) == 3
    assert "RESASPP_TRITON_DGRAD_SEGMENTS=loads" in loads and loads.startswith(plain)
