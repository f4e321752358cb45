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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..chunks import chunks
from ..sources.inputs import INPUT_SCHEMA, Block, Blocks, item_from_row
from ..storage import Storage
from .codec import parquet_bytes
from .layout import plan_blocks_uri, plan_uri

PLAN_SCHEMA = pa.schema([("block_id", pa.string()), *INPUT_SCHEMA])
ITEM_TYPE = pa.struct(list(INPUT_SCHEMA))
BLOCKS_SCHEMA = pa.schema([("block_id", pa.string()), ("items", pa.list_(ITEM_TYPE))])
BLOCKS_PER_ROW_GROUP = 64  # Ray Data streams a row group at a time to the decode tasks


BLOCKS_PER_WRITE = 1024  # blocks written at a time: the copies a write makes stay this small


def plan_table(blocks: Blocks) -> pa.Table:
    """One row per input: its block's id, then the input's columns."""
    inputs = blocks.inputs.select(INPUT_SCHEMA.names).cast(INPUT_SCHEMA)
    return inputs.add_column(0, "block_id", blocks.block_of_each_input())


def blocks_table(blocks: Blocks) -> pa.Table:
    """The per-block shape: each block's rows as one list."""
    inputs = blocks.inputs.select(INPUT_SCHEMA.names).cast(INPUT_SCHEMA)
    items = pa.StructArray.from_arrays(
        [inputs.column(f.name).combine_chunks() for f in ITEM_TYPE], fields=list(ITEM_TYPE)
    )
    offsets = (blocks.offsets - blocks.offsets[0]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), items)
    return pa.table(
        {"block_id": pa.array(blocks.ids, pa.string()), "items": lists}, schema=BLOCKS_SCHEMA
    )


def write_plan(root: str, blocks: Blocks | list[Block], storage: Storage = Storage()) -> None:
    """Both shapes, each written BLOCKS_PER_WRITE blocks at a time (no copy of the whole plan
    beside it); the per-input table last (a resume reads it, so it names a complete plan)."""
    blocks = Blocks.of(blocks)
    parts = [blocks[part] for part in chunks(len(blocks), BLOCKS_PER_WRITE)]
    feed = parquet_bytes((blocks_table(p) for p in parts), BLOCKS_PER_ROW_GROUP, BLOCKS_SCHEMA)
    storage.write_bytes_atomic(plan_blocks_uri(root), feed)
    del feed
    per_input = parquet_bytes((plan_table(p) for p in parts), schema=PLAN_SCHEMA)
    storage.write_bytes_atomic(plan_uri(root), per_input)


def block_from_row(row: dict) -> Block:
    """A row of `_plan/blocks.parquet` as Ray Data hands it to a task -> the Block."""
    return Block(str(row["block_id"]), tuple(item_from_row(r) for r in row["items"]))


def read_plan(root: str, storage: Storage = Storage()) -> Blocks | None:
    """The blocks of the stored plan, in its order; None when the run has none yet."""
    try:
        data = storage.read_bytes(plan_uri(root))
    except FileNotFoundError:
        return None
    return blocks_from_plan_table(pq.read_table(io.BytesIO(data)))


def blocks_from_plan_table(table: pa.Table) -> Blocks:
    """`_plan/plan.parquet`'s rows (grouped by block) -> Blocks."""
    block_id = table.column("block_id").combine_chunks()
    n = len(block_id)
    if n == 0:
        return Blocks.empty()
    changes = pc.not_equal(block_id.slice(1), block_id.slice(0, n - 1))
    starts = np.r_[0, np.flatnonzero(changes.to_numpy(zero_copy_only=False)) + 1]
    ids = block_id.take(pa.array(starts)).to_pylist()
    return Blocks(table.drop_columns(["block_id"]), ids, np.r_[starts, n])
