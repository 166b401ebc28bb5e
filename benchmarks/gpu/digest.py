"""A short digest of a GPU call's results, printed last so that the device tool's reply (the end of the
output) shows the numbers even before the files are read.

    python benchmarks/gpu/digest.py OUT_DIR

Reads OUT_DIR/results/*.json (the benchmark suite) and OUT_DIR/aspp_gpu_check.json (the independent check).
"""
import json
import sys
from pathlib import Path

SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def bench_lines(doc: dict) -> list[str]:
    meta = doc["meta"]
    lines = [f"bench: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, commit "
             f"{(meta.get('commit') or '?')[:12]}, bf16 matmul {doc['ceiling']['bf16_matmul_tflops'] or 0:.0f} "
             f"TFLOP/s, complete={meta.get('complete')}"]
    cases: dict = {}
    for row in doc["rows"]:
        cases.setdefault((row["level"], row["preset"], tuple(row["rates"]), row["dtype"], row["mode"]), []).append(row)
    for (level, preset, rates, dtype, mode), rows in cases.items():
        best = min((r for r in rows if r["median_ms"] is not None and not r["provider"].startswith("fused")),
                   key=lambda r: r["median_ms"], default=None)
        fused = [f"{r['provider'].removeprefix('fused-')} "
                 + (f"{r['speedup_vs_best_baseline']:.2f}x" if r["speedup_vs_best_baseline"] else
                    "WRONG" if r["correct"] is False else "-")
                 + (f" host {r['host_us']:.0f} us" if r.get("host_us") else "")
                 for r in rows if r["provider"].startswith("fused")]
        best_text = f"best {best['provider']} {best['median_ms']:.3f} ms" if best else "no baseline timed"
        if best and best.get("host_us"):
            best_text += f" host {best['host_us']:.0f} us"
        lines.append(f"  {level[:3]} {preset:15s} r{','.join(map(str, rates)):9s} {SHORT_DTYPE.get(dtype, dtype)} {mode:7s} "
                     f"{best_text:38s} | " + ", ".join(fused))
    return lines


def check_lines(doc: dict) -> list[str]:
    bad = [p for p in doc.get("parity", []) if not p["ok"]]
    lines = [f"check: {len(doc.get('parity', []))} parity rows, {len(bad)} bad"]
    lines += [f"  BAD {p['backend']} {p['dtype']} {p['shape']} r{p['rates']}: {p['err']}" for p in bad[:10]]
    lines += [f"  {t['preset']:22s} {t['mode']:8s} torchvision-cl {t['tv_ms']:.3f} ms, fused {t['fused_ms']:.3f} ms, "
              f"{t['speedup']:.2f}x" for t in doc.get("timing", [])]
    return lines


def main(argv) -> int:
    out = Path(argv[0]) if argv else Path(".")
    lines = []
    for path in sorted((out / "results").glob("*.json")):
        try:
            lines += bench_lines(json.loads(path.read_text()))
        except (KeyError, ValueError, TypeError) as exc:
            lines.append(f"bench: {path.name} unreadable ({type(exc).__name__}: {exc})")
    check = out / "aspp_gpu_check.json"
    if check.exists():
        try:
            lines += check_lines(json.loads(check.read_text()))
        except (KeyError, ValueError, TypeError) as exc:
            lines.append(f"check: unreadable ({type(exc).__name__}: {exc})")
    print("\n".join(lines) if lines else "digest: no results under " + str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
