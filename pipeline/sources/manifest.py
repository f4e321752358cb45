"""A manifest source: one Parquet or CSV file whose rows name the images, no listing at all.

Columns (only these are read):
  uri       required; an object URI or a path (a relative one is relative to the manifest)
  image_id  optional; default: the uri's path below the folder all uris share (the uri
            itself when they share no scheme and bucket)
  label     optional; the class (index or name), also the annotation's label
  boxes     optional; [[x0, y0, x1, y1], ...] inclusive pixel corners, as JSON text or a list
  version / etag  optional; what the image's bytes are (e.g. the object's ETag)

Versions: with no listing there is nothing to ask the store per image, so an item's version is
the row's `version` (or `etag`) and, without one, the manifest file's own version: editing a
manifest that has no version column then recomputes every block on resume. The uri is always
part of the version (a row re-pointed at another object is a changed input), and so are the
row's annotations, as `_annotated` does for an annotation file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath

from ..storage import filesystem, with_retries
from .listing import InputItem, file_version
from .objects import fetch_object

COLUMNS = ("uri", "image_id", "label", "boxes", "version", "etag")
ANNOTATION_COLUMNS = ("label", "boxes")


def list_manifest(uri: str, endpoint_url: str | None) -> list[InputItem]:
    fs, path = filesystem(uri, endpoint_url)
    try:
        info = with_retries(lambda: fs.info(path), what=f"reading {uri}")
    except FileNotFoundError:
        raise FileNotFoundError(f"source {uri!r} does not exist") from None
    names, rows = _read_columns(fs, path, uri, info.get("size"), endpoint_url)
    if "uri" not in rows:
        raise ValueError(f"manifest {uri}: no column 'uri' (it has: {', '.join(names)})")
    n = len(rows["uri"])
    if n == 0:
        raise ValueError(f"manifest {uri}: no rows (a manifest lists the images to explain)")
    base = posixpath.dirname(uri)
    uris = []
    for i, u in enumerate(rows["uri"]):
        if u is None or not str(u).strip():
            raise ValueError(f"manifest {uri}: column 'uri': row {i} is empty")
        u = str(u).strip()
        uris.append(u if "://" in u or u.startswith("/") else posixpath.join(base, u))
    id_column = "image_id" if "image_id" in rows else "uri"
    ids = [str(v) for v in rows["image_id"]] if "image_id" in rows else _ids_from_uris(uris)
    first: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        if image_id in first:
            raise ValueError(
                f"manifest {uri}: column {id_column!r}: duplicate image id {image_id!r} "
                f"(rows {first[image_id]} and {i})"
            )
        first[image_id] = i
    given = rows.get("version") or rows.get("etag") or [None] * n
    manifest_version = f"manifest:{file_version(info)}"
    labels = rows.get("label") or [None] * n
    items = []
    for i in range(n):
        annotation = _annotation(rows, i, uri)
        version = f"{given[i] or manifest_version}|{_digest(uris[i])}"
        meta = {}
        if annotation:
            meta["annotation"] = annotation
            version += f"+a{_digest(json.dumps(annotation, sort_keys=True))}"
        items.append(InputItem(ids[i], uris[i], None, labels[i], meta, version))
    return items


def _read_columns(fs, path: str, uri: str, size: int | None, endpoint_url):
    """(the file's column names, {column: values} for the manifest columns it has): no other
    column is read."""
    if path.endswith((".parquet", ".pq")):
        from .parquet import open_parquet

        pf = open_parquet(fs, path, uri, size)
        names = pf.schema_arrow.names
        present = [c for c in COLUMNS if c in names]
        table = pf.read(columns=present)
    elif path.endswith(".csv"):
        import pyarrow as pa
        from pyarrow import csv as pacsv

        data = fetch_object(uri, endpoint_url)
        names = next(csv.reader([data.split(b"\n", 1)[0].decode("utf-8-sig")]), [])
        present = [c for c in COLUMNS if c in names]
        table = pacsv.read_csv(
            io.BytesIO(data),
            convert_options=pacsv.ConvertOptions(
                include_columns=present,
                column_types={c: pa.string() for c in present if c != "label"},
            ),
        )
    else:
        raise ValueError(f"manifest {uri}: not a .parquet or .csv file")
    return names, {c: table.column(c).to_pylist() for c in present}


def _ids_from_uris(uris: list[str]) -> list[str]:
    """Each uri's path below the deepest folder they all share; the uris themselves when they
    do not share a scheme and bucket."""
    split = [_bucket_and_key(u) for u in uris]
    if len({bucket for bucket, _ in split}) != 1:
        return uris
    paths = [key for _, key in split]
    try:
        common = posixpath.commonpath([posixpath.dirname(p) for p in paths])
    except ValueError:  # absolute and relative paths mixed
        return uris
    return [p[len(common) :].lstrip("/") for p in paths]


def _bucket_and_key(uri: str) -> tuple[str, str]:
    """("s3://bucket", "key/of/object") for an object URI, ("", path) for a path."""
    if "://" not in uri:
        return "", uri
    scheme, rest = uri.split("://", 1)
    bucket, _, key = rest.partition("/")
    return f"{scheme}://{bucket}", key


def _annotation(rows: dict[str, list], i: int, uri: str) -> dict:
    out = {}
    if rows.get("label") is not None and rows["label"][i] is not None:
        out["label"] = rows["label"][i]
    if rows.get("boxes") is not None and rows["boxes"][i] not in (None, ""):
        out["boxes"] = _boxes(rows["boxes"][i], i, uri)
    return out


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


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
