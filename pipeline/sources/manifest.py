"""A manifest source: one Parquet or CSV file whose rows name the images, no listing at all.

Columns (only these are read):
  uri       required; an object URI or a path (a relative one is relative to the manifest)
  image_id  optional; default: the uri's path below the folder all uris share (the uri
            itself when they share no scheme and bucket)
  label     optional; the class (index or name), also the annotation's label
  boxes     optional; [[x0, y0, x1, y1], ...] inclusive pixel corners, as JSON text or a list
  version / etag  optional; what the image's bytes are (e.g. the object's ETag)

Versions: with no listing there is nothing to ask the store per image, so an item's version is
a digest of the row's `version` (or `etag`) or, without one, of the manifest file's own version:
editing a manifest that has no version column then recomputes every block on resume. The uri is
always part of the digest (a row re-pointed at another object is a changed input), and so are
the row's annotations, as `_annotated` does for an annotation file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..chunks import chunks
from ..storage import Storage
from .inputs import INPUT_SCHEMA, ROWS_PER_BATCH, Inputs, json_text
from .listing import file_version
from .objects import read_object

COLUMNS = ("uri", "image_id", "label", "boxes", "version", "etag")
ANNOTATION_COLUMNS = ("label", "boxes")


def list_manifest(uri: str, storage: Storage) -> Inputs:
    """The manifest's rows as inputs, sorted by image id. Read a batch of rows at a time, each
    batch turned into the inputs' columns before the next is read: at 10M rows the driver
    holds the inputs, not the manifest beside them, and makes no Python object per row except
    the version digests of one batch."""
    fs, path = storage.filesystem(uri)
    try:
        info = storage.retry(lambda: fs.info(path), what=f"reading {uri}")
    except FileNotFoundError:
        raise FileNotFoundError(f"source {uri!r} does not exist") from None
    names, batches = _batches(fs, path, uri, info.get("size"), storage)
    if "uri" not in names:
        raise ValueError(f"manifest {uri}: no column 'uri' (it has: {', '.join(names)})")
    manifest_version = f"manifest:{file_version(info)}"
    parts, first_row = [], 0
    for batch in batches:
        parts.append(_inputs_of(batch, uri, first_row, manifest_version))
        first_row += batch.num_rows
    if first_row == 0:
        raise ValueError(f"manifest {uri}: no rows (a manifest lists the images to explain)")
    table = pa.concat_tables(parts)  # the batches' buffers, not a copy
    del parts
    if "image_id" in names:
        id_column = "image_id"
    else:
        id_column = "uri"
        table = table.set_column(0, "image_id", _ids_from_uris(table.column("uri")))
    inputs = Inputs(table)
    duplicate = inputs.first_duplicate()
    if duplicate is not None:
        ids = table.column("image_id")
        rows = np.flatnonzero(pc.equal(ids, duplicate).to_numpy(zero_copy_only=False))
        raise ValueError(
            f"manifest {uri}: column {id_column!r}: duplicate image id {duplicate!r} "
            f"(rows {rows[0]} and {rows[1]})"
        )
    return inputs.sorted()


def _inputs_of(batch: pa.Table, uri: str, first_row: int, manifest_version: str) -> pa.Table:
    """One batch of manifest rows (first_row: the first one's place) -> INPUT_SCHEMA columns;
    image_id is null until every uri is known when the manifest has no image_id column."""
    n = batch.num_rows
    uris = _uris(batch.column("uri").combine_chunks(), uri, first_row)
    if "image_id" in batch.column_names:
        ids = _text(batch.column("image_id").combine_chunks(), "image_id", uri, first_row, False)
    else:
        ids = pa.nulls(n, pa.string())
    labels = batch.column("label").combine_chunks() if "label" in batch.column_names else None
    meta, annotations = _annotations(batch, labels, uri, first_row)
    given = next((batch.column(c) for c in ("version", "etag") if c in batch.column_names), None)
    if given is not None:
        given = pc.fill_null(given.combine_chunks().cast(pa.string()), "").to_pylist()
    uri_texts = uris.to_pylist()
    notes = annotations.to_pylist() if annotations is not None else None
    versions = []
    for i, u in enumerate(uri_texts):
        tag = (given and given[i]) or manifest_version
        versions.append("m:" + _digest(f"{tag}|{u}|{(notes and notes[i]) or ''}", 16))
    return pa.table(
        {
            "image_id": ids,
            "uri": uris,
            "member": pa.nulls(n, pa.string()),
            "label": _label_texts(labels) if labels is not None else pa.nulls(n, pa.string()),
            "version": pa.array(versions, pa.string()),
            "meta": meta,
        },
        schema=INPUT_SCHEMA,
    )


def _batches(fs, path: str, uri: str, size: int | None, storage: Storage):
    """(the file's column names, batches of ROWS_PER_BATCH rows of the manifest columns it
    has): no other column is read, and a Parquet file is read a batch at a time."""
    if path.endswith((".parquet", ".pq")):
        from .parquet import open_parquet

        pf = open_parquet(fs, path, uri, size, storage=storage)
        names = pf.schema_arrow.names
        present = [c for c in COLUMNS if c in names]
        batches = (
            pa.Table.from_batches([b])
            for b in pf.iter_batches(batch_size=ROWS_PER_BATCH, columns=present)
        )
        return names, batches
    if path.endswith(".csv"):
        from pyarrow import csv as pacsv

        data = read_object(uri, storage)
        names = next(csv.reader([data.split(b"\n", 1)[0].decode("utf-8-sig")]), [])
        present = [c for c in COLUMNS if c in names]
        table = pacsv.read_csv(
            io.BytesIO(data),
            convert_options=pacsv.ConvertOptions(
                include_columns=present,
                column_types={c: pa.string() for c in present if c != "label"},
            ),
        )
        del data
        return names, (table[part] for part in chunks(len(table), ROWS_PER_BATCH))
    raise ValueError(f"manifest {uri}: not a .parquet or .csv file")


def _text(values: pa.Array, column: str, uri: str, first_row: int, trim: bool = True) -> pa.Array:
    """A column as text (trimmed); an empty or missing value is an error that names its row."""
    text = values.cast(pa.string())
    if trim:
        text = pc.utf8_trim_whitespace(text)
    empty = pc.fill_null(pc.equal(text, ""), True)
    row = pc.index(empty, True).as_py()
    if row >= 0:
        raise ValueError(f"manifest {uri}: column {column!r}: row {first_row + row} is empty")
    return text


def _uris(values: pa.Array, manifest: str, first_row: int) -> pa.Array:
    """The uris, a relative one made relative to the manifest's folder."""
    text = _text(values, "uri", manifest, first_row)
    absolute = pc.or_(pc.match_substring(text, "://"), pc.starts_with(text, "/"))
    base = posixpath.dirname(manifest)
    if not base or pc.all(absolute).as_py():
        return text
    joined = pc.binary_join_element_wise(base.rstrip("/"), text, "/")
    return pc.if_else(absolute, text, joined)


def _ids_from_uris(uris):
    """Each uri's path below the deepest folder they all share; the uris themselves when they
    do not share a scheme and bucket (or mix absolute and relative paths)."""
    has_scheme = pc.match_substring(uris, "://")
    if pc.any(has_scheme).as_py() and not pc.all(has_scheme).as_py():
        return uris
    absolute = pc.starts_with(uris, "/")
    if pc.any(absolute).as_py() and not pc.all(absolute).as_py():
        return uris
    # what every uri shares is what the least and the greatest share; cut back to a folder
    least, greatest = (v.as_py() for v in pc.min_max(uris).values())
    common = posixpath.commonprefix([least, greatest])
    if "://" in least and "/" not in common.partition("://")[2]:
        return uris  # not one bucket
    common = common[: common.rfind("/") + 1] if "/" in common else ""
    return pc.utf8_slice_codeunits(uris, len(common))


def _label_texts(labels: pa.Array) -> pa.Array:
    """The label column as the plan holds it (JSON text: 7, "cat"), null where there is none."""
    if pa.types.is_integer(labels.type):
        return labels.cast(pa.string())
    unique = pc.unique(labels)
    texts = pa.array([None if v is None else json_text(v) for v in unique.to_pylist()], pa.string())
    return texts.take(pc.index_in(labels, unique))


def _annotations(table: pa.Table, labels: pa.Array | None, uri: str, first_row: int):
    """(meta texts, annotation texts or None): a row with a label or boxes carries them as its
    annotation (in its meta, and in its version). Rows with only a label share their texts
    (one per distinct label); rows with boxes are parsed one by one."""
    n = table.num_rows
    boxes = table.column("boxes").to_pylist() if "boxes" in table.column_names else None
    if labels is None and boxes is None:
        return pa.array(["{}"] * n, pa.string()), None
    if boxes is None:
        unique = pc.unique(labels)
        annotations = [None if v is None else {"label": v} for v in unique.to_pylist()]
        at = pc.index_in(labels, unique)
        metas = [json_text({"annotation": a} if a else {}) for a in annotations]
        texts = [json.dumps(a, sort_keys=True) if a else "" for a in annotations]
        return pa.array(metas, pa.string()).take(at), pa.array(texts, pa.string()).take(at)
    label_values = labels.to_pylist() if labels is not None else [None] * n
    metas, texts = [], []
    for i in range(n):
        annotation = {}
        if label_values[i] is not None:
            annotation["label"] = label_values[i]
        if boxes[i] not in (None, ""):
            annotation["boxes"] = _boxes(boxes[i], first_row + i, uri)
        metas.append(json_text({"annotation": annotation} if annotation else {}))
        texts.append(json.dumps(annotation, sort_keys=True) if annotation else "")
    return pa.array(metas, pa.string()), pa.array(texts, pa.string())


def _boxes(value, i: int, uri: str) -> list[list[float]]:
    try:
        boxes = json.loads(value) if isinstance(value, str) else value
        boxes = [[float(v) for v in box] for box in boxes]
        if any(len(box) != 4 for box in boxes):
            raise ValueError("each box needs 4 numbers")
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"manifest {uri}: column 'boxes': row {i}: not a list of [x0, y0, x1, y1] ({e})"
        ) from None
    return boxes


def _digest(text: str, length: int = 12) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]
