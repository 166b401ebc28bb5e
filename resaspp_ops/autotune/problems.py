"""The two op families as problems backend="auto" can measure: one call's validated inputs, its key in each
direction, a candidate's results in a direction, and the float64 results they are verified against.

A direction's results are named tensors:

    forward      out       [N, (1+B)*Co, H, W]
    input_grad   grad_x    [N, C, H, W]                     (the backend's backward with need_x only)
    weight_grad  grad_w1x1, grad_w3x3 (multi_rate_conv2d); grad_w1x1, grad_w_dw, grad_w_pw and the mid stage's
                 grad_mid_scale / grad_mid_shift where asked for (the separable op)

The backward directions take the grad before the epilogue (what a backend's backward takes), so their keys
leave the epilogue out.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from resaspp_ops import backend as _backend
from resaspp_ops.autotune.key import ProblemKey, device_label, layout
from resaspp_ops.backend import precision
from resaspp_ops.op_common import accumulation_dtype

# Activations, judged line by line too (error_rule.judge); sliced to the verified images.
ACTIVATIONS = ("out", "grad_x")
# The float64 check of the forward and the input grad (both per image) runs on the first images only where
# the batch is large: about this many multiply-adds at most (a few ms of float64 convolutions on a GPU).
VERIFY_MACS = 5e10


def _acc(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(accumulation_dtype(dtype))


def _to(t: Optional[Tensor], dtype: torch.dtype, images: Optional[int] = None) -> Optional[Tensor]:
    if t is None:
        return None
    return (t if images is None else t[:images]).to(dtype)


class _Problem:
    """What both families share; a subclass sets family and the tensors, and defines sizes() (N, C, H, W, Co),
    _flags, _options (the signature's share of the flags), _forward, _backward, _image_macs and _cast."""

    family: str
    x: Tensor
    rates: tuple

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def empty(self) -> bool:
        """Nothing to compute (an empty batch or map): nothing to measure."""
        return self.x.numel() == 0 or self.sizes()[4] == 0

    def _common_flags(self) -> tuple:
        flags = (layout(self.x),)
        if self.dtype == torch.float32 and self.device.type == "cuda":
            flags += ("tf32" if precision.tf32_convolutions() else "ieee",)
        return flags

    def key(self, direction: str) -> ProblemKey:
        n, c, h, w, co = self.sizes()
        return ProblemKey(device_label(self.device), self.family, direction, str(self.dtype).replace("torch.", ""),
                          n, c, h, w, co, len(self.rates), tuple(self.rates),
                          self._flags(direction) + self._common_flags())

    def signature(self) -> tuple:
        """What every direction's key depends on, cheaper to build than the keys (the plan memo's key, built
        at every plain eager call)."""
        x = self.x
        tf32 = precision.tf32_convolutions() if x.dtype == torch.float32 and x.device.type == "cuda" else None
        return (self.family, x.device, x.dtype, x.shape, x.stride(), self.rates, tf32) + self._options()

    def verified_images(self, direction: str) -> Optional[int]:
        """How many images the float64 check of this direction compares (None: all of them)."""
        if direction == "weight_grad":
            return None  # a sum over the batch
        n = self.x.shape[0]
        k = max(1, min(n, int(VERIFY_MACS // max(self._image_macs(), 1))))
        return None if k >= n else k

    def run(self, spec: str, direction: str, grad: Optional[Tensor] = None) -> dict:
        """The results of backend spec `spec` (e.g. "triton:v1") in `direction`, with its variant selected for
        this thread's call only."""
        module, variant = _backend.implementation(spec, self.family)
        with variant:
            if direction == "forward":
                return {"out": self._forward(module)}
            return self._backward(module, grad, direction)

    def reference64(self, direction: str, grad: Optional[Tensor] = None) -> dict:
        """The reference backend's results in float64 on the call's device, on the verified images."""
        images = self.verified_images(direction)
        problem = self._cast(torch.float64, images)
        module = _backend.get("reference", self.family)
        if direction == "forward":
            return {"out": problem._forward(module)}
        return problem._backward(module, _to(grad, torch.float64, images), direction)


class MultiRateProblem(_Problem):
    """multi_rate_conv2d(x, w1x1, w3x3, rates, scale, shift, relu) on validated inputs (ops.py's shapes)."""

    family = _backend.MULTI_RATE

    def __init__(self, x: Tensor, w1x1: Tensor, w3x3: Tensor, rates: tuple, scale: Optional[Tensor] = None,
                 shift: Optional[Tensor] = None, relu: bool = False) -> None:
        self.x, self.w1x1, self.w3x3, self.rates = x, w1x1, w3x3, tuple(rates)
        self.scale, self.shift, self.relu = scale, shift, relu

    def sizes(self):
        n, c, h, w = self.x.shape
        return n, c, h, w, self.w1x1.shape[0]

    def _image_macs(self) -> int:
        _, c, h, w, co = self.sizes()
        return h * w * co * c * (1 + 9 * len(self.rates))

    def _options(self) -> tuple:
        return self.w1x1.shape[0], self.scale is None, self.shift is None, self.relu

    def _flags(self, direction: str) -> tuple:
        if direction != "forward":
            return ()
        return tuple(name for name, on in (("scale", self.scale is not None), ("shift", self.shift is not None),
                                           ("relu", self.relu)) if on)

    def _cast(self, dtype: torch.dtype, images: Optional[int]) -> "MultiRateProblem":
        return MultiRateProblem(_to(self.x, dtype, images), self.w1x1.to(dtype), self.w3x3.to(dtype), self.rates,
                                _to(self.scale, dtype), _to(self.shift, dtype), self.relu)

    def _forward(self, module) -> Tensor:
        return module.forward(self.x, self.w1x1, self.w3x3, self.rates, _acc(self.scale, self.dtype),
                              _acc(self.shift, self.dtype), self.relu)

    def _backward(self, module, grad: Tensor, direction: str) -> dict:
        need_x = direction == "input_grad"
        gx, g1, g3 = module.backward(grad, self.x, self.w1x1, self.w3x3, self.rates, need_x, not need_x)
        return {"grad_x": gx} if need_x else {"grad_w1x1": g1, "grad_w3x3": g3}


class SeparableProblem(_Problem):
    """multi_rate_separable_conv2d(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu)
    on validated inputs (ops_separable.py's shapes). need_w / need_mid: what a weight-grad call computes (the
    pointwise and depthwise weights' grads, the mid stage's)."""

    family = _backend.SEPARABLE

    def __init__(self, x: Tensor, w1x1: Tensor, w_dw: Tensor, w_pw: Tensor, rates: tuple,
                 mid_scale: Optional[Tensor] = None, mid_shift: Optional[Tensor] = None, mid_relu: bool = False,
                 scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, relu: bool = False,
                 need_w: bool = True, need_mid: bool = False) -> None:
        self.x, self.w1x1, self.w_dw, self.w_pw, self.rates = x, w1x1, w_dw, w_pw, tuple(rates)
        self.mid_scale, self.mid_shift, self.mid_relu = mid_scale, mid_shift, mid_relu
        self.scale, self.shift, self.relu = scale, shift, relu
        self.need_w, self.need_mid = need_w, need_mid and (mid_scale is not None or mid_shift is not None)

    def sizes(self):
        n, c, h, w = self.x.shape
        return n, c, h, w, self.w1x1.shape[0]

    def _image_macs(self) -> int:
        _, c, h, w, co = self.sizes()
        b = len(self.rates)
        return h * w * (9 * b * c + (1 + b) * co * c)

    def _options(self) -> tuple:
        return (self.w1x1.shape[0], self.mid_scale is None, self.mid_shift is None, self.mid_relu, self.scale is None,
                self.shift is None, self.relu, self.need_w, self.need_mid)

    def _flags(self, direction: str) -> tuple:
        mid = (("mid_scale", self.mid_scale is not None), ("mid_shift", self.mid_shift is not None),
               ("mid_relu", self.mid_relu))
        if direction == "forward":
            named = mid + (("scale", self.scale is not None), ("shift", self.shift is not None), ("relu", self.relu))
        elif direction == "weight_grad":
            named = mid + (("weights", self.need_w), ("mid_grads", self.need_mid))
        else:
            named = mid
        return tuple(name for name, on in named if on)

    def _cast(self, dtype: torch.dtype, images: Optional[int]) -> "SeparableProblem":
        return SeparableProblem(_to(self.x, dtype, images), self.w1x1.to(dtype), self.w_dw.to(dtype),
                                self.w_pw.to(dtype), self.rates, _to(self.mid_scale, dtype),
                                _to(self.mid_shift, dtype), self.mid_relu, _to(self.scale, dtype),
                                _to(self.shift, dtype), self.relu, self.need_w, self.need_mid)

    def _forward(self, module) -> Tensor:
        d = self.dtype
        return module.forward(self.x, self.w1x1, self.w_dw, self.w_pw, self.rates, _acc(self.mid_scale, d),
                              _acc(self.mid_shift, d), self.mid_relu, _acc(self.scale, d), _acc(self.shift, d),
                              self.relu)

    def _backward(self, module, grad: Tensor, direction: str) -> dict:
        need_x = direction == "input_grad"
        need_w, need_mid = (False, False) if need_x else (self.need_w, self.need_mid)
        gx, g1, gdw, gpw, gms, gmt = module.backward(
            grad, self.x, self.w1x1, self.w_dw, self.w_pw, self.rates, _acc(self.mid_scale, self.dtype),
            _acc(self.mid_shift, self.dtype), self.mid_relu, need_x, need_w, need_mid)
        if need_x:
            return {"grad_x": gx}
        results = {"grad_w1x1": g1, "grad_w_dw": gdw, "grad_w_pw": gpw} if need_w else {}
        if need_mid:
            results.update({name: g for name, g, t in (("grad_mid_scale", gms, self.mid_scale),
                                                       ("grad_mid_shift", gmt, self.mid_shift)) if t is not None})
        return results
