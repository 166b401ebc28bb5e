"""DistributedDataParallel and SyncBatchNorm with FusedASPP, on PyTorch's own engine (issue 7)."""
import copy
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from resaspp_ops import FusedASPP

WORLD = 2
STEPS = 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model():
    """conv stem + FusedASPP + classifier, with every BatchNorm frozen (fine-tuning style), no dropout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), FusedASPP(12, [1, 2, 4], 8, dropout=0.0), nn.Conv2d(8, 4, 1))
    model = model.double().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 10, 12, generator=g, dtype=torch.float64), torch.randn(4, 4, 10, 12, generator=g, dtype=torch.float64)


def train(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def _worker(rank, port, out_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        x, y = make_data()
        shard = slice(rank * 2, rank * 2 + 2)
        train(model, x[shard], y[shard])
        if rank == 0:
            torch.save(model.module.state_dict(), out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process_with_frozen_batchnorm(tmp_path):
    out_path = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(_free_port(), out_path), nprocs=WORLD, join=True)
    ddp_state = torch.load(out_path)
    single = train(make_model(), *make_data()).state_dict()
    start = make_model().state_dict()
    moved = False
    for k, v in single.items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-10, atol=1e-12, msg=k)
        moved |= not torch.equal(v, start[k])
    assert moved, "training changed nothing: the comparison would be vacuous"


def test_sync_batchnorm_conversion_of_a_model_with_fused_aspp():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(FusedASPP(8, [1, 2], 4)))
    fused = model[0]
    assert isinstance(fused, FusedASPP)
    bns = [m for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 2 + 2 + 1 and all(type(m) is nn.SyncBatchNorm for m in bns)


@pytest.mark.cuda
def test_sync_batchnorm_trains_under_ddp_on_gpu(gpu_device, monkeypatch):
    """One NCCL process: SyncBatchNorm in FusedASPP's training path runs forward and backward under DDP.

    (With one process SyncBatchNorm computes its statistics locally, as BatchNorm2d does: this checks that
    the converted model runs and trains on a GPU under DDP, not the statistics exchange itself.)"""
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    if dist.is_initialized():  # a process group left behind would make init raise, and hide this test's result
        dist.destroy_process_group()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.cuda.set_device(gpu_device)
    # A bounded wait: a stuck collective fails the test instead of eating the whole GPU session.
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))
    try:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(make_model()).float().train()).to(gpu_device)
        assert any(isinstance(m, nn.SyncBatchNorm) and m.training for m in model.modules())
        model = nn.parallel.DistributedDataParallel(model, device_ids=[gpu_device.index])
        x, y = (t.float().to(gpu_device) for t in make_data())
        before = [p.detach().clone() for p in model.parameters()]
        train(model, x, y)
        torch.cuda.synchronize(gpu_device)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    finally:
        dist.destroy_process_group()
