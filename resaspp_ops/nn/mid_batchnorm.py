"""A BatchNorm between depthwise and pointwise as the separable op's mid stage (mid_scale, mid_shift [B*C]).

Eval mode (running statistics): the BatchNorm folds into a per-channel affine (cached for inference).
Training mode (or no running statistics): batch statistics. The statistics pass (ops_separable.
depthwise_moments) recomputes the depthwise outputs and returns their per-channel sum and sum of squares;
for a training SyncBatchNorm in a process group of more than one rank they are all-reduced with the element
count (a differentiable all-reduce, so each rank's grads see the global statistics, as SyncBatchNorm's own
backward does). Then mean = sum / n and the biased variance = sum of squares / n - mean^2 give

    mid_scale = weight / sqrt(var + eps),    mid_shift = bias - mean * mid_scale

as differentiable functions of x and the depthwise weights: the op's grads of mid_scale and mid_shift flow
back through the statistics to x, the depthwise weights and the BatchNorm's weight and bias, which is
exactly the BatchNorm's training-mode backward. The running statistics (and num_batches_tracked, with
momentum=None's cumulative average) are updated as BatchNorm's forward updates them: with the unbiased
variance var * n / (n - 1).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from resaspp_ops.nn.inference_cache import InferenceCache, batchnorm_eps, batchnorm_tensors, fold_batchnorm, folds
from resaspp_ops.ops_separable import depthwise_moments


def _sync_group(bns: list):
    """The process group the training SyncBatchNorms among `bns` reduce over, or None (no sync here)."""
    syncing = [bn for bn in bns if isinstance(bn, nn.SyncBatchNorm) and bn.training]
    if not syncing or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    groups = {id(bn.process_group): bn.process_group for bn in syncing}
    if len(groups) > 1:
        raise ValueError("the mid SyncBatchNorms of one separable ASPP use different process groups; "
                         "give them one (nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group))")
    group = next(iter(groups.values())) or torch.distributed.group.WORLD
    return group if torch.distributed.get_world_size(group) > 1 else None


def _batch_moments(x: Tensor, w_dw: Tensor, rates, bns: list, backend: str) -> tuple[Tensor, Tensor, list]:
    """(sum, sum of squares [B*C] in the accumulation dtype, each branch's element count n)."""
    s, ss = depthwise_moments(x, w_dw, rates, backend=backend)
    count = float(x.shape[0] * x.shape[2] * x.shape[3])
    group = _sync_group(bns)
    if group is not None:
        import torch.distributed.nn.functional as dist_fn

        global_moments = dist_fn.all_reduce(torch.stack([s, ss]), group=group)
        total = torch.tensor([count], dtype=torch.float64, device=x.device)
        torch.distributed.all_reduce(total, group=group)
        c = x.shape[1]
        synced = [isinstance(bn, nn.SyncBatchNorm) and bn.training for bn in bns]
        # Branches with a training SyncBatchNorm take the global moments, the others their own.
        keep = torch.tensor([g for g in synced for _ in range(c)], device=x.device)
        s, ss = torch.where(keep, global_moments[0], s), torch.where(keep, global_moments[1], ss)
        return s, ss, [float(total) if g else count for g in synced]
    return s, ss, [count] * len(bns)


def _update_running_statistics(bn: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor, n: float) -> None:
    """As BatchNorm's training forward: num_batches_tracked += 1, then the running statistics move by the
    momentum (1 / num_batches_tracked where momentum is None) towards the batch mean and unbiased variance."""
    with torch.no_grad():
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        unbiased = var * (n / (n - 1))
        bn.running_mean.copy_((1 - factor) * bn.running_mean + factor * mean.to(bn.running_mean.dtype))
        bn.running_var.copy_((1 - factor) * bn.running_var + factor * unbiased.to(bn.running_var.dtype))


def _batch_affine(bn, s: Tensor, ss: Tensor, n: float) -> tuple[Tensor, Tensor]:
    """(scale, shift) [C] of a BatchNorm normalising with these batch moments; updates its running statistics."""
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)} (a BatchNorm between "
                         "depthwise and pointwise of a separable ASPP)")
    mean = s / n
    var = (ss / n - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises with
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        _update_running_statistics(bn, mean.detach(), var.detach(), n)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(scale.dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(shift.dtype)
    return scale, shift


def mid_affine(x: Tensor, w_dw: Tensor, rates, bns: list, cache: InferenceCache, backend: str
               ) -> tuple[Tensor, Tensor]:
    """(mid_scale, mid_shift) [B*C] for the B mid BatchNorms of x [N, C, H, W] and w_dw [B, C, 1, 3, 3]."""
    if all(folds(bn) for bn in bns):
        def fold() -> tuple[Tensor, Tensor]:
            scales, shifts = zip(*(fold_batchnorm(bn) for bn in bns))
            return torch.cat(scales), torch.cat(shifts)

        inputs = [t for bn in bns for t in batchnorm_tensors(bn)]
        return cache.get("mid", inputs, fold, batchnorm_eps(bns))
    s, ss, counts = _batch_moments(x, w_dw, rates, bns, backend)
    c = x.shape[1]
    scales, shifts = [], []
    for i, bn in enumerate(bns):
        if folds(bn):
            scale, shift = fold_batchnorm(bn)
        else:
            scale, shift = _batch_affine(bn, s[i * c:(i + 1) * c], ss[i * c:(i + 1) * c], counts[i])
        scales.append(scale.to(s.dtype))
        shifts.append(shift.to(s.dtype))
    return torch.cat(scales), torch.cat(shifts)
