"""The run's plan: every input and its block, written under the run before any compute, in two
shapes of the same rows:

- `_plan/plan.parquet`, one row per input: a resume knows what each finished block was made of
  without reading a marker, and a person can query what the run covers
  (`SELECT block_id, count(*) FROM '<run>/_plan/plan.parquet' GROUP BY block_id`);
- `_plan/blocks.parquet`, one row per block (its inputs as a list): what Ray Data reads to feed
  the decode tasks, so the blocks never pass through the driver's memory or object store.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..sources.listing import Block, InputItem
from ..storage import read_bytes, write_bytes_atomic
from .codec import parquet_bytes
from .layout import plan_blocks_uri, plan_uri

PLAN_SCHEMA = pa.schema(
    [
        ("block_id", pa.string()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("member", pa.string()),  # tar member / Parquet row in uri, or null
        ("label", pa.string()),  # JSON: an index, a class name or null
        ("version", pa.string()),  # size + ETag/mtime (+ annotation digest) when listed
        ("meta", pa.string()),  # JSON: folder, annotation, shard, ...
    ]
)


ITEM_TYPE = pa.struct([f for f in PLAN_SCHEMA if f.name != "block_id"])
BLOCKS_SCHEMA = pa.schema([("block_id", pa.string()), ("items", pa.list_(ITEM_TYPE))])
BLOCKS_PER_ROW_GROUP = 64  # Ray Data streams a row group at a time to the decode tasks


def _dumps(value) -> str:
    # most inputs have no label or meta: skip the encoder for those (millions of rows)
    if value is None:
        return "null"
    if value == {}:
        return "{}"
    if type(value) is int:  # a class index, as json.dumps writes it
        return str(value)
    return json.dumps(value, sort_keys=True)


def item_from_row(r: dict) -> InputItem:
    return InputItem(
        r["image_id"], r["uri"], r["member"], _json(r["label"]), _json(r["meta"]), r["version"]
    )


def plan_table(blocks: list[Block]) -> pa.Table:
    """One row per input, built column by column (no dict per row: 10M rows on the driver)."""
    columns: dict[str, list] = {name: [] for name in PLAN_SCHEMA.names}
    for b in blocks:
        n = len(b.items)
        columns["block_id"] += [b.block_id] * n
        columns["image_id"] += [it.image_id for it in b.items]
        columns["uri"] += [it.uri for it in b.items]
        columns["member"] += [it.member for it in b.items]
        columns["label"] += [_dumps(it.label) for it in b.items]
        columns["version"] += [it.version for it in b.items]
        columns["meta"] += [_dumps(it.meta) for it in b.items]
    return pa.table(columns, schema=PLAN_SCHEMA)


def blocks_table(plan: pa.Table, blocks: list[Block]) -> pa.Table:
    """The per-block shape over the same column buffers: each block's rows as one list."""
    items = pa.StructArray.from_arrays(
        [plan.column(f.name).combine_chunks() for f in ITEM_TYPE], fields=list(ITEM_TYPE)
    )
    offsets = np.cumsum([0] + [len(b.items) for b in blocks], dtype=np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), items)
    return pa.table(
        {"block_id": pa.array([b.block_id for b in blocks], pa.string()), "items": lists},
        schema=BLOCKS_SCHEMA,
    )


def write_plan(root: str, blocks: list[Block], endpoint_url: str | None = None) -> None:
    """Both shapes; the per-input table last (a resume reads it, so it names a complete plan)."""
    per_input = plan_table(blocks)
    feed = blocks_table(per_input, blocks)
    data = parquet_bytes(feed, row_group_size=BLOCKS_PER_ROW_GROUP)
    write_bytes_atomic(plan_blocks_uri(root), data, endpoint_url)
    del feed, data
    write_bytes_atomic(plan_uri(root), parquet_bytes(per_input), endpoint_url)


def block_from_row(row: dict) -> Block:
    """A row of `_plan/blocks.parquet` as Ray Data hands it to a task -> the Block."""
    return Block(str(row["block_id"]), tuple(item_from_row(r) for r in row["items"]))


def read_plan(root: str, endpoint_url: str | None = None) -> list[Block] | None:
    """The blocks of the stored plan, in its order; None when the run has none yet."""
    try:
        data = read_bytes(plan_uri(root), endpoint_url)
    except FileNotFoundError:
        return None
    table = pq.read_table(io.BytesIO(data))
    blocks: list[Block] = []
    current, items = None, []
    for r in table.to_pylist():
        if r["block_id"] != current and items:
            blocks.append(Block(current, tuple(items)))
            items = []
        current = r["block_id"]
        items.append(item_from_row(r))
    if items:
        blocks.append(Block(current, tuple(items)))
    return blocks


def _json(text: str):
    # most rows hold no label or meta: skip the parser for those (millions of rows on resume)
    if text == "null":
        return None
    if text == "{}":
        return {}
    return json.loads(text)
