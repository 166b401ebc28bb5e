"""The performance model of the sm_90a kernels (csrc/sm90_*.cu) on DeepLab's presets, from the very plans
the kernels launch (resaspp_ops.backend.sm90_plan): programs, waves, MMA work, operand bytes, predicted
times and the ratio to cuDNN. Its output is what benchmarks/NOTES.md records before the first GPU run.

    python benchmarks/sm90_model.py [--sms 132]

Model (every rate an assumption, named in the output):
- a K step is one stage: 128 x 256 x 64 MACs (m64n256k16 x 4 per consumer warpgroup) and the stage's TMA
  bytes from L2; a program spends max(MMA time, L2 time) on it, plus one step's time per job for the
  epilogue (the two consumer warpgroups store while the producer refills the ring);
- MMA: the measured-elsewhere bf16 matmul rate (~790 TFLOP/s dense on H100/H200, 80% of peak) shared
  evenly by the SMs; L2 -> SM: 5.5 (low) to 10 (high) TB/s for the whole chip;
- a kernel's time is its slowest program's sum (the static queues cannot rebalance) plus 5 us of launch
  and ramp; cuDNN runs the 1 + B convolutions densely (padding taps included) at 50-75% of the matmul
  rate.
"""
from __future__ import annotations

import argparse

from resaspp_ops.backend import jobs as J
from resaspp_ops.backend import sm90_plan as P

PRESETS = [("voc-os16", 8, 2048, 256, 33, 33, (6, 12, 18)),
           ("voc-os8", 4, 2048, 256, 65, 65, (12, 24, 36)),
           ("cityscapes-os8", 2, 2048, 256, 97, 97, (12, 24, 36))]
MATMUL_FLOPS = 790e12
L2_BW = (5.5e12, 10e12)
CUDNN_EFF = (0.50, 0.75)
LAUNCH_S = 5e-6
STEP_MACS = 128 * 256 * 64


def kernel_model(p: P.Sm90Plan, sms: int) -> dict:
    step_s_mma = 2 * STEP_MACS / (MATMUL_FLOPS / sms)
    stage = p.stage_bytes()
    per_prog = []
    off, order = p.queues[: p.programs + 1], p.queues[p.programs + 1:]
    steps_total = 0
    for g in range(p.programs):
        steps = sum(p.job_steps(int(order[q])) for q in range(off[g], off[g + 1]))
        jobs = int(off[g + 1] - off[g])
        steps_total += steps
        per_prog.append((steps, jobs))
    times = []
    for bw in L2_BW:
        step_s = max(step_s_mma, stage / (bw / sms))
        times.append(max(((s + j) * step_s for s, j in per_prog), default=0.0) + LAUNCH_S)
    mean = sum(s + j for s, j in per_prog) / max(len(per_prog), 1)
    worst = max((s + j for s, j in per_prog), default=0)
    return {"jobs": int(p.jobs.shape[0]), "programs": p.programs, "waves": p.jobs.shape[0] / sms,
            "steps": steps_total, "mma_flop": 2 * STEP_MACS * steps_total, "l2_bytes": stage * steps_total,
            "stage_bytes": stage, "imbalance": worst / mean if mean else 1.0,
            "time_s": (max(times), min(times)), "l2_bound": stage / (L2_BW[0] / sms) > step_s_mma}


def dense_flop(n, c, co, h, w, rates) -> float:
    return 2.0 * n * h * w * co * c * (1 + 9 * len(rates))


def useful_flop(n, c, co, h, w, rates) -> float:
    taps = n * h * w * (1 + sum(J.popcount(J.live_taps(h, w, y, y + 1, x, x + 1, r))
                                for r in rates for y in range(h) for x in range(w)) / (h * w))
    return 2.0 * co * c * taps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sms", type=int, default=132)
    args = ap.parse_args(argv)
    print(f"rates assumed: MMA {MATMUL_FLOPS / 1e12:.0f} TFLOP/s bf16 over {args.sms} SMs, L2->SM "
          f"{L2_BW[0] / 1e12:.1f}-{L2_BW[1] / 1e12:.0f} TB/s, cuDNN at {CUDNN_EFF[0]:.0%}-{CUDNN_EFF[1]:.0%} of the "
          f"matmul rate on dense FLOPs, {LAUNCH_S * 1e6:.0f} us launch; wgmma m64n256k16 everywhere")
    print("| preset | kernel | tile x stack | jobs | programs | waves | imbalance | K steps | stage KiB | "
          "L2->SM GB | MMA GFLOP | bound | predicted ms | cuDNN ms (model) | ratio to cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, n, c, co, h, w, rates in PRESETS:
        dense = dense_flop(n, c, co, h, w, rates)
        cudnn = tuple(dense / (MATMUL_FLOPS * e) for e in CUDNN_EFF[::-1])  # (fast, slow)
        for kind in ("forward", "dgrad", "wgrad"):
            p = P.plan(kind, n, c, co, h, w, rates, args.sms)
            m = kernel_model(p, args.sms)
            t_hi, t_lo = m["time_s"]
            ratio = (cudnn[0] / t_hi, cudnn[1] / t_lo)
            t = p.tiles
            print(f"| {name} | {kind} | {t.tile_h}x{t.tile_w} x{t.stack} | {m['jobs']} | {m['programs']} | "
                  f"{m['waves']:.2f} | {m['imbalance']:.2f} | {m['steps']} | {m['stage_bytes'] / 1024:.0f} | "
                  f"{m['l2_bytes'] / 1e9:.2f} | {m['mma_flop'] / 1e9:.0f} | {'L2' if m['l2_bound'] else 'MMA'} | "
                  f"{t_lo * 1e3:.2f}-{t_hi * 1e3:.2f} | {cudnn[0] * 1e3:.2f}-{cudnn[1] * 1e3:.2f} | "
                  f"{ratio[0]:.2f}-{ratio[1]:.2f}x |")
        print(f"| {name} | (dense {dense / 1e9:.0f} GFLOP, useful {useful_flop(n, c, co, h, w, rates) / 1e9:.0f}) "
              "| | | | | | | | | | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
