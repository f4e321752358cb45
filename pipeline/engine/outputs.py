"""Output layout, Parquet schemas and block files (written atomically, named per block).

<output.uri>/<run_id>/
  heatmaps/part-<block>.parquet   one row per image x target x explainer
  metrics/part-<block>.parquet    one row per image x target x explainer x metric
  errors/part-<block>.parquet     one row per input (or per failed step) that went wrong
  _blocks/<block>.json            written last: the block is finished (counts, metric states)
  overlays/<explainer>/*.png      a few overlays from the first block
  pictures/<explainer>/*.png      per-pair image extras (Explainer.image_extras)
  summary.json, spec.yaml
"""

from __future__ import annotations

import io
import json
import posixpath
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ..storage import filesystem, write_bytes_atomic

TABLES = ("heatmaps", "metrics", "errors")


def heatmap_schema(size: int, dtype: str) -> pa.Schema:
    value_type = pa.uint8() if dtype == "uint8" else pa.float16()
    return pa.schema(
        [
            ("run_id", pa.string()),
            ("image_id", pa.string()),
            ("source_uri", pa.string()),
            ("source_member", pa.string()),  # tar member / Parquet row in source_uri, or null
            ("model_id", pa.string()),
            ("explainer", pa.string()),
            ("method", pa.string()),
            ("target", pa.int32()),
            ("target_name", pa.string()),
            ("target_rank", pa.int16()),
            ("score", pa.float32()),
            ("predicted", pa.int32()),
            ("predicted_name", pa.string()),
            ("label", pa.int32()),
            ("heatmap", pa.fixed_shape_tensor(value_type, [size, size])),
            ("h", pa.int16()),
            ("w", pa.int16()),
            ("map_min", pa.float32()),
            ("map_max", pa.float32()),
            ("forward_passes", pa.int32()),
        ]
    )


METRIC_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),
        ("explainer", pa.string()),
        ("target", pa.int32()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("fatal", pa.bool_()),  # true: the input produced no heatmap at all
    ]
)


def safe_name(name: str) -> str:
    """A file name from an image id: no separators, no '..', nothing but [A-Za-z0-9._-]."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "__")).lstrip(".")
    return cleaned[:200] or "image"


# overlays/<explainer>/<id>.t<target>.png and pictures/<explainer>/<id>.t<target>.<name>.png
_PAIR_FILE = re.compile(r"^(.*)\.t\d+\.(?:[A-Za-z0-9_-]+\.)?png$")


# -- the heatmap codec: one encoder (the worker), one decoder (every reader) ------------------
def shrink(maps: torch.Tensor, size: int) -> torch.Tensor:
    """[N,H,W] -> [N,size,size]: area averaging when shrinking (keeps energy), bilinear else."""
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps.float()
    mode = "area" if size < maps.shape[-1] else "bilinear"
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(maps[:, None].float(), size=(size, size), mode=mode, **kwargs)[:, 0]


def encode_heatmaps(
    maps: torch.Tensor, size: int, dtype: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N,H,W] float maps -> (stored [N,size,size], map_min [N], map_max [N]). uint8 stores each
    map min-max quantised (a constant map is all 0); float16 stores the values themselves."""
    small = shrink(maps, size)
    lo = small.flatten(1).amin(1) if len(small) else small.new_zeros(0)
    hi = small.flatten(1).amax(1) if len(small) else small.new_zeros(0)
    if dtype == "uint8":
        scale = (hi - lo).clamp_min(1e-12)[:, None, None]
        stored = ((small - lo[:, None, None]) / scale * 255).round().to(torch.uint8)
    else:
        stored = small.to(torch.float16)
    return stored, lo, hi


def decode_heatmaps(table: pa.Table) -> np.ndarray:
    """The `heatmap` column of any number of rows (and parts) -> float32 [N,size,size] in the
    maps' own units (uint8 needs the table's map_min and map_max)."""
    column = table.column("heatmap")
    if column.num_chunks == 0 or table.num_rows == 0:
        return np.zeros((0, 0, 0), np.float32)
    q = column.combine_chunks().to_numpy_ndarray()
    if q.dtype != np.uint8:
        return q.astype(np.float32)
    lo = table.column("map_min").to_numpy().astype(np.float32)[:, None, None]
    hi = table.column("map_max").to_numpy().astype(np.float32)[:, None, None]
    return lo + q.astype(np.float32) / 255 * (hi - lo)


def run_root(output_uri: str, run_id: str) -> str:
    return posixpath.join(output_uri.rstrip("/"), run_id)


def part_uri(root: str, table: str, block_id: str) -> str:
    return f"{root}/{table}/part-{block_id}.parquet"


def marker_uri(root: str, block_id: str) -> str:
    return f"{root}/_blocks/{block_id}.json"


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_block(
    root: str,
    block_id: str,
    tables: dict[str, pa.Table],
    marker: dict,
    endpoint_url: str | None = None,
) -> None:
    """Data files first, the marker last: a block without a marker is recomputed on resume and
    its files are replaced whole (same names), so there are never duplicates."""
    for name in TABLES:
        write_bytes_atomic(
            part_uri(root, name, block_id), parquet_bytes(tables[name]), endpoint_url
        )
    write_bytes_atomic(marker_uri(root, block_id), json.dumps(marker).encode(), endpoint_url)


def finished_blocks(root: str, endpoint_url: str | None = None) -> dict[str, dict]:
    """block id -> its marker, for every block a previous attempt finished."""
    fs, path = filesystem(f"{root}/_blocks", endpoint_url)
    fs.invalidate_cache(path)  # s3fs caches listings; a resume must see the latest markers
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        if name.endswith(".json"):
            with fs.open(name, "rb") as f:
                out[posixpath.basename(name)[: -len(".json")]] = json.loads(f.read())
    return out


def remove_stale_outputs(
    root: str, keep: set[str], stale_images: set[str], endpoint_url: str | None = None
) -> None:
    """Remove every part and marker whose block is not in `keep`, and the per-image pictures
    and overlays of `stale_images`. Markers go first: a crash half-way leaves data files
    without a marker, which the next attempt removes or replaces."""
    fs, path = filesystem(root, endpoint_url)
    fs.invalidate_cache(path)

    def block_of(name: str, prefix: str, suffix: str) -> str | None:
        base = posixpath.basename(name)
        if base.startswith(prefix) and base.endswith(suffix):
            return base[len(prefix) : -len(suffix)]
        return None

    doomed = []
    for folder, prefix, suffix in [("_blocks", "", ".json")] + [
        (t, "part-", ".parquet") for t in TABLES
    ]:
        try:
            names = fs.ls(f"{path}/{folder}", detail=False)
        except FileNotFoundError:
            continue
        doomed += [n for n in names if (b := block_of(n, prefix, suffix)) and b not in keep]
    # per-pair files are named `<safe image id>.t<target>.<...>.png`
    stale_names = {safe_name(image) for image in stale_images}
    for folder in ("pictures", "overlays"):
        if stale_names and fs.exists(f"{path}/{folder}"):
            doomed += [
                p
                for p in fs.find(f"{path}/{folder}")
                if (m := _PAIR_FILE.match(posixpath.basename(p))) and m[1] in stale_names
            ]
    for name in doomed:
        fs.rm_file(name)


def read_table(
    root: str,
    table: str,
    endpoint_url: str | None = None,
    columns: list[str] | None = None,
    filters=None,
) -> pa.Table:
    """All parts of one output table (for tests, reports and comparisons); `columns` and
    `filters` (pyarrow's) are pushed down, so a report can read metadata without heatmaps."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(f"{root}/{table}", endpoint_url)
    parts = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    if not parts:
        return pa.table({})
    return pq.read_table(
        parts, filesystem=PyFileSystem(FSSpecHandler(fs)), columns=columns, filters=filters
    )
