"""convert_aspp / revert_aspp on separable ASPPs: smp's DeepLabV3Plus (its default decoder_aspp_separable=True) and
VainF/DeepLabV3Plus-Pytorch's AtrousSeparableConvolution branches; the rates read off them."""
import copy
import warnings

import pytest
import torch
from torch import nn

from resaspp_ops import FusedASPP, FusedSeparableASPP, convert_aspp, revert_aspp
from resaspp_ops.nn.structure import aspp_rates, rates_of, separable_aspp_rates
from separable_models import VainFASPP, smp_separable_aspp
from utils import randomize_batchnorm

smp = pytest.importorskip("segmentation_models_pytorch", reason="the test extra installs segmentation-models-pytorch")


def rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def deeplabv3plus(**kwargs):
    """smp's DeepLabV3Plus as its users build it (resnet18, no download), narrow decoder (CPU time); rates small
    enough for the 4x4 map of a 64x64 input that the depthwise convs keep off-centre taps."""
    torch.manual_seed(0)
    model = smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None, classes=3, decoder_channels=32,
                              decoder_atrous_rates=(1, 2, 6), **kwargs)
    randomize_batchnorm(model.decoder)
    return model.double()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_smp_deeplabv3plus_converts_end_to_end_and_reverts(train):
    model = deeplabv3plus().train(train)
    model.decoder.aspp[0].project[3].p = 0.0  # dropout off: two runs draw different masks
    source_aspp = model.decoder.aspp[0]
    params = {id(p) for p in source_aspp.parameters()}
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # today's "nothing was converted" warning must be gone
        converted = convert_aspp(model)
    fused = converted.decoder.aspp[0]
    assert isinstance(fused, FusedSeparableASPP) and fused.rates == (1, 2, 6) and fused.training == train
    assert {id(p) for p in fused.parameters()} == params
    assert list(fused.state_dict()) == list(source_aspp.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    outs, grads = [], []
    for m in (reference, converted):
        y = m(x)
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), list(m.decoder.parameters())))
    assert rel_err(outs[1], outs[0]) < 1e-10
    for (name, _), a, b in zip(reference.decoder.named_parameters(), grads[1], grads[0]):
        assert rel_err(a, b) < 1e-9, name
    for (name, a), b in zip(reference.named_buffers(), converted.buffers()):
        assert rel_err(a.double(), b.double()) < 1e-10, name
    reverted = revert_aspp(converted)
    assert reverted.decoder.aspp[0] is source_aspp and type(source_aspp).__name__ == "ASPP"
    assert {id(p) for p in source_aspp.parameters()} == params and source_aspp.training == train
    assert rel_err(reverted(x), reference(x)) < 1e-10


def test_vainf_atrous_separable_convolution_converts_and_reverts():
    torch.manual_seed(0)
    source = randomize_batchnorm(VainFASPP(6, (2, 4, 7), 4)).double().eval()
    source.convs[2][1].train()  # a per-child mode that must survive
    keys = list(source.state_dict())
    assert "convs.1.0.body.0.weight" in keys
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    source.convs[2][1].eval()
    with torch.no_grad():
        ref = source(x)
    source.convs[2][1].train()
    wrapper = convert_aspp(nn.Sequential(source))
    fused = wrapper[0]
    assert isinstance(fused, FusedSeparableASPP) and list(fused.state_dict()) == keys
    assert fused.project[3].p == 0.1 and not fused.training and fused.convs[2][1].training
    fused.convs[2][1].eval()
    with torch.no_grad():
        assert rel_err(fused(x), ref) < 1e-10
    back = revert_aspp(wrapper)[0]
    assert back is source and type(back) is VainFASPP


def test_convert_keeps_device_dtype_and_the_source_holds_nothing_else():
    source = smp_separable_aspp(8, (1, 2, 3), 4).half()
    fused = convert_aspp(source)
    assert isinstance(fused, FusedSeparableASPP) and all(p.dtype == torch.float16 for p in fused.parameters())
    extra = smp_separable_aspp(8, (1, 2, 3), 4)
    extra.scale = nn.Parameter(torch.ones(1))  # a parameter of its own, which the fused module would drop
    with pytest.warns(UserWarning, match="nothing was converted"):
        assert convert_aspp(extra) is extra


def test_a_directly_built_module_reverts_to_smp():
    fused = randomize_batchnorm(FusedSeparableASPP(8, (1, 2, 3), 4, dropout=0.0)).double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = fused(x)
    params = {id(p) for p in fused.parameters()}
    aspp = revert_aspp(fused)
    assert type(aspp).__module__.startswith("segmentation_models_pytorch") and not aspp.training
    assert {id(p) for p in aspp.parameters()} == params
    with torch.no_grad():
        assert rel_err(aspp(x), y) < 1e-12
    with pytest.raises(ValueError, match="three rates"):
        revert_aspp(FusedSeparableASPP(8, (1, 2), 4))


def test_structure_matching_and_rates():
    assert separable_aspp_rates(smp_separable_aspp(8, (3, 6, 9), 4)) == (3, 6, 9)
    assert separable_aspp_rates(VainFASPP(8, (3, 6, 9), 4)) == (3, 6, 9)
    assert aspp_rates(smp_separable_aspp(8, (3, 6, 9), 4)) is None
    from segmentation_models_pytorch.decoders.deeplabv3.decoder import ASPP

    plain = ASPP(8, 4, (3, 6, 9), separable=False, dropout=0.5)
    assert separable_aspp_rates(plain) is None and aspp_rates(plain) == (3, 6, 9)
    assert isinstance(convert_aspp(plain), FusedASPP)  # smp's non-separable ASPP stays FusedASPP's
    broken = smp_separable_aspp(8, (3, 6, 9), 4)
    broken.convs[2][0][0] = nn.Conv2d(8, 8, 3, padding=6, dilation=6, groups=4, bias=False)  # not depthwise
    assert separable_aspp_rates(broken) is None
    for module in (FusedSeparableASPP(8, (2, 4, 6), 4), smp_separable_aspp(8, (2, 4, 6), 4), VainFASPP(8, (2, 4, 6), 4)):
        assert rates_of(module) == (2, 4, 6)


def test_erf_finds_the_separable_aspp_and_its_rates():
    from resaspp_ops.erf.cli import _aspp_modules

    model = nn.Sequential(nn.Conv2d(3, 8, 1), smp_separable_aspp(8, (2, 4, 6), 4))
    assert _aspp_modules(model) == [model[1]]
    convert_aspp(model)
    assert _aspp_modules(model) == [model[1]] and isinstance(model[1], FusedSeparableASPP)


def test_the_default_deeplabv3plus_converts_without_a_warning():
    model = smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_aspp(model)
    assert isinstance(model.decoder.aspp[0], FusedSeparableASPP) and model.decoder.aspp[0].rates == (12, 24, 36)


@pytest.mark.parametrize("convert", [True, False], ids=["convert", "no-convert"])
def test_resaspp_erf_reads_the_star_off_a_separable_aspp(tmp_path, capsys, monkeypatch, convert):
    """`resaspp erf` on a tiny positive network with smp's separable ASPP: converted (or not), its rates read
    off the module, and the measured star agrees with 2 * max(rates) * OS."""
    import json
    from pathlib import Path

    from resaspp_ops.erf.cli import main as erf_main

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    args = ["--model", "erf_models:tiny_smp_separable", "--input-size", "512", "--random", "1", "--no-progress",
            "--out", str(tmp_path / "erf.png"), "--json", str(tmp_path / "fit.json")]
    assert erf_main(args + ([] if convert else ["--no-convert"])) == 0
    assert f"ASPP: {'FusedSeparableASPP' if convert else 'ASPP'})" in capsys.readouterr().out
    report = json.loads((tmp_path / "fit.json").read_text())
    assert report["rates"] == [4, 8, 12] and report["output_stride"] == 16 and report["star"]["agree"]
