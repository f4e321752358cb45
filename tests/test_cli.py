"""The command line: help, the single-machine explain path, and clear errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_console_script_lists_commands():
    # the script installed beside this interpreter (the venv need not be on PATH)
    exe = shutil.which("salient", path=str(Path(sys.executable).parent))
    assert exe, "the console script `salient` is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("explain", "demo"):
        assert command in out


def test_explain_writes_overlay_and_map_per_image_and_method(tmp_path, demo_images):
    paths = []
    for name, img in zip(("chelsea", "coffee"), demo_images[:2], strict=True):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(img).save(paths[-1])
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "explain",
            *map(str, paths),
            "-m",
            "gradcam",
            "-m",
            "saliency",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "espresso" in result.output  # the predicted class of the coffee photo is printed
    for stem in ("chelsea", "coffee"):
        for method in ("gradcam", "saliency"):
            heat = np.load(out / f"{stem}.{method}.npy")
            assert heat.shape == (224, 224) and np.isfinite(heat).all()
            assert Image.open(out / f"{stem}.{method}.png").size == (224, 224)


def test_explain_bad_inputs_exit_2_with_the_name(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = runner.invoke(app, ["explain", str(bad), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "notes.png: not a recognised image format" in result.output
    result = runner.invoke(app, ["explain", str(tmp_path / "missing.jpg")])
    assert result.exit_code == 2 and "missing.jpg" in result.output
    good = tmp_path / "g.png"
    Image.new("RGB", (32, 32)).save(good)
    result = runner.invoke(app, ["explain", str(good), "-m", "gradcam", "-p", "gradcam.lyr=x"])
    assert result.exit_code == 2 and "no parameter 'lyr'" in result.output
    result = runner.invoke(app, ["explain", str(good), "--target", "not a class"])
    assert result.exit_code == 2 and "not a class" in result.output
