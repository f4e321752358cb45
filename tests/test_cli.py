"""The command line: help, the single-machine explain path, and clear errors."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import image_bytes
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
    for name in ("chelsea.png", "coffee.png"):
        for method in ("gradcam", "saliency"):
            (npy,) = out.glob(f"{name}.{method}.t*.npy")  # the explained target is in the name
            heat = np.load(npy)
            assert heat.shape == (224, 224) and np.isfinite(heat).all()
            assert Image.open(npy.with_suffix(".png")).size == (224, 224)


def test_explain_bad_inputs_exit_2_with_the_name(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = runner.invoke(app, ["explain", str(bad), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "notes.png: not a recognised image format" in result.output
    assert "skipped" in result.output and "none of the 1 inputs could be read" in result.output
    result = runner.invoke(app, ["explain", str(tmp_path / "missing.jpg")])
    assert result.exit_code == 2 and "missing.jpg" in result.output
    good = tmp_path / "g.png"
    Image.new("RGB", (32, 32)).save(good)
    result = runner.invoke(app, ["explain", str(good), "-m", "gradcam", "-p", "gradcam.lyr=x"])
    assert result.exit_code == 2 and "no parameter 'lyr'" in result.output
    result = runner.invoke(app, ["explain", str(good), "--target", "not a class"])
    assert result.exit_code == 2 and "not a class" in result.output


def _outputs(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def test_explain_folder_keeps_same_stems_apart_and_skips_a_corrupt_file(tmp_path, demo_images):
    src = tmp_path / "photos"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "a" / "cat.jpg").write_bytes(image_bytes(demo_images[0][::4, ::4]))
    (src / "b" / "cat.png").write_bytes(image_bytes(demo_images[1][::4, ::4], "PNG"))
    (src / "broken.jpg").write_bytes(image_bytes(demo_images[2][::4, ::4])[:300])  # truncated
    (src / "notes.txt").write_text("not an image file name: not an input")
    out = src / "explained"  # inside the folder: a second run must not explain these overlays
    for _ in range(2):
        result = runner.invoke(app, ["explain", str(src), "--out", str(out), "--device", "cpu"])
        assert result.exit_code == 0, result.output
    assert "skipped broken.jpg: cannot decode" in result.output
    assert "notes.txt" not in result.output
    files = _outputs(out)
    assert len(files) == 4, files  # one overlay and one map per good image
    for name in ("a__cat.jpg", "b__cat.png"):
        (npy,) = out.glob(f"{name}.gradcam.t*.npy")
        assert np.load(npy).shape == (224, 224) and npy.with_suffix(".png").exists()
    assert not np.array_equal(*(np.load(p) for p in sorted(out.glob("*.npy"))))


def test_explain_glob_and_files_with_the_same_name(tmp_path, demo_images):
    for sub, i in (("x", 0), ("y", 1)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "cat.jpg").write_bytes(image_bytes(demo_images[i][::4, ::4]))
    out = tmp_path / "out"
    pattern = str(tmp_path / "*" / "cat.jpg")  # quoted, as a shell passes it: salient expands it
    result = runner.invoke(app, ["explain", pattern, "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("x__cat.jpg.gradcam.t*.npy"))) == 1
    assert len(list(out.glob("y__cat.jpg.gradcam.t*.npy"))) == 1
    # the same two files named one by one: their parent folders tell them apart
    out2 = tmp_path / "out2"
    files = [str(tmp_path / "x" / "cat.jpg"), str(tmp_path / "y" / "cat.jpg")]
    result = runner.invoke(app, ["explain", *files, "-o", str(out2), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert [p.split(".gradcam")[0] for p in _outputs(out2)[::2]] == ["x__cat.jpg", "y__cat.jpg"]
    result = runner.invoke(app, ["explain", str(tmp_path / "*.webp")])
    assert result.exit_code == 2 and "no image files match" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["explain", str(empty)])
    assert result.exit_code == 2 and "folder has no image files" in result.output


def test_explain_target_any_case_and_close_suggestions(tmp_path, demo_images):
    img = tmp_path / "chelsea.jpg"
    img.write_bytes(image_bytes(demo_images[0][::2, ::2]))
    out = tmp_path / "out"
    args = ["explain", str(img), "-o", str(out), "--device", "cpu", "--target"]
    result = runner.invoke(app, [*args, "TABBY"])
    assert result.exit_code == 0, result.output
    assert (out / "chelsea.jpg.gradcam.t281.npy").exists()  # 281 = tabby in ImageNet
    result = runner.invoke(app, [*args, "tabbbby"])
    assert result.exit_code == 2
    assert "target 'tabbbby' is not a class of the model; did you mean 'tabby'" in result.output


def test_methods_lists_every_explainer_and_metric_with_defaults():
    from pipeline.explainers import EXPLAINERS, explainer_class
    from pipeline.metrics import METRICS, metric_class

    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()

    def line_of(name: str) -> str:
        (line,) = [x for x in lines if x.split() and x.split()[0] == name]
        return line

    for name in (*EXPLAINERS, *METRICS):
        line_of(name)  # each is listed exactly once
    k = inspect.signature(explainer_class("glas").__init__).parameters["k"].default
    assert f"k={k!r}," in line_of("glas") and "[>= 0]" in line_of("glas")
    assert "[signed]" in line_of("integrated_gradients")
    steps = inspect.signature(metric_class("deletion").__init__).parameters["steps"].default
    assert f"steps={steps!r}," in line_of("deletion") and "lower is better" in line_of("deletion")


def _one_line_error(result, code: int = 2) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == code and len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_user_mistakes_are_one_line_each(tmp_path, demo_images, monkeypatch):
    import socket

    import torch
    import yaml

    image = tmp_path / "cat.png"
    Image.fromarray(demo_images[0][::4, ::4]).save(image)
    with socket.socket() as s:  # a port nothing listens on: an offline URL
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = _one_line_error(runner.invoke(app, ["explain", f"http://127.0.0.1:{port}/cat.jpg"]))
    assert "cannot be reached (ClientConnectorError" in line and "not found" not in line
    # S3 without credentials (and no instance metadata to fall back on)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    line = _one_line_error(runner.invoke(app, ["explain", "s3://bucket/cat.jpg"]))
    assert "NoCredentialsError" in line and "AWS_ACCESS_KEY_ID" in line
    # a text where a number belongs
    line = _one_line_error(
        runner.invoke(app, ["explain", str(image), "-m", "glas", "-p", "glas.k=abc"])
    )
    assert "explainer 'glas': k must be an integer >= 1, got 'abc'" in line
    if not torch.cuda.is_available():
        line = _one_line_error(runner.invoke(app, ["explain", str(image), "--device", "cuda"]))
        assert "no usable CUDA GPU; use --device cpu" in line
    line = _one_line_error(runner.invoke(app, ["explain", str(image), "--model", "timm:resnet18"]))
    assert "has no weights" in line and "--random-weights" in line
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"source": {"uri": "x"}, "explainers": [{"name": "gradcam"}]}))
    line = _one_line_error(runner.invoke(app, ["run", str(spec), "--run-id", "../x"]))
    assert line.startswith("error: --run-id '../x': run_id may hold only letters")


def test_explain_random_weights_only_on_purpose(tmp_path, demo_images):
    image = tmp_path / "cat.png"
    Image.fromarray(demo_images[0][::4, ::4]).save(image)
    out = tmp_path / "out"
    args = ["explain", str(image), "--model", "torchvision:resnet18", "-o", str(out)]
    result = runner.invoke(app, [*args, "--random-weights"])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("cat.png.gradcam.t*.npy"))) == 1
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    line = _one_line_error(
        runner.invoke(app, ["explain", str(image), "--weights", str(weights), "-o", str(out)])
    )
    assert "carries its own weights" in line


def test_raylet_messages_go_to_the_log_not_the_console(tmp_path, capsys):
    """Ray's driver prints the raylet's messages (worker-start warnings and the like) to stdout
    from a listener thread; under `salient run` they belong in the log."""
    import ray._private.worker as ray_worker

    from pipeline.cli import ray_output_to

    log = tmp_path / "run.log"
    line = "WARNING: 8 PYTHON worker processes have been started on node: x"
    with ray_output_to(log):
        ray_worker.print_to_stdstream(
            {"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False
        )
        ray_worker.print_to_stdstream(
            {"lines": ["a task's own line"], "pid": 123, "ip": "1.2.3.4", "is_err": False},
            ignore_prefix=False,
        )
    out = capsys.readouterr().out
    assert "PYTHON worker" not in out and "a task's own line" in out
    assert line in log.read_text()
    assert ray_worker.print_to_stdstream.__name__ == "print_to_stdstream"  # restored
