"""The nightly regression gate: metric comparison, baseline search, exit codes, a real job."""

from __future__ import annotations

import time

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.spec import SpecError, parse_spec
from pipeline.tracking.compare import DEFAULT_TOLERANCE, compare_metrics, gate


def test_compare_metrics_directions_and_tolerances():
    base = {"gradcam.images_per_s": 100.0, "errors": 2.0, "mystery": 1.0, "untracked": 5.0}
    tol = {"*.images_per_s": "30%", "errors": 0, "mystery": 0.1}
    same = compare_metrics(dict(base), base, tol)
    assert gate(same) == "pass" and {c.status for c in same} <= {"ok", "info"}
    slower = compare_metrics({**base, "gradcam.images_per_s": 69.0}, base, tol)
    assert gate(slower) == "fail"  # 31% slower, 30% allowed; higher is better
    assert gate(compare_metrics({**base, "gradcam.images_per_s": 71.0}, base, tol)) == "pass"
    faster = compare_metrics({**base, "gradcam.images_per_s": 200.0}, base, tol)
    assert {c.metric: c.status for c in faster}["gradcam.images_per_s"] == "improved"
    assert gate(compare_metrics({**base, "errors": 3.0}, base, tol)) == "fail"  # lower is better
    assert gate(compare_metrics({**base, "errors": 1.0}, base, tol)) == "pass"
    # unknown direction: a change beyond tolerance either way fails
    assert gate(compare_metrics({**base, "mystery": 0.8}, base, tol)) == "fail"
    assert gate(compare_metrics({**base, "untracked": 0.0}, base, tol)) == "pass"  # not gated
    missing = {k: v for k, v in base.items() if k != "errors"}
    assert gate(compare_metrics(missing, base, tol, fail_on_missing=True)) == "fail"


def _log_run(client, exp_id, metrics, tags, status="FINISHED"):
    run = client.create_run(exp_id, tags=tags)
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, status=status)
    time.sleep(0.01)  # distinct start times
    return run.info.run_id


def test_compare_cli_finds_the_last_success_and_exits_3_on_regression(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("nightly")
    tags = {"salient.job": "nightly"}
    _log_run(client, exp, {"errors": 0}, {"salient.job": "other"})
    good = _log_run(client, exp, {"errors": 0, "gradcam.images_per_s": 50}, tags)
    _log_run(client, exp, {"errors": 9}, tags, status="FAILED")  # never a baseline
    worse = _log_run(client, exp, {"errors": 2, "gradcam.images_per_s": 51}, tags)
    runner = CliRunner()
    result = runner.invoke(app, ["compare", worse, "--tracking-uri", uri, "-t", "errors=0"])
    assert result.exit_code == 3, result.output
    assert good in result.output and "regressed" in result.output
    result = runner.invoke(app, ["compare", worse, "--tracking-uri", uri, "-t", "errors=2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["compare", "no-such-run", "--tracking-uri", uri])
    assert result.exit_code == 2 and "no MLflow run 'no-such-run'" in result.output
    # without --tracking-uri the store comes from MLFLOW_TRACKING_URI, as for a job spec
    result = runner.invoke(
        app, ["compare", worse, "-t", "errors=0"], env={"MLFLOW_TRACKING_URI": uri}
    )
    assert result.exit_code == 3 and good in result.output, result.output


@pytest.mark.slow
def test_nightly_job_tags_pass_then_fails_against_a_better_pinned_baseline(
    ray_local, demo_images, tmp_path
):
    from test_job import _local_images

    _local_images(tmp_path / "data", demo_images, 3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {
        "source": {"uri": str(tmp_path / "data" / "images")},
        "explainers": [{"name": "gradcam"}],
        "metrics": [{"name": "deletion", "params": {"steps": 4}}],
        "output": {"uri": str(tmp_path / "runs")},
        "compute": {"device": "cpu", "block_size": 4},
        "tracking": {"uri": uri, "experiment": "nightly", "tags": {"salient.job": "nightly"}},
        "compare_to": {"tolerances": {"errors": 0, "images_ok": 0, "gradcam.deletion": 0}},
        "run_id": "nightly-{date}-a",
    }
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(spec))
    runner = CliRunner()
    first = runner.invoke(app, ["run", str(path)])
    assert first.exit_code == 0, first.output
    spec["run_id"] = "nightly-{date}-b"
    path.write_text(yaml.safe_dump(spec))
    second = runner.invoke(app, ["run", str(path)])
    assert second.exit_code == 0 and "PASS" in second.output, second.output
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("nightly").experiment_id
    runs = client.search_runs([exp], order_by=["attributes.start_time DESC"])
    assert runs[0].data.tags["salient.gate"] == "pass"
    assert runs[0].data.tags["salient.baseline_run"] == runs[1].info.run_id
    # the same images both nights: the gate's test is paired on the metrics tables' values
    import json
    from pathlib import Path

    saved = client.download_artifacts(runs[0].info.run_id, "comparison.json", str(tmp_path))
    verdict = json.loads(Path(saved).read_text())
    assert verdict["pairing"] == "paired on per-image values for 1 of 1 metrics", verdict
    (deletion,) = [c for c in verdict["changes"] if c["metric"] == "gradcam.deletion"]
    assert (deletion["test"], deletion["n"], deletion["status"]) == ("paired t", 3, "ok")
    assert runs[0].data.metrics["gradcam.deletion.n"] == 3
    assert "gradcam.deletion.ci_low" in runs[0].data.metrics
    better = _log_run(client, exp, {"errors": 0, "images_ok": 10}, {"salient.job": "nightly"})
    spec["run_id"] = "nightly-{date}-c"
    spec["compare_to"]["baseline"] = better
    path.write_text(yaml.safe_dump(spec))
    third = runner.invoke(app, ["run", str(path)])
    assert third.exit_code == 3, third.output
    assert client.get_run(runs[0].info.run_id).data.tags["salient.gate"] == "pass"
    latest = client.search_runs([exp], filter_string="tags.`salient.gate` = 'fail'")
    assert len(latest) == 1 and latest[0].data.tags["salient.baseline_run"] == better


def test_gate_without_tolerances_compares_every_shared_metric_in_its_direction():
    base = {"gradcam.deletion": 0.20, "gradcam.insertion": 0.60, "gradcam.images_per_s": 9.0}
    # deletion is lower-is-better: up 10% is a regression, down 10% an improvement
    worse = compare_metrics({**base, "gradcam.deletion": 0.22}, base, {})
    by_key = {c.metric: c for c in worse}
    assert by_key["gradcam.deletion"].status == "regressed" and gate(worse) == "fail"
    assert by_key["gradcam.deletion"].tolerance == DEFAULT_TOLERANCE
    assert by_key["gradcam.images_per_s"].tolerance is None  # throughput is not gated by default
    better = {
        c.metric: c.status for c in compare_metrics({**base, "gradcam.deletion": 0.18}, base, {})
    }
    assert better["gradcam.deletion"] == "improved"
    # insertion is higher-is-better: down 4% is within the default 5%, down 6% is not
    assert gate(compare_metrics({**base, "gradcam.insertion": 0.576}, base, {})) == "pass"
    assert gate(compare_metrics({**base, "gradcam.insertion": 0.564}, base, {})) == "fail"
    # a labelled metric's direction comes from the run's tags, not from its name
    labelled = {"gradcam.del_fine": 0.2}
    up = compare_metrics({"gradcam.del_fine": 0.3}, labelled, {}, directions={"del_fine": False})
    assert up[0].status == "regressed" and up[0].higher_is_better is False


@pytest.mark.parametrize(
    "current, baseline, tolerances, message",
    [
        ({"a.deletion": 1.0}, {"a.deletion": 1.0}, {"*.pointing_game": 0.1}, "matches no metric"),
        ({"a.deletion": 1.0}, {"a.deletion": 1.0}, {"*.deletion": "abc"}, "must be a number"),
        ({"a.deletion": 1.0}, {"a.deletion": 1.0}, {"*.deletion": -0.1}, "must be >= 0"),
        ({"a.deletion": 1.0}, {"b.insertion": 1.0}, {}, "nothing to compare"),
        ({"errors": 1.0}, {"errors": 1.0}, {}, "nothing to compare"),
    ],
)
def test_gate_refuses_to_compare_nothing(current, baseline, tolerances, message):
    with pytest.raises(ValueError, match=message):
        compare_metrics(current, baseline, tolerances)


def test_compare_cli_gates_without_tolerances_and_gives_one_line_errors(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("cmp")
    direction = {"salient.direction.deletion": "lower_is_better"}
    base = _log_run(client, exp, {"gradcam.deletion": 0.20, "errors": 0}, direction)
    worse = _log_run(client, exp, {"gradcam.deletion": 0.25, "errors": 0}, direction)
    runner = CliRunner(env={"COLUMNS": "200"})  # one table row per line
    args = ["compare", worse, "--baseline", base, "--tracking-uri", uri]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "gradcam.deletion" in result.output and "regressed" in result.output
    assert "↓" in result.output  # the direction beside the metric
    for tol, message in [
        ("*.pointing_game=0.1", "matches no metric"),
        ("*.deletion=abc", "must be a number"),
        ("*.deletion=-1", "must be >= 0"),
        ("deletion", "expected METRIC=TOL"),
    ]:
        result = runner.invoke(app, [*args, "-t", tol])
        assert result.exit_code == 2, (tol, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and message in lines[0], (tol, result.output)
    assert runner.invoke(app, [*args, "-t", "*.deletion=0.1"]).exit_code == 0


def test_spec_tolerances_must_name_a_metric_of_the_job():
    spec = {
        "source": {"uri": "data/"},
        "explainers": [{"name": "gradcam"}],
        "metrics": [{"name": "deletion"}],
        "compare_to": {"tolerances": {"*.deletion": 0.01}},
    }
    parse_spec(spec)
    for tolerances, message in [
        ({"*.pointing_game": 0.1}, "matches no metric of this job"),
        ({"*.deletion": "abc"}, "must be a number"),
        ({"*.deletion": -1}, "must be >= 0"),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_spec({**spec, "compare_to": {"tolerances": tolerances}})
    with pytest.raises(SpecError, match="this job has none"):
        parse_spec({**spec, "metrics": [], "compare_to": {}})
