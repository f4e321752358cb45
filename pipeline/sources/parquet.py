"""Parquet shards read by the byte ranges they need, never whole.

The driver reads each file's footer and only its id/label columns; a block reads only the
image column of the row groups its items are in. Each item records its row group
(`meta["row_group"]`) and file (`meta["shard"]`), and `make_blocks` keeps a row group in one
block, so every image byte is read once. A footer is read by the listing and again by each
block of its file (a few KB, against MBs of images per row group).
"""

from __future__ import annotations

import bisect
import posixpath
import struct

from ..storage import Storage
from .decode import BadImage
from .inputs import InputItem
from .listing import _files_under, _unstrip, file_version
from .objects import RangeFile

_MAGIC = b"PAR1"


def open_parquet(fs, path: str, uri: str, size: int | None = None, storage: Storage = Storage()):
    """A ParquetFile that fetches its footer in two exact GETs and each column chunk it reads
    in one; `size` from a listing saves a HEAD. `storage` retries those reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if size is None:
        size = storage.retry(lambda: fs.size(path), what=f"reading {uri}")
    f = RangeFile(fs, path, size, uri, storage)
    if size < 12:
        raise ValueError(f"{uri}: not a Parquet file ({size} bytes)")
    f.seek(size - 8)
    tail = f.read(8)
    if tail[4:] != _MAGIC:
        raise ValueError(f"{uri}: not a Parquet file (no PAR1 footer)")
    (footer_len,) = struct.unpack("<i", tail[:4])
    if not 0 < footer_len <= size - 12:
        raise ValueError(f"{uri}: corrupt Parquet footer length {footer_len}")
    f.seek(size - 8 - footer_len)
    footer = f.read(footer_len)
    # pyarrow would read the last 64 KiB to find the footer (most of a small file): parse the
    # exact footer from memory, then hand its metadata (absolute offsets) to the real file
    metadata = pq.read_metadata(pa.BufferReader(_MAGIC + footer + tail))
    # no pre-buffering: it coalesces neighbouring column chunks, i.e. reads the image column
    # when only the ids were asked for
    return pq.ParquetFile(f, metadata=metadata, pre_buffer=False)


def list_parquet(
    uri: str, image_column: str, label_column: str | None, storage: Storage
) -> list[InputItem]:
    """One item per row; ids from an `image_id` column, else the row number in its file."""
    fs, _, files = _files_under(uri, storage)
    items = []
    for path in (p for p in files if p.endswith(".parquet")):
        shard = _unstrip(uri, fs, path)
        pf = open_parquet(fs, path, shard, files[path].get("size"), storage=storage)
        names = pf.schema_arrow.names
        if image_column not in names:
            raise ValueError(f"source {path!r} has no column {image_column!r}")
        has_ids = "image_id" in names
        has_labels = bool(label_column) and label_column in names
        columns = list(dict.fromkeys(["image_id"] * has_ids + [label_column] * has_labels))
        name, version = posixpath.basename(path), file_version(files[path])
        row = 0
        for group in range(pf.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            table = pf.read_row_group(group, columns=columns) if columns else None
            ids = table.column("image_id").to_pylist() if has_ids else range(row, row + n)
            labels = table.column(label_column).to_pylist() if has_labels else [None] * n
            for i, (image_id, label) in enumerate(zip(ids, labels, strict=True)):
                items.append(
                    InputItem(
                        f"{name}/{image_id}",
                        shard,
                        str(row + i),
                        label,
                        {
                            "image_column": image_column,
                            "shard": shard,
                            "row_group": group,
                            "size": files[path].get("size"),  # a block's read needs no HEAD
                        },
                        version=version,
                    )
                )
            row += n
    return items


def read_cells(items: list[InputItem], storage: Storage) -> list[tuple]:
    """(item, image bytes or the exception for that item) for items of one Parquet file, in
    order: only the image column of the row groups they are in is read. An item's `member` is
    its row in the file; its row group comes from meta (or the footer, for an item a report
    rebuilt from a heatmap row)."""
    uri = items[0].uri
    fs, path = storage.filesystem(uri)
    pf = open_parquet(fs, path, uri, items[0].meta.get("size"), storage=storage)
    starts, row = [], 0
    for group in range(pf.num_row_groups):
        starts.append(row)
        row += pf.metadata.row_group(group).num_rows
    wanted: dict[int, list[tuple[int, int]]] = {}  # row group -> (index in items, row in it)
    for k, it in enumerate(items):
        row = int(it.member)
        group = it.meta.get("row_group")
        if group is None:
            group = bisect.bisect_right(starts, row) - 1
        offset = row - starts[group] if 0 <= group < len(starts) else -1
        wanted.setdefault(group, []).append((k, offset))
    column = items[0].meta.get("image_column", "image")
    out: dict[int, object] = {}
    for group, members in sorted(wanted.items()):
        in_file = 0 <= group < len(starts)
        values = pf.read_row_group(group, columns=[column]).column(column) if in_file else []
        for k, offset in members:
            out[k] = _cell(items[k], values, offset)
    return [(it, out[k]) for k, it in enumerate(items)]


def _cell(item: InputItem, values, offset: int):
    if not 0 <= offset < len(values):
        return IndexError(f"{item.uri}: no row {item.member}")
    value = values[offset].as_py()
    if isinstance(value, dict):  # HF-style {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if value is None:
        return BadImage("empty", f"{item.image_id}: no image bytes")
    return value
