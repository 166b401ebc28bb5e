"""Non-finite inputs for the NaN / Inf propagation tests (issue 22 item 7) and where they must show up.

A NaN in x at pixel p (any channel) reaches every output whose window reads p: the 1x1 branch at p itself,
a 3x3 branch of rate r at each q with q + d = p for one of its 9 taps d (inside the map), and there every
output channel of the branch, since each sums over all input channels. ReLU keeps it (torch.relu: NaN in,
NaN out); a kernel whose ReLU is fmaxf(v, 0) turns it into 0. A single +-Inf gives +-Inf there (times the
weight's sign), which ReLU maps to Inf or 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# (n, c, h, w, value): a NaN, a +Inf on the last channel (a channel tail of the K chunks) at a corner and a
# -Inf on an edge, far enough apart that no 3x3 window of the rates used reads two of them.
SPOTS = ((0, 5, 4, 6, float("nan")), (1, -1, 0, -1, float("inf")), (1, 17, -1, 0, float("-inf")))


def plant(x: torch.Tensor, spots=SPOTS) -> torch.Tensor:
    """A copy of x [N, C, H, W] (same layout) with the spots' values written in."""
    y = x.detach().clone()
    for n, c, h, w, v in spots:
        y[n, c % x.shape[1], h % x.shape[2], w % x.shape[3]] = v
    return y


def footprint(bad: torch.Tensor, rates, co: int) -> torch.Tensor:
    """bool [N, (1+B) Co, H, W]: the outputs whose window reads a pixel where bad [N, H, W] is set."""
    b = bad.to("cpu", torch.float64)[:, None]
    hits = [b] + [F.conv2d(b, torch.ones(1, 1, 3, 3, dtype=torch.float64), padding=r, dilation=r) for r in rates]
    return torch.cat([h.expand(-1, co, -1, -1) for h in hits], 1) > 0


def assert_same_nonfinite(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """NaN, +Inf and -Inf in exactly the same places."""
    got, ref = got.detach().cpu(), ref.detach().cpu()
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        a, b = test(got), test(ref)
        assert torch.equal(a, b), (f"{what}: {name} at {int((a & ~b).sum())} places the reference has none, "
                                   f"missing at {int((b & ~a).sum())}")
