"""The benchmark's fused-auto provider runs backend="auto"'s measured choice, what a user gets, and its JSON row
records the decisions (CPU tensors with RESASPP_AUTO=measure; unset, the CPU's static reference)."""
import json

import pytest

from resaspp_ops import autotune
from resaspp_ops.bench import main as bench_main

ARGS = ["--device", "cpu", "--quick", "--presets", "unet-stare", "--levels", "branches", "--modes", "fwd+bwd",
        "--providers", "conv2d-eager,fused-auto", "--check-only"]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RESASPP_CACHE_DIR", str(tmp_path / "cache"))
    autotune.reset()
    yield tmp_path
    autotune.reset()


def _fused_auto_rows(out_dir):
    rows = json.loads(next(out_dir.glob("*.json")).read_text())["rows"]
    return [r for r in rows if r["provider"] == "fused-auto"]


def test_fused_auto_records_the_measured_choice(cache_dir, monkeypatch):
    monkeypatch.setenv("RESASPP_AUTO", "measure")
    assert bench_main(ARGS + ["--out-dir", str(cache_dir / "out")]) == 0
    rows = _fused_auto_rows(cache_dir / "out")
    assert rows and all(r["correct"] is True for r in rows)
    for row in rows:
        choices = row["auto_choice"]
        assert {c["key"]["direction"] for c in choices} == {"forward", "input_grad", "weight_grad"}
        assert all(c["chosen"] == "reference" and c["trials"][0]["median_ms"] > 0 for c in choices)
        assert row["note"].startswith("auto -> reference;")
    meta = json.loads(next((cache_dir / "out").glob("*.json")).read_text())["meta"]
    assert meta["env"]["RESASPP_AUTO"] == "measure"


def test_fused_auto_on_the_cpu_default_is_the_static_reference(cache_dir, monkeypatch):
    monkeypatch.delenv("RESASPP_AUTO", raising=False)
    assert bench_main(ARGS + ["--out-dir", str(cache_dir / "out")]) == 0
    for row in _fused_auto_rows(cache_dir / "out"):
        assert "auto_choice" not in row and row["note"].startswith("auto -> reference (static order)")
    assert autotune.COUNTS["measurements"] == 0
