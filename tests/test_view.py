"""`salient view` over two runs, one on the S3 endpoint, in a real headless Chromium: pages load
without console errors, filters and sorts change what is shown, an overlay decodes, the
two-run view lists the changed images first; the token guards any non-loopback host."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from test_report import CHROMIUM, FLAGS

from pipeline.runstore import METRIC_SCHEMA
from pipeline.runstore.codec import encode_heatmaps, heatmap_schema, heatmap_table, parquet_bytes
from pipeline.runstore.layout import part_uri
from pipeline.storage import Storage
from pipeline.view.server import make_server

CLASSES = {0: "cat", 1: "dog"}
IMAGES = [f"img{i:02d}" for i in range(20)]  # img00-09 labelled cat, img10-19 dog
WRONG = {"img10", "img11", "img12"}  # dogs predicted as cats
CHANGED = {"img03", "img07", "img14", "img18"}  # maps inverted in the second run
DELETION = {iid: round(0.05 * (i % 10) + 0.01 * (i // 10), 3) for i, iid in enumerate(IMAGES)}


def _write_run(root: str, storage: Storage, images: Path, changed: set[str]) -> None:
    """A run as the job writes it (summary, heatmap and metric parts via the run's codec)."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    heat_rows, metric_rows = [], []
    schema = heatmap_schema(16, "uint8")
    for i, iid in enumerate(IMAGES):
        label = 0 if i < 10 else 1
        predicted = 0 if iid in WRONG else label
        blob = torch.exp(-((yy - 4 - i) ** 2 + (xx - 8 - i % 5) ** 2) / 30.0)
        for explainer in ("gradcam", "saliency"):
            m = blob if explainer == "gradcam" else blob.T
            if iid in changed:
                m = 1 - m
            stored, lo, hi = encode_heatmaps(m[None], 16, "uint8")
            heat_rows.append(
                {
                    "run_id": "r",
                    "image_id": iid,
                    "source_uri": str(images / f"{iid}.png"),
                    "source_member": None,
                    "model_id": "test",
                    "explainer": explainer,
                    "method": explainer,
                    "target": predicted,
                    "target_name": CLASSES[predicted],
                    "target_rank": 0,
                    "score": 0.5 + i / 100,
                    "predicted": predicted,
                    "predicted_name": CLASSES[predicted],
                    "label": label,
                    "heatmap": stored[0].numpy(),
                    "h": 32,
                    "w": 32,
                    "map_min": float(lo[0]),
                    "map_max": float(hi[0]),
                    "forward_passes": 1,
                }  # fmt: skip
            )
            value = DELETION[iid] + (0.5 if explainer == "saliency" else 0.0)
            metric_rows.append(
                {
                    "run_id": "r",
                    "image_id": iid,
                    "explainer": explainer,
                    "target": predicted,
                    "metric": "deletion",
                    "value": value,
                }  # fmt: skip
            )
    storage.write_bytes_atomic(
        part_uri(root, "heatmaps", "b0"), parquet_bytes(heatmap_table(heat_rows, schema))
    )
    metrics = pa.Table.from_pylist(metric_rows, schema=METRIC_SCHEMA)
    storage.write_bytes_atomic(part_uri(root, "metrics", "b0"), parquet_bytes(metrics))
    per = {
        x: {"images": 20, "metrics": {"deletion": 0.3}, "metric_counts": {"deletion": 20},
            "metric_intervals": {"deletion": [0.25, 0.35]}}
        for x in ("gradcam", "saliency")
    }  # fmt: skip
    summary = {
        "run_id": root.rsplit("/", 1)[-1], "inputs": 20, "images_ok": 20, "errors": 0, "lost": 0,
        "metrics": [{"key": "deletion", "name": "deletion", "higher_is_better": False}],
        "explainers": per,
        "preprocess": {"size": 32, "policy": "squash"},
    }  # fmt: skip
    storage.write_bytes_atomic(f"{root}/summary.json", json.dumps(summary).encode())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, s3_endpoint, s3):
    tmp = tmp_path_factory.mktemp("view")
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for iid in IMAGES:
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            images / f"{iid}.png"
        )
    s3.create_bucket(Bucket="view-runs")
    storage = Storage(endpoint_url=s3_endpoint)
    current = "s3://view-runs/runs/nightly-2"
    _write_run(current, storage, images, CHANGED)
    baseline = str(tmp / "runs" / "nightly-1")
    _write_run(baseline, storage, images, set())
    server, url = make_server(current, storage, against=baseline, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield url.rstrip("/"), tmp
    server.shutdown()
    server.server_close()


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=10000",
         *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _dom(url: str, tmp: Path) -> str:
    """The page after load in headless Chromium, failing on any console error."""
    proc = _chromium(tmp, "--dump-dom", url)
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln]
    errors = [ln for ln in console if re.search(r"ERROR|Uncaught|console\.error", ln)]
    assert not errors, errors
    assert proc.stdout.strip(), proc.stderr[-500:]
    return proc.stdout


def _ids(dom: str) -> list[str]:
    return re.findall(r"<span class=\"id\">([^<]+)</span>", dom)


def test_the_pages_load_and_filters_and_sorts_change_what_is_shown(runs):
    url, tmp = runs
    home = _dom(url + "/", tmp)
    assert "nightly-2" in home and "[0.250, 0.350]" in home and "n=20" in home
    wrong = _dom(url + "/grid?cls=1&outcome=wrong", tmp)
    assert re.search(r'id="total">6<', wrong)  # 3 wrong dogs x 2 explainers
    assert set(_ids(wrong)) == WRONG
    by_metric = _dom(url + "/grid?explainer=gradcam&metric=deletion&sort=metric&desc=1", tmp)
    assert _ids(by_metric)[0] == max(DELETION, key=DELETION.get)
    ascending = _dom(url + "/grid?explainer=gradcam&metric=deletion&sort=metric", tmp)
    assert _ids(ascending)[0] == min(DELETION, key=DELETION.get)
    ranged = _dom(url + "/grid?explainer=gradcam&metric=deletion&low=0.3&high=0.5", tmp)
    assert set(_ids(ranged)) == {i for i, v in DELETION.items() if 0.3 <= v <= 0.5}
    classes = _dom(url + "/classes?sort=accuracy&desc=0", tmp)
    rows = re.findall(r"<td><a href=\"/grid\?cls=(\d)\">", classes)
    assert rows == ["1", "0"]  # dogs (70% right) before cats (100%) ascending
    one = _dom(url + "/image?id=img05", tmp)
    assert one.count("<img") == 2 and "deletion 0.250" in one and "deletion 0.750" in one


def test_an_overlay_decodes_in_the_browser(runs):
    url, tmp = runs
    probe = tmp / "probe.html"
    src = f"{url}/overlay.png?run=0&image=img01&explainer=gradcam&target=0"
    probe.write_text(
        f"<img id=o src='{src}' onload=\"document.title='decoded '+this.naturalWidth\" "
        "onerror=\"document.title='failed'\">"
    )
    proc = _chromium(tmp, "--dump-dom", probe.as_uri())
    assert "<title>decoded 160</title>" in proc.stdout, proc.stdout[-500:]


def test_the_two_run_view_lists_the_changed_images_first(runs):
    url, tmp = runs
    dom = _dom(url + "/compare?explainer=gradcam", tmp)
    ids = _ids(dom)
    assert set(ids[: len(CHANGED)]) == CHANGED and len(ids) == 20
    values = [float(v) for v in re.findall(r'class="value">([0-9.]+)<', dom)]
    assert min(values[: len(CHANGED)]) > 1.5 and max(values[len(CHANGED) :]) < 1e-3
    if os.environ.get("SALIENT_UPDATE_SCREENSHOT"):  # the README's picture (docs/view.jpg)
        shot = tmp / "view.png"
        _chromium(tmp, "--window-size=1100,760", f"--screenshot={shot}",
                  url + "/grid?metric=deletion&sort=metric&desc=1")  # fmt: skip
        docs = Path(__file__).parents[1] / "docs"
        docs.mkdir(exist_ok=True)
        Image.open(shot).convert("RGB").save(docs / "view.jpg", quality=80)


def test_a_browser_on_another_host_needs_its_token(runs, tmp_path):
    storage = Storage()
    run = str(tmp_path / "run")
    _write_run(run, storage, tmp_path, set())
    server, url = make_server(run, storage, host="0.0.0.0", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base, token = url.split("?token=")
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(base + "classes")
        assert denied.value.code == 403
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "classes?token=wrong")
        ok = urllib.request.urlopen(f"{base}classes?token={token}")
        assert ok.status == 200 and "salient_token=" in ok.headers["Set-Cookie"]
        cookie = ok.headers["Set-Cookie"].split(";")[0]
        again = urllib.request.urlopen(
            urllib.request.Request(base + "grid", headers={"Cookie": cookie})
        )
        assert again.status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a finished run"):
        make_server(str(tmp_path), Storage(), port=0)
