"""FusedSeparableASPP against smp's separable ASPP, FusedDepthwiseSeparableASPP against mmsegmentation's structure
(BN + ReLU between depthwise and pointwise), in float64: outputs, every grad, running statistics, train and eval."""
import contextlib
import copy

import pytest
import torch
from torch import nn

from resaspp_ops import FusedDepthwiseSeparableASPP, FusedSeparableASPP
from separable_models import MMSegASPP, smp_separable_aspp
from utils import randomize_batchnorm

pytest.importorskip("segmentation_models_pytorch", reason="the test extra installs segmentation-models-pytorch")

RATES = (2, 5, 11)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def smp_twins(c=12, co=8, rates=RATES, device="cpu"):
    source = randomize_batchnorm(smp_separable_aspp(c, rates, co)).to(device, torch.float64)
    fused = FusedSeparableASPP(c, rates, co, dropout=0.0).to(device, torch.float64)
    fused.load_state_dict(source.state_dict())
    return source, fused


def mmseg_twins(c=6, co=4, rates=RATES, momentum=0.1, device="cpu"):
    source = randomize_batchnorm(MMSegASPP(c, rates, co)).to(device, torch.float64)
    fused = FusedDepthwiseSeparableASPP(c, rates, co).to(device, torch.float64)
    fused.load_state_dict(source.state_dict())
    for m in list(source.modules()) + list(fused.modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return source, fused


def run_step(module, x, seed=1):
    """(output, grads of x and of every parameter, buffers after the step) of sum(out * g)."""
    xi = x.clone().requires_grad_(True)
    y = module(xi)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype).to(x.device)
    grads = torch.autograd.grad(y, [xi] + list(module.parameters()), g)
    return y, grads, [b.clone() for b in module.buffers()]


def assert_twins_agree(source, fused, x, steps=1, tol=1e-10):
    names = ["x"] + [n for n, _ in source.named_parameters()]
    buffer_names = [n for n, _ in source.named_buffers()]
    assert buffer_names == [n for n, _ in fused.named_buffers()]
    for step in range(steps):
        (ys, gs, bs), (yf, gf, bf) = run_step(source, x, step), run_step(fused, x, step)
        assert rel_err(yf, ys) < tol, f"step {step} output"
        for name, a, b in zip(names, gf, gs):
            assert rel_err(a, b) < tol, f"step {step} grad of {name}"
        for name, a, b in zip(buffer_names, bf, bs):
            assert torch.equal(a, b) if name.endswith("num_batches_tracked") else rel_err(a, b) < tol, \
                f"step {step} buffer {name}"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 12, 13, 9), (2, 12, 4, 4)], ids=["13x9", "4x4"])
def test_smp_separable_aspp_outputs_grads_and_statistics(device, train, shape):
    source, fused = smp_twins(device=device)
    source.train(train)
    fused.train(train)
    assert_twins_agree(source, fused, torch.randn(*shape, dtype=torch.float64, device=device), steps=2)


@pytest.mark.parametrize("mode", ["train", "eval", "frozen-mid", "frozen-branches"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_bn_between_outputs_grads_and_statistics(device, mode, momentum):
    """Training: the mid BatchNorms normalise with batch statistics from the statistics pass; the grads flow
    through them to x, the depthwise weights and the BN's weight and bias exactly as in the unfused module, and
    the running statistics move as BatchNorm moves them (momentum, and momentum=None's cumulative average).
    frozen-mid: mid BNs in eval (folded), the rest training; frozen-branches: the other way round."""
    source, fused = mmseg_twins(momentum=momentum, device=device)
    for m in (source, fused):
        m.train(mode != "eval")
        for name, bn in m.named_modules():
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            mid = "depthwise_conv" in name
            if (mode == "frozen-mid" and mid) or (mode == "frozen-branches" and not mid):
                bn.eval()
    # 4x7 with rate 5 and 11: the branches lose vertical taps, one only its centre
    assert_twins_agree(source, fused, torch.randn(2, 6, 4, 7, dtype=torch.float64, device=device), steps=2)


def test_bn_between_without_affine_or_running_statistics():
    source, fused = mmseg_twins()
    for m in (source, fused):
        m.aspp_modules[1].depthwise_conv.bn = nn.BatchNorm2d(6, affine=False, track_running_stats=False).double()
        m.aspp_modules[2].depthwise_conv.bn = nn.BatchNorm2d(6, affine=False).double()
    for train in (True, False):
        source.train(train)
        fused.train(train)
        assert_twins_agree(source, fused, torch.randn(2, 6, 5, 5, dtype=torch.float64))


def test_bn_between_batch_statistics_need_more_than_one_value():
    source, fused = mmseg_twins()
    fused.train()
    fused.image_pool[1].bn.eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 6, 1, 1, dtype=torch.float64))


def test_state_dict_round_trips():
    source = randomize_batchnorm(smp_separable_aspp(16, (3, 6, 9), 8))
    fused = FusedSeparableASPP(16, (3, 6, 9), 8)
    assert list(fused.state_dict()) == list(source.state_dict())
    fused.load_state_dict(source.state_dict())
    back = smp_separable_aspp(16, (3, 6, 9), 8)
    back.load_state_dict(fused.state_dict())
    for (k, a), b in zip(source.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    mm = randomize_batchnorm(MMSegASPP(16, (3, 6), 8))
    fused_mm = FusedDepthwiseSeparableASPP(16, (3, 6), 8)
    assert list(fused_mm.state_dict()) == list(mm.state_dict())
    assert "aspp_modules.1.depthwise_conv.bn.running_var" in fused_mm.state_dict()
    fused_mm.load_state_dict(mm.state_dict())
    back_mm = MMSegASPP(16, (3, 6), 8)
    back_mm.load_state_dict(fused_mm.state_dict())
    for (k, a), b in zip(mm.state_dict().items(), back_mm.state_dict().values()):
        assert torch.equal(a, b), k


def test_same_seed_same_initialisation_as_smp():
    torch.manual_seed(0)
    source = smp_separable_aspp(8, (1, 2, 3), 4)
    torch.manual_seed(0)
    fused = FusedSeparableASPP(8, (1, 2, 3), 4)
    for (k, a), b in zip(source.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), k


def test_submodules_are_real_and_sync_batchnorm_convertible():
    cases = ((FusedSeparableASPP(8, (1, 2, 3), 4), 6, 9), (FusedDepthwiseSeparableASPP(8, (1, 2), 4), 7, 7))
    for module, n_bns, n_convs in cases:
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        assert type(converted) is type(module)
        bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(bns) == n_bns and all(type(m) is nn.SyncBatchNorm for m in bns)
        assert sum(type(m) is nn.Conv2d for m in converted.modules()) == n_convs


@pytest.mark.parametrize("cls", [FusedSeparableASPP, FusedDepthwiseSeparableASPP])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward_constructs_no_module(monkeypatch, cls, train):
    """The hot path reads submodules through their containers' dicts: no ModuleList / Sequential slicing."""
    module = randomize_batchnorm(cls(8, (1, 2, 12), 8)).train(train)
    x = torch.randn(2, 8, 6, 6, requires_grad=train)
    module(x)  # fills the inference caches
    built = []
    real_init = nn.Module.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__init__", counting_init)
    with contextlib.nullcontext() if train else torch.no_grad():
        y = module(x)
        if train:
            y.sum().backward()
    assert built == []


def test_batch_of_one_in_training_names_the_pooling_batchnorm():
    smp_module = FusedSeparableASPP(8, (1, 2, 3), 4).train()
    with pytest.raises(ValueError, match=r"convs\.4\.2"):
        smp_module(torch.randn(1, 8, 5, 5))
    smp_module.convs[-1][2].eval()
    assert smp_module(torch.randn(1, 8, 5, 5)).shape == (1, 4, 5, 5)
    mm = FusedDepthwiseSeparableASPP(8, (1, 2), 4).train()
    with pytest.raises(ValueError, match=r"image_pool\.1\.bn"):
        mm(torch.randn(1, 8, 5, 5))


def test_input_and_construction_errors(monkeypatch):
    with pytest.raises(ValueError, match="built for 8 input channels, got 9"):
        FusedSeparableASPP(8, (1, 2, 3), 4).eval()(torch.randn(2, 9, 5, 5))
    with pytest.raises(ValueError, match="4-D input"):
        FusedDepthwiseSeparableASPP(8, (1, 2), 4).eval()(torch.randn(8, 5, 5))
    from resaspp_ops import backend as backend_registry

    monkeypatch.setitem(backend_registry.FAMILIES, backend_registry.SEPARABLE, {"reference": "reference_separable"})
    monkeypatch.setattr(backend_registry, "_MODULES", {})
    with pytest.raises(NotImplementedError, match="does not implement multi_rate_separable_conv2d"):
        FusedSeparableASPP(8, (1, 2, 3), 4, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        FusedDepthwiseSeparableASPP(8, (1, 2), 4, backend="cudnn")


def test_properties_and_for_input_size():
    m = FusedSeparableASPP.for_input_size(16, 769, 8, out_channels=4)
    assert m.rates == (15, 30, 45) and m.in_channels == 16 and m.out_channels == 4
    assert "rates=(15, 30, 45)" in repr(m)
    mm = FusedDepthwiseSeparableASPP(16, (12, 24, 36), 4)
    assert mm.rates == (12, 24, 36) and mm.dilations == (1, 12, 24, 36) and mm.out_channels == 4


@pytest.mark.parametrize("twins", [smp_twins, mmseg_twins])
def test_inference_caches_follow_in_place_updates(twins):
    source, fused = twins()
    source.eval()
    fused.eval()
    x = torch.randn(2, next(fused.parameters()).shape[1] if twins is smp_twins else 6, 7, 8, dtype=torch.float64)
    bns = [n for n, m in source.named_modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [n for n, m in source.named_modules() if isinstance(m, nn.Conv2d)]
    updates = [lambda m, n=n: m.get_submodule(n).running_mean.add_(0.5) for n in bns[::2]]
    updates += [lambda m, n=n: m.get_submodule(n).weight.mul_(-1.0) for n in bns[1::2] + convs]
    with torch.no_grad():
        assert rel_err(fused(x), source(x)) < 1e-10
        for update in updates:
            for m in (source, fused):
                update(m)
            assert rel_err(fused(x), source(x)) < 1e-10


def test_hooks_keep_the_hooked_modules_called():
    """A forward hook on a mid BatchNorm runs the branches as modules; one on a branch ReLU in eval mode keeps the
    branch BNs and ReLUs called (not folded); the results stay the unfused module's."""
    source, fused = mmseg_twins()
    source.eval()
    fused.eval()
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    for module in (fused.aspp_modules[1].depthwise_conv.bn, fused.aspp_modules[2].pointwise_conv.activate):
        seen = []
        handle = module.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        with torch.no_grad():
            y = fused(x)
        handle.remove()
        assert seen and rel_err(y, source(x)) < 1e-10
    smp_source, smp_fused = smp_twins()
    smp_source.eval()
    smp_fused.eval()
    seen = []
    smp_fused.convs[1][2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 12, 7, 8, dtype=torch.float64)
    assert rel_err(smp_fused(x), smp_source(x)) < 1e-10 and seen == [(2, 8, 7, 8)]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_compile_fullgraph_matches_eager(train):
    torch.manual_seed(0)
    for make in (smp_twins, mmseg_twins):
        _, eager = make()
        eager = eager.float().train(train)
        twin = copy.deepcopy(eager)
        compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
        x = torch.randn(2, eager.in_channels, 9, 7)
        y_eager, y_compiled = eager(x), compiled(x)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-4, atol=1e-5)
        if train:
            y_eager.square().mean().backward()
            y_compiled.square().mean().backward()
            for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
            for (name, a), b in zip(eager.named_buffers(), twin.buffers()):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
