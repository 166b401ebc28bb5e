"""FusedASPP against torchvision's ASPP; convert_aspp / revert_aspp."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50
from torchvision.models.segmentation.deeplabv3 import ASPP

import resaspp_ops
from resaspp_ops import FusedASPP, convert_aspp, revert_aspp
from utils import randomize_batchnorm

RATES = (2, 5, 11)



def twin_modules(c=12, rates=RATES, co=8, dtype=torch.float64, device="cpu"):
    tv = randomize_batchnorm(ASPP(c, list(rates), co)).to(device, dtype)
    fused = FusedASPP(c, rates, co).to(device, dtype)
    fused.load_state_dict(tv.state_dict())
    return tv, fused


def eval_twins():
    """(torchvision ASPP, FusedASPP with the same state, both in eval mode, an input), float64."""
    tv, fused = twin_modules()
    return tv.eval(), fused.eval(), torch.randn(2, 12, 7, 8, dtype=torch.float64)


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 12, 13, 9), (2, 12, 4, 4)], ids=["13x9", "4x4"])
def test_matches_torchvision_outputs_and_grads(device, train, shape):
    tv, fused = twin_modules(device=device)
    tv.train(train)
    fused.train(train)
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    outs, grads, stats = [], [], []
    for m in (tv, fused):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # the same dropout mask in train mode
        y = m(xi)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype).to(device)
        params = list(m.parameters())
        gs = torch.autograd.grad(y, [xi] + params, g)
        outs.append(y)
        grads.append(gs)
        stats.append([b.clone() for b in m.buffers()])
    assert rel_err(outs[1], outs[0]) < 1e-10
    names = ["x"] + [n for n, _ in tv.named_parameters()]
    for name, a, b in zip(names, grads[1], grads[0]):
        assert rel_err(a, b) < 1e-10, name
    for a, b in zip(stats[1], stats[0]):  # running statistics updated identically
        assert rel_err(a.double(), b.double()) < 1e-10


def test_frozen_batchnorm_finetuning_gets_bn_param_grads():
    """Eval-mode BN (folded into the epilogue) still passes grads to BN's weight and bias."""
    tv, fused = twin_modules()
    tv.eval()
    fused.eval()
    x = torch.randn(2, 12, 7, 8, dtype=torch.float64)
    gt = torch.autograd.grad(tv(x).square().sum(), list(tv.parameters()))
    gf = torch.autograd.grad(fused(x).square().sum(), list(fused.parameters()))
    for (name, _), a, b in zip(tv.named_parameters(), gf, gt):
        assert rel_err(a, b) < 1e-10, name


def test_state_dict_round_trip():
    tv = randomize_batchnorm(ASPP(16, [3, 6], 8))
    fused = FusedASPP(16, [3, 6], 8)
    assert list(fused.state_dict()) == list(tv.state_dict())
    fused.load_state_dict(tv.state_dict())
    tv2 = ASPP(16, [3, 6], 8)
    tv2.load_state_dict(fused.state_dict())
    for (k, a), (_, b) in zip(tv.state_dict().items(), tv2.state_dict().items()):
        assert torch.equal(a, b), k


def test_same_seed_same_initialisation():
    torch.manual_seed(0)
    tv = ASPP(8, [1, 2], 4)
    torch.manual_seed(0)
    fused = FusedASPP(8, [1, 2], 4)
    for (k, a), b in zip(tv.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), k


def test_batch_of_one_in_training_names_the_pooling_batchnorm():
    fused = FusedASPP(8, [1, 2], 4).train()
    with pytest.raises(ValueError, match=r"convs\.3\.2"):
        fused(torch.randn(1, 8, 5, 5))
    fused.convs[-1][2].eval()  # the documented way out
    assert fused(torch.randn(1, 8, 5, 5)).shape == (1, 4, 5, 5)


def test_wrong_input_channels():
    with pytest.raises(ValueError, match="built for 8 input channels, got 9"):
        FusedASPP(8, [1, 2], 4).eval()(torch.randn(2, 9, 5, 5))


def test_unknown_backend_rejected_at_construction():
    with pytest.raises(ValueError, match="unknown backend"):
        FusedASPP(8, [1, 2], 4, backend="cudnn")


def test_for_input_size():
    m = FusedASPP.for_input_size(16, 769, 8, out_channels=4)
    assert m.rates == (15, 30, 45)
    assert m.out_channels == 4


def test_sync_batchnorm_conversion_reaches_every_batchnorm():
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(FusedASPP(8, [1, 2], 4))
    bns = [m for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 5 and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert isinstance(fused, FusedASPP)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_convert_deeplabv3_end_to_end(train):
    torch.manual_seed(0)
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5).double()
    randomize_batchnorm(model.classifier)
    model.train(train)
    converted = convert_aspp(copy.deepcopy(model))
    assert isinstance(converted.classifier[0], FusedASPP)
    assert converted.training == train
    x = torch.randn(2, 3, 65, 81, dtype=torch.float64)
    outs = []
    for m in (model, converted):
        torch.manual_seed(1)  # the same dropout mask in train mode
        outs.append(m(x)["out"])
    assert rel_err(outs[1], outs[0]) < 1e-10
    for a, b in zip(converted.buffers(), model.buffers()):
        assert rel_err(a.double(), b.double()) < 1e-10


def test_convert_keeps_parameters_state_device_dtype():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), ASPP(8, [1, 2], 4)).double()
    model[1].convs[1][1].eval()  # a per-child mode that must survive
    params = {id(p) for p in model[1].parameters()}
    converted = convert_aspp(model)
    assert converted is model and isinstance(model[1], FusedASPP)
    assert {id(p) for p in model[1].parameters()} == params
    assert model[1].training and not model[1].convs[1][1].training
    assert all(p.dtype == torch.float64 for p in model[1].parameters())
    reverted = revert_aspp(model)
    assert isinstance(reverted[1], ASPP) and {id(p) for p in reverted[1].parameters()} == params


def test_convert_then_revert_same_outputs():
    torch.manual_seed(0)
    aspp = randomize_batchnorm(ASPP(8, [1, 3], 4)).double().eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    ref = aspp(x)
    fused = convert_aspp(copy.deepcopy(aspp))  # a top-level ASPP is returned replaced
    assert isinstance(fused, FusedASPP)
    assert rel_err(fused(x), ref) < 1e-10
    back = revert_aspp(fused)
    assert type(back) is ASPP and rel_err(back(x), ref) < 1e-12


class StructurallyASPP(nn.Module):
    """torchvision's ASPP structure under another class (as segmentation_models_pytorch's ASPP)."""

    def __init__(self, c, co, rates, dropout=0.1):
        super().__init__()
        mods = [nn.Sequential(nn.Conv2d(c, co, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU())]
        mods += [nn.Sequential(nn.Conv2d(c, co, 3, padding=r, dilation=r, bias=False), nn.BatchNorm2d(co), nn.ReLU())
                 for r in rates]
        mods.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, co, 1, bias=False), nn.BatchNorm2d(co),
                                  nn.ReLU()))
        self.convs = nn.ModuleList(mods)
        self.project = nn.Sequential(nn.Conv2d((2 + len(rates)) * co, co, 1, bias=False), nn.BatchNorm2d(co),
                                     nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x):
        h, w = x.shape[-2:]
        outs = [m(x) for m in self.convs[:-1]]
        outs.append(nn.functional.interpolate(self.convs[-1](x), size=(h, w), mode="bilinear", align_corners=False))
        return self.project(torch.cat(outs, 1))


def test_convert_accepts_structural_aspp():
    torch.manual_seed(0)
    m = randomize_batchnorm(StructurallyASPP(6, 4, [2, 4])).double().eval()
    x = torch.randn(2, 6, 8, 10, dtype=torch.float64)
    ref = m(x)
    wrapper = convert_aspp(nn.Sequential(m))
    assert isinstance(wrapper[0], FusedASPP) and wrapper[0].project[3].p == 0.1
    assert rel_err(wrapper(x), ref) < 1e-10


def test_convert_skips_other_structures_and_warns():
    model = nn.Sequential(nn.Conv2d(3, 3, 3))
    with pytest.warns(UserWarning, match="nothing was converted"):
        convert_aspp(model)
    m = StructurallyASPP(6, 4, [2])
    m.convs[1][0] = nn.Conv2d(6, 4, 3, padding=1, dilation=2, bias=False)  # padding != dilation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert_aspp(nn.Sequential(m))
    assert any("nothing was converted" in str(w.message) for w in caught)


def test_converted_module_uses_requested_backend():
    fused = convert_aspp(ASPP(8, [1, 2], 4), backend="reference")
    assert fused.backend == "reference"
    assert "rates=(1, 2)" in repr(fused)


def test_public_api():
    for name in resaspp_ops.__all__:
        assert hasattr(resaspp_ops, name), name


def test_inference_weight_cache_follows_weight_updates():
    """The no-grad stack of the atrous weights is rebuilt when a weight changes in place."""
    tv, fused, x = eval_twins()
    with torch.no_grad():
        assert rel_err(fused(x), tv(x)) < 1e-10
        for m in (tv, fused):
            m.convs[2][0].weight.mul_(-2.0)  # an optimizer step or load_state_dict does the same
        assert rel_err(fused(x), tv(x)) < 1e-10
        fused.load_state_dict(tv.state_dict())
        assert rel_err(fused(x), tv(x)) < 1e-10


def test_inference_cache_follows_batchnorm_and_projection_updates():
    """The folded epilogue and the projection's weight blocks, cached for inference, follow in-place updates of
    the running statistics, the BN affine parameters, eps and the projection weight."""
    tv, fused, x = eval_twins()
    updates = [
        lambda m: m.convs[1][1].running_mean.add_(0.5),
        lambda m: m.convs[0][1].running_var.mul_(3.0),
        lambda m: m.convs[3][1].weight.mul_(-1.0),
        lambda m: m.convs[2][1].bias.add_(1.0),
        lambda m: setattr(m.convs[1][1], "eps", 0.25),
        lambda m: m.project[0].weight.mul_(0.5),
    ]
    with torch.no_grad():
        assert rel_err(fused(x), tv(x)) < 1e-10
        for update in updates:
            for m in (tv, fused):
                update(m)
            assert rel_err(fused(x), tv(x)) < 1e-10


def test_inference_cache_follows_new_tensors_even_at_a_reused_address():
    """A new parameter tensor at the old one's address with the same version count (what .to() or .half()
    can produce when the allocator hands back freed memory) must not be taken for the old one: the cache
    keys on the tensor objects too. Built here on purpose: a new Parameter over the same storage, whose
    values change through .data (which moves no version counter)."""
    tv, fused, x = eval_twins()
    with torch.no_grad():
        fused.convs[1][0].weight = nn.Parameter(fused.convs[1][0].weight.data.clone())
        fused(x)  # caches the stack, keyed on this weight at version 0
        old = fused.convs[1][0].weight
        fused.convs[1][0].weight = nn.Parameter(old.data)  # same address, version 0
        fused.convs[1][0].weight.data.mul_(-1.0)
        tv.convs[1][0].weight.mul_(-1.0)
        assert fused.convs[1][0].weight.data_ptr() == old.data_ptr() and fused.convs[1][0].weight._version == 0
        del old
        assert rel_err(fused(x), tv(x)) < 1e-10


def test_module_with_a_filled_cache_pickles_and_copies():
    import io

    tv, fused, x = eval_twins()
    with torch.no_grad():
        y = fused(x)
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        copied = copy.deepcopy(fused)
        for m in (loaded, copied):
            assert torch.equal(m(x), y)
            m.convs[1][0].weight.mul_(-1.0)  # the copy's cache is its own
            assert not torch.equal(m(x), y)
        assert torch.equal(fused(x), y)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward_constructs_no_module(monkeypatch, train):
    """The hot path reads submodules through their containers' dicts: slicing a ModuleList or Sequential
    (convs[:-1], project[1:]) would build new containers on every call, more host time than a small map's work."""
    import contextlib

    fused = randomize_batchnorm(FusedASPP(8, (1, 2, 12), 8)).train(train)
    x = torch.randn(2, 8, 6, 6, requires_grad=train)
    fused(x)  # fills the inference caches
    built = []
    real_init = nn.Module.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__init__", counting_init)
    with contextlib.nullcontext() if train else torch.no_grad():
        y = fused(x)
        if train:
            y.sum().backward()
    assert built == []


def test_folded_inference_skips_no_hook():
    """Inference folds the pooling branch's and the projection's BatchNorms into weights, calling none of
    their modules; a forward hook on one of them keeps those modules called (and the result the same)."""
    tv, fused, x = eval_twins()
    seen = []
    with torch.no_grad():
        y_folded = fused(x)
        handle = fused.project[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
        y_hooked = fused(x)
        handle.remove()
        assert seen == [y_hooked.shape]
        assert rel_err(y_folded, tv(x)) < 1e-10 and rel_err(y_hooked, tv(x)) < 1e-10
