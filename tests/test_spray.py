"""SpRAy: a known answer (a watermark shortcut found as its own, first-ranked cluster), the
spectral maths against direct dense computations, and the Ray Data path against the in-process
one on a run's written heatmaps table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from pipeline.analysis.spray import (
    SprayParams,
    eigengap,
    knn_affinity,
    log_spray,
    normalise_maps,
    normalised_laplacian,
    read_spray,
    spectral_embedding,
    spray,
    write_spray,
)
from pipeline.runstore import (
    ERROR_SCHEMA,
    METRIC_SCHEMA,
    BlockMarker,
    encode_heatmaps,
    heatmap_schema,
    heatmap_table,
    write_block,
)
from pipeline.storage import Storage

SIZE = 32
A, B = 0, 1
WATERMARK = (slice(1, 5), slice(1, 5))  # rows, cols: a bright 4x4 square near the top-left
SHAPE_BOX = [8.0, 8.0, 24.0, 24.0]  # x0, y0, x1, y1: where the real cues are


def synthetic(seed: int = 0):
    """Class A: 40 images with a bright central square (the real cue) and 20 with only a corner
    watermark (the shortcut); class B: 60 images with a central ring. Noise everywhere."""
    g = torch.Generator().manual_seed(seed)
    images, labels, marked = [], [], []
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    r = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2).sqrt()
    ring = ((r > 5) & (r < 8)).float()
    for i in range(120):
        x = 0.15 * torch.randn(3, SIZE, SIZE, generator=g)
        if i < 40:  # A, real cue
            x[:, 12:20, 12:20] += 1.0
            labels.append(A)
        elif i < 60:  # A, watermark only
            x[:, WATERMARK[0], WATERMARK[1]] += 2.0
            labels.append(A)
        else:  # B
            x += ring
            labels.append(B)
        marked.append(40 <= i < 60)
        images.append(x)
    return torch.stack(images), torch.tensor(labels), np.array(marked)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def trained(x, y, steps: int = 60):
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def write_run(root: str, ids, maps, preds, labels, explainer="ixg", blocks=3, only=None):
    """Blocks as the worker writes them (the run store's codec, schema and markers): rows
    i, i + blocks, ... in block b<i>; `only`: those blocks' indices."""
    dtype = "float16"
    schema = heatmap_schema(SIZE, dtype)
    stored, lo, hi = encode_heatmaps(torch.as_tensor(maps), SIZE, dtype)
    rows = [
        {
            "run_id": "run-spray",
            "image_id": ids[i],
            "source_uri": f"mem://{ids[i]}",
            "source_member": None,
            "model_id": "test:watermark",
            "explainer": explainer,
            "method": explainer,
            "target": int(preds[i]),
            "target_name": f"class{int(preds[i])}",
            "target_rank": 0,
            "score": 1.0,
            "predicted": int(preds[i]),
            "predicted_name": f"class{int(preds[i])}",
            "label": int(labels[i]),
            "heatmap": stored[i].numpy(),
            "h": SIZE,
            "w": SIZE,
            "map_min": float(lo[i]),
            "map_max": float(hi[i]),
            "forward_passes": 1,
        }
        for i in range(len(ids))
    ]
    for b in only if only is not None else range(blocks):
        tables = {
            "heatmaps": heatmap_table(rows[b::blocks], schema),
            "metrics": METRIC_SCHEMA.empty_table(),
            "errors": ERROR_SCHEMA.empty_table(),
        }
        write_block(root, BlockMarker(f"b{b}", n_inputs=len(rows[b::blocks])), tables)


@pytest.fixture(scope="module")
def watermark_run(tmp_path_factory):
    """A trained CNN's Grad-CAM maps of the synthetic set, written as a run."""
    from pipeline.explainers import build_explainer
    from pipeline.models import Preprocess, wrap_module

    x, y, marked = synthetic()
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # small convolutions: a second thread only contends (seconds vs a minute)
    try:
        net = trained(x, y)
        with torch.no_grad():
            preds = net(x).argmax(1)
        model = wrap_module(net, Preprocess(size=SIZE, policy="squash"), id="test:wm", device="cpu")
        maps = build_explainer("gradcam", model)(x, preds).detach()
    finally:
        torch.set_num_threads(threads)
    ids = [f"img{i:03d}" for i in range(len(x))]
    root = str(tmp_path_factory.mktemp("runs") / "run-spray")
    write_run(root, ids, maps, preds, y)
    return root, ids, marked, preds.numpy(), y.numpy(), (maps, preds)


def test_watermark_images_are_the_first_ranked_cluster_of_their_class(watermark_run):
    root, ids, marked, preds, labels, _ = watermark_run
    assert (preds == labels).mean() >= 0.97  # the model learnt both cues of A
    result = spray(root, "ixg", params=SprayParams(), engine="local")
    rows = result.images.to_pylist()
    a = [r for r in rows if r["target"] == A]
    is_marked = {i: m for i, m in zip(ids, marked, strict=True)}
    top = [r for r in a if r["cluster_rank"] == 1]
    purity = np.mean([is_marked[r["image_id"]] for r in top])
    recall = sum(is_marked[r["image_id"]] for r in top) / sum(is_marked[r["image_id"]] for r in a)
    print(f"class A: {a[0]['clusters']} clusters; purity {purity:.3f}, recall {recall:.3f}")
    assert purity >= 0.9 and recall >= 0.9
    first = result.clusters.filter(
        (result.clusters.column("target").to_numpy() == A)
        & (result.clusters.column("cluster_rank").to_numpy() == 1)
    ).to_pylist()[0]
    assert first["cluster"] != 0  # not the class's largest cluster
    assert all(is_marked[i] for i in first["examples"])
    # the mean map of the watermark cluster peaks in the corner, the others' in the middle
    for c in result.clusters.to_pylist():
        mean = np.abs(np.asarray(c["mean_map"]).reshape(SIZE, SIZE))
        y, x = np.unravel_index(mean.argmax(), mean.shape)
        assert (y < 8 and x < 8) == (c is not None and c["cluster"] == first["cluster"]) or (
            c["target"] != A
        )


def test_with_boxes_the_watermark_cluster_puts_its_relevance_outside_them(watermark_run):
    root, ids, marked, _, _, _ = watermark_run
    boxes = {i: [SHAPE_BOX] for i in ids}
    result = spray(root, "ixg", params=SprayParams(rank_by="outside"), boxes=boxes, engine="local")
    clusters = [c for c in result.clusters.to_pylist() if c["target"] == A]
    first = min(clusters, key=lambda c: c["cluster_rank"])
    assert first["outside_energy"] > 0.5
    assert all(marked[ids.index(i)] for i in first["examples"])
    rest = [c["outside_energy"] for c in clusters if c["cluster_rank"] > 1]
    assert max(rest) < first["outside_energy"]


def test_eigengap_picks_three_for_three_separate_blobs():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.1, (25, 6)) for c in (0.0, 3.0, 6.0)])
    values, _ = spectral_embedding(knn_affinity(x, 8), 11)
    assert np.allclose(values[:3], 0, atol=1e-8) and values[3] > 0.05
    assert eigengap(values, 10) == 3
    assert eigengap(np.array([0.0, 0.0, 0.5, 0.6, 0.65]), 10) == 2
    assert eigengap(np.array([0.0, 0.9, 0.95]), 10) == 1


def test_laplacian_and_embedding_match_a_dense_computation():
    from scipy import sparse

    # a weighted graph of 7 nodes: two triangles joined by one edge, and a pendant node
    edges = [(0, 1, 1.0), (1, 2, 2.0), (0, 2, 1.0), (2, 3, 0.5), (3, 4, 1.0), (4, 5, 1.0)]
    edges += [(3, 5, 3.0), (5, 6, 1.0)]
    w = np.zeros((7, 7))
    for i, j, v in edges:
        w[i, j] = w[j, i] = v
    d = w.sum(1)
    expected = np.eye(7) - w / np.sqrt(np.outer(d, d))
    lap = normalised_laplacian(sparse.csr_matrix(w)).toarray()
    assert np.allclose(lap, expected)
    want = np.linalg.eigvalsh(expected)
    for dense_limit in (10**6, 0):  # dense eigh and the sparse shift-invert solver
        values, vectors = spectral_embedding(sparse.csr_matrix(w), 4, dense_limit=dense_limit)
        assert np.allclose(values, want[:4], atol=1e-8)
        assert np.allclose(expected @ vectors, vectors * values, atol=1e-8)
        # the first eigenvector is D^1/2 1 (normalised)
        assert np.allclose(np.abs(vectors[:, 0]), np.sqrt(d) / np.linalg.norm(np.sqrt(d)))
    assert np.allclose(normalise_maps(np.array([[1.0, -3.0], [0.0, 0.0]])), [[0.25, -0.75], [0, 0]])


def test_ray_data_path_gives_the_in_process_clusters(watermark_run, ray_local, tmp_path):
    """The same run written again, two blocks compacted (committed files, partitioned by
    explainer) and a third block's part written after: Ray Data reads both kinds and gives
    the same rows, clusters and ranks as the in-process path over the parts."""
    from pipeline.runstore.compaction import compact

    root, ids, _, _, labels, (maps, preds) = watermark_run
    copy = str(tmp_path / "run-spray")
    write_run(copy, ids, maps, preds, labels, only=[0, 1])
    compact(copy, {"b0", "b1"}, Storage())
    write_run(copy, ids, maps, preds, labels, only=[2])
    local = spray(root, "ixg", engine="local")
    ray_result = spray(copy, "ixg", engine="ray")
    cols = ["image_id", "target", "cluster", "cluster_rank", "clusters"]
    assert ray_result.images.select(cols).equals(local.images.select(cols))
    assert np.allclose(
        ray_result.images.column("distance").to_numpy(), local.images.column("distance").to_numpy()
    )
    keep = ["target", "cluster", "cluster_rank", "n_images", "examples"]
    assert ray_result.clusters.select(keep).equals(local.clusters.select(keep))
    # written beside the run and read back
    uris = write_spray(copy, ray_result)
    images, clusters, info = read_spray(copy, "ixg")
    assert images.equals(ray_result.images) and clusters.equals(ray_result.clusters)
    assert info["engine"] == "ray" and info["classes"] == 2
    assert pq.read_table(uris["spray.parquet"].removeprefix("file://")).num_rows == len(images)
    assert json.loads(Path(uris["spray.json"]).read_text())["params"]["size"] == 32


def test_logged_to_the_runs_mlflow_run(watermark_run, tmp_path):
    import mlflow
    import yaml

    root, *_ = watermark_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("salient")
    run = client.create_run(exp, tags={"salient.run_id": "run-spray"})
    spec = {"tracking": {"uri": uri, "experiment": "salient", "enabled": True}}
    Storage().write_bytes_atomic(f"{root}/spec.yaml", yaml.safe_dump(spec).encode())
    result = spray(root, "ixg", engine="local")
    assert log_spray(root, result) == run.info.run_id
    logged = client.get_run(run.info.run_id).data
    assert logged.metrics["spray.ixg.classes"] == 2
    assert logged.metrics["spray.ixg.images"] == 120
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "spray/ixg")}
    assert artifacts == {"spray/ixg/spray.json", "spray/ixg/spray_clusters.parquet"}


def test_cli_writes_the_tables_beside_the_run(watermark_run, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    root, ids, marked, *_ = watermark_run
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({i: [SHAPE_BOX] for i in ids}))
    args = ["spray", root, "--explainer", "ixg", "--engine", "local", "--boxes", str(boxes)]
    result = CliRunner().invoke(app, [*args, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 0, result.output
    assert "SpRAy: ixg" in result.output and "mlflow run: -" in result.output
    images, clusters, info = read_spray(root, "ixg")
    assert info["per_class"][0]["ranked_by"] == "outside"
    first = clusters.filter(clusters.column("cluster_rank").to_numpy() == 1).to_pylist()[0]
    assert all(marked[ids.index(i)] for i in first["examples"])
    missing = CliRunner().invoke(app, ["spray", root, "--explainer", "nope", "--engine", "local"])
    assert missing.exit_code == 2 and "no heatmaps of explainer 'nope'" in missing.output


def test_the_bulk_is_the_class_mean_not_its_largest_cluster():
    """A shortcut held by 20 images (the largest single cluster) beside a real cue that
    varies in place (three groups of 14): the shortcut cluster is still the most outlying."""
    import pyarrow as pa

    from pipeline.analysis.spray import cluster_class, pooled_schema

    rng = np.random.default_rng(1)
    maps = []
    for _ in range(20):  # shortcut: the top-left corner
        m = np.zeros((8, 8))
        m[:2, :2] = 1.0
        maps.append(m)
    for y0, x0 in ((3, 3), (3, 4), (4, 3)):  # the real cue, a pixel apart: three clusters
        for _ in range(14):
            m = np.zeros((8, 8))
            m[y0 : y0 + 3, x0 : x0 + 3] = 1.0
            maps.append(m)
    x = np.stack(maps) + 0.02 * rng.random((len(maps), 8, 8))
    n = len(x)
    rows = pa.table(
        {
            "explainer": ["e"] * n,
            "image_id": [f"i{i:02d}" for i in range(n)],
            "target": pa.array([0] * n, pa.int32()),
            "target_name": ["a"] * n,
            "predicted": pa.array([0] * n, pa.int32()),
            "label": pa.array([0] * n, pa.int32()),
            "features": pa.FixedSizeListArray.from_arrays(
                pa.array(x.reshape(-1), pa.float32()), 64
            ),
            "outside_energy": pa.array([None] * n, pa.float64()),
        },
        schema=pooled_schema(8),
    )
    images, clusters, info = cluster_class(rows, SprayParams(size=8, clusters=4))
    first = clusters.filter(clusters.column("cluster_rank").to_numpy() == 1).to_pylist()[0]
    assert first["cluster"] == 0 and first["n_images"] == 20  # the largest, yet first
    assert set(first["examples"]) <= {f"i{i:02d}" for i in range(20)}


def test_the_run_browser_lists_the_watermark_cluster_first_for_its_class(watermark_run, tmp_path):
    """`salient view`'s SpRAy page: per class the clusters in rank order, each with its mean
    map and example overlays; for class A the first is the watermark cluster."""
    import re
    import shutil

    from PIL import Image

    from pipeline.view.server import Browser

    src, ids, marked, *_ = watermark_run
    root = str(tmp_path / "run-spray")
    shutil.copytree(src, root)  # the other tests write their own SpRAy results into src
    write_spray(root, spray(root, "ixg", engine="local"))
    summary = {"run_id": "run-spray", "inputs": len(ids), "images_ok": len(ids), "errors": 0,
               "lost": 0, "metrics": [], "explainers": {"ixg": {"images": len(ids), "metrics": {}}},
               "preprocess": {"size": SIZE, "policy": "squash"}}  # fmt: skip
    Path(root, "summary.json").write_text(json.dumps(summary))
    browser = Browser(root, Storage())
    page = browser.spray()
    assert "href='/spray'" in browser.summary()  # the nav links the page once results exist
    section = page.split("<h2 class=class>class0</h2>")[1].split("</table>")[0]
    first = re.findall(r"<tr class=cluster data-cluster='(\d+)'>(.*?)</tr>", section)[0]
    examples = re.findall(r"data-id='([^']+)'", first[1])
    assert examples and all(marked[ids.index(i)] for i in examples)
    mean = re.search(r"src='(/spray_mean.png\?[^']+)'", first[1]).group(1)
    q = dict(kv.split("=") for kv in mean.split("?")[1].split("&"))
    png = browser.spray_mean_png(q["explainer"], int(q["target"]), int(q["cluster"]))
    assert Image.open(io.BytesIO(png)).size == (96, 96)
    assert Image.open(io.BytesIO(browser.overlay_png(0, examples[0], "ixg", A))).size == (160, 160)


def test_salient_spray_adds_its_section_to_the_runs_report(watermark_run, tmp_path):
    """report.html gains each class's clusters with example overlays, watermark cluster first
    for class A; a second run replaces the section rather than adding another; the page loads
    in Chromium without console errors."""
    import re
    import shutil

    from test_report import load_in_chromium
    from typer.testing import CliRunner

    from pipeline.cli import app

    src, ids, marked, *_ = watermark_run
    root = tmp_path / "run-spray"
    shutil.copytree(src, root)
    (root / "report.html").write_text("<html><body><h1>Salient run</h1></body></html>")
    args = ["spray", str(root), "--explainer", "ixg", "--engine", "local"]
    for _ in range(2):
        result = CliRunner().invoke(app, [*args, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
        assert result.exit_code == 0, result.output
    page = (root / "report.html").read_text()
    assert page.count("<!-- spray:spray-ixg -->") == 1 and "<h1>Salient run</h1>" in page
    section = page.split("<h3>class0</h3>")[1].split("</table>")[0]
    first = section.split("<tr><td>1</td>")[1].split("</tr>")[0]
    examples = re.findall(r"title='([^']+)'", first)
    assert examples and all(marked[ids.index(i)] for i in examples)
    _, errors = load_in_chromium(root / "report.html", tmp_path)
    assert not errors, errors
