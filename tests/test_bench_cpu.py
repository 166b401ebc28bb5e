"""The benchmark suite's CPU mode, as CI runs it: a smoke test of the whole pipeline, not a measurement."""
import json

import pytest

from resaspp_ops.bench import main as bench_main

SCHEMA_META = {"device", "torch", "triton", "cuda", "commit", "date"}
SCHEMA_ROW = {"level", "preset", "rates", "provider", "dtype", "mode", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
              "tflops_dense", "tflops_useful", "speedup_vs_best_baseline", "correct"}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    status = bench_main(["--device", "cpu", "--quick", "--presets", "unet-stare,voc-os16",
                       "--time-budget", "25", "--out-dir", str(out_dir)])
    return status, out_dir


def test_writes_the_three_files(cpu_run):
    status, out_dir = cpu_run
    assert status == 0
    stems = {p.stem for p in out_dir.iterdir()}
    assert len(stems) == 1, stems
    stem = stems.pop()
    assert stem.endswith("_cpu")
    for suffix in (".json", ".md", ".png"):
        assert (out_dir / (stem + suffix)).stat().st_size > 0
    assert (out_dir / (stem + ".png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_follows_the_schema(cpu_run):
    _, out_dir = cpu_run
    doc = json.loads(next(out_dir.glob("*.json")).read_text())
    assert {"meta", "ceiling", "rows"} <= set(doc)
    assert SCHEMA_META <= set(doc["meta"])
    assert doc["ceiling"]["bf16_matmul_tflops"] > 0
    rows = doc["rows"]
    assert rows
    for row in rows:
        assert SCHEMA_ROW <= set(row), SCHEMA_ROW - set(row)
        assert row["dtype"] == "float32" and row["mode"] in ("fwd", "fwd+bwd")
        assert row["level"] in ("module", "branches")
        assert isinstance(row["rates"], list)
        if row["correct"] is None:   # skipped: says why, and carries no numbers
            assert row["note"].startswith("skipped: ") and row["median_ms"] is None
            continue
        assert row["correct"] is True, row
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["tflops_useful"] <= row["tflops_dense"]
        assert row["speedup_vs_best_baseline"] > 0
        assert row["peak_mem_mb"] is None   # no allocator statistics on the CPU
        # The host time per call, on the launch-bound preset only.
        assert (row["host_us"] is not None and row["host_us"] > 0) == (row["preset"] == "unet-stare"), row


def test_cpu_providers_ran_and_gpu_ones_were_skipped_with_a_reason(cpu_run):
    _, out_dir = cpu_run
    rows = json.loads(next(out_dir.glob("*.json")).read_text())["rows"]
    timed = {(r["level"], r["provider"]) for r in rows if r["median_ms"] is not None}
    # The first case (module level) runs well inside the budget; a later one may meet the budget on a loaded
    # machine, and then says so.
    assert {("module", "torchvision-eager"), ("module", "fused-auto")} <= timed
    for row in rows:
        if row["level"] == "branches" and row["provider"] in ("conv2d-eager", "fused-auto"):
            assert row["median_ms"] is not None or row["note"] == "skipped: time budget spent", row
    assert any(r["level"] == "branches" for r in rows)
    for row in rows:
        if row["provider"] in ("fused-cuda", "fused-cuda-sm90"):
            assert row["correct"] is None and "backend 'cuda' unavailable" in row["note"]
        if row["provider"].endswith("-compile"):
            assert row["correct"] is None and "--providers" in row["note"]
        if row["provider"] == "fused-auto" and row["correct"]:
            assert "auto -> reference" in row["note"]


def test_markdown_file_has_the_table(cpu_run):
    _, out_dir = cpu_run
    text = next(out_dir.glob("*.md")).read_text()
    assert "| level | preset | rates | provider |" in text and "fused-auto" in text


def test_resaspp_bench_delegates_and_rejects_an_unknown_preset(capsys):
    from resaspp_ops.cli import main as cli_main

    with pytest.raises(SystemExit) as info:
        cli_main(["bench", "--device", "cpu", "--presets", "no-such-preset"])
    assert info.value.code == 2
    assert "voc-os16" in capsys.readouterr().err   # the message lists the presets there are


def test_a_wrong_result_is_reported_and_never_timed(tmp_path, monkeypatch):
    from resaspp_ops.bench import suite

    real_build = suite.build

    def build_with_a_broken_fused_op(level, provider, *args, **kwargs):
        runner = real_build(level, provider, *args, **kwargs)
        if provider == "fused-auto":
            right = runner.fn
            runner.fn = lambda x: right(x) * 1.01   # 1% off: far outside the fp32 bound
        return runner

    monkeypatch.setattr(suite, "build", build_with_a_broken_fused_op)
    status = bench_main(["--device", "cpu", "--quick", "--presets", "unet-stare", "--levels", "branches",
                         "--modes", "fwd", "--out-dir", str(tmp_path)])
    assert status == 1
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    fused = [r for r in rows if r["provider"] == "fused-auto"]
    assert fused and all(r["correct"] is False and r["median_ms"] is None for r in fused)
    assert "out err" in fused[0]["note"]
    assert any(r["provider"] == "conv2d-eager" and r["correct"] for r in rows)


@pytest.mark.parametrize("check_only", [False, True], ids=["timed", "check-only"])
def test_a_baseline_past_the_rule_is_reported_but_fails_nothing(tmp_path, monkeypatch, check_only):
    """A PyTorch baseline outside the error rule is PyTorch itself (compiled bf16 BatchNorm backward can be):
    reported, timed in a timed run, and not a failure of the run, whether or not anything is timed."""
    from resaspp_ops.bench import suite

    real_build = suite.build

    def build_with_an_inexact_baseline(level, provider, *args, **kwargs):
        runner = real_build(level, provider, *args, **kwargs)
        if provider == "conv2d-eager-cl":
            right = runner.fn
            runner.fn = lambda x: right(x) * 1.01
        return runner

    monkeypatch.setattr(suite, "build", build_with_an_inexact_baseline)
    status = bench_main(["--device", "cpu", "--quick", "--presets", "unet-stare", "--levels", "branches",
                         "--modes", "fwd", "--out-dir", str(tmp_path)] + (["--check-only"] if check_only else []))
    assert status == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    baseline = [r for r in rows if r["provider"] == "conv2d-eager-cl"]
    assert baseline and all(r["correct"] is False for r in baseline)
    assert all((r["median_ms"] is None) == check_only for r in baseline)


def test_file_names_are_safe_for_any_gpu_name_and_tag(monkeypatch):
    import torch

    from resaspp_ops.bench import environment, report

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3 / PCIe")
    doc = {"meta": {"date": "2026-11-23T06:00:00+00:00"}}
    assert report.file_stem(doc, torch.device("cuda", 0), "call.2") == "2026-11-23_nvidia-h100-80gb-hbm3-pcie_call.2"
    assert environment.device_slug(torch.device("cpu")) == "cpu"
    with pytest.raises(SystemExit):
        from resaspp_ops.bench.options import parse

        parse(["--tag", "a/b"])


def test_speedups_are_per_case_idempotent_and_name_their_baselines():
    from resaspp_ops.bench.suite import add_all_speedups

    def row(provider, ms, rates=(1,), correct=True):
        return {"level": "module", "preset": "p", "rates": list(rates), "dtype": "bfloat16", "mode": "fwd",
                "provider": provider, "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "peak_mem_mb": None,
                "tflops_dense": None, "tflops_useful": None, "correct": correct, "speedup_vs_best_baseline": None}

    rows = [row("torchvision-eager", 4.0), row("torchvision-compile", None, correct=None), row("fused-cuda", 2.0),
            row("torchvision-eager", 1.0, rates=(2,)), row("fused-cuda", 2.0, rates=(2,))]
    for _ in range(2):
        add_all_speedups(rows)
    assert rows[2]["speedup_vs_best_baseline"] == 2.0 and rows[2]["speedup_baselines"] == ["torchvision-eager"]
    assert rows[4]["speedup_vs_best_baseline"] == 0.5
    from resaspp_ops.bench.report import markdown

    text = markdown({"meta": {"commit": None, "device": "d", "date": "x", "torch": "t", "triton": "t", "cuda": None,
                              "complete": False},
                     "ceiling": {"bf16_matmul_tflops": 1.0}, "rows": [dict(r, note="") for r in rows]})
    assert "- torchvision-compile (1)" in text and "Incomplete run" in text


def test_plain_progress_stands_in_for_tqdm(capsys):
    from resaspp_ops.bench.suite import _PlainProgress

    with _PlainProgress(total=20) as bar:
        bar.set_postfix_str("case")
        bar.update(10)
    assert "10/20" in capsys.readouterr().err


def test_check_only_checks_every_provider_and_times_none(tmp_path):
    status = bench_main(["--device", "cpu", "--quick", "--presets", "unet-stare", "--levels", "branches",
                         "--providers", "conv2d-eager,conv2d-eager-cl,fused-auto,fused-auto-compile",
                         "--compile-mode", "default", "--check-only", "--out-dir", str(tmp_path), "--tag", "check"])
    assert status == 0
    doc = json.loads(next(tmp_path.glob("*_check.json")).read_text())
    assert doc["meta"]["check_only"] is True and doc["ceiling"]["bf16_matmul_tflops"] is None
    checked = [r for r in doc["rows"] if r["correct"] is not None]
    assert {r["provider"] for r in checked} == {"conv2d-eager", "conv2d-eager-cl", "fused-auto", "fused-auto-compile"}
    assert all(r["correct"] is True for r in checked)
    assert all(r["median_ms"] is None and r["speedup_vs_best_baseline"] is None for r in doc["rows"])
    assert "Correctness check only" in next(tmp_path.glob("*_check.md")).read_text()


@pytest.mark.parametrize("with_compiled_baseline", [True, False], ids=["with", "without"])
def test_a_compiled_fused_provider_answers_for_its_own_error(tmp_path, monkeypatch, with_compiled_baseline):
    """fused-auto-compile's bound comes from the worse of eager and the compiled baseline of the case (the
    compiler's own rounding of the ops around the fused op is PyTorch's); without that baseline, from eager."""
    from resaspp_ops.bench import suite

    real_build = suite.build
    off_by = {"conv2d-compile": 1.01, "fused-auto-compile": 1.015}

    def build_inexact(level, provider, *args, **kwargs):
        runner = real_build(level, provider, *args, **kwargs)
        if provider in off_by:
            right = runner.fn
            runner.fn = lambda x, f=off_by[provider]: right(x) * f
        return runner

    monkeypatch.setattr(suite, "build", build_inexact)
    providers = "conv2d-eager,conv2d-compile,fused-auto-compile" if with_compiled_baseline else \
        "conv2d-eager,fused-auto-compile"
    status = bench_main(["--device", "cpu", "--quick", "--presets", "unet-stare", "--levels", "branches",
                         "--modes", "fwd", "--providers", providers, "--compile-mode", "default", "--check-only",
                         "--out-dir", str(tmp_path)])
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    fused = next(r for r in rows if r["provider"] == "fused-auto-compile")
    assert fused["correct"] is with_compiled_baseline, fused
    assert status == (0 if with_compiled_baseline else 1)
    assert ("compiled baseline" in fused["note"]) is with_compiled_baseline


def test_gpu_call_digest_reads_the_suite_and_check_files(cpu_run, tmp_path):
    """benchmarks/gpu/digest.py, printed last by a GPU call: a line per case from the suite's JSON, the check's
    bad parity rows and timings."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    _, out_dir = cpu_run
    (tmp_path / "results").mkdir()
    shutil.copy(next(out_dir.glob("*.json")), tmp_path / "results")
    (tmp_path / "aspp_gpu_check.json").write_text(json.dumps({
        "parity": [{"backend": "triton", "dtype": "torch.bfloat16", "shape": [1, 8, 8, 5, 5], "rates": [1],
                    "err": "boom", "err_pytorch": None, "ok": False}],
        "timing": [{"preset": "voc-os16", "mode": "fwd", "tv_ms": 1.0, "fused_ms": 0.5, "speedup": 2.0}]}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "digest.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("bench: ") and any("unet-stare" in line and "fp32" in line for line in lines)
    assert "check: 1 parity rows, 1 bad" in lines and any("2.00x" in line for line in lines)


def test_hbm_bytes_collects_nsight_compute_csv(tmp_path):
    """benchmarks/gpu/hbm_bytes.py collect: the dram__bytes_read of every kernel in ncu's CSV, summed with its
    unit, set against the least bytes (x and the weights)."""
    import subprocess
    import sys
    from pathlib import Path

    header = ('"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n')
    rows = ('"0","_forward_v2_kernel","Command line profiler metrics","dram__bytes_read.sum","Mbyte","40.50"\n'
            '"1","elementwise","Command line profiler metrics","dram__bytes_read.sum","Kbyte","500"\n')
    (tmp_path / "voc-os16-fused-triton.csv").write_text("==PROF== Connected to process\n" + header + rows)
    (tmp_path / "voc-os16-fused-triton.json").write_text(json.dumps(
        {"provider": "fused-triton", "preset": "voc-os16", "rates": [6, 12, 18], "x_bytes": 20_000_000,
         "weight_bytes": 10_000_000, "least_bytes": 30_000_000}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "hbm_bytes.py"
    target = tmp_path / "hbm_bytes.json"
    done = subprocess.run([sys.executable, str(script), "collect", str(tmp_path), str(target)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(target.read_text())
    assert row["dram_bytes_read"] == 41_000_000 and row["kernels"] == 2
    assert abs(row["over_least"] - 41 / 30) < 1e-9
    assert "1.37x x+weights" in done.stdout


def test_kernel_variant_providers_run_their_variant_and_say_where_they_cannot(monkeypatch):
    """fused-triton-v1 and fused-cuda-sm90 run the backend's other design / kernel family for their calls only,
    exist for the multi-rate op only, and fused-cuda-sm90 is skipped with the family's own reason on a GPU
    that cannot run it (never a fault, never another family in its place); fused-triton-unrolled runs the
    separable forward with its taps unrolled, and exists for the separable op only."""
    import torch

    from resaspp_ops import backend as backend_registry
    from resaspp_ops.backend import cuda as cuda_backend
    from resaspp_ops.bench import providers

    monkeypatch.delenv("RESASPP_CUDA_KERNEL", raising=False)
    with providers._variant_context("cuda", "sm90")():
        assert cuda_backend.requested_kernel() == "sm90"
    assert cuda_backend.requested_kernel() == "auto"
    gpu, bf16 = torch.device("cuda", 0), torch.bfloat16
    monkeypatch.setattr(backend_registry, "status", lambda *a, **k: backend_registry.BackendStatus(True, "test"))
    monkeypatch.setattr(cuda_backend, "sm90_built", lambda: True)
    monkeypatch.setattr(cuda_backend, "_capability", lambda index: (8, 0))
    why = providers.skip_reason("fused-cuda-sm90", gpu, bf16, True, "aspp", "module")
    assert why is not None and "sm90" in why and "sm_80" in why
    assert providers.skip_reason("fused-cuda", gpu, bf16, True, "aspp", "module") is None
    monkeypatch.setattr(cuda_backend, "_capability", lambda index: (9, 0))
    assert providers.skip_reason("fused-cuda-sm90", gpu, bf16, True, "aspp", "module") is None
    for provider in ("fused-cuda-sm90", "fused-triton-v1"):
        assert "multi_rate_conv2d only" in providers.skip_reason(provider, gpu, bf16, True, "separable", "module")
    why = providers.skip_reason("fused-triton-unrolled", gpu, bf16, True, "aspp", "module")
    assert "kernel variant of multi_rate_separable_conv2d only" in why
    configs = pytest.importorskip("resaspp_ops.backend.triton.configs")
    monkeypatch.delenv("RESASPP_TRITON_SEPARABLE_TAPS", raising=False)
    with providers._variant_context("triton", "taps-unrolled")():
        assert configs.separable_taps() == "unrolled"
    assert configs.separable_taps() == "loop"
