"""`resaspp tune` fills backend="auto"'s cache from a model; `resaspp info` shows the decisions and why."""
import json
import os

import pytest
from torch import nn

from resaspp_ops import autotune
from resaspp_ops.autotune.cache import FILE_NAME
from resaspp_ops.cli import main


def tiny_segmenter() -> nn.Module:
    """A stem and torchvision's ASPP: what `resaspp tune --model test_auto_cli:tiny_segmenter` converts."""
    segmentation = pytest.importorskip("torchvision.models.segmentation.deeplabv3")
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), segmentation.ASPP(8, [1, 2], 4))


def no_aspp() -> nn.Module:
    return nn.Conv2d(3, 4, 1)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RESASPP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RESASPP_AUTO", raising=False)
    autotune.reset()
    yield tmp_path
    autotune.reset()


def test_tune_runs_each_shape_and_mode_and_writes_the_cache(cache_dir, capsys):
    assert main(["tune", "--model", "test_auto_cli:tiny_segmenter", "--input-size", "32", "24x40",
                 "--batch-size", "2", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    entries = json.loads((cache_dir / FILE_NAME).read_text())["environments"]
    keys = [k for env in entries.values() for k in env]
    # per size: train (forward, input grad, weight grad) and eval (forward with the folded-BatchNorm epilogue)
    assert len(keys) == 2 * 4, keys
    assert sum(" forward " in k and "scale,shift,relu" in k for k in keys) == 2
    assert "8 decisions for test_auto_cli:tiny_segmenter on cpu (float32)" in out
    assert "RESASPP_AUTO" not in os.environ  # the command measured; the process's setting is as it was
    assert "reference (fastest verified" in out and str(cache_dir / FILE_NAME) in out
    autotune.reset()
    assert main(["info"]) == 0
    info = capsys.readouterr().out
    assert "auto decisions for resaspp_ops" in info and "(8):" in info
    assert "multi_rate_conv2d weight_grad float32 N2 C8 8x8" in info and "cache file" in info


def test_info_without_decisions_says_how_to_make_them(cache_dir, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend='auto' measures: measure for CUDA tensors, static (the reference) for CPU tensors" in out
    assert "none yet (`resaspp tune` makes them ahead of time)" in out


def test_tune_says_what_is_wrong(cache_dir, capsys):
    assert main(["tune", "--model", "test_auto_cli:no_aspp", "--input-size", "32", "--device", "cpu",
                 "--no-progress"]) == 2
    assert "has no ASPP that convert_aspp could fuse" in capsys.readouterr().err
    assert main(["tune", "--model", "test_auto_cli:tiny_segmenter", "--input-size", "32", "--batch-size", "1",
                 "--mode", "train", "--device", "cpu", "--no-progress"]) == 1  # BatchNorm of one pooled value
    assert "failed: 1x3x32x32 train" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--model", "x:y", "--input-size", "32", "--batch-size", "0"])
