"""What a job reads: the list of inputs under a source URI, cut into deterministic blocks.

A block is the unit of work, of output files and of resume. Its id is a digest of its inputs'
ids and versions (size + ETag or mtime), never of its position: the same inputs give the same
blocks, and a block whose inputs changed gets a new id, so a re-run can tell what it finished.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from dataclasses import dataclass, field

from ..storage import filesystem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DEMO_IMAGES = ("chelsea", "coffee", "astronaut", "rocket", "cat", "horse", "immunohistochemistry")


@dataclass(frozen=True)
class InputItem:
    """One input image. `uri` is where its bytes are; `member` names it inside a container
    (a tar member or a Parquet row index); `image_id` is unique within the job."""

    image_id: str
    uri: str
    member: str | None = None
    label: int | str | None = None
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    # what the bytes were when listed (size + ETag/mtime): a changed input is a new input
    version: str = ""


@dataclass(frozen=True)
class Block:
    block_id: str
    items: tuple[InputItem, ...]


def list_inputs(
    uri: str,
    fmt: str = "images",
    *,
    image_column: str = "image",
    label_column: str | None = "label",
    endpoint_url: str | None = None,
) -> list[InputItem]:
    """Every input under `uri`, sorted by image id (so blocks are deterministic)."""
    if uri.startswith("skimage:"):
        return [InputItem(name, f"skimage:{name}") for name in DEMO_IMAGES]
    if fmt == "images":
        items = _list_image_files(uri, endpoint_url)
    elif fmt == "webdataset":
        items = _list_webdataset(uri, endpoint_url)
    elif fmt == "parquet":
        items = _list_parquet(uri, image_column, label_column, endpoint_url)
    else:
        raise ValueError(f"source.format: unknown format {fmt!r}")
    ids = [it.image_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"source {uri!r}: duplicate image ids")
    return sorted(items, key=lambda it: it.image_id)


def make_blocks(items: list[InputItem], block_size: int) -> list[Block]:
    """Consecutive runs of `block_size` items, each named by the digest of its inputs."""
    return [
        Block(block_id(chunk), chunk)
        for chunk in (tuple(items[s : s + block_size]) for s in range(0, len(items), block_size))
    ]


def block_id(items: tuple[InputItem, ...]) -> str:
    text = "\n".join(f"{it.image_id}\t{it.version}" for it in items)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_version(info: dict) -> str:
    """size + ETag (object stores) or mtime (file systems) from an fsspec info dict."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{str(tag).strip(chr(34))}"


def _files_under(uri: str, endpoint_url: str | None):
    """(fs, root, {path: info}) for every file under `uri` (or the one file it names)."""
    fs, root = filesystem(uri, endpoint_url)
    if not fs.exists(root):
        raise FileNotFoundError(f"source {uri!r} does not exist")
    if fs.isfile(root):
        return fs, posixpath.dirname(root), {root: fs.info(root)}
    found = fs.find(root, detail=True)
    return fs, root.rstrip("/"), {p: found[p] for p in sorted(found)}


def _unstrip(uri: str, fs, path: str) -> str:
    """A path from `fs.find` back to a URI with the source's scheme."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _list_image_files(uri: str, endpoint_url: str | None) -> list[InputItem]:
    fs, root, files = _files_under(uri, endpoint_url)
    items = []
    for p, info in files.items():
        if not p.lower().endswith(IMAGE_EXTENSIONS):
            continue
        rel = posixpath.relpath(p, root)
        folder = posixpath.basename(posixpath.dirname(p)) if "/" in rel else None
        items.append(
            InputItem(
                rel, _unstrip(uri, fs, p), meta={"folder": folder}, version=file_version(info)
            )
        )
    return items


def _list_webdataset(uri: str, endpoint_url: str | None) -> list[InputItem]:
    """WebDataset shards: members sharing a key (`a/b/0001.jpg`, `a/b/0001.cls`) are one sample."""
    fs, _, files = _files_under(uri, endpoint_url)
    items = []
    for shard in (p for p in files if p.endswith(".tar")):
        with fs.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in members:
                key, ext = posixpath.splitext(name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                label = None
                if key + ".cls" in members:
                    label = int(tar.extractfile(members[key + ".cls"]).read().decode().strip())
                elif key + ".json" in members:
                    import json

                    meta = json.loads(tar.extractfile(members[key + ".json"]).read())
                    label = meta.get("label", meta.get("label_index"))
                shard_name = posixpath.basename(shard)
                items.append(
                    InputItem(
                        f"{shard_name}/{key}",
                        _unstrip(uri, fs, shard),
                        name,
                        label,
                        version=file_version(files[shard]),
                    )
                )
    return items


def _list_parquet(
    uri: str, image_column: str, label_column: str | None, endpoint_url: str | None
) -> list[InputItem]:
    import pyarrow.parquet as pq

    fs, _, files = _files_under(uri, endpoint_url)
    items = []
    for path in (p for p in files if p.endswith(".parquet")):
        with fs.open(path, "rb") as f:
            table = pq.read_table(io.BytesIO(f.read()), columns=None)
        if image_column not in table.column_names:
            raise ValueError(f"source {path!r} has no column {image_column!r}")
        labels = (
            table.column(label_column).to_pylist()
            if label_column and label_column in table.column_names
            else [None] * table.num_rows
        )
        ids = (
            table.column("image_id").to_pylist()
            if "image_id" in table.column_names
            else [str(i) for i in range(table.num_rows)]
        )
        name = posixpath.basename(path)
        for row, (image_id, label) in enumerate(zip(ids, labels, strict=True)):
            items.append(
                InputItem(
                    f"{name}/{image_id}",
                    _unstrip(uri, fs, path),
                    str(row),
                    label,
                    {"image_column": image_column},
                    version=file_version(files[path]),
                )
            )
    return items
