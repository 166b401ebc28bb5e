"""SyncBatchNorm between depthwise and pointwise: the statistics pass all-reduces its moments, so two ranks with
half a batch each compute what one process computes on the whole batch (outputs, grads, running statistics)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from resaspp_ops import FusedDepthwiseSeparableASPP

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_module(sync: bool):
    """Mid BatchNorms training (batch statistics), every other BatchNorm frozen (SyncBatchNorm's own forward
    needs a GPU to synchronise; the mid ones never run their forward)."""
    torch.manual_seed(0)
    module = FusedDepthwiseSeparableASPP(6, (1, 3), 4).double()
    if sync:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            m.train("depthwise_conv" in name)
    return module


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 6, 7, 5, generator=g, dtype=torch.float64), torch.randn(4, 4, 7, 5, generator=g,
                                                                                 dtype=torch.float64)


def step(module, x, g):
    x = x.clone().requires_grad_(True)
    y = module(x)
    grads = torch.autograd.grad((y * g).sum(), [x] + list(module.parameters()))
    return y.detach(), list(grads), [b.clone() for b in module.buffers()]


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        module = make_module(sync=True)
        assert sum(isinstance(m, nn.SyncBatchNorm) and m.training for m in module.modules()) == 2
        x, g = make_data()
        shard = slice(rank * 2, rank * 2 + 2)
        y, grads, buffers = step(module, x[shard], g[shard])
        for t in grads[1:]:  # the parameters' grads summed over the ranks: the whole batch's loss
            dist.all_reduce(t)
        torch.save({"y": y, "grads": grads, "buffers": buffers}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, g = make_data()
    y, grads, buffers = step(make_module(sync=False), x, g)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["grads"][0] for r in ranks]), grads[0], rtol=1e-10, atol=1e-12)
    for rank in ranks:
        for a, b in zip(rank["grads"][1:], grads[1:]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(rank["buffers"], buffers):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    names = [n for n, _ in make_module(sync=False).named_buffers()]
    start = dict(make_module(sync=False).named_buffers())
    moved = [n for n, b in zip(names, buffers) if not torch.equal(b, start[n])]
    # Only the mid statistics move (the comparison is not vacuous), and they moved identically on both ranks.
    assert moved and all("depthwise_conv.bn" in n for n in moved)
