"""ONNX models (`onnx:`): the builtin model exported to ONNX gives the torch model's maps and
scores for every forward-only method and metric; the methods and metrics that need more than
forwards are refused by `salient validate`, naming what runs."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import image_bytes, pearson
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.explainers import build_explainer
from pipeline.metrics import ExplainedBatch, build_metric
from pipeline.models import load_model

SIZE = 64


@pytest.fixture(scope="module")
def onnx_builtin(tmp_path_factory, builtin):
    """The builtin model at 64 px exported to ONNX (dynamic batch), with its card."""
    torch_model = load_model("builtin:efficientnet-lite0", device="cpu", size=SIZE)
    path = tmp_path_factory.mktemp("onnx") / "builtin.onnx"
    example = torch.randn(2, 3, SIZE, SIZE)
    torch.onnx.export(
        torch_model.module,
        (example,),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )
    p = torch_model.preprocess
    card = {"size": SIZE, "mean": list(p.mean), "std": list(p.std), "resize": p.policy}
    card["labels"] = torch_model.labels
    (path.parent / "builtin.onnx.card.yaml").write_text(yaml.safe_dump(card))
    return torch_model, load_model(f"onnx:{path}", device="cpu"), path


def test_onnx_maps_and_deletion_scores_match_the_torch_model(onnx_builtin, demo_images):
    torch_model, onnx_model, _ = onnx_builtin
    assert onnx_model.labels == torch_model.labels and onnx_model.capabilities == frozenset()
    x = torch_model.preprocess([img for img in demo_images[:2]])
    t = torch_model.predict(x)[1][:, 0]
    assert torch.equal(onnx_model.predict(x)[1][:, 0], t)
    before = onnx_model.forward_passes
    for name, params in (("rise", {"n_masks": 64}), ("glas", {"k": 5}), ("occlusion", {})):
        want = build_explainer(name, torch_model, **params)(x, t)
        got = build_explainer(name, onnx_model, **params)(x, t)
        for a, b in zip(got, want, strict=True):
            assert pearson(a, b) >= 0.999, name
    assert onnx_model.forward_passes > before  # counted like a torch model's
    maps = build_explainer("occlusion", torch_model)(x, t)
    scores = []
    for model in (torch_model, onnx_model):
        deletion = build_metric("deletion", steps=16)
        scores.append(deletion.update(ExplainedBatch(maps, model=model, x=x, targets=t)))
    assert scores[1] == pytest.approx(scores[0], abs=1e-3)


def test_validate_refuses_what_needs_more_than_forwards(onnx_builtin, tmp_path, demo_images):
    _, _, path = onnx_builtin
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(image_bytes(demo_images[0][::4, ::4], "PNG"))
    spec = {
        "source": {"uri": str(images)},
        "model": {"uri": f"onnx:{path}"},
        "explainers": [{"name": "gradcam"}, {"name": "rise"}, {"name": "lrp"}],
        "metrics": [{"name": "deletion"}, {"name": "parameter_randomisation"}],
        "output": {"uri": str(tmp_path / "out")},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["validate", str(job)])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if "explainers." in ln or "metrics." in ln]
    assert len(lines) == 3, result.output  # gradcam, lrp and the parameter randomisation
    assert "explainers.0 (gradcam): gradcam needs activations and gradients" in lines[0]
    for name in ("evet", "glas", "lime", "occlusion", "rglas", "rise", "smoothgrad"):
        assert name in lines[0]
    assert "explainers.2 (lrp)" in lines[1]
    assert "metrics.1 (parameter_randomisation): needs weights" in lines[2]
