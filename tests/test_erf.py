"""The ERF toolkit (resaspp_ops.erf): Eq. 1, the star's geometry, the Gaussian fit, the PNG and the CLI."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import resaspp_ops
from resaspp_ops.erf import effective_receptive_field, fit_gaussian_2d, measure_star, render_erf, star_points
from resaspp_ops.erf.cli import main as erf_main
from resaspp_ops.nn import FusedASPP, revert_aspp

from erf_models import DictOut, TinySegNet

OS = 16
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _erf(model, images):
    return effective_receptive_field(model, images, progress=False)


@pytest.fixture(scope="module", params=[((6, 12, 18), 576), ((4, 8, 12), 384)], ids=["r6", "r4"])
def star_case(request):
    """(rates, expected outer distance, ERF [1024, 1024]) of the positive tiny net on one random image."""
    rates, distance = request.param
    torch.manual_seed(0)
    erf = _erf(TinySegNet(rates), [torch.rand(1, 3, 1024, 1024)])
    return rates, distance, erf


def test_erf_shows_the_star(star_case):
    rates, _, erf = star_case
    assert erf.shape == (1024, 1024) and erf.dtype == torch.float32
    z = erf.numpy()
    pts = star_points(rates, OS, (512, 512))
    # every star point is bright, and every bright pixel belongs to a star point (a 32 x 32 px square)
    for x, y in pts:
        assert z[int(y), int(x)] > 0.05 * z.max()
    ys, xs = np.nonzero(z > 0.01 * z.max())
    cheb = np.abs(xs[:, None] - pts[None, :, 0]).clip(min=0)
    cheb = np.maximum(cheb, np.abs(ys[:, None] - pts[None, :, 1]))
    assert (cheb.min(1) <= 16).all()
    assert len(xs) >= len(pts) * 32 * 32 * 0.9


def test_star_distance(star_case):
    rates, distance, erf = star_case
    star = measure_star(erf, rates, OS, tolerance=3)
    assert star.predicted == distance
    assert star.agree, star
    assert abs(star.measured_horizontal - distance) <= 3 and abs(star.measured_vertical - distance) <= 3
    for r, (h, v) in star.per_rate.items():  # the inner rates too
        assert abs(h - 2 * r * OS) <= 3 and abs(v - 2 * r * OS) <= 3
    assert abs(star.outer["left"][0] - (512 - distance / 2)) <= 3
    assert star.contrast > 0.5
    # the wrong stride's prediction finds no points where it looks
    wrong = measure_star(erf, rates, 8, tolerance=3)
    assert not wrong.agree and math.isnan(wrong.measured)


def _random_bn(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def _backends(device):
    return [name for name, st in resaspp_ops.backends(device).items() if st.available]


@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
def test_fused_equals_torchvision(device, backend):
    if backend not in _backends(device):
        pytest.skip(f"backend {backend} is not available for {device} tensors")
    model = TinySegNet((6, 12, 18), channels=6, aspp_channels=8, num_classes=3, positive=False, backend=backend)
    _random_bn(model)
    reverted = revert_aspp(copy.deepcopy(model))
    assert not any(isinstance(m, FusedASPP) for m in reverted.modules())
    model, reverted = model.to(device), reverted.to(device)
    gen = torch.Generator().manual_seed(2)
    images = [torch.randn(2, 3, 512, 512, generator=gen), torch.randn(3, 512, 512, generator=gen)]
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare fp32 with fp32
    try:
        fused, reference = _erf(model, images), _erf(reverted, images)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert fused.max() > 0
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5 * float(reference.max()))


def test_each_image_has_its_own_gradient():
    torch.manual_seed(3)
    model = TinySegNet((3, 6, 9), positive=False)
    images = torch.randn(3, 3, 256, 256)
    batched = _erf(model, [images])
    single = sum(_erf(model, [img]) for img in images)  # [3, H, W] images, one at a time
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-7)
    # ReLU before summing matters here: ReLU of the summed gradients is a different map
    x = images.clone().requires_grad_(True)
    y = model.eval()(x)[:, :, 128, 128].sum()
    (g,) = torch.autograd.grad(y, x)
    assert not torch.allclose(g.sum((0, 1)).clamp_min(0), batched, rtol=1e-3)


def test_dataloader_dict_output_and_mode_restored():
    torch.manual_seed(4)
    model = TinySegNet((3, 6, 9), positive=False)
    images = torch.randn(4, 3, 128, 128)
    expected = _erf(model, [images])
    wrapped = DictOut(model).train()
    wrapped.model.classifier.eval()  # a submodule's own mode survives too
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=3)
    got = effective_receptive_field(wrapped, loader, progress=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert wrapped.training and wrapped.model.stem.training and not wrapped.model.classifier.training
    assert all(p.grad is None for p in wrapped.parameters())  # only the input's gradient was taken


def test_erf_errors():
    model = TinySegNet((3, 6, 9))
    with pytest.raises(ValueError, match="no images"):
        _erf(model, [])
    with pytest.raises(ValueError, match="one size"):
        _erf(model, [torch.rand(3, 64, 64), torch.rand(3, 96, 96)])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        _erf(model, [torch.rand(64, 64)])


def _gaussian(h, w, cx, cy, sx, sy, a):
    y, x = np.mgrid[:h, :w].astype(np.float64)
    return a * np.exp(-0.5 * ((x - cx) / sx) ** 2 - 0.5 * ((y - cy) / sy) ** 2)


def test_fit_gaussian_recovers_parameters():
    true = dict(cx=171.3, cy=120.8, sx=23.5, sy=41.0, a=2.5e-4)
    z = _gaussian(240, 320, **true)
    noisy = z + np.random.default_rng(0).normal(0, 0.01 * true["a"], z.shape)
    fit = fit_gaussian_2d(torch.from_numpy(noisy).float())
    assert fit.cx == pytest.approx(true["cx"], abs=0.2) and fit.cy == pytest.approx(true["cy"], abs=0.2)
    assert fit.sigma_x == pytest.approx(true["sx"], rel=0.01) and fit.sigma_y == pytest.approx(true["sy"], rel=0.01)
    assert fit.amplitude == pytest.approx(true["a"], rel=0.01)
    assert 0.99 < fit.r2 <= 1.0
    exact = fit_gaussian_2d(z)
    assert exact.r2 == pytest.approx(1.0, abs=1e-9) and exact.sigma_x == pytest.approx(true["sx"], rel=1e-6)
    with pytest.raises(ValueError):
        fit_gaussian_2d(np.zeros((8, 8)))


def test_star_points():
    pts = star_points((6, 12, 18), 16, (512, 500))
    assert pts.shape == (25, 2)
    assert tuple(pts[0]) == (512, 500)
    r6 = {tuple(p) for p in pts[1:9]}
    assert r6 == {(512 + 96 * ox, 500 + 96 * oy) for ox in (-1, 0, 1) for oy in (-1, 0, 1) if (ox, oy) != (0, 0)}
    assert tuple(pts[17]) == (512 + 288, 500)  # the first point of the last rate: + r * OS along x
    assert len({tuple(p) for p in pts}) == 25
    assert star_points((2,), 8, (0, 0)).shape == (9, 2)
    with pytest.raises(ValueError):
        star_points((0, 6), 16, (0, 0))


def _blob_star(rates, stride, size=1024, scale=1.0, background=True):
    """A synthetic ERF: a broad Gaussian plus a small Gaussian blob at each (scaled) star point."""
    c = size // 2
    z = _gaussian(size, size, c, c, 120, 120, 1.0) if background else np.zeros((size, size))
    for x, y in star_points(rates, stride, (c, c)):
        x, y = c + (x - c) * scale, c + (y - c) * scale
        z += _gaussian(size, size, x, y, 10, 10, 0.3)
    return z


def test_measure_star_on_synthetic_maps():
    assert measure_star(_blob_star((6, 12, 18), 16), (6, 12, 18), 16, tolerance=2).agree
    star = measure_star(_blob_star((6, 12, 18), 16, background=False), (6, 12, 18), 16, tolerance=1)
    assert star.agree and star.measured == pytest.approx(576, abs=0.5)
    # a star 5% too wide is measured as such, and does not agree
    wide = measure_star(_blob_star((6, 12, 18), 16, scale=1.05), (6, 12, 18), 16)
    assert not wide.agree and wide.measured == pytest.approx(576 * 1.05, abs=3)
    # no star at all: no peaks found, NaN, no agreement
    plain = measure_star(_gaussian(1024, 1024, 512, 512, 120, 120, 1.0), (6, 12, 18), 16)
    assert not plain.agree and math.isnan(plain.measured) and plain.contrast < 0.05


def test_render_erf(tmp_path):
    z = _blob_star((4, 8, 12), 16, size=512)
    out = render_erf(torch.from_numpy(z), tmp_path / "erf.png", rates=(4, 8, 12), output_stride=16, title="t")
    assert Path(out).read_bytes()[:8] == PNG_MAGIC
    render_erf(z, tmp_path / "lin.png", log_scale=False)
    assert (tmp_path / "lin.png").read_bytes()[:8] == PNG_MAGIC
    render_erf(z, tmp_path / "both.png", log_scale="both", rates=(4, 8, 12), output_stride=16, smooth=8)
    assert (tmp_path / "both.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="log_scale"):
        render_erf(z, tmp_path / "x.png", log_scale="linear")
    with pytest.raises(ValueError, match="output_stride"):
        render_erf(z, tmp_path / "x.png", rates=(4, 8, 12))


def _cli_args(tmp_path, *extra):
    return ["--model", "erf_models:tiny", "--input-size", "512", "--out", str(tmp_path / "erf.png"),
            "--json", str(tmp_path / "fit.json"), "--no-progress", *extra]


def test_cli_random(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert erf_main(_cli_args(tmp_path, "--random", "1")) == 0
    out = capsys.readouterr().out
    assert "output stride 16" in out and "agree" in out and "wrote" in out
    assert (tmp_path / "erf.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((tmp_path / "fit.json").read_text())
    assert report["rates"] == [4, 8, 12] and report["output_stride"] == 16
    assert report["star"]["agree"] and report["star"]["measured"] == pytest.approx(384, abs=3)
    assert report["fit"]["cx"] == pytest.approx(256, abs=3) and report["fit"]["r2"] is not None


def test_cli_images_folder(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate([(400, 600), (700, 520)]):  # smaller and larger than the crop
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert erf_main(_cli_args(tmp_path, "--images", str(folder), "--batch-size", "2")) == 0
    assert "2 folder image(s) of 512x512" in capsys.readouterr().out
    assert json.loads((tmp_path / "fit.json").read_text())["star"]["agree"]


@pytest.mark.parametrize("convert", [True, False], ids=["convert", "no-convert"])
def test_cli_converts_torchvision_aspp(tmp_path, capsys, monkeypatch, convert):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    args = _cli_args(tmp_path, "--random", "1", "--scale", "log", "--save-erf", str(tmp_path / "erf.pt"))
    args[1] = "erf_models:tiny_torchvision"
    assert erf_main(args + ([] if convert else ["--no-convert"])) == 0
    assert f"ASPP: {'FusedASPP' if convert else 'ASPP'})" in capsys.readouterr().out
    assert json.loads((tmp_path / "fit.json").read_text())["star"]["agree"]
    assert torch.load(tmp_path / "erf.pt").shape == (512, 512)


def test_cli_checkpoint(tmp_path, capsys, monkeypatch):
    import erf_models

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    trained = erf_models.tiny_torchvision()  # torchvision ASPP keys load into FusedASPP too
    with torch.no_grad():
        trained.classifier.weight.mul_(3.0)
    torch.save({"model": trained.state_dict()}, tmp_path / "ckpt.pth")
    assert erf_main(_cli_args(tmp_path, "--random", "1", "--checkpoint", str(tmp_path / "ckpt.pth"))) == 0
    amplitude = json.loads((tmp_path / "fit.json").read_text())["fit"]["amplitude"]
    assert erf_main(_cli_args(tmp_path, "--random", "1")) == 0
    assert amplitude == pytest.approx(3.0 * json.loads((tmp_path / "fit.json").read_text())["fit"]["amplitude"],
                                      rel=1e-3)
    torch.save(TinySegNet(channels=6).state_dict(), tmp_path / "other.pth")
    assert erf_main(_cli_args(tmp_path, "--random", "1", "--checkpoint", str(tmp_path / "other.pth"))) == 2
    assert "does not fit the model" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert erf_main(["--model", "erf_models:nope", "--input-size", "64", "--random", "1",
                     "--out", str(tmp_path / "a.png")]) == 2
    assert erf_main(["--model", "not_a_model", "--input-size", "64", "--random", "1",
                     "--out", str(tmp_path / "a.png")]) == 2
    assert erf_main(_cli_args(tmp_path, "--images", str(tmp_path / "missing"))) == 2
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        erf_main(["--model", "erf_models:tiny", "--input-size", "64", "--out", "a.png"])  # no image source


def test_top_level_cli_delegates(tmp_path, monkeypatch):
    from resaspp_ops.cli import main

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["erf", *_cli_args(tmp_path, "--random", "1")]) == 0
    assert (tmp_path / "erf.png").exists()
