"""The benchmark suite on the separable (DeepLabV3+) presets, CPU mode: smp's separable ASPP and the separable
branch convolutions as baselines, the separable op / FusedSeparableASPP as fused providers, the unchanged
correctness gate (planted errors fail it), smp missing handled."""
import json

import pytest

from resaspp_ops import backend as backend_registry
from resaspp_ops.backend import reference_separable
from resaspp_ops.bench import main as bench_main
from resaspp_ops.bench import providers

pytest.importorskip("segmentation_models_pytorch", reason="the test extra installs segmentation-models-pytorch")


def _rows(out_dir):
    return json.loads(next(out_dir.glob("*.json")).read_text())["rows"]


def _check(out_dir, *args):
    return bench_main(["--device", "cpu", "--check-only", "--presets", "v3plus-os16", "--rate-sets", "default",
                       "--out-dir", str(out_dir), *args])


def test_separable_presets_check_every_provider(tmp_path):
    assert _check(tmp_path) == 0
    rows = _rows(tmp_path)
    checked = {(r["level"], r["mode"], r["provider"]) for r in rows if r["correct"] is True}
    for level, baseline in (("module", "smp-eager"), ("branches", "sepconv-eager")):
        for mode in ("fwd", "fwd+bwd"):
            assert {(level, mode, baseline), (level, mode, baseline + "-cl"), (level, mode, "fused-auto")} <= checked
    for row in rows:
        assert row["correct"] is not False, row
        if row["provider"] in ("fused-triton", "fused-triton-unrolled", "fused-cuda"):   # skipped: the backend's reason
            backend = providers.FUSED_BACKENDS[row["provider"]]
            assert backend_registry.status(backend, "cpu", family=backend_registry.SEPARABLE).reason in row["note"]
        if row["provider"] in ("fused-triton-v1", "fused-cuda-sm90"):   # variants of the multi-rate op only
            assert "kernel variant of multi_rate_conv2d only" in row["note"]
        if row["provider"] == "fused-auto":
            assert "auto -> reference" in row["note"]
    assert {"fused-triton-v1", "fused-triton-unrolled"} <= {row["provider"] for row in rows}
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["meta"]["presets"]["v3plus-os16"] == {"n": 2, "c": 32, "co": 16, "h": 32, "w": 32, "family": "separable"}


def test_without_smp_the_module_cases_are_skipped_with_the_reason(tmp_path, monkeypatch):
    from resaspp_ops.bench import separable

    monkeypatch.setattr(separable, "smp_unavailable", lambda: "segmentation_models_pytorch is not installed")
    assert _check(tmp_path, "--modes", "fwd") == 0
    rows = _rows(tmp_path)
    assert all(r["correct"] is None and "not installed" in r["note"] for r in rows if r["level"] == "module")
    assert any(r["provider"] == "fused-auto" and r["correct"] for r in rows if r["level"] == "branches")


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_the_gate_fails_a_planted_border_row(tmp_path, monkeypatch, where):
    """The bottom row of the last branch off by 1e-3 relative in the forward, or the top row of grad_x in the
    backend's own backward (which eager autograd calls once DIFFERENTIABLE is off): fused-auto is failed at
    module and branch level, the baselines pass."""
    if where == "forward":
        real = reference_separable.forward

        def forward(x, w1x1, w_dw, w_pw, rates, *args):
            out = real(x, w1x1, w_dw, w_pw, rates, *args)
            out[:, len(rates) * w1x1.shape[0]:, -1, :] *= 1 + 1e-3
            return out

        monkeypatch.setattr(reference_separable, "forward", forward)
    else:
        monkeypatch.setattr(reference_separable, "DIFFERENTIABLE", False)
        real = reference_separable.backward

        def backward(*args):
            grads = real(*args)
            if grads[0] is not None:
                grads[0][:, :, 0, :] *= 1 + 1e-3
            return grads

        monkeypatch.setattr(reference_separable, "backward", backward)
    status = _check(tmp_path, "--modes", "fwd" if where == "forward" else "fwd+bwd",
                    "--providers", "smp-eager,smp-eager-cl,sepconv-eager,sepconv-eager-cl,fused-auto")
    assert status == 1
    rows = _rows(tmp_path)
    fused = [r for r in rows if r["provider"] == "fused-auto"]
    assert len(fused) == 2 and all(r["correct"] is False for r in fused)
    assert all(("out err" if where == "forward" else "grad_x err") in r["note"] for r in fused)
    assert all(r["correct"] for r in rows if r["provider"] != "fused-auto")


def test_separable_macs():
    from resaspp_ops.flops import separable_branch_macs, separable_module_macs

    dense_map = separable_branch_macs(1, 4, 2, 8, 8, (1,))
    assert dense_map.dense == 64 * (4 * 2 * 2 + 4 * 9)
    assert dense_map.useful == 64 * 4 * 2 * 2 + 4 * (8 + 2 * 7) ** 2
    centre_only = separable_branch_macs(1, 4, 2, 8, 8, (12,))
    assert centre_only.useful == 64 * (4 * 2 * 2 + 4)
    assert separable_module_macs(1, 4, 2, 8, 8, (1,)).dense == dense_map.dense + 4 * 2 + 64 * 3 * 2 * 2
