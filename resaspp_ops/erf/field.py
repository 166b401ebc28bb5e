"""The effective receptive field of a segmentation model (the paper's Eq. 1, DESIGN.md section 2).

    y_c = sum over classes k of f(x)[k, H_out // 2, W_out // 2]      the central output unit
    g   = sum over input channels of d y_c / d x                      [H, W] per image
    ERF = sum over images x of ReLU(g)
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


def _progress(images, enabled: bool):
    """Wrap `images` in a tqdm bar when asked and tqdm is installed (it is optional)."""
    if not enabled:
        return images
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return images
    total = len(images) if hasattr(images, "__len__") else None
    return tqdm(images, total=total, desc="ERF", unit="batch")


def _logits(output) -> Tensor:
    """[N, K, H, W] logits from a model's output: a tensor, or a dict with "out" (torchvision)."""
    if isinstance(output, dict):
        if "out" not in output:
            raise TypeError(f"the model returned a dict without an 'out' entry (keys: {sorted(output)})")
        output = output["out"]
    if not isinstance(output, Tensor) or output.dim() != 4:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise TypeError(f"expected [N, K, H, W] logits from the model, got {shape}")
    return output


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def image_gradient(model: nn.Module, batch: Tensor) -> Tensor:
    """ReLU(sum_c d y_c / d x) for every image of `batch` [N, 3, H, W] -> [N, H, W] (model already in eval mode).

    The per-image y_c are summed over the batch before one backward pass: in eval mode images do not
    interact, so d(sum_i y_c,i) / d x_i is image i's own gradient, and ReLU is applied per image.
    """
    x = batch.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = _logits(model(x))
        h, w = logits.shape[2] // 2, logits.shape[3] // 2
        y_c = logits[:, :, h, w].sum()
        (grad,) = torch.autograd.grad(y_c, x)  # only w.r.t. the input: parameters' .grad stay untouched
    return grad.sum(1).clamp_min(0)


def effective_receptive_field(model: nn.Module, images: Iterable[Tensor], *, progress: bool = True) -> Tensor:
    """The ERF of `model` over `images`: a float32 CPU tensor [H, W] (H, W of the input images).

    Args:
        model: maps [N, 3, H, W] to [N, K, H', W'] logits, or to a dict whose "out" entry is those
            logits (torchvision's segmentation models). It runs in eval mode; its previous
            train/eval state is restored afterwards. FusedASPP works on every backend (the gradient
            goes through the fused op's autograd).
        images: any iterable of [N, 3, H, W] batches or [3, H, W] images (a list, a DataLoader
            yielding tensors or (image, target) pairs), all of one H x W. They are moved to the
            model's device and dtype.
        progress: show a tqdm progress bar (when tqdm is installed).
    """
    device, dtype = _model_device_dtype(model)
    modes = {m: m.training for m in model.modules()}  # restore each submodule's own mode afterwards
    model.eval()
    erf = None
    try:
        for batch in _progress(images, progress):
            if isinstance(batch, (tuple, list)):  # (image, target) pairs from a DataLoader
                batch = batch[0]
            if not isinstance(batch, Tensor) or batch.dim() not in (3, 4):
                shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
                raise ValueError(f"expected [N, 3, H, W] or [3, H, W] image tensors, got {shape}")
            if batch.dim() == 3:
                batch = batch.unsqueeze(0)
            if batch.shape[0] == 0:
                continue
            if erf is not None and batch.shape[2:] != erf.shape:
                raise ValueError(f"all images must have one size: got {tuple(batch.shape[2:])} after "
                                 f"{tuple(erf.shape)}")
            grad = image_gradient(model, batch.to(device=device, dtype=dtype)).sum(0)
            # accumulate in float64 so that many images do not lose the small off-centre values
            erf = grad.double() if erf is None else erf + grad.double()
    finally:
        for m, training in modes.items():
            m.training = training
    if erf is None:
        raise ValueError("effective_receptive_field got no images")
    return erf.float().cpu()
