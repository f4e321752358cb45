"""The distributed job with real parts: a local S3 endpoint over HTTP, local Ray, MLflow."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import image_bytes
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.engine.job import JobFailed, run_job
from pipeline.engine.worker import torch_threads
from pipeline.explainers import build_explainer
from pipeline.runstore import finished_block_ids, read_markers, read_table, safe_name, shrink
from pipeline.sources.decode import decode_image
from pipeline.spec import parse_spec

BUCKET = "salient-test"


def huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header claiming 20000x20000 pixels (a few hundred bytes on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def dataset(demo_images) -> tuple[dict[str, bytes], dict[str, str]]:
    """Good photos, two odd-but-valid modes, and four bad inputs with the error each must give."""
    chelsea, coffee, astronaut, rocket = demo_images
    gray16 = np.asarray(coffee[..., 0], dtype=np.uint16) * 257
    files = {
        "images/cat/chelsea.jpg": image_bytes(chelsea),
        "images/cup/coffee.png": image_bytes(coffee, "PNG"),
        "images/astronaut.jpg": image_bytes(astronaut),
        "images/rocket.webp": image_bytes(rocket, "WEBP"),
        "images/odd/cmyk.jpg": image_bytes(chelsea, "JPEG", mode="CMYK"),
        "images/odd/gray16.png": image_bytes(gray16, "PNG"),
        "images/bad/truncated.jpg": image_bytes(coffee)[:3000],
        "images/bad/empty.jpg": b"",
        "images/bad/notes.jpg": b"these are my notes, not a picture",
        "images/bad/huge.png": huge_png(),
    }
    expected_errors = {
        "bad/truncated.jpg": "corrupt",
        "bad/empty.jpg": "empty",
        "bad/notes.jpg": "not_an_image",
        "bad/huge.png": "too_large",
    }
    return files, expected_errors


def base_spec(source: str, output_uri: str, tracking: str, **extra) -> dict:
    spec = {
        "source": {"uri": source},
        "model": {"uri": "builtin:efficientnet-lite0"},
        "explainers": [{"name": "gradcam"}, {"name": "saliency"}],
        # compaction costs a few Ray Data pipelines per job: on only where a test is about it
        "output": {"uri": output_uri, "heatmap_size": 56, "compact": False},
        "compute": {"actors": 1, "batch_size": 4, "block_size": 4, "device": "cpu"},
        "tracking": {"uri": tracking, "experiment": "tests"},
    }
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def test_s3_job_end_to_end(ray_local, s3, s3_endpoint, builtin, demo_images, tmp_path):
    s3.create_bucket(Bucket=BUCKET)
    files, expected_errors = dataset(demo_images)
    for key, data in files.items():
        s3.put_object(Bucket=BUCKET, Key=f"e2e/{key}", Body=data)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = parse_spec(
        base_spec(
            f"s3://{BUCKET}/e2e/images/",
            f"s3://{BUCKET}/runs/",
            tracking,
            storage={"endpoint_url": s3_endpoint},
            output={"compact": True},
        )
    )
    result = run_job(spec)
    s = result.summary
    assert (s["inputs"], s["images_ok"], s["errors"], s["lost"]) == (10, 6, 4, 0)
    # compacted on S3: a file per explainer and table, the markers one table, nothing else
    keys = [
        o["Key"].removeprefix(f"runs/{result.run_id}/")
        for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{result.run_id}/")["Contents"]
    ]
    data = sorted(k.rsplit("/", 1)[0] for k in keys if k.endswith(".parquet") and "/" in k)
    assert data == [
        "_plan",  # per input
        "_plan",  # per block: what Ray Data reads
        "errors",
        "heatmaps/explainer=gradcam",
        "heatmaps/explainer=saliency",
    ], keys
    assert not [k for k in keys if k.startswith("_blocks/") or "part-" in k]

    # read back with plain pyarrow over the same HTTP endpoint
    fs = pafs.S3FileSystem(
        endpoint_override=s3_endpoint.removeprefix("http://"),
        scheme="http",
        access_key="testing-key-id",
        secret_key="testing-secret-value-0123",
        region="us-east-1",
    )
    prefix = f"{BUCKET}/runs/{result.run_id}"
    heat = pq.read_table(f"{prefix}/heatmaps", filesystem=fs)
    errors = pq.read_table(f"{prefix}/errors", filesystem=fs).to_pylist()
    assert str(heat.schema.field("heatmap").type).startswith("extension<arrow.fixed_shape_tensor")
    assert heat.num_rows == 6 * 2
    keys = {
        (r["image_id"], r["explainer"], r["target"])
        for r in heat.drop_columns(["heatmap"]).to_pylist()
    }
    assert len(keys) == heat.num_rows  # no duplicates
    assert {e["image_id"]: e["error_type"] for e in errors} == expected_errors
    assert all(e["fatal"] and e["stage"] == "decode" for e in errors)

    # a stored heatmap equals the one build_explainer gives in-process for that image
    row = next(
        r
        for r in heat.to_pylist()
        if r["image_id"] == "cat/chelsea.jpg" and r["explainer"] == "gradcam"
    )
    idx = [
        i
        for i, r in enumerate(heat.select(["image_id", "explainer"]).to_pylist())
        if (r["image_id"], r["explainer"]) == ("cat/chelsea.jpg", "gradcam")
    ][0]
    # the extension type keeps the shape: plain pyarrow gives [N,56,56]
    stored = np.concatenate([c.to_numpy_ndarray() for c in heat.column("heatmap").chunks])[idx]
    x = builtin.preprocess([decode_image(files["images/cat/chelsea.jpg"])])
    assert row["predicted"] == int(builtin.predict(x)[1][0, 0])
    local = shrink(build_explainer("gradcam", builtin)(x, torch.tensor([row["target"]])), 56)[0]
    local = ((local - local.min()) / (local.max() - local.min()) * 255).round().numpy()
    assert stored.shape == (56, 56)
    assert np.abs(stored.astype(float) - local).max() <= 1.0
    assert row["map_max"] == pytest.approx(
        float(
            shrink(build_explainer("gradcam", builtin)(x, torch.tensor([row["target"]])), 56).max()
        ),
        rel=1e-4,
    )

    # the MLflow run
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["salient.run_id"] == result.run_id
    assert run.data.tags["salient.model_weights_sha256"] == builtin.weights_hash
    assert run.data.metrics["inputs"] == 10 and run.data.metrics["errors"] == 4
    assert "gradcam.images_per_s" in run.data.metrics
    assert run.data.params["explainers.gradcam.name"] == "gradcam"
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"spec.yaml", "summary.json", "summary.csv", "overlays"} <= artifacts
    assert client.list_artifacts(result.mlflow_run_id, "overlays/gradcam")
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert all(secret not in v for v in run.data.params.values())
    assert all(secret not in v for v in run.data.tags.values())
    summary = json.loads(
        s3.get_object(Bucket=BUCKET, Key=f"runs/{result.run_id}/summary.json")["Body"].read()
    )
    assert summary["explainers"]["gradcam"]["images"] == 6


def _local_images(root: Path, demo_images, n: int) -> None:
    """n distinct small photos: crops of the demo images."""
    (root / "images").mkdir(parents=True)
    for i in range(n):
        img = demo_images[i % 4]
        h, w = img.shape[:2]
        crop = img[(i * 7) % (h // 4) :, (i * 11) % (w // 4) :]
        (root / "images" / f"img{i:02d}.png").write_bytes(image_bytes(crop, "PNG"))


def test_interrupted_job_resumes_to_the_rows_of_an_uninterrupted_run(
    ray_local, demo_images, tmp_path
):
    _local_images(tmp_path / "data", demo_images, 12)
    spec = base_spec(
        str(tmp_path / "data" / "images"),
        str(tmp_path / "runs"),
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        compute={"block_size": 2, "batch_size": 2},
    )
    spec["explainers"].append({"name": "scorecam", "params": {"top_k": 12}})
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump({**spec, "run_id": "interrupted"}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(spec_path)]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    markers = tmp_path / "runs" / "interrupted" / "_blocks"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-job
    proc.wait()
    # a Ray worker can outlive its raylet by a moment and finish the block it holds: count once
    # the markers have stopped changing
    finished_before, stable_since = -1, time.time()
    while time.time() - stable_since < 3:
        now = len(list(markers.glob("*.json")))
        if now != finished_before:
            finished_before, stable_since = now, time.time()
        time.sleep(0.2)
    assert 2 <= finished_before < 6, "the kill did not land mid-job"

    resumed = run_job(parse_spec({**spec, "run_id": "interrupted"}))
    assert resumed.summary["blocks_resumed"] == finished_before
    assert resumed.summary["blocks_computed"] == 6 - finished_before
    straight = run_job(parse_spec({**spec, "run_id": "straight"}))
    for table in ("heatmaps", "metrics", "errors"):
        a = read_table(resumed.root, table)
        b = read_table(straight.root, table)
        assert a.num_rows == b.num_rows
    a = _by_key(read_table(resumed.root, "heatmaps"))
    b = _by_key(read_table(straight.root, "heatmaps"))
    assert a.keys() == b.keys() and len(a) == 12 * 3
    assert max(np.abs(a[k].astype(int) - b[k].astype(int)).max() for k in a) <= 1


def _by_key(table) -> dict:
    maps = np.concatenate([c.to_numpy_ndarray() for c in table.column("heatmap").chunks])
    meta = table.select(["image_id", "explainer", "target"]).to_pylist()
    out = {(m["image_id"], m["explainer"], m["target"]): maps[i] for i, m in enumerate(meta)}
    assert len(out) == len(meta)  # no duplicate (image, explainer, target)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_job_against_a_real_mlflow_server(ray_local, demo_images, tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        import urllib.request

        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        _local_images(tmp_path / "data", demo_images, 3)
        uri = f"http://127.0.0.1:{port}"
        spec = parse_spec(base_spec(str(tmp_path / "data" / "images"), str(tmp_path / "runs"), uri))
        result = run_job(spec)
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        run = client.get_run(result.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["images_ok"] == 3
        assert "summary.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"sourc": {"uri": "x"}}, "sourc: unknown key"),
        ({"compute": {"actors": "two"}}, "compute.actors: Input should be a valid integer"),
        ({"explainers": [{"name": "gradcm"}]}, "explainers.0.name: unknown explainer 'gradcm'"),
        (
            {"explainers": [{"name": "gradcam", "params": {"lyr": 1}}]},
            "explainers.0.params.lyr: explainer 'gradcam' has no parameter 'lyr'",
        ),
        ({"storage": {"aws_secret_access_key": "x"}}, "storage.aws_secret_access_key: unknown key"),
        ({"targets": {"mode": "classes"}}, "targets: mode 'classes' needs a non-empty"),
        ({"run_id": "../../etc"}, "run_id: run_id may hold only letters"),
        ({"output": {"heatmap_dtype": "int7"}}, "output.heatmap_dtype: Input should be"),
        (
            {"metrics": [{"name": "win", "params": {"against": "rise"}}]},
            "metrics.0.params.against: 'win' compares with another explainer",
        ),
        (
            {"metrics": [{"name": "deletion", "params": {"stepz": 3}}]},
            "metrics.0.params.stepz: metric 'deletion' has no parameter 'stepz'",
        ),
    ],
)
def test_bad_spec_one_line_with_path_exit_2(patch, expected, tmp_path):
    spec = {"source": {"uri": "data/"}, "explainers": [{"name": "gradcam"}], **patch}
    if "sourc" in patch:
        spec.pop("source")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert expected in result.output, result.output
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and expected in result.output


def test_attribution_visualization_pictures_are_written_per_image(ray_local, demo_images, tmp_path):
    """Image-shaped extras (the synthesised image and its mask) land as PNGs beside the rows."""
    from PIL import Image

    _local_images(tmp_path / "data", demo_images, 2)
    params = {"steps": 2, "attr_steps": 2}
    spec = base_spec(
        str(tmp_path / "data" / "images"),
        str(tmp_path / "runs"),
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        explainers=[{"name": "attribution_visualization", "params": params}],
        run_id="vis",
    )
    result = run_job(parse_spec(spec))
    rows = read_table(result.root, "heatmaps").select(["image_id", "target"]).to_pylist()
    assert len(rows) == 2
    folder = Path(result.root) / "pictures" / "attribution_visualization"
    for row in rows:
        stem = f"{row['image_id']}.t{row['target']}"
        image = Image.open(folder / safe_name(f"{stem}.image.png"))
        mask = Image.open(folder / safe_name(f"{stem}.mask.png"))
        assert image.mode == "RGB" and image.size == (224, 224)
        assert mask.mode == "L" and mask.size == (224, 224)
    assert len(list(folder.iterdir())) == 4
    # the actor runs torch on the threads the spec gives it, not the 1 Ray's OMP_NUM_THREADS
    # would leave it for a fractional CPU
    markers = read_markers(result.root, finished_block_ids(result.root))  # folded: compacted
    assert {m.torch_threads for m in markers} == {os.cpu_count()}  # one actor, 0.5 CPU


def test_torch_threads_per_actor():
    from pipeline.spec import ComputeSpec

    cores = os.cpu_count()
    assert torch_threads(ComputeSpec()) == cores  # one actor with a fraction: the node's cores
    assert torch_threads(ComputeSpec(actors=cores * 2)) == 1
    assert torch_threads(ComputeSpec(cpus_per_actor=3)) == 3  # what Ray reserved for it
    assert torch_threads(ComputeSpec(cpus_per_actor=3, threads_per_actor=5)) == 5
    # 64 actors of 0.5 CPU over eight 96-core nodes: 8 per node, 12 threads each (the
    # cluster-wide count gave 96 // 64 = 1)
    assert torch_threads(ComputeSpec(actors=64), node_cpus=96, nodes=8) == 12
    # all 64 on one such node: the node's cores shared by 64
    assert torch_threads(ComputeSpec(actors=64), node_cpus=96, nodes=1) == 1
    # more actors than fit on a node at their fraction: at most cpus / fraction there
    assert torch_threads(ComputeSpec(actors=500, cpus_per_actor=0.5), 8, 2) == 1


def test_batch_size_defaults_by_device():
    from pipeline.spec import ComputeSpec

    assert ComputeSpec().batch_for("cpu") == 16
    assert ComputeSpec().batch_for("cuda:0") == 64
    assert ComputeSpec(batch_size=8).batch_for("cuda:0") == 8  # the spec's own wins


def test_decode_tasks_follow_the_cluster_cpus():
    from pipeline.engine.job import decode_tasks
    from pipeline.spec import ComputeSpec

    assert decode_tasks(ComputeSpec(), 2) == 2  # a laptop: at least 2
    # 8 GPU actors of 4 CPUs on 96 CPUs: 64 spare, at most 4 per actor
    assert decode_tasks(ComputeSpec(actors=8, cpus_per_actor=4), 96) == 32
    # 64 actors of 1 CPU on 96: the 32 spare CPUs
    assert decode_tasks(ComputeSpec(actors=64, cpus_per_actor=1), 96) == 32


def test_bench_pipeline_compares_the_job_with_in_process(ray_local, demo_images, tmp_path):
    _local_images(tmp_path / "data", demo_images, 6)
    spec = base_spec(
        str(tmp_path / "data" / "images"),
        str(tmp_path / "runs"),
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        explainers=[{"name": "gradcam"}],
        compute={"block_size": 2, "batch_size": 2},
    )
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "pipeline.json"
    result = CliRunner().invoke(app, ["bench", "--pipeline", str(spec_path), "--json", str(out)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["images"] == 6
    for key in ("in_process_images_per_s", "ray_images_per_s", "ray_steady_images_per_s"):
        assert got[key] > 0, key
    assert got["ratio"] == pytest.approx(got["ray_images_per_s"] / got["in_process_images_per_s"])
    assert got["startup_seconds"] > 0
    assert read_table(str(tmp_path / "runs" / got["run_id"]), "heatmaps").num_rows == 6


def test_resume_after_inputs_changed_holds_the_rows_of_a_fresh_run(
    ray_local, demo_images, tmp_path
):
    """Between attempts one input is added, one removed and one replaced under its name: a
    resume reports it and keeps its plan; a replanned one recomputes only the blocks those
    touch, leaves no stale part behind, and its tables and summary equal a fresh run's over the
    final inputs."""
    folder = tmp_path / "data" / "images"
    _local_images(tmp_path / "data", demo_images, 6)
    spec = base_spec(
        str(folder),
        str(tmp_path / "runs"),
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        explainers=[{"name": "gradcam"}],
        metrics=[{"name": "average_drop"}],
        compute={"block_size": 2, "batch_size": 2},
        output={"compact": True},  # the changed blocks' rows must leave the compacted files
    )
    first = run_job(parse_spec({**spec, "run_id": "changing"}))
    assert first.summary["blocks_computed"] == 3
    before = _by_key(read_table(first.root, "heatmaps"))

    (folder / "img00.png").unlink()  # removed: its block (img00, img01) goes
    crop = demo_images[3][40:200, 60:260]
    (folder / "img03.png").write_bytes(image_bytes(crop, "PNG"))  # replaced: (img02, img03)
    (folder / "img99.png").write_bytes(image_bytes(demo_images[0][::2, ::2], "PNG"))  # added
    # a plain resume keeps its stored plan (no listing before the compute) and says what changed
    kept = run_job(parse_spec({**spec, "run_id": "changing"}))
    assert (kept.summary["blocks_resumed"], kept.summary["blocks_computed"]) == (3, 0)
    assert kept.summary["source_changes"] == (
        "the source changed since this run was planned: 1 inputs added, 1 removed, 1 changed; "
        "this run kept its plan: run it with --replan to compute the changes"
    )
    assert _by_key(read_table(kept.root, "heatmaps")).keys() == before.keys()
    resumed = run_job(parse_spec({**spec, "run_id": "changing"}), replan=True)
    s = resumed.summary
    assert (s["inputs"], s["images_ok"], s["lost"]) == (6, 6, 0)
    # kept: (img04, img05); new blocks: img01, img02, img03 and img99 (two blocks of two)
    assert (s["blocks_resumed"], s["blocks_computed"]) == (1, 2)
    assert s["explainers"]["gradcam"]["images"] == 6
    assert s["explainers"]["gradcam"]["metric_counts"]["average_drop"] == 6

    fresh = run_job(parse_spec({**spec, "run_id": "fresh"}))
    for table in ("heatmaps", "metrics", "errors"):
        assert read_table(resumed.root, table).num_rows == read_table(fresh.root, table).num_rows
    a = _by_key(read_table(resumed.root, "heatmaps"))
    b = _by_key(read_table(fresh.root, "heatmaps"))
    assert {k[0] for k in a} == {f"img{i:02d}.png" for i in (1, 2, 3, 4, 5, 99)}
    assert a.keys() == b.keys()
    assert max(np.abs(a[k].astype(int) - b[k].astype(int)).max() for k in a) <= 1
    # the replaced image was recomputed: its map is the new bytes', not the old ones'
    new = next(k for k in a if k[0] == "img03.png")
    old = next(k for k in before if k[0] == "img03.png")
    assert np.abs(a[new].astype(int) - before[old].astype(int)).max() > 10
    for key in ("images_ok", "errors", "rows"):
        assert s[key] == fresh.summary[key]
    assert s["explainers"]["gradcam"]["metrics"] == pytest.approx(
        fresh.summary["explainers"]["gradcam"]["metrics"]
    )
    # compacted again: one file per table and explainer, no part or marker left over; no
    # block had an error, so there is no errors file
    left = sorted(
        p.relative_to(resumed.root).parent.as_posix() for p in Path(resumed.root).rglob("*.parquet")
    )
    want = [".", "_plan", "_plan", "heatmaps/explainer=gradcam", "metrics/explainer=gradcam"]
    assert left == want, left  # "." : the folded markers
    assert not (Path(resumed.root) / "_blocks").exists() or not any(
        (Path(resumed.root) / "_blocks").iterdir()
    )

    # a run with nothing changed computes nothing and reads the same
    again = run_job(parse_spec({**spec, "run_id": "changing"}))
    assert (again.summary["blocks_resumed"], again.summary["blocks_computed"]) == (3, 0)
    assert again.summary["explainers"]["gradcam"]["images"] == 6
    assert (
        again.summary["explainers"]["gradcam"]["metrics"] == s["explainers"]["gradcam"]["metrics"]
    )


def test_a_run_that_explains_too_little_fails_loudly_and_keeps_its_rows(
    ray_local, demo_images, tmp_path
):
    import mlflow

    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for i in range(2):
        (images / f"good{i}.png").write_bytes(image_bytes(demo_images[i][::4, ::4], "PNG"))
    for i in range(3):
        (images / f"bad{i}.jpg").write_bytes(b"not a picture %d" % i)
    annotations = tmp_path / "data" / "annotations.json"  # labels, but no boxes to point at
    annotations.write_text(json.dumps([{"file": f"good{i}.png", "label_index": 1} for i in (0, 1)]))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = base_spec(
        str(images),
        str(tmp_path / "runs"),
        tracking,
        explainers=[{"name": "gradcam"}],
        metrics=[{"name": "pointing_game"}],
        run_id="too-little",
    )
    spec["source"]["annotations"] = str(annotations)
    spec["tracking"]["tags"] = {"deploy_token": "plain-value-never-copied"}
    with pytest.raises(JobFailed, match=r"3 of 5 inputs failed \(60%\), more than max_error_share"):
        run_job(parse_spec(spec))
    root = tmp_path / "runs" / "too-little"
    summary = json.loads((root / "summary.json").read_text())  # kept for a look
    assert (summary["images_ok"], summary["errors"]) == (2, 3)
    assert summary["warnings"] == ["gradcam: metric 'pointing_game' produced no values"]
    client = mlflow.MlflowClient(tracking)
    run = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id],
        filter_string="tags.`salient.run_id` = 'too-little'",
    )[0]
    assert run.info.status == "FAILED" and "max_error_share" in run.data.tags["salient.error"]
    # secret-named values are hidden in the spec's copies as in the tags
    assert "plain-value-never-copied" not in (root / "spec.yaml").read_text()
    assert run.data.tags["deploy_token"] == "***"
    artifact = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="spec.yaml", tracking_uri=tracking
    )
    assert "plain-value-never-copied" not in Path(artifact).read_text()

    # the same run accepting more errors: resumed (nothing recomputed), passes with a warning,
    # and the failure it resumed from is cleared
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**spec, "max_error_share": 0.8}))
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "warning: gradcam: metric 'pointing_game' produced no values" in result.output
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "salient.error" not in run.data.tags

    # nothing explained at all: exit 1 with the first error, no throughput for 0 images
    for i in range(2):
        (images / f"good{i}.png").unlink()
    spec_none = {**spec, "run_id": "nothing", "metrics": []}
    path.write_text(yaml.safe_dump(spec_none))
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["run", str(path)])
    assert result.exit_code == 1
    assert "no image was explained: all 3 inputs are error rows; first error: bad0.jpg" in (
        " ".join(result.output.split())
    )
    summary = json.loads((tmp_path / "runs" / "nothing" / "summary.json").read_text())
    assert summary["images_per_s"] is None
    assert summary["explainers"]["gradcam"]["images"] == 0
    assert summary["explainers"]["gradcam"]["images_per_s"] is None


def test_console_carries_only_salients_lines_and_ctrl_c_says_how_to_resume(demo_images, tmp_path):
    """The CLI as a user runs it (its own local Ray, real stderr): progress per block, no Ray
    or MLflow lines; Ctrl-C (SIGINT to the process group) says what was saved; the same
    command resumes and ends with the report's path."""
    _local_images(tmp_path / "data", demo_images, 8)
    spec = base_spec(
        "data/images",  # relative: resolved against the spec's folder, not the working dir
        "runs/",
        "sqlite:///mlflow.db",
        explainers=[{"name": "gradcam"}, {"name": "scorecam", "params": {"top_k": 24}}],
        compute={"block_size": 2, "batch_size": 2},
        output={"compact": True},  # the console of a run as shipped: compaction included
        run_id="console",
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["SALIENT_LOG_DIR"] = str(tmp_path / "logs")
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "job.yaml")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=elsewhere,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    markers = tmp_path / "runs" / "console" / "_blocks"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 1:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"error: interrupted: [1-3]/4 blocks saved; run the same command to resume", last
    ), err
    noise = ("raylet", "core_worker", "Token authentication", "MLflow database", "WARNING")
    for text in (out, err):
        assert not any(n in text for n in noise), text

    done = subprocess.run(cmd, env=env, cwd=elsewhere, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"4 blocks, [1-3] finished by an earlier attempt", lines[0]), lines[0]
    assert any(re.match(r"block 4/4: 2/2 images explained", ln) for ln in lines), done.stdout
    assert lines[-1] == f"report: {tmp_path / 'runs' / 'console'}/report.html"
    assert (tmp_path / "runs" / "console" / "report.html").exists()
    assert done.stderr == "" and not any(n in done.stdout for n in noise), done.stderr
    # MLflow: the run resumed to success, the interruption's error cleared, absolute URIs
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs(
        [client.get_experiment_by_name("tests").experiment_id],
        filter_string="tags.`salient.run_id` = 'console'",
    )[0]
    assert run.info.status == "FINISHED" and "salient.error" not in run.data.tags
    assert run.data.tags["salient.data_uri"] == str(tmp_path / "data" / "images")
    assert run.data.tags["salient.output_uri"] == str(tmp_path / "runs" / "console")


def test_a_ray_job_that_ends_without_every_block_fails_not_a_partial_summary(
    ray_local, demo_images, tmp_path, monkeypatch
):
    """If the stream of finished blocks ends early without an error (an interrupt swallowed by
    a library, a Ray bug), the run must not end as a success over the blocks that did arrive."""
    from pipeline.engine import job as job_module

    _local_images(tmp_path / "data", demo_images, 4)
    spec = base_spec(
        str(tmp_path / "data" / "images"),
        str(tmp_path / "runs"),
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        explainers=[{"name": "gradcam"}],
        compute={"block_size": 2},
    )
    monkeypatch.setattr(job_module, "_execute", lambda *args: iter(()))
    with pytest.raises(JobFailed, match="2 of 2 blocks did not finish"):
        run_job(parse_spec(spec))
