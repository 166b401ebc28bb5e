"""The `resaspp` command."""
import subprocess
import sys

import pytest

from resaspp_ops.cli import main


def test_rates(capsys):
    assert main(["rates", "--input-size", "769", "--output-stride", "8"]) == 0
    out = capsys.readouterr().out
    assert "15.35" in out and "(15, 30, 45)" in out and "752 px" in out


def test_rates_non_square(capsys):
    assert main(["rates", "--input-size", "512x1024", "--output-stride", "8"]) == 0
    out = capsys.readouterr().out
    assert "shorter side S = 512" in out and "(10, 20, 30)" in out


def test_rates_bad_input(capsys):
    assert main(["rates", "--input-size", "20", "--output-stride", "8"]) == 2
    assert "must exceed 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["rates", "--input-size", "abc", "--output-stride", "8"])


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for text in ("torch", "resaspp_ops._C", "reference", "cuda", "triton", "auto for a CUDA bf16 tensor"):
        assert text in out


def test_console_script_is_installed():
    res = subprocess.run([sys.executable, "-m", "resaspp_ops.cli", "rates", "--input-size", "513",
                          "--output-stride", "16"], capture_output=True, text=True, check=True)
    assert "(5, 10, 15)" in res.stdout


def test_info_piped_into_a_reader_that_stops_early_is_no_error():
    """`resaspp info | head -1` (or `| grep -q`): the closed pipe ends the command quietly, exit status 0."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "resaspp_ops.cli", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, stderr
    assert first.startswith(b"resaspp_ops ") and "Traceback" not in stderr, stderr
