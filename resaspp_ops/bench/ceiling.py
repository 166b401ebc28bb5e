"""The device's bf16 matmul rate, measured in the same run: the ceiling TFLOP/s are read against."""
from __future__ import annotations

import torch

from resaspp_ops.bench.timing import TimingSettings, time_step

# Square bf16 GEMM sizes: large enough to reach the tensor cores' sustained rate on a GPU, small
# enough to finish in well under a second on a laptop CPU.
MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}


def bf16_matmul_tflops(device: torch.device, settings: TimingSettings) -> float:
    """TFLOP/s (2 * n^3 flops per product) of an n x n x n bf16 matmul, median over timed steps."""
    n = MATMUL_SIZE.get(device.type, 1024)
    g = torch.Generator(device=device).manual_seed(3)
    operands = [(torch.randn(n, n, generator=g, device=device, dtype=torch.bfloat16),
                 torch.randn(n, n, generator=g, device=device, dtype=torch.bfloat16)) for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)

    def step(i: int) -> None:
        a, b = operands[i % len(operands)]
        torch.mm(a, b, out=out)

    timing = time_step(step, device, settings)
    return 2 * n ** 3 / (timing.median_ms * 1e-3) / 1e12
