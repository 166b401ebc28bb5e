"""HBM bytes read by one bf16 forward of a provider, for Nsight Compute: "one input read for all branches",
measured (DESIGN.md section 4).

    ncu --profile-from-start off --metrics dram__bytes_read.sum --csv --log-file OUT.csv \
        python benchmarks/gpu/hbm_bytes.py run PROVIDER PRESET OUT.json   # the profiled region: one forward
    python benchmarks/gpu/hbm_bytes.py collect DIR HBM.json             # DIR/*.csv + *.json -> HBM.json

PROVIDER: torchvision-eager-cl (torchvision's ASPP, channels_last), fused-triton (design v2), fused-triton-v1,
fused-cuda; the branch convolutions alone (level "branches"), eval, no grad. PRESET: a benchmark preset name.
The region is warmed up first (compiles, cuDNN's algorithm search), then profiled once between
cudaProfilerStart and Stop; `collect` sums dram__bytes_read over the region's kernels and sets it against the
bytes of x and of the weights (the least any implementation must read).
"""
import csv
import json
import sys
from pathlib import Path

import torch

PROVIDERS = ("torchvision-eager-cl", "fused-triton", "fused-triton-v1", "fused-cuda")


def _region(provider: str, preset_name: str):
    import torch.nn.functional as F

    import resaspp_ops
    from resaspp_ops.backend import triton as triton_backend
    from resaspp_ops.bench.presets import PRESETS

    p = PRESETS[preset_name]
    rates = p.rate_sets["default"]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(p.n, p.c, p.h, p.w, device=dev, dtype=torch.bfloat16, generator=g).contiguous(
        memory_format=torch.channels_last)
    w1 = torch.randn(p.co, p.c, 1, 1, device=dev, dtype=torch.bfloat16, generator=g)
    w3 = torch.randn(len(rates), p.co, p.c, 3, 3, device=dev, dtype=torch.bfloat16, generator=g)
    if provider == "torchvision-eager-cl":
        w1c = w1.contiguous(memory_format=torch.channels_last)
        w3c = [w.contiguous(memory_format=torch.channels_last) for w in w3]

        def fn():
            return torch.cat([F.conv2d(x, w1c)] + [F.conv2d(x, w, padding=r, dilation=r) for w, r in zip(w3c, rates)], 1)
    else:
        backend = {"fused-triton": "triton", "fused-triton-v1": "triton", "fused-cuda": "cuda"}[provider]
        version = "v1" if provider == "fused-triton-v1" else "v2"

        def fn():
            with triton_backend.use_kernel_version(version):
                return resaspp_ops.multi_rate_conv2d(x, w1, w3, rates, backend=backend)
    least = (x.numel() + w1.numel() + w3.numel()) * x.element_size()  # x and the weights, once
    return fn, {"provider": provider, "preset": preset_name, "rates": list(rates), "x_bytes": x.numel() * 2,
                "weight_bytes": (w1.numel() + w3.numel()) * 2, "least_bytes": least}


def run(provider: str, preset: str, info_path: str) -> int:
    fn, info = _region(provider, preset)
    with torch.no_grad():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    Path(info_path).write_text(json.dumps(info) + "\n")
    return 0


def _dram_bytes(csv_path: Path) -> tuple[int, int]:
    """(bytes, kernels): dram__bytes_read.sum over the kernels ncu reported, in bytes."""
    lines = [ln for ln in csv_path.read_text().splitlines() if ln.startswith('"')]
    total = kernels = 0
    unit_scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "dram__bytes_read.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        total += int(value * unit_scale.get(row.get("Metric Unit", "byte"), 1))
        kernels += 1
    return total, kernels


def collect(directory: str, target: str) -> int:
    out = Path(directory)
    rows = []
    for info_path in sorted(out.glob("*.json")):
        info = json.loads(info_path.read_text())
        csv_path = info_path.with_suffix(".csv")
        if not csv_path.exists():
            info["error"] = "no ncu report"
        else:
            info["dram_bytes_read"], info["kernels"] = _dram_bytes(csv_path)
            info["over_least"] = info["dram_bytes_read"] / info["least_bytes"]
        rows.append(info)
    Path(target).write_text(json.dumps(rows, indent=1) + "\n")
    for r in rows:
        print(f"hbm: {r['preset']:15s} {r['provider']:22s} "
              + (f"{r['dram_bytes_read'] / 2**20:8.1f} MiB read, {r['over_least']:.2f}x x+weights, {r['kernels']} kernels"
                 if "dram_bytes_read" in r else r.get("error", "?")))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "run":
        sys.exit(run(sys.argv[2], sys.argv[3], sys.argv[4]))
    if len(sys.argv) == 4 and sys.argv[1] == "collect":
        sys.exit(collect(sys.argv[2], sys.argv[3]))
    print(__doc__, file=sys.stderr)
    sys.exit(2)
