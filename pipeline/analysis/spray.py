"""Spectral relevance analysis (SpRAy; Lapuschkin et al., Nature Communications 2019,
"Unmasking Clever Hans predictors"), over one explainer's heatmaps of a run.

Per class (the row's `target`: the class the heatmap explains; by default each image's first
target only), every heatmap is pooled to `size` x `size` (area averaging) and divided by its
sum of |relevance| ("l1", as CoRelAy's preprocessing does) or by its max |relevance|. Then:
- a k-nearest-neighbour graph (Euclidean; k = 10 by default, CoRelAy's SparseKNN; edge weight
  1, made symmetric as (A + A^T) / 2),
- its normalised Laplacian L = I - D^-1/2 A D^-1/2 and the eigenvectors of its smallest
  eigenvalues (dense `eigh` up to DENSE_LIMIT heatmaps, else shift-invert `eigsh`),
- the number of clusters k by the eigengap: the largest gap among the first max_clusters + 1
  eigenvalues (k = index of the gap + 1: three separate blobs give three zeros, then a gap),
- k-means (seeded) on the first k eigenvectors, rows normalised to unit length (Ng, Jordan and
  Weiss; CoRelAy normalises the rows too).
Clusters are numbered by size (0 is the largest) and ranked by how far their mean map sits
from the class's mean map (rank 1 = most outlying). The class mean, not the largest cluster,
is the reference: a real cue that k-means splits into several small clusters must not make a
coherent shortcut cluster the "main mode" (seen with saliency maps in the tests' data); the
class mean is dominated by the bulk, so a cluster of share p sits about (1 - p) x its gap to
the rest away from it. When boxes are given, clusters are ranked by the share of |relevance|
outside the boxes instead (the distance breaks ties). Outlying clusters are candidate
spurious strategies ("Clever Hans").

Scale: the heavy per-image part (read, decode, pool) is a Ray Data `map_batches` over the
heatmaps table; the clustering is one task per class (`groupby(target).map_groups`), which holds
that class's pooled maps: n x size^2 floats (10k images at 32x32: 10M floats, 80 MB as float64)
and runs a k-NN search of O(n^2 size^2) (about 10^11 flops for 10k images). A class of 100k
heatmaps needs a 4x smaller `size` or an approximate k-NN. The small run's path (`engine=
"local"`) runs the same functions in this process.
"""

from __future__ import annotations

import io
import json
import posixpath
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..runstore import decode_heatmaps, read_table, shrink, spray_uri, table_files
from ..runstore.codec import parquet_bytes
from ..storage import Storage

DENSE_LIMIT = 2000  # up to this many heatmaps a class's eigenproblem is solved dense
RAY_ROWS = 50_000  # engine="auto": more heatmap rows than this run on Ray Data
SORT_PARTITIONS = 200  # at most this many partitions (tasks) in the per-class shuffle

# what the per-image step reads from the heatmaps table
READ_COLUMNS = [
    "image_id",
    "target",
    "target_name",
    "target_rank",
    "predicted",
    "label",
    "heatmap",
    "map_min",
    "map_max",
    "h",
    "w",
]

Boxes = Mapping[str, Sequence[Sequence[float]]]  # image_id -> [[x0, y0, x1, y1], ...]


@dataclass(frozen=True)
class SprayParams:
    size: int = 32  # side of the pooled maps
    norm: str = "l1"  # "l1": divide each map by its sum of |relevance|; "max": by its max
    neighbours: int = 10  # k of the k-NN graph (at most n - 1)
    max_clusters: int = 10  # the eigengap is looked for among the first max_clusters + 1
    clusters: int | None = None  # a fixed number of clusters instead of the eigengap
    min_images: int = 10  # classes with fewer heatmaps are skipped (listed in spray.json)
    all_targets: bool = False  # every target of an image, not only its first (target_rank 0)
    rank_by: str = "auto"  # "distance", "outside" (needs boxes), "auto": outside with boxes
    examples: int = 8  # image ids per cluster, nearest its mean map first
    seed: int = 0

    def __post_init__(self):
        if self.norm not in ("l1", "max"):
            raise ValueError(f"norm must be 'l1' or 'max', got {self.norm!r}")
        if self.rank_by not in ("auto", "distance", "outside"):
            raise ValueError(f"rank_by must be auto, distance or outside, got {self.rank_by!r}")
        if self.size < 1 or self.neighbours < 1 or self.max_clusters < 1:
            raise ValueError("size, neighbours and max_clusters must be at least 1")
        if self.clusters is not None and self.clusters < 1:
            raise ValueError(f"clusters must be at least 1, got {self.clusters}")


def pooled_schema(size: int) -> pa.Schema:
    """What the per-image step gives: the pooled map in the map's own units."""
    return pa.schema(
        [
            ("explainer", pa.string()),
            ("image_id", pa.string()),
            ("target", pa.int32()),
            ("target_name", pa.string()),
            ("predicted", pa.int32()),
            ("label", pa.int32()),
            ("features", pa.list_(pa.float32(), size * size)),
            ("outside_energy", pa.float64()),
        ]
    )


# one row per heatmap analysed
SPRAY_SCHEMA = pa.schema(
    [
        ("explainer", pa.string()),
        ("image_id", pa.string()),
        ("target", pa.int32()),  # the class
        ("target_name", pa.string()),
        ("predicted", pa.int32()),
        ("label", pa.int32()),
        ("cluster", pa.int32()),  # numbered by size: 0 = the class's largest cluster
        ("cluster_rank", pa.int32()),  # 1 = the most outlying cluster of the class
        ("clusters", pa.int32()),  # the class's number of clusters (eigengap)
        ("distance", pa.float64()),  # |map - the class's mean map| (normalised maps)
        ("outside_energy", pa.float64()),  # share of |relevance| outside the boxes; null: none
        ("embed_1", pa.float32()),  # the first two non-trivial eigenvector coordinates
        ("embed_2", pa.float32()),
    ]
)


def clusters_schema(size: int) -> pa.Schema:
    """One row per class x cluster."""
    return pa.schema(
        [
            ("explainer", pa.string()),
            ("target", pa.int32()),
            ("target_name", pa.string()),
            ("cluster", pa.int32()),
            ("cluster_rank", pa.int32()),
            ("clusters", pa.int32()),
            ("n_images", pa.int32()),
            ("share", pa.float64()),  # of the class's heatmaps
            ("score", pa.float64()),  # |cluster mean map - the class's mean map|
            ("outside_energy", pa.float64()),  # the cluster's mean; null without boxes
            ("label_agreement", pa.float64()),  # share with label == target; null: no labels
            ("examples", pa.list_(pa.string())),
            ("mean_map", pa.list_(pa.float32(), size * size)),  # normalised, row-major
            ("map_size", pa.int16()),
        ]
    )


@dataclass
class SprayResult:
    explainer: str
    images: pa.Table  # SPRAY_SCHEMA
    clusters: pa.Table  # clusters_schema(size)
    info: dict = field(default_factory=dict)  # params, per class: n, k, eigenvalues, seconds


# -- the maths, on arrays --------------------------------------------------------------------
def pool_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """[N,H,W] -> float32 [N,size,size]: area averaging (bilinear when enlarging)."""
    import torch

    if len(maps) == 0:
        return np.zeros((0, size, size), np.float32)
    return shrink(torch.from_numpy(np.ascontiguousarray(maps, np.float32)), size).numpy()


def normalise_maps(x: np.ndarray, how: str = "l1") -> np.ndarray:
    """[N, D] -> float64 [N, D], each row divided by its sum of |x| ("l1") or max |x|; an
    all-zero row stays zero."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    a = np.abs(x)
    scale = a.sum(1) if how == "l1" else a.max(1, initial=0.0)
    return x / np.where(scale > 0, scale, 1.0)[:, None]


def knn_affinity(x: np.ndarray, k: int):
    """Symmetric k-nearest-neighbour graph (Euclidean), weight 1 per edge: (A + A^T) / 2."""
    from sklearn.neighbors import kneighbors_graph

    k = max(1, min(k, len(x) - 1))
    a = kneighbors_graph(x, n_neighbors=k, mode="connectivity", include_self=False)
    return ((a + a.T) / 2).tocsr()


def normalised_laplacian(affinity):
    """L = I - D^-1/2 A D^-1/2 (sparse); a node without edges keeps L_ii = 1."""
    from scipy import sparse

    degree = np.asarray(affinity.sum(1)).ravel()
    inv = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    d = sparse.diags(inv)
    return (sparse.identity(affinity.shape[0], format="csr") - d @ affinity @ d).tocsr()


def spectral_embedding(affinity, m: int, dense_limit: int = DENSE_LIMIT, seed: int = 0):
    """(eigenvalues ascending [m], eigenvectors [n, m]) of the normalised Laplacian's m
    smallest eigenvalues. Dense up to `dense_limit` nodes; else Lanczos (eigsh) in
    shift-invert mode around a point just below 0."""
    lap = normalised_laplacian(affinity)
    n = lap.shape[0]
    m = min(m, n)
    if n <= dense_limit or m >= n - 1:
        from scipy.linalg import eigh

        values, vectors = eigh(lap.toarray(), subset_by_index=[0, m - 1])
    else:
        from scipy.sparse.linalg import eigsh

        # shift-invert just below 0 (L - sigma I is positive definite): finds repeated zero
        # eigenvalues (one per connected component), which plain Lanczos on I - L misses
        v0 = np.random.default_rng(seed).uniform(0.5, 1.5, n)
        values, vectors = eigsh(lap.tocsc(), k=m, sigma=-1e-3, which="LM", v0=v0)
    order = np.argsort(values, kind="stable")
    values, vectors = np.clip(values[order], 0.0, 2.0), vectors[:, order]
    # a sign per vector, so that the same graph gives the same embedding whichever solver
    signs = np.sign(vectors[np.abs(vectors).argmax(0), np.arange(vectors.shape[1])])
    return values, vectors * np.where(signs == 0, 1.0, signs)


def eigengap(values: np.ndarray, max_clusters: int = 10) -> int:
    """The number of clusters: 1 + the index of the largest gap between consecutive ascending
    eigenvalues among the first max_clusters + 1 (three separate components: 0, 0, 0, gap -> 3)."""
    values = np.asarray(values, np.float64)[: max_clusters + 1]
    if len(values) < 2:
        return 1
    return int(np.argmax(np.diff(values))) + 1


def spectral_clusters(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means labels on the first k eigenvectors, rows normalised to unit length."""
    if k <= 1:
        return np.zeros(len(vectors), np.int64)
    from sklearn.cluster import KMeans

    emb = vectors[:, :k]
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(emb)


def outside_energy(maps: np.ndarray, h: np.ndarray, w: np.ndarray, boxes: list) -> np.ndarray:
    """Per map, the share of |relevance| whose cell centre lies outside every box; boxes in
    the map's pixels (`h` x `w`: the model input, as the job's annotations are after
    `to_model_space`). NaN for a map without boxes or without relevance."""
    out = np.full(len(maps), np.nan)
    for i, image_boxes in enumerate(boxes):
        if not image_boxes:
            continue
        s = maps.shape[-1]
        ys = (np.arange(s) + 0.5) * float(h[i]) / s
        xs = (np.arange(s) + 0.5) * float(w[i]) / s
        inside = np.zeros((s, s), bool)
        for x0, y0, x1, y1 in image_boxes:
            inside |= ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        a = np.abs(maps[i])
        total = a.sum()
        if total > 0:
            out[i] = float(a[~inside].sum() / total)
    return out


# -- the per-image step: heatmap rows -> pooled rows -------------------------------------------
def pool_batch(
    batch: pa.Table,
    explainer: str,
    size: int = 32,
    all_targets: bool = False,
    blocks: list[str] | None = None,
    boxes: Boxes | None = None,
) -> pa.Table:
    """Heatmap rows (any part or compacted file) -> pooled rows of `explainer` (pooled_schema):
    decoded with the run store's codec, pooled to size x size. `blocks`: keep only rows of
    these block ids (a compacted file's rows count only for the blocks its commit names)."""
    keep = None
    if "explainer" in batch.column_names:
        keep = pc.equal(batch.column("explainer").cast(pa.string()), explainer)
    if blocks is not None and "block_id" in batch.column_names:
        inside = pc.is_in(batch.column("block_id"), pa.array(blocks, pa.string()))
        keep = inside if keep is None else pc.and_(keep, inside)
    if not all_targets:
        first = pc.equal(batch.column("target_rank"), 0)
        keep = first if keep is None else pc.and_(keep, first)
    if keep is not None:
        batch = batch.filter(keep)
    schema = pooled_schema(size)
    if batch.num_rows == 0:
        return schema.empty_table()
    maps = decode_heatmaps(batch)
    pooled = pool_maps(maps, size)
    ids = batch.column("image_id").to_pylist()
    if boxes:
        found = [boxes.get(i) for i in ids]
        h = batch.column("h").to_numpy(zero_copy_only=False)
        w = batch.column("w").to_numpy(zero_copy_only=False)
        outside = outside_energy(maps, h, w, found)
    else:
        outside = np.full(len(ids), np.nan)
    flat = pa.array(pooled.reshape(-1), pa.float32())
    return pa.table(
        {
            "explainer": pa.array([explainer] * len(ids), pa.string()),
            "image_id": batch.column("image_id"),
            "target": batch.column("target").cast(pa.int32()),
            "target_name": batch.column("target_name"),
            "predicted": batch.column("predicted").cast(pa.int32()),
            "label": batch.column("label").cast(pa.int32()),
            "features": pa.FixedSizeListArray.from_arrays(flat, size * size),
            "outside_energy": pa.array(outside, pa.float64(), from_pandas=True),
        },
        schema=schema,
    )


# -- the per-class step: one class's pooled rows -> its clusters --------------------------------
def cluster_class(
    rows: pa.Table, params: SprayParams = SprayParams()
) -> tuple[pa.Table, pa.Table, dict]:
    """One class's pooled rows -> (its SPRAY_SCHEMA rows, its clusters rows, info). Rows are
    sorted by image id first, so the answer does not depend on the order they came in."""
    t0 = time.perf_counter()
    rows = rows.sort_by([("image_id", "ascending")])
    n = rows.num_rows
    size = params.size
    target = rows.column("target")[0].as_py()
    info: dict = {"target": target, "target_name": rows.column("target_name")[0].as_py(), "n": n}
    if n < max(params.min_images, 3):
        info["skipped"] = f"{n} heatmaps, fewer than min_images {params.min_images}"
        return SPRAY_SCHEMA.empty_table(), clusters_schema(size).empty_table(), info
    raw = rows.column("features").combine_chunks().flatten().to_numpy().reshape(n, -1)
    x = normalise_maps(raw, params.norm)
    affinity = knn_affinity(x, params.neighbours)
    values, vectors = spectral_embedding(
        affinity, min(params.max_clusters + 1, n), seed=params.seed
    )
    k = params.clusters or eigengap(values, params.max_clusters)
    k = min(k, n)
    labels = spectral_clusters(vectors, k, params.seed)
    # numbered by size (ties: the first image's position), 0 the largest
    found = sorted(
        set(labels.tolist()), key=lambda c: (-(labels == c).sum(), np.argmax(labels == c))
    )
    labels = np.array([found.index(c) for c in labels.tolist()], np.int64)
    k = len(found)
    means = np.stack([x[labels == c].mean(0) for c in range(k)])
    # how far from the class's bulk: distance to the class's mean map, which the large
    # clusters dominate (a cluster of share p sits about (1 - p) x the gap away from it)
    centre = x.mean(0)
    score = np.linalg.norm(means - centre, axis=1)
    distance = np.linalg.norm(x - centre, axis=1)
    outside = rows.column("outside_energy").to_numpy(zero_copy_only=False).astype(np.float64)
    cluster_outside = [
        float(np.nanmean(outside[labels == c])) if np.isfinite(outside[labels == c]).any() else None
        for c in range(k)
    ]
    by_outside = params.rank_by == "outside" or (
        params.rank_by == "auto" and any(v is not None for v in cluster_outside)
    )
    if by_outside:
        order = sorted(
            range(k),
            key=lambda c: (
                -(cluster_outside[c] if cluster_outside[c] is not None else -1.0),
                -score[c],
                c,
            ),
        )
    else:
        order = sorted(range(k), key=lambda c: (-score[c], c))
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(1, k + 1)
    ids = rows.column("image_id").to_pylist()
    label_col = rows.column("label").to_numpy(zero_copy_only=False)
    explainer = rows.column("explainer")[0].as_py()
    cluster_rows = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        near = members[np.argsort(np.linalg.norm(x[members] - means[c], axis=1), kind="stable")]
        known = label_col[members]
        known = known[~np.isnan(known.astype(np.float64))] if known.dtype.kind == "f" else known
        cluster_rows.append(
            {
                "explainer": explainer,
                "target": target,
                "target_name": info["target_name"],
                "cluster": c,
                "cluster_rank": int(rank[c]),
                "clusters": k,
                "n_images": len(members),
                "share": len(members) / n,
                "score": float(score[c]),
                "outside_energy": cluster_outside[c],
                "label_agreement": float(np.mean(known == target)) if len(known) else None,
                "examples": [ids[i] for i in near[: params.examples]],
                "mean_map": means[c].astype(np.float32),
                "map_size": size,
            }
        )
    embed = [vectors[:, j] if vectors.shape[1] > j else np.zeros(n) for j in (1, 2)]
    images = pa.table(
        {
            "explainer": rows.column("explainer"),
            "image_id": rows.column("image_id"),
            "target": rows.column("target"),
            "target_name": rows.column("target_name"),
            "predicted": rows.column("predicted"),
            "label": rows.column("label"),
            "cluster": pa.array(labels, pa.int32()),
            "cluster_rank": pa.array(rank[labels], pa.int32()),
            "clusters": pa.array(np.full(n, k), pa.int32()),
            "distance": pa.array(distance, pa.float64()),
            "outside_energy": pa.array(outside, pa.float64(), from_pandas=True),
            "embed_1": pa.array(embed[0], pa.float32()),
            "embed_2": pa.array(embed[1], pa.float32()),
        },
        schema=SPRAY_SCHEMA,
    )
    info |= {
        "clusters": k,
        "eigengap_k": int(eigengap(values, params.max_clusters)),
        "eigenvalues": [round(float(v), 6) for v in values],
        "neighbours": int(min(params.neighbours, n - 1)),
        "ranked_by": "outside" if by_outside else "distance",
        "seconds": round(time.perf_counter() - t0, 4),
    }
    return images, _clusters_table(cluster_rows, size), info


def _clusters_table(rows: list[dict], size: int) -> pa.Table:
    schema = clusters_schema(size)
    if not rows:
        return schema.empty_table()
    columns = {n: [r[n] for r in rows] for n in schema.names if n != "mean_map"}
    flat = pa.array(np.concatenate([r["mean_map"] for r in rows]), pa.float32())
    columns["mean_map"] = pa.FixedSizeListArray.from_arrays(flat, size * size)
    return pa.table({n: columns[n] for n in schema.names}, schema=schema)


def _result(explainer: str, parts: list, params: SprayParams, timings: dict) -> SprayResult:
    """Per-class answers -> one result, sorted by class, then rank, then image id."""
    images = [p[0] for p in parts if p[0].num_rows]
    clusters = [p[1] for p in parts if p[1].num_rows]
    infos = sorted((p[2] for p in parts), key=lambda i: i["target"])
    images_t = pa.concat_tables(images) if images else SPRAY_SCHEMA.empty_table()
    clusters_t = (
        pa.concat_tables(clusters) if clusters else clusters_schema(params.size).empty_table()
    )
    images_t = images_t.sort_by(
        [("target", "ascending"), ("cluster_rank", "ascending"), ("image_id", "ascending")]
    )
    clusters_t = clusters_t.sort_by([("target", "ascending"), ("cluster_rank", "ascending")])
    info = {
        "explainer": explainer,
        "params": asdict(params),
        "images": images_t.num_rows,
        "classes": len([i for i in infos if "skipped" not in i]),
        "skipped": [i for i in infos if "skipped" in i],
        "per_class": [i for i in infos if "skipped" not in i],
        "seconds": timings,
    }
    return SprayResult(explainer, images_t, clusters_t, info)


# -- a run's heatmaps: in this process, or Ray Data --------------------------------------------
def pooled_table(
    root: str,
    explainer: str,
    storage: Storage = Storage(),
    params: SprayParams = SprayParams(),
    boxes: Boxes | None = None,
) -> pa.Table:
    """In this process: the explainer's heatmap rows, pooled (for small runs and tests)."""
    t = read_table(
        root,
        "heatmaps",
        storage,
        columns=[*READ_COLUMNS, "explainer"],
        filters=[("explainer", "=", explainer)],
    )
    if t.num_rows == 0:
        return pooled_schema(params.size).empty_table()
    return pool_batch(t, explainer, params.size, params.all_targets, None, boxes)


def pooled_dataset(
    root: str,
    explainer: str,
    storage: Storage = Storage(),
    params: SprayParams = SprayParams(),
    boxes: Boxes | None = None,
):
    """Ray Data: the explainer's heatmap rows read from the run's current files (compacted:
    only its explainer's partition, rows of committed blocks; parts: every row), decoded and
    pooled per batch in tasks; and the number of files it reads. (None, 0) when the run has
    no heatmaps."""
    import ray

    files = table_files(root, "heatmaps", storage)
    kwargs = {"explainer": explainer, "size": params.size, "all_targets": params.all_targets}
    kwargs["boxes"] = dict(boxes) if boxes else None
    datasets = []
    if files.parts:
        ds = ray.data.read_parquet(
            files.parts,
            filesystem=files.filesystem,
            columns=[*READ_COLUMNS, "explainer"],
            # a read task per file: Ray's default (200 blocks whatever the size) makes a small
            # run start hundreds of tasks, each importing torch
            override_num_blocks=len(files.parts),
        )
        datasets.append(ds.map_batches(pool_batch, fn_kwargs=kwargs, batch_format="pyarrow"))
    mine = [p for p in files.compacted if f"explainer={explainer}" in p.split("/")]
    if mine:
        ds = ray.data.read_parquet(
            mine,
            filesystem=files.filesystem,
            columns=[*READ_COLUMNS, "block_id"],
            partitioning=None,
            override_num_blocks=len(mine),
        )
        datasets.append(
            ds.map_batches(
                pool_batch, fn_kwargs=kwargs | {"blocks": files.blocks}, batch_format="pyarrow"
            )
        )
    if not datasets:
        return None, 0
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    return ds, len(files.parts) + len(mine)


def analyse(pooled: pa.Table, params: SprayParams = SprayParams()) -> SprayResult:
    """In this process: pooled rows (one explainer) -> clusters per class."""
    t0 = time.perf_counter()
    explainer = pooled.column("explainer")[0].as_py() if pooled.num_rows else ""
    targets = pooled.column("target").to_numpy(zero_copy_only=False)
    parts = [
        cluster_class(pooled.filter(pa.array(targets == c)), params)
        for c in sorted(set(targets.tolist()))
    ]
    return _result(explainer, parts, params, {"cluster": round(time.perf_counter() - t0, 3)})


_SHUFFLE = threading.Lock()  # DataContext is process-wide; a dataset copies it when created


def _cluster_group(rows: pa.Table, params_json: str) -> pa.Table:
    """A Ray task's answer for one class: its three results as one row (Arrow IPC bytes)."""
    images, clusters, info = cluster_class(rows, SprayParams(**json.loads(params_json)))
    return pa.table(
        {
            "target": pa.array([info["target"]], pa.int32()),
            "images": pa.array([_ipc(images)], pa.binary()),
            "clusters": pa.array([_ipc(clusters)], pa.binary()),
            "info": pa.array([json.dumps(info)], pa.string()),
        }
    )


def analyse_dataset(
    ds, explainer: str, params: SprayParams = SprayParams(), partitions: int = 1
) -> SprayResult:
    """Ray Data: pooled rows -> one clustering task per class (groupby + map_groups; a
    task-based sort, not the hash shuffle's aggregator actors; `partitions` of it, at most
    SORT_PARTITIONS: Ray's default of 200 makes a small run wait on 200 x 200 tiny tasks).
    The driver receives one row per class, each holding that class's small tables."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    t0 = time.perf_counter()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    with _SHUFFLE:
        saved = ctx.shuffle_strategy
        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        try:
            partitions = max(1, min(SORT_PARTITIONS, partitions))
            out = ds.groupby("target", num_partitions=partitions).map_groups(
                _cluster_group,
                fn_kwargs={"params_json": json.dumps(asdict(params))},
                batch_format="pyarrow",
            )
        finally:
            ctx.shuffle_strategy = saved
    parts = []
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
        for i in range(batch.num_rows):
            parts.append(
                (
                    _from_ipc(batch.column("images")[i].as_py()),
                    _from_ipc(batch.column("clusters")[i].as_py()),
                    json.loads(batch.column("info")[i].as_py()),
                )
            )
    return _result(
        explainer, parts, params, {"pool_and_cluster": round(time.perf_counter() - t0, 3)}
    )


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def heatmap_rows(root: str, storage: Storage = Storage()) -> int:
    """The heatmaps table's row count, from the files' metadata (no row is read)."""
    import pyarrow.dataset as pads

    files = table_files(root, "heatmaps", storage)
    paths = files.parts + files.compacted
    if not paths:
        return 0
    return pads.dataset(paths, filesystem=files.filesystem, format="parquet").count_rows()


def spray(
    root: str,
    explainer: str,
    storage: Storage = Storage(),
    params: SprayParams = SprayParams(),
    boxes: Boxes | None = None,
    engine: str = "auto",
) -> SprayResult:
    """SpRAy over one explainer's heatmaps of the run at `root`. `engine`: "local" (this
    process), "ray" (Ray Data; Ray must be initialised or it starts a local one) or "auto"
    (Ray when it is initialised or the heatmaps table has more than RAY_ROWS rows)."""
    if engine == "auto":
        import ray

        engine = (
            "ray" if ray.is_initialized() or heatmap_rows(root, storage) > RAY_ROWS else "local"
        )
    if engine == "ray":
        ds, n_files = pooled_dataset(root, explainer, storage, params, boxes)
        if ds is None:
            return _result(explainer, [], params, {})
        result = analyse_dataset(ds, explainer, params, n_files)
    elif engine == "local":
        t0 = time.perf_counter()
        pooled = pooled_table(root, explainer, storage, params, boxes)
        pool_s = round(time.perf_counter() - t0, 3)
        result = analyse(pooled, params)
        result.info["seconds"]["pool"] = pool_s
        result.explainer = result.info["explainer"] = explainer
    else:
        raise ValueError(f"engine must be auto, local or ray, got {engine!r}")
    result.info["engine"] = engine
    if result.images.num_rows == 0 and not result.info["skipped"]:
        raise ValueError(f"no heatmaps of explainer {explainer!r} under {root}")
    return result


# -- beside the run, and in its MLflow run ----------------------------------------------------
def write_spray(root: str, result: SprayResult, storage: Storage = Storage()) -> dict[str, str]:
    """The result as `<root>/spray/<explainer>/{spray.parquet, spray_clusters.parquet,
    spray.json}`; returns name -> URI."""
    uris = {
        name: spray_uri(root, result.explainer, name)
        for name in ("spray.parquet", "spray_clusters.parquet", "spray.json")
    }
    storage.write_bytes_atomic(uris["spray.parquet"], parquet_bytes(result.images))
    storage.write_bytes_atomic(uris["spray_clusters.parquet"], parquet_bytes(result.clusters))
    storage.write_bytes_atomic(uris["spray.json"], json.dumps(result.info, indent=2).encode())
    return uris


def read_spray(
    root: str, explainer: str, storage: Storage = Storage()
) -> tuple[pa.Table, pa.Table, dict]:
    """(spray rows, spray_clusters rows, spray.json) as written by write_spray;
    FileNotFoundError when SpRAy was not run for this explainer."""
    import pyarrow.parquet as pq

    def table(name: str) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.read_bytes(spray_uri(root, explainer, name))))

    info = json.loads(storage.read_bytes(spray_uri(root, explainer, "spray.json")))
    return table("spray.parquet"), table("spray_clusters.parquet"), info


def summary_metrics(result: SprayResult) -> dict[str, float]:
    """Run-level numbers for MLflow: classes analysed, heatmaps, mean clusters per class, and
    the mean share of a class's heatmaps in its most outlying cluster."""
    per_class = result.info["per_class"]
    key = f"spray.{result.explainer}"
    out = {f"{key}.classes": len(per_class), f"{key}.images": result.images.num_rows}
    if per_class:
        out[f"{key}.clusters_mean"] = float(np.mean([c["clusters"] for c in per_class]))
        first = result.clusters.filter(pc.equal(result.clusters.column("cluster_rank"), 1))
        multi = first.filter(pc.greater(first.column("clusters"), 1))
        if multi.num_rows:
            out[f"{key}.top_outlier_share"] = float(np.mean(multi.column("share").to_numpy()))
    return out


def log_spray(
    root: str,
    result: SprayResult,
    storage: Storage = Storage(),
    tracking_uri: str | None = None,
) -> str | None:
    """Into the MLflow run of the run at `root` (tag salient.run_id = its folder name; the
    tracking URI from its spec.yaml unless given): metrics (summary_metrics), a tag, and the
    clusters table and spray.json as artifacts under spray/<explainer>/. Returns the MLflow run
    id, or None when the run has no MLflow run (tracking disabled, or not found)."""
    import yaml

    from ..tracking import JobTracker

    try:
        spec = yaml.safe_load(storage.read_bytes(f"{root}/spec.yaml")) or {}
    except FileNotFoundError:
        spec = {}
    tracking = spec.get("tracking") or {}
    if not tracking.get("enabled", True):
        return None
    uri = tracking_uri or tracking.get("uri")
    if not uri:
        return None
    import mlflow

    run_id = posixpath.basename(root.rstrip("/"))
    experiment = tracking.get("experiment", "salient")
    if mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment) is None:
        return None
    tracker = JobTracker(uri, experiment, run_id)
    found = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`salient.run_id` = '{run_id}'",
        max_results=1,
    )
    if not found:
        return None
    tracker.mlflow_run_id = found[0].info.run_id
    tracker.log_metrics(summary_metrics(result))
    tracker.set_tags({f"salient.spray.{result.explainer}": spray_uri(root, result.explainer, "")})
    folder = f"spray/{result.explainer}"
    tracker.log_artifacts(
        {
            f"{folder}/spray_clusters.parquet": parquet_bytes(result.clusters),
            f"{folder}/spray.json": json.dumps(result.info, indent=2).encode(),
        }
    )
    return tracker.mlflow_run_id
