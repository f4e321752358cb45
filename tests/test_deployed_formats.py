"""Deployed model formats end to end: an ONNX model, a torch.export program and a Hugging Face
folder, each on the S3 endpoint, explained by a real Ray job that writes heatmaps and metric rows
and records the run in MLflow; and an audit that compares a model with its ONNX export."""

from __future__ import annotations

import io

import pytest
import torch
import yaml
from conftest import TinyNet, image_bytes

from pipeline.audit import run_audit
from pipeline.engine.job import run_job
from pipeline.runstore import read_table
from pipeline.spec import parse_spec
from pipeline.storage import Storage

BUCKET = "salient-formats"
CARD = {"size": 32, "resize": "squash", "labels": [f"thing {i}" for i in range(10)]}


@pytest.fixture(scope="module")
def formats(s3, demo_images):
    """The same tiny CNN as ONNX and as an exported program, a tiny HF ViT, and 3 photos."""
    import transformers as tf

    s3.create_bucket(Bucket=BUCKET)
    put = lambda key, data: s3.put_object(Bucket=BUCKET, Key=key, Body=data)  # noqa: E731
    for i, img in enumerate(demo_images[:3]):
        put(f"images/img{i}.png", image_bytes(img[::8, ::8], "PNG"))
    torch.manual_seed(0)
    net = TinyNet(10).eval()
    example = torch.randn(2, 3, 32, 32)
    buf = io.BytesIO()
    torch.onnx.export(
        net, (example,), buf, dynamo=False, input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )  # fmt: skip
    put("models/tiny.onnx", buf.getvalue())
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(net, (example,), dynamic_shapes={"x": {0: batch}})
    buf = io.BytesIO()
    torch.export.save(program, buf)
    put("models/tiny.pt2", buf.getvalue())
    for name in ("tiny.onnx", "tiny.pt2"):
        put(f"models/{name}.card.yaml", yaml.safe_dump(CARD).encode())
    config = tf.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=32, patch_size=8, num_labels=4,
    )  # fmt: skip
    folder = tf.ViTForImageClassification(config).eval()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as local:
        folder.save_pretrained(local)
        tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(local)
        for f in Path(local).iterdir():
            put(f"models/vit/{f.name}", f.read_bytes())
    return f"s3://{BUCKET}"


JOBS = {
    "onnx": ("onnx:{root}/models/tiny.onnx", [{"name": "rise", "params": {"n_masks": 16}}]),
    "export": ("export:{root}/models/tiny.pt2", [{"name": "gradcam"}, {"name": "lrp"}]),
    "hf": ("hf:{root}/models/vit", [{"name": "gradcam"}]),
}


@pytest.mark.parametrize("kind", list(JOBS))
def test_a_job_explains_a_deployed_model_from_the_s3_endpoint(
    kind, formats, ray_local, s3_endpoint, tmp_path
):
    uri, explainers = JOBS[kind]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = parse_spec(
        {
            "source": {"uri": f"{formats}/images/"},
            "model": {"uri": uri.format(root=formats)},
            "explainers": explainers,
            "metrics": [{"name": "deletion", "params": {"steps": 4}}],
            "output": {"uri": f"{formats}/runs-{kind}/", "heatmap_size": 8, "compact": False},
            "compute": {"actors": 1, "batch_size": 4, "block_size": 4, "device": "cpu"},
            "storage": {"endpoint_url": s3_endpoint},
            "tracking": {"uri": tracking, "experiment": "formats"},
        }
    )
    result = run_job(spec)
    s = result.summary
    assert (s["inputs"], s["images_ok"], s["errors"], s["lost"]) == (3, 3, 0, 0)
    storage = Storage(endpoint_url=s3_endpoint)
    heat = read_table(result.root, "heatmaps", storage).drop_columns(["heatmap"]).to_pylist()
    assert len(heat) == 3 * len(explainers)
    assert {r["model_id"] for r in heat} == {spec.model.uri}
    metrics = read_table(result.root, "metrics", storage).to_pylist()
    assert len(metrics) == 3 * len(explainers) and all(m["value"] is not None for m in metrics)
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=tracking).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["inputs"] == 3


def test_an_audit_compares_a_model_with_its_onnx_export(formats, ray_local, s3_endpoint, tmp_path):
    """The drift section of `salient audit --against`: the exported program and its ONNX twin
    give near-identical occlusion maps."""
    result = run_audit(
        f"export:{formats}/models/tiny.pt2",
        f"{formats}/images/",
        against=f"onnx:{formats}/models/tiny.onnx",
        out=f"{formats}/audits/",
        methods=["occlusion"],
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        steps=4,
        sanity_images=0,
        storage=Storage(endpoint_url=s3_endpoint),
    )
    summary = result.drift["summary"]
    assert summary["mean_rank_correlation"] >= 0.999, summary
