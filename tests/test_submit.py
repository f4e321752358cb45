"""`salient submit / status / logs` against a real two-node Ray cluster on this machine.

The cluster is started with `ray start` (a head with the dashboard, plus a second node that
joins it), in its own temp dir and on free ports, so that it cannot meet another Ray on the
machine. It is stopped by killing only the processes it started (found by that temp dir in
their command lines, and their descendants): never `ray stop`, which kills every Ray here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app

RAY = str(Path(sys.executable).with_name("ray"))
SECRET = "not-a-real-secret-7f3a9c"  # set in the submitter's env: must not travel with the job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Every port a node listens on, chosen free: defaults (10001, 52365, ...) may be taken by
    another engineer's Ray on this machine."""
    names = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    return [f"--{name}={free_port()}" for name in names]


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _ppids() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def cluster_pids(temp_dir: Path) -> set[int]:
    """Processes of the cluster rooted at temp_dir: those naming it on their command line (GCS,
    raylets, dashboard, monitors) and all their descendants (agents, workers, job drivers)."""
    parents = _ppids()
    # the dir itself, not a sibling that shares its prefix (ray0 vs ray01)
    named = re.compile(re.escape(str(temp_dir)) + r"(?=[/\s'\"]|$)")
    mine = {pid for pid in parents if named.search(_cmdline(pid))}
    grew = True
    while grew:
        kids = {pid for pid, ppid in parents.items() if ppid in mine} - mine
        mine |= kids
        grew = bool(kids)
    mine.discard(os.getpid())
    return mine


def stop_cluster(temp_dir: Path, timeout: float = 3.0) -> None:
    """SIGTERM this cluster's processes, then SIGKILL what is left after `timeout` (the GCS and
    raylets can take 10+ s to exit on SIGTERM; nothing of theirs needs saving here)."""
    pids = cluster_pids(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)}
            if not pids:
                return
            time.sleep(0.2)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _dashboard_up(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def _alive_nodes(url: str) -> int:
    with urllib.request.urlopen(f"{url}/api/v0/nodes", timeout=5) as r:
        nodes = json.load(r)["data"]["result"]["result"]
    return sum(n["state"] == "ALIVE" for n in nodes)


@pytest.fixture
def cluster(tmp_path_factory):
    """A head (1 CPU, dashboard) and a second node (1 CPU) joined to it; yields the dashboard
    URL. A short temp dir: Ray's socket paths under it must stay below 108 characters."""
    temp_dir = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = free_port(), free_port()
    common = [
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=100000000",
        "--disable-usage-stats",
    ]
    head = [
        RAY,
        "start",
        "--head",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={free_port()}",
        *common,
        *_node_ports(),
    ]
    worker = [RAY, "start", f"--address=127.0.0.1:{gcs}", *common, *_node_ports()]
    url = f"http://127.0.0.1:{dashboard}"
    try:
        for cmd in (head, worker):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
            if r.returncode != 0:
                pytest.skip(f"`ray start` failed: {(r.stderr or r.stdout).strip()[-400:]}")
        if not _dashboard_up(url, 60):
            pytest.skip(f"the Ray dashboard did not answer at {url} within 60 s")
        deadline = time.monotonic() + 30
        while _alive_nodes(url) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _alive_nodes(url) == 2, "the second node did not join the head"
        yield url
    finally:
        stop_cluster(temp_dir)
        assert not cluster_pids(temp_dir), "cluster processes left running"


def write_images(folder: Path) -> None:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True)
    for name in ("chelsea", "coffee", "astronaut"):
        Image.fromarray(getattr(data, name)()).resize((96, 72)).save(folder / f"{name}.jpg")


@pytest.mark.slow
def test_submit_runs_a_job_on_a_two_node_cluster(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    write_images(tmp_path / "images")
    spec = {
        "source": {"uri": str(tmp_path / "images"), "labels_from": "none"},
        "model": {"uri": "builtin:efficientnet-lite0"},
        "explainers": [{"name": "gradcam"}],
        "output": {"uri": str(tmp_path / "out"), "heatmap_size": 16},
        "compute": {"actors": 1, "batch_size": 4, "block_size": 2, "cpus_per_actor": 0.5},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "submit"},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    job_id = f"salient-test-{uuid.uuid4().hex[:8]}"
    runner = CliRunner()
    address = ["--address", cluster]

    t0 = time.monotonic()
    r = runner.invoke(
        app,
        ["submit", str(spec_path), *address, "--submission-id", job_id]
        + ["--python", sys.executable, "--wait"],
    )
    assert r.exit_code == 0, r.output
    assert job_id in r.output and "SUCCEEDED" in r.output
    assert time.monotonic() - t0 < 120

    r = runner.invoke(app, ["status", job_id, *address])
    assert r.exit_code == 0, r.output
    assert "SUCCEEDED" in r.output

    for follow in ([], ["--follow"]):
        r = runner.invoke(app, ["logs", job_id, *address, *follow])
        assert r.exit_code == 0, r.output
        assert "inputs 3 = images 3 + errors 0 (lost 0)" in r.output
        assert "run id: run-" in r.output

    runs = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert (summary["inputs"], summary["images_ok"], summary["errors"]) == (3, 3, 0)
    heatmaps = pq.read_table(runs[0] / "heatmaps")
    assert heatmaps.num_rows == 3
    assert sorted(heatmaps.column("image_id").to_pylist()) == sorted(
        ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
    )
    # compacted on the cluster: the two blocks' markers folded into one table, no part left
    commit = json.loads((runs[0] / "_compacted.json").read_text())
    assert len(commit["blocks"]) == 2 and commit["markers"]
    assert not list(runs[0].glob("*/part-*.parquet")) and not list(runs[0].glob("_blocks/*"))
    assert (tmp_path / "mlflow.db").exists()

    # the same submission id again: refused with one clear line, nothing resubmitted
    r = runner.invoke(app, ["submit", str(spec_path), *address, "--submission-id", job_id])
    assert r.exit_code == 2
    assert "already exists" in r.output and "Traceback" not in r.output

    # nothing secret travelled: not in the runtime env, the entrypoint or the metadata
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(cluster).get_job_info(job_id)
    sent = json.dumps([info.runtime_env, info.entrypoint, info.metadata])
    assert SECRET not in sent and "env_vars" not in (info.runtime_env or {})
    assert info.entrypoint.startswith(sys.executable)


def test_unreachable_cluster_gives_one_line(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    r = CliRunner().invoke(app, ["status", "nope", "--address", f"http://127.0.0.1:{free_port()}"])
    assert r.exit_code == 1
    assert "cannot reach the Ray dashboard" in r.output and "Traceback" not in r.output


def test_bad_spec_is_refused_before_the_cluster(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("source: {uri: /data}\nexplainers: [{name: gradcam, params: {lyr: 1}}]\n")
    r = CliRunner().invoke(app, ["submit", str(spec), "--address", "http://127.0.0.1:1"])
    assert r.exit_code == 2
    assert "explainers.0.params.lyr" in r.output and "Traceback" not in r.output


def test_submission_carries_package_and_spec_but_no_secret(tmp_path, monkeypatch):
    from pipeline.cluster import PACKAGE_DIR, SubmitError, build_submission
    from pipeline.spec import SpecError

    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "source: {uri: /data}\nexplainers: [{name: gradcam}]\n"
        "tracking: {uri: 'sqlite:////srv/mlflow.db'}\noutput: {uri: /srv/runs}\n"
        "run_id: nightly-{date}\n"
    )
    sub = build_submission(str(spec), python="/opt/venv/bin/python", workdir=tmp_path / "w")
    assert sub.entrypoint == "/opt/venv/bin/python -m pipeline.cli run spec.yaml"
    assert sub.runtime_env["py_modules"] == [str(PACKAGE_DIR)]
    assert (Path(sub.runtime_env["working_dir"]) / "spec.yaml").read_text() == spec.read_text()
    assert set(sub.runtime_env) == {"working_dir", "py_modules", "excludes"}  # no env_vars

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-secret")
    spec.with_name("clean.yaml").write_text(spec.read_text())
    spec.write_text(
        spec.read_text().replace("sqlite:////srv/mlflow.db", "http://u:hunter2-secret@h")
    )
    # refused while the spec is read, as `run` and `validate` refuse it (pipeline/secrets.py)
    with pytest.raises(SpecError, match=r"contains the value of \$MLFLOW_TRACKING_PASSWORD"):
        build_submission(str(spec), workdir=tmp_path / "w2")
    with pytest.raises(SubmitError, match="MLFLOW_TRACKING_PASSWORD"):  # and in the entrypoint
        build_submission(
            str(spec.with_name("clean.yaml")), run_id="hunter2-secret", workdir=tmp_path / "w3"
        )


# -- a spec bound for a cluster ------------------------------------------------------------
LOCAL_ONLY = (
    "source: {uri: 's3://b/imgs/'}\nexplainers: [{name: gradcam}]\n"
    "output: {uri: 's3://b/runs/'}\n"
    "storage: {endpoint_url: 'http://127.0.0.1:9000'}\n"
    "tracking: {uri: 'sqlite:///mlflow.db'}\n"
)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("http://127.0.0.1:9000", True),
        ("http://127.8.0.1", True),
        ("http://localhost:9000/", True),
        ("http://[::1]:9000", True),
        ("http://[::ffff:127.0.0.1]:9000", True),
        ("http://0.0.0.0:9000", True),
        ("127.0.0.1:6379", True),
        ("ray://127.0.0.1:10001", True),
        ("http://minio.storage:9000", False),
        ("https://s3.eu-west-1.amazonaws.com", False),
        ("ray://head:10001", False),
        ("http://10.0.0.7:8265", False),
    ],
)
def test_loopback_addresses(address, loopback):
    from pipeline.spec import is_loopback

    assert is_loopback(address) is loopback


def test_submit_to_a_remote_cluster_refuses_what_only_works_here(tmp_path, monkeypatch):
    import pipeline.cluster as cluster_module

    tried = []
    monkeypatch.setattr(cluster_module, "client", lambda address: tried.append(address))
    spec = tmp_path / "spec.yaml"
    spec.write_text(LOCAL_ONLY)
    r = CliRunner().invoke(app, ["submit", str(spec), "--address", "http://head-svc:8265"])
    assert r.exit_code == 2 and tried == [], r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 2, r.output
    assert lines[0].startswith(f"error: {spec}: storage.endpoint_url: 'http://127.0.0.1:9000'")
    assert lines[1].startswith(f"{spec}: tracking.uri: 'sqlite:///mlflow.db' is a relative")
    # mended: absolute sqlite, the storage service's cluster address
    spec.write_text(
        LOCAL_ONLY.replace("127.0.0.1", "minio.storage").replace("///mlflow", "////srv/mlflow")
    )
    from pipeline.cluster import build_submission

    sub = build_submission(str(spec), workdir=tmp_path / "w", remote=True)
    assert sub.entrypoint.endswith("run spec.yaml")


def test_submit_to_a_dashboard_here_only_warns(tmp_path, monkeypatch):
    """The local stack's head reaches 127.0.0.1 too: warnings, and the submission goes on."""
    import pipeline.cluster as cluster_module

    def unreachable(address):
        raise cluster_module.SubmitError(f"cannot reach the Ray dashboard at {address}: test")

    monkeypatch.setattr(cluster_module, "client", unreachable)
    spec = tmp_path / "spec.yaml"
    spec.write_text(LOCAL_ONLY.replace("tracking: {uri: 'sqlite:///mlflow.db'}\n", ""))
    r = CliRunner().invoke(app, ["submit", str(spec), "--address", "http://127.0.0.1:8265"])
    assert r.exit_code == 1 and "cannot reach the Ray dashboard" in r.output, r.output
    assert "warning: storage.endpoint_url: 'http://127.0.0.1:9000' is a loopback" in r.output
    # a left-out tracking.uri is the cluster's MLFLOW_TRACKING_URI: said, not refused
    assert "tracking.uri is not in the spec" in r.output


def test_run_on_a_remote_cluster_refuses_before_ray(tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    spec = jobs / "spec.yaml"
    spec.write_text(LOCAL_ONLY.replace("sqlite:///mlflow.db", "sqlite:///../mlflow.db"))
    r = CliRunner().invoke(app, ["run", str(spec), "--address", "ray://head:10001"])
    assert r.exit_code == 2, r.output
    assert "storage.endpoint_url: 'http://127.0.0.1:9000' is a loopback" in r.output
    # as written, not as resolved here (load_spec makes the path absolute for a local run)
    assert "tracking.uri: 'sqlite:///../mlflow.db' is a relative sqlite store" in r.output
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")  # the address from the environment
    r = CliRunner().invoke(app, ["run", str(spec)])
    assert r.exit_code == 2 and "storage.endpoint_url" in r.output, r.output


@pytest.mark.parametrize(
    ("address", "remote"),
    [(None, False), ("auto", False), ("local", False), ("ray://127.0.0.1:10001", False)]
    + [("127.0.0.1:6379", False), ("ray://head:10001", True), ("10.1.2.3:6379", True)],
)
def test_which_ray_addresses_are_remote(address, remote):
    from pipeline.cli import _remote_address

    assert _remote_address(address) is remote
