"""The run's Parquet schemas and the one heatmap codec: one encoder (the worker's rows -> a
table), one decoder (every reader's table -> float maps)."""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

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


def heatmap_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Heatmap rows (each with its stored map under "heatmap", as encode_heatmaps gives it) ->
    a table of `schema`, the maps as one fixed-shape tensor column."""
    tensor_type = schema.field("heatmap").type
    size = tensor_type.shape[-1]
    columns = {name: [r[name] for r in rows] for name in schema.names if name != "heatmap"}
    flat = (
        np.stack([np.asarray(r["heatmap"]) for r in rows]).reshape(-1)
        if rows
        else np.zeros(0, dtype=tensor_type.value_type.to_pandas_dtype())
    )
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat), size * size)
    columns["heatmap"] = pa.ExtensionArray.from_storage(tensor_type, storage)
    return pa.table({n: columns[n] for n in schema.names}, schema=schema)


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


def parquet_bytes(
    tables: pa.Table | Iterable[pa.Table],
    row_group_size: int | None = None,
    schema: pa.Schema | None = None,
) -> bytes:
    """One zstd Parquet file from a table, or from a stream of tables of `schema` written as
    they come (no copy of them all at once)."""
    if isinstance(tables, pa.Table):
        tables, schema = [tables], tables.schema
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, schema, compression="zstd") as writer:
        for table in tables:
            writer.write_table(table, row_group_size=row_group_size)
    return buf.getvalue()
