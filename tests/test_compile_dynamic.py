"""torch.compile(dynamic=True, fullgraph=True) through every fused module family and through converted torchvision
and segmentation_models_pytorch models, and smp's scriptable flag across convert_aspp / revert_aspp (issue 26).

With dynamic shapes Dynamo makes float module attributes (a BatchNorm's eps) symbolic: nothing on the traced path
may turn one into a string or a dict key. Each compiled module runs at two input sizes (batch, height and width
all change) and must not recompile for the second where PyTorch allows it, and must match the module in eager mode.
"""
import contextlib
import copy

import pytest
import torch
import torch._dynamo
from torch import nn

from resaspp_ops import (FusedASPP, FusedDepthwiseSeparableASPP, FusedSeparableASPP, convert_aspp,
                         multi_rate_conv2d, multi_rate_separable_conv2d, revert_aspp)
from separable_models import MMSegASPP, VainFASPP
from test_compile_export import tiny_deeplabv3
from utils import randomize_batchnorm

SIZES = ((2, 6, 7, 9), (3, 6, 10, 5))  # [N, C, H, W]: every dimension but C changes


def fused_aspp():
    return FusedASPP(6, (1, 2), 4, dropout=0.0)


def fused_separable_aspp():
    return FusedSeparableASPP(6, (1, 2, 3), 4, dropout=0.0)  # three rates, as smp's ASPP takes


def fused_depthwise_separable_aspp():
    return FusedDepthwiseSeparableASPP(6, (1, 2), 4)


FAMILIES = [fused_aspp, fused_separable_aspp, fused_depthwise_separable_aspp]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no frames or guards left from another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@contextlib.contextmanager
def no_compile_cache():
    """Inductor's and AOTAutograd's on-disk caches off: a cached artifact brings the guards of the compile that
    wrote it (a specialised size from another run), which would make the recompile count depend on history."""
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
            enable_autograd_cache=False):
        yield


def step(module, x, seed):
    """(output, grad of x, grads of the parameters, buffers) of sum(out * g) for a fixed random g."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    out = out["out"] if isinstance(out, dict) else out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x] + params, g)
    return out.detach(), grads, [b.clone() for b in module.buffers()]


def forward(module, x):
    with torch.no_grad():
        out = module(x)
    return out["out"] if isinstance(out, dict) else out


def assert_compiles_once_and_matches(model, train, backend, sizes=SIZES, dtype=torch.float64, rtol=1e-7, atol=1e-7):
    """Compile `model` with dynamic shapes and full graph; at each size its outputs (and in training the grads of
    the input and every parameter, and the buffers after the step) must match an eager copy, and no size after the
    first may recompile."""
    model = model.to(dtype).train(train)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend=backend)
    for i, size in enumerate(sizes):
        x = torch.randn(size, generator=torch.Generator().manual_seed(i), dtype=dtype)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            if train:
                (y, grads, buffers), (y_ref, grads_ref, buffers_ref) = step(compiled, x, i), step(eager, x, i)
            else:
                y, y_ref = forward(compiled, x), forward(eager, x)
        torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol, msg=lambda m: f"output at {size}: {m}")
        if train:
            for j, (a, b) in enumerate(zip(grads, grads_ref)):
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"grad {j} at {size}: {m}")
            for a, b in zip(buffers, buffers_ref):
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"buffers at {size}: {m}")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_modules_compile_dynamic_fullgraph_once(family, train):
    """aot_eager: Dynamo (where the issue's symbolic eps broke the graph) and AOTAutograd's trace of the forward
    and backward with the ops' fake kernels."""
    torch.manual_seed(0)
    assert_compiles_once_and_matches(randomize_batchnorm(family()), train, "aot_eager")


@pytest.mark.slow
def test_fused_modules_compile_dynamic_with_inductor_for_inference():
    """Inductor (C++ on the CPU: slow to compile, so the three families in one model, one compile), eval mode
    under no_grad: two sizes, one graph."""
    torch.manual_seed(0)
    model = nn.Sequential(fused_aspp(), FusedSeparableASPP(4, (1, 3, 4), 4, dropout=0.0),
                          FusedDepthwiseSeparableASPP(4, (2, 3), 5))
    with no_compile_cache():
        assert_compiles_once_and_matches(randomize_batchnorm(model), False, "inductor")


@pytest.mark.slow
def test_separable_module_compiles_dynamic_with_inductor_for_training():
    """Inductor, training mode (one family: a compile of forward and backward takes a minute here; the traced
    layout test below covers what Inductor checks of both ops, and test_compile_export FusedASPP's training).
    Inductor's lowering of a convolution's input grad fixes the map size on the CPU (torchvision's own ASPP
    recompiles per map size there too), so the second size changes the batch only: that must not recompile."""
    torch.manual_seed(0)
    with no_compile_cache():
        assert_compiles_once_and_matches(randomize_batchnorm(fused_separable_aspp()), True, "inductor",
                                         sizes=((2, 6, 7, 9), (3, 6, 7, 9)))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_converted_torchvision_model_compiles_dynamic_fullgraph_once(train):
    torch.manual_seed(0)
    model = randomize_batchnorm(convert_aspp(tiny_deeplabv3()))
    model.classifier[0].project[3].p = 0.0  # dropout off: eager and compiled draw different masks
    assert isinstance(model.classifier[0], FusedASPP)
    assert_compiles_once_and_matches(model, train, "aot_eager", sizes=((2, 3, 32, 40), (3, 3, 24, 48)))


SMP_CASES = [("DeepLabV3", False), ("DeepLabV3Plus", False), ("DeepLabV3Plus", True)]


@pytest.mark.parametrize("architecture, train", SMP_CASES, ids=["V3-eval", "V3Plus-eval", "V3Plus-train"])
def test_converted_smp_model_compiles_dynamic_fullgraph_once(architecture, train):
    """The issue's case: smp's models (resnet18, random init, nothing downloaded) converted, compiled with
    dynamic shapes and full graph (DeepLabV3's training is FusedASPP's, as in the torchvision model above)."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = getattr(smp, architecture)(encoder_name="resnet18", encoder_weights=None, classes=3)
    model = randomize_batchnorm(convert_aspp(model))
    fused = model.decoder.aspp if architecture == "DeepLabV3" else model.decoder.aspp[0]
    assert isinstance(fused, FusedASPP if architecture == "DeepLabV3" else FusedSeparableASPP)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    assert_compiles_once_and_matches(model, train, "eager", sizes=((2, 3, 32, 48), (3, 3, 48, 32)))


def _traced_output_strides(op, *args):
    """The output strides that Dynamo's fake propagation gives `op` under dynamic shapes, with concrete sizes."""
    seen = []

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "resaspp_ops" in str(node.target):
                seen.append(node.meta["example_value"])
        return gm.forward

    out = torch.compile(op, dynamic=True, fullgraph=True, backend=record)(*args)
    assert len(seen) == 1 and any(isinstance(size, torch.SymInt) for size in seen[0].shape)
    return tuple(int(s.node.hint) if isinstance(s, torch.SymInt) else s for s in seen[0].stride()), out.stride()


@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
def test_traced_layout_of_the_ops_is_their_output_layout(epilogue):
    """With symbolic sizes, FakeTensorMode derives an op's output from its entry in torch._decomp's table (the
    ONNX composition) rather than its fake kernel: that entry must hand back the op's layout (channels_last), or
    Inductor's stride check fails at run time (issue 26)."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 7, 9)
    w1, w3 = torch.randn(4, 6, 1, 1), torch.randn(2, 4, 6, 3, 3)
    w_dw, w_pw = torch.randn(2, 6, 1, 3, 3), torch.randn(2, 4, 6, 1, 1)
    scale, shift = (torch.rand(12) + 0.5, torch.randn(12)) if epilogue else (None, None)
    traced, real = _traced_output_strides(lambda x: multi_rate_conv2d(x, w1, w3, (1, 2), scale, shift, epilogue), x)
    assert traced == real
    assert real == torch.empty(2, 12, 7, 9, memory_format=torch.channels_last).stride()
    torch._dynamo.reset()
    traced, real = _traced_output_strides(
        lambda x: multi_rate_separable_conv2d(x, w1, w_dw, w_pw, (1, 2), scale=scale, shift=shift, relu=epilogue), x)
    assert traced == real


def _twins(family):
    """(the unfused module, the fused one with a copy of its state), float64, eval mode, BNs randomised."""
    if family is fused_aspp:
        from torchvision.models.segmentation.deeplabv3 import ASPP

        source = randomize_batchnorm(ASPP(6, (1, 2), 4)).double().eval()
    elif family is fused_separable_aspp:
        source = randomize_batchnorm(VainFASPP(6, (1, 2, 3), 4)).double().eval()
        return source, convert_aspp(copy.deepcopy(source))  # FusedSeparableASPP, with the source's module names
    else:
        source = randomize_batchnorm(MMSegASPP(6, (1, 2), 4)).double().eval()
    fused = family().double().eval()
    fused.load_state_dict(source.state_dict())
    return source, fused


HEAD_BATCHNORM = {fused_aspp: "project.1", fused_separable_aspp: "project.1", fused_depthwise_separable_aspp:
                  "bottleneck.bn"}


@pytest.mark.parametrize("head_training", [False, True], ids=["all-folded", "head-training"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_batchnorm_eps_change_reaches_the_cached_folds(family, head_training):
    """The inference caches compare each folded BatchNorm's eps by value (it is no longer part of an entry's name):
    changing any BatchNorm's eps after the caches are filled changes the result as it changes the unfused one's.
    With the projection's BatchNorm in training mode the branch BatchNorms fold into the op's epilogue alone (the
    other cache entries)."""
    source, fused = _twins(family)
    assert type(fused) is type(family())
    if head_training:
        for m in (source, fused):
            m.get_submodule(HEAD_BATCHNORM[family]).train()
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    names = [name for name, m in source.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(names) >= 5
    with torch.no_grad():
        torch.testing.assert_close(fused(x), source(x), rtol=1e-10, atol=1e-12)
        for i, name in enumerate(names):
            for m in (source, fused):
                m.get_submodule(name).eps = 0.3 + 0.1 * i
            torch.testing.assert_close(fused(x), source(x), rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("architecture", ["DeepLabV3", "DeepLabV3Plus"])
def test_convert_tells_smp_the_model_is_not_scriptable_and_revert_restores_it(architecture):
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = getattr(smp, architecture)(encoder_name="resnet18", encoder_weights=None, classes=3).eval()
    assert model._is_torch_scriptable is True and "_is_torch_scriptable" not in vars(model)
    convert_aspp(model)
    assert model._is_torch_scriptable is False
    assert model.encoder._is_torch_scriptable is True  # the encoder holds no fused module: still scriptable
    with pytest.raises(RuntimeError, match="revert_aspp"):
        torch.jit.script(model)
    copied = copy.deepcopy(model)
    assert copied._is_torch_scriptable is False
    revert_aspp(model)
    assert model._is_torch_scriptable is True
    assert "_is_torch_scriptable" not in vars(model)  # the class attribute shows through again, as before
    assert [k for k in vars(model) if "scriptable" in k] == []
    torch.jit.script(model)  # the flag tells the truth: scripting works again
    revert_aspp(copied)
    assert copied._is_torch_scriptable is True


def test_scriptable_flag_keeps_an_instance_value_and_survives_a_second_convert():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.DeepLabV3(encoder_name="resnet18", encoder_weights=None, classes=3)
    model._is_torch_scriptable = "declared here"  # an instance value, not the class's
    wrapper = nn.Sequential(model)
    convert_aspp(wrapper)
    assert model._is_torch_scriptable is False
    with pytest.warns(UserWarning, match="nothing was converted"):
        convert_aspp(wrapper)  # already converted: the saved value must stay the original one
    revert_aspp(wrapper)
    assert vars(model)["_is_torch_scriptable"] == "declared here"
    assert not hasattr(wrapper, "_is_torch_scriptable")


def test_torchvision_models_get_no_scriptable_flag():
    """torchvision's models carry no such flag; convert_aspp adds none."""
    model = convert_aspp(tiny_deeplabv3())
    assert not any(hasattr(m, "_is_torch_scriptable") for m in model.modules())
    revert_aspp(model)
    assert not any(hasattr(m, "_is_torch_scriptable") for m in model.modules())
