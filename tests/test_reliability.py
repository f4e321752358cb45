"""Reliability with real parts (local Ray, a local S3 endpoint over HTTP, MLflow): load with bad
inputs, a killed worker, a storage outage (short and permanent) and hostile input. Each test
checks that nothing is lost and nothing is duplicated."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision
from conftest import image_bytes

from pipeline.engine.job import JobFailed, run_job
from pipeline.runstore import read_table
from pipeline.spec import parse_spec

BUCKET = "salient-reliability"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bucket(s3):
    s3.create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture(scope="module")
def tiny_weights(s3, bucket):
    """A ResNet-18 for 10 classes run at 32 px: real architecture, fixed weights on S3, fast."""
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), buf)
    s3.put_object(Bucket=bucket, Key="models/rn18.pt", Body=buf.getvalue())
    return f"s3://{bucket}/models/rn18.pt"


def small_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return image_bytes(rng.integers(0, 255, (24 + seed % 9, 30, 3), dtype=np.uint8), "PNG")


def bad_inputs(n_each: int) -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, expected error type, or None where the input must be handled)."""
    from test_job import huge_png

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)
    out = {}
    for i in range(n_each):
        out[f"bad/truncated-{i}.png"] = (small_png(1000 + i)[:60], "corrupt")
        out[f"bad/empty-{i}.jpg"] = (b"", "empty")
        out[f"bad/text-{i}.jpg"] = (f"not an image {i}".encode(), "not_an_image")
        out[f"bad/huge-{i}.png"] = (huge_png(20000 + i, 20000), "too_large")
        mode = ("CMYK", "LA", "P", "1", "I;16")[i % 5]
        if mode == "I;16":
            data = image_bytes((rgb[..., 0].astype(np.uint16) * 257), "PNG")
        else:
            data = image_bytes(rgb, "TIFF" if mode == "CMYK" else "PNG", mode=mode)
        out[f"odd/{mode.replace(';', '')}-{i}.{'tif' if mode == 'CMYK' else 'png'}"] = (data, None)
    return out


def upload(s3, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)


def spec(prefix: str, weights: str, tmp_path, **compute) -> dict:
    return {
        "source": {"uri": f"s3://{BUCKET}/{prefix}/"},
        "model": {"uri": "torchvision:resnet18", "weights": weights, "size": 32, "num_classes": 10},
        "explainers": [{"name": "gradcam"}],
        # compaction only where a test is about it (it costs a few Ray Data pipelines per job)
        "output": {"uri": f"s3://{BUCKET}/runs/", "heatmap_size": 16, "compact": False},
        "compute": {"actors": 1, "batch_size": 32, "block_size": 50, "device": "cpu", **compute},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "reliability"},
        "storage": {"retries": 3, "retry_delay_s": 0.2},
    }


def check_nothing_lost(result, inputs: int, explainers: int = 1) -> pa.Table:
    s = result.summary
    heat = read_table(result.root, "heatmaps").drop_columns(["heatmap"])
    errors = read_table(result.root, "errors")
    keys = list(
        zip(*(heat.column(c).to_pylist() for c in ("image_id", "explainer", "target")), strict=True)
    )
    assert len(keys) == len(set(keys)), "duplicate (image, explainer, target) rows"
    images = set(heat.column("image_id").to_pylist())
    fatal = [e for e in errors.to_pylist() if e["fatal"]]
    assert len({e["image_id"] for e in fatal}) == len(fatal)
    assert not images & {e["image_id"] for e in fatal}
    assert inputs == len(images) + len(fatal) == s["inputs"]
    assert s["lost"] == 0 and heat.num_rows == len(images) * explainers
    return errors


def test_load_2000_images_with_bad_inputs_compacted_and_counted_by_duckdb(
    ray_local, s3, bucket, tiny_weights, tmp_path
):
    """2,000 inputs on S3 (50 odd or bad: 40 must fail, 10 odd modes must work), compacted:
    the counts read back through pyarrow and through DuckDB are exact (lost 0, duplicates 0),
    from a handful of files."""
    import duckdb
    import pyarrow.dataset as pads

    from pipeline.runstore.commit import arrow_filesystem, read_commit
    from pipeline.storage import Storage

    bad = bad_inputs(10)
    good = {f"good/{i:04d}.png": small_png(i) for i in range(1950)}
    upload(s3, bucket, "load", {**good, **{k: v for k, (v, _) in bad.items()}})
    s = spec("load", tiny_weights, tmp_path, block_size=250)
    s["output"]["compact"] = True
    t0 = time.perf_counter()
    result = run_job(parse_spec(s))
    wall = time.perf_counter() - t0
    errors = check_nothing_lost(result, 2000)
    expected = {k: kind for k, (_, kind) in bad.items() if kind}
    assert {e["image_id"]: e["error_type"] for e in errors.to_pylist()} == expected
    commit = read_commit(result.root)
    # one explainer, no metric: one heatmap file and one errors file for 8 blocks
    assert len(commit.blocks) == 8 and result.summary["files"] == {"heatmaps": 1, "errors": 1}
    # DuckDB over the compacted files as they lie on S3 (through a pyarrow dataset)
    fs, base = Storage().filesystem(result.root)
    heat = pads.dataset(  # noqa: F841 (DuckDB finds it by name)
        [f"{base}/{p}" for p in commit.files["heatmaps"]],
        filesystem=arrow_filesystem(fs),
        partitioning="hive",
    )
    (row,) = duckdb.sql(
        "SELECT count(*), count(DISTINCT image_id), count(DISTINCT (image_id, explainer, target))"
        " FROM heat"
    ).fetchall()
    assert row == (1960, 1960, 1960)  # every good image once: 1950 + 10 odd modes
    print(
        f"\nload: 2000 inputs, {len(expected)} bad, {result.summary['images_ok']} ok, "
        f"lost 0, duplicates 0, {wall:.1f} s wall"
    )


def test_killed_worker_is_restarted_and_the_job_completes(
    ray_local, s3, bucket, tiny_weights, tmp_path
):
    upload(s3, bucket, "kill", {f"{i:03d}.png": small_png(i) for i in range(100)})
    s = spec("kill", tiny_weights, tmp_path, block_size=10)
    s["explainers"].append({"name": "rise", "params": {"n_masks": 60}})
    killed = []

    def progress(marker, state):
        if not killed:  # kill the actor that just finished a block, mid-job
            pid = int(marker.worker.split("-")[0])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result = run_job(parse_spec(s), progress=progress)
    assert killed and result.summary["blocks_computed"] == 10
    check_nothing_lost(result, 100, explainers=2)
    assert result.summary["actor_restarts"] >= 1  # the run records the restart
    import mlflow

    run = mlflow.MlflowClient(s["tracking"]["uri"]).get_run(result.mlflow_run_id)
    assert run.data.metrics["actor_restarts"] >= 1


def test_an_outage_longer_than_the_in_process_retries_is_ridden_out_by_ray(
    ray_local, s3, s3_server, bucket, tiny_weights, tmp_path
):
    """The endpoint goes away for 2.5 s; a task's own retries give up after ~0.1 s, so the
    blocks caught by it fail and only Ray's retries of those blocks (after their jittered
    pauses, >= 6 x 0.5 s) carry the job through."""
    upload(s3, bucket, "blip", {f"{i:03d}.png": small_png(i) for i in range(120)})
    s = spec("blip", tiny_weights, tmp_path, block_size=10)
    s["storage"] = {
        "retries": 2,
        "retry_delay_s": 0.1,
        "block_retries": 6,
        "block_retry_delay_s": 1.0,
    }
    s["explainers"].append({"name": "rise", "params": {"n_masks": 60}})
    outage = []

    def progress(marker, state):
        if not outage:
            s3_server.stop()
            outage.append(time.time())
            threading.Timer(2.5, s3_server.start).start()

    result = run_job(parse_spec(s), progress=progress)
    assert outage
    check_nothing_lost(result, 120, explainers=2)


def test_endpoint_that_never_returns_fails_clearly_then_resume_completes(
    ray_local, s3, s3_server, bucket, tiny_weights, tmp_path
):
    upload(s3, bucket, "down", {f"{i:03d}.png": small_png(i) for i in range(60)})
    s = spec("down", tiny_weights, tmp_path, block_size=10)
    s["explainers"].append({"name": "rise", "params": {"n_masks": 60}})
    s["run_id"] = "outage"
    # patience: 2 in-process attempts, then 2 Ray retries after ~0.3 s pauses
    s["storage"] = {
        "retries": 2,
        "retry_delay_s": 0.2,
        "block_retries": 2,
        "block_retry_delay_s": 0.3,
    }
    stopped = []

    def progress(marker, state):
        if not stopped:
            s3_server.stop()
            stopped.append(state.finished)

    try:
        with pytest.raises(JobFailed, match="storage unreachable"):
            run_job(parse_spec(s), progress=progress)
    finally:
        if stopped:
            s3_server.start()
    import mlflow

    client = mlflow.MlflowClient(s["tracking"]["uri"])
    runs = client.search_runs(
        [client.get_experiment_by_name("reliability").experiment_id],
        filter_string="tags.`salient.run_id` = 'outage'",
    )
    assert runs[0].info.status == "FAILED"
    assert "storage unreachable" in runs[0].data.tags["salient.error"]
    result = run_job(parse_spec(s))  # the same command again, once storage is back
    assert result.summary["blocks_resumed"] >= 1
    check_nothing_lost(result, 60, explainers=2)
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"


ODD_KEYS = [
    "spaces in name.png",
    "ünïcödé-猫.png",
    "hash#tag.png",
    "question?mark.png",
    "percent%20encoded.png",
    "quote'and\"double.png",
    "semi;colon&amp.png",
    "../dotdot.png",
]


def test_hostile_keys_and_secrets_stay_out_of_outputs(
    ray_local, s3, bucket, tiny_weights, tmp_path, capsys
):
    files = {f"{i:02d}-{k}": small_png(i) for i, k in enumerate(ODD_KEYS)}
    files["bad/secret-leak.jpg"] = b"not an image"
    upload(s3, bucket, "odd", files)
    s = spec("odd", tiny_weights, tmp_path)
    result = run_job(parse_spec(s))
    check_nothing_lost(result, len(files))
    ids = set(read_table(result.root, "heatmaps").column("image_id").to_pylist())
    assert {i for i in ids if "猫" in i or "#" in i or "?" in i}, ids
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    for table in ("heatmaps", "metrics", "errors"):
        t = read_table(result.root, table)
        for name in t.column_names:
            if pa.types.is_string(t.schema.field(name).type):
                assert not any(secret in v or key_id in v for v in t.column(name).to_pylist() if v)
    import mlflow

    run = mlflow.MlflowClient(s["tracking"]["uri"]).get_run(result.mlflow_run_id)
    for v in [*run.data.params.values(), *run.data.tags.values()]:
        assert secret not in v and key_id not in v
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    import ray

    session = ray._private.worker.global_worker.node.get_session_dir_path()
    for root, _, names in os.walk(os.path.join(session, "logs")):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert secret.encode() not in f.read(), f"secret in Ray log {name}"


def test_overlay_names_cannot_escape_the_run_folder():
    from pipeline.runstore import safe_name

    for raw in ("../../etc/passwd", "a/../../b.png", "..", "/abs/path.png", "猫 #?.png"):
        name = safe_name(raw)
        assert "/" not in name and not name.startswith(".") and name
