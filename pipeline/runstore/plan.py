"""The run's plan: every input and its block, written under the run before any compute
(`_plan/plan.parquet`, one row per input), so a resume knows what each finished block was made
of without reading a marker, and a person can query what the run covers:

    SELECT block_id, count(*) FROM '<run>/_plan/plan.parquet' GROUP BY block_id
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from ..sources.listing import Block, InputItem
from ..storage import read_bytes, write_bytes_atomic
from .codec import parquet_bytes
from .layout import plan_uri

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


def plan_table(blocks: list[Block]) -> pa.Table:
    rows = [
        {
            "block_id": b.block_id,
            "image_id": it.image_id,
            "uri": it.uri,
            "member": it.member,
            "label": json.dumps(it.label),
            "version": it.version,
            "meta": json.dumps(it.meta, sort_keys=True),
        }
        for b in blocks
        for it in b.items
    ]
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def write_plan(root: str, blocks: list[Block], endpoint_url: str | None = None) -> None:
    write_bytes_atomic(plan_uri(root), parquet_bytes(plan_table(blocks)), endpoint_url)


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
        items.append(
            InputItem(
                r["image_id"],
                r["uri"],
                r["member"],
                _json(r["label"]),
                _json(r["meta"]),
                r["version"],
            )
        )
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
