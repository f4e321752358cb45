"""`salient audit`: the suite, sanity verdicts, drift against a second model, report, MLflow."""

from __future__ import annotations

import json

import mlflow
import pytest
from typer.testing import CliRunner

from pipeline.cli import app


@pytest.mark.slow
def test_audit_with_drift_against_a_second_model(ray_local, demo_images, tmp_path):
    from test_job import _local_images

    _local_images(tmp_path / "data", demo_images, 3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(
        app,
        [
            "audit",
            "--model",
            "builtin:efficientnet-lite0",
            "--data",
            str(tmp_path / "data" / "images"),
            "--against",
            "torchvision:resnet18",
            "--out",
            str(tmp_path / "runs"),
            "--tracking-uri",
            uri,
            "--methods",
            "gradcam",
            "--steps",
            "8",
            "--sanity-images",
            "2",
            "--size",
            "96",
            "--random-weights",  # resnet18 has no weights here: random on purpose
        ],
    )
    assert result.exit_code == 0, result.output
    assert "sanity gradcam: pass" in result.output
    assert "drift against torchvision:resnet18" in result.output
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("salient-audit").experiment_id
    runs = {r.data.tags["salient.run_id"]: r for r in client.search_runs([exp])}
    audited = [r for r in runs.values() if "salient.against" in r.data.tags]
    assert len(audited) == 1
    run = audited[0]
    assert run.data.tags["salient.sanity.gradcam"] == "pass"
    for metric in (
        "gradcam.deletion",
        "gradcam.insertion",
        "gradcam.average_drop",
        "gradcam.stability_index",
        "drift.mean_rank_correlation",
    ):
        assert metric in run.data.metrics, metric
    root = tmp_path / "runs" / run.data.tags["salient.run_id"]
    payload = json.loads((root / "audit.json").read_text())
    assert payload["drift"]["summary"]["pairs"] == 3
    assert len(payload["drift"]["most_changed"]) == 3
    html = (root / "report.html").read_text()
    for section in ("drift", "sanity", "curves", "summary"):
        assert f"<h2 id={section}>" in html
