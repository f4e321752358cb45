"""Reading a run's tables: whole (tests, comparisons) or one heatmap row from a known block.
A compacted run is read from its committed files (rows of the blocks the commit names) plus the
parts of any block computed since; an uncompacted one from its parts."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..storage import Storage
from .codec import decode_heatmaps
from .commit import arrow_filesystem, part_block, read_commit
from .layout import part_uri


@dataclass(frozen=True)
class TableFiles:
    """Where a table's current rows are: the compacted files (paths in `filesystem`; only
    their rows of `blocks` count, by the `block_id` column) and the parts of blocks computed
    since (every row counts). What a reader that is not pyarrow (Ray Data) needs."""

    filesystem: object  # pyarrow FileSystem over the run's storage
    compacted: list[str]
    blocks: list[str]  # the block ids the compacted files hold
    parts: list[str]


def table_files(root: str, table: str, storage: Storage = Storage()) -> TableFiles:
    fs, base = storage.filesystem(root)
    fs.invalidate_cache(base)
    commit = read_commit(root, storage)
    covered = set(commit.blocks) if commit else set()
    try:
        found = fs.find(f"{base}/{table}")
    except FileNotFoundError:
        found = []
    parts = sorted(p for p in found if (b := part_block(p)) and b not in covered)
    compacted = [f"{base}/{p}" for p in commit.files.get(table, [])] if commit else []
    return TableFiles(arrow_filesystem(fs), compacted, sorted(covered), parts)


def _dataset(root: str, table: str, storage: Storage):
    """(dataset of the table's current rows, row filter or None), or None when it has none."""
    files = table_files(root, table, storage)
    compacted, parts, covered, afs = files.compacted, files.parts, files.blocks, files.filesystem
    pieces = []
    if compacted:
        ds = pads.dataset(compacted, filesystem=afs, partitioning="hive", format="parquet")
        keep = pc.field("block_id").isin(pa.array(sorted(covered), pa.string()))
        pieces.append((ds, keep))
    if parts:
        pieces.append((pads.dataset(parts, filesystem=afs, format="parquet"), None))
    return pieces


def read_table(
    root: str,
    table: str,
    storage: Storage = Storage(),
    columns: list[str] | None = None,
    filters=None,
) -> pa.Table:
    """One output table's current rows; `columns` and `filters` (pyarrow's DNF list or an
    expression) are pushed down. Compacted rows carry a `block_id` column; parts do not, so
    it is dropped here: both read alike."""
    pieces = _dataset(root, table, storage)
    if not pieces:
        return pa.table({})
    expr = pq.filters_to_expression(filters) if isinstance(filters, list) else filters
    tables = []
    for ds, keep in pieces:
        names = [n for n in ds.schema.names if n != "block_id"]
        want = columns or names
        where = keep if expr is None else (expr if keep is None else keep & expr)
        t = ds.to_table(columns=want, filter=where)
        if t.schema.get_field_index("explainer") >= 0 and pa.types.is_dictionary(
            t.schema.field("explainer").type
        ):  # the hive partition column comes back dictionary-encoded
            i = t.schema.get_field_index("explainer")
            t = t.set_column(i, "explainer", t.column("explainer").cast(pa.string()))
        tables.append(t)
    if len(tables) == 1:
        return tables[0]
    order = tables[-1].schema.names
    return pa.concat_tables([t.select(order) for t in tables])


def read_heatmap(
    root: str,
    block_id: str,
    image_id: str,
    explainer: str,
    target: int,
    storage: Storage = Storage(),
):
    """One decoded heatmap [size, size]: from its block's part (one file), or from the
    compacted files of its explainer (sorted by image id, so row groups are skipped)."""
    fs, base = storage.filesystem(root)
    where = [("image_id", "=", image_id), ("explainer", "=", explainer), ("target", "=", target)]
    commit = read_commit(root, storage)
    if commit and block_id in commit.blocks:
        paths = [
            f"{base}/{p}"
            for p in commit.files.get("heatmaps", [])
            if f"explainer={explainer}" in posixpath.dirname(p).split("/")
        ]
        ds = pads.dataset(paths, filesystem=arrow_filesystem(fs), format="parquet")
        t = ds.to_table(
            columns=["heatmap", "map_min", "map_max"],
            # the explainer is the partition; the block id tells a recomputed image's new rows
            # from those of a block that left the plan
            filter=pq.filters_to_expression([*where[:1], where[2], ("block_id", "=", block_id)]),
        )
    else:
        t = pq.read_table(
            part_uri(base, "heatmaps", block_id),
            filesystem=arrow_filesystem(fs),
            columns=["heatmap", "map_min", "map_max"],
            filters=where,
        )
    if t.num_rows == 0:
        raise FileNotFoundError(f"no heatmap for {image_id} ({explainer}, target {target})")
    return decode_heatmaps(t)[0]
