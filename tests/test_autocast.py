"""FusedASPP under torch.autocast computes as nn.Conv2d would (issue 7)."""
import pytest
import torch
from torchvision.models.segmentation.deeplabv3 import ASPP

from resaspp_ops import FusedASPP


def _check(device, dtype, train):
    torch.manual_seed(0)
    tv = ASPP(16, [1, 2, 3], 8).to(device).train(train)
    fused = FusedASPP(16, [1, 2, 3], 8).to(device).train(train)
    fused.load_state_dict(tv.state_dict())
    fused.project[3].p = tv.project[3].p = 0.0
    x = torch.randn(2, 16, 9, 10, device=device)
    with torch.autocast(device.type, dtype=dtype):
        y_tv, y_fused = tv(x), fused(x)
    assert y_fused.dtype == y_tv.dtype
    torch.testing.assert_close(y_fused.float(), y_tv.float(), rtol=5e-2, atol=5e-2)
    y_fused.float().square().mean().backward()
    for name, p in fused.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
    assert fused.convs[1][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_cpu_bfloat16(train):
    _check(torch.device("cpu"), torch.bfloat16, train)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_gpu(gpu_device, dtype, train):
    _check(gpu_device, dtype, train)
