"""What a job reads: the inputs under a source URI, listed concurrently where the store
allows, as columns (`Inputs`; `inputs.make_blocks` cuts them into blocks)."""

from __future__ import annotations

import posixpath
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pyarrow as pa

from ..storage import Storage
from .inputs import INPUT_SCHEMA, InputItem, Inputs, json_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DEMO_IMAGES = ("chelsea", "coffee", "astronaut", "rocket", "cat", "horse", "immunohistochemistry")
# An object store is listed by prefix, concurrently: the top level with a delimiter (its files
# and common prefixes), levels with fewer prefixes than LISTING_FANOUT one level deeper (at
# most LISTING_LEVELS delimiter levels), then every prefix found in full, LISTING_THREADS at once.
LISTING_THREADS = 32
LISTING_FANOUT = 16
LISTING_LEVELS = 3


def list_inputs(
    uri: str,
    fmt: str = "images",
    *,
    image_column: str = "image",
    label_column: str | None = "label",
    storage: Storage = Storage(),
) -> Inputs:
    """Every input under `uri`, sorted by image id (so blocks are deterministic). A WebDataset
    source lists one item per shard (member ALL_SAMPLES), never opening a shard; a manifest
    source lists the rows of the file `uri` names."""
    if uri.startswith("skimage:"):
        return Inputs.from_items(InputItem(name, f"skimage:{name}") for name in DEMO_IMAGES)
    if fmt == "images":
        items = _list_image_files(uri, storage)
    elif fmt == "webdataset":
        from .webdataset import list_shards

        items = Inputs.from_items(list_shards(uri, storage))
    elif fmt == "parquet":
        from .parquet import list_parquet

        items = Inputs.from_items(list_parquet(uri, image_column, label_column, storage))
    elif fmt == "manifest":
        from .manifest import list_manifest

        items = list_manifest(uri, storage)
    else:
        raise ValueError(f"source.format: unknown format {fmt!r}")
    items = items.sorted()
    duplicate = items.first_duplicate()  # sorted: one comparison of neighbours
    if duplicate is not None:
        raise ValueError(f"source {uri!r}: duplicate image id {duplicate!r}")
    return items


def file_version(info: dict) -> str:
    """size + ETag (object stores) or mtime (file systems) from an fsspec info dict."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{str(tag).strip(chr(34))}"


def _files_under(uri: str, storage: Storage):
    """(fs, root, {path: info}) for every file under `uri` (or the one file it names), sorted:
    for sources of few files (shards). An image listing reads `_file_parts` a part at a time."""
    fs, root, parts = _file_parts(uri, storage)
    found: dict[str, dict] = {}
    for part in parts:
        found.update(part)
    return fs, root, {p: found[p] for p in sorted(found)}


def _file_parts(uri: str, storage: Storage):
    """(fs, root, the files under `uri` as {path: info} parts): a local folder is walked; an
    object store is listed over its common prefixes in parallel (`_tree_parts`), which gives
    what one `fs.find(root, detail=True)` gives, a prefix at a time."""
    fs, root = storage.filesystem(uri)
    # a listing this process made before (a resume lists again) must not answer for this one
    fs.invalidate_cache(root)
    try:
        info = storage.retry(lambda: fs.info(root), what=f"listing {uri}")
    except FileNotFoundError:
        raise FileNotFoundError(f"source {uri!r} does not exist") from None
    if info.get("type") == "file":
        return fs, posixpath.dirname(root), iter([{root: info}])
    root = root.rstrip("/")
    if _is_local(fs):
        return fs, root, iter([fs.find(root, detail=True)])
    return fs, root, _tree_parts(fs, root, storage)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _list_tree(
    fs, root: str, storage: Storage = Storage(), threads: int = LISTING_THREADS
) -> dict[str, dict]:
    """{path: info} of every file under the folder `root` of an object store (`_tree_parts`
    merged)."""
    found: dict[str, dict] = {}
    for part in _tree_parts(fs, root, storage, threads):
        found.update(part)
    return found


def _tree_parts(
    fs, root: str, storage: Storage, threads: int = LISTING_THREADS
) -> Iterator[dict[str, dict]]:
    """Every file under the folder `root` of an object store as {path: info} parts, what one
    `fs.find(root, detail=True)` gives (one serial chain of pages), listed over common prefixes
    by `threads` requests at once. The top level is listed with a delimiter; a level with fewer
    than LISTING_FANOUT prefixes is listed one level deeper; each prefix found is then listed
    in full, at most 2 x `threads` prefixes ahead of the reader (10M keys are never all held
    as info dicts). Every request is retried (`storage.retry`) and bypasses a listings cache; a
    prefix that is gone by the time it is listed lists nothing."""
    frontier, whole = [root], []
    with ThreadPoolExecutor(threads, thread_name_prefix="listing") as pool:
        for level in range(LISTING_LEVELS):
            if not frontier or (level and len(frontier) >= LISTING_FANOUT):
                break
            deeper = []
            for parent, entries in zip(
                frontier, pool.map(partial(_ls, fs, storage), frontier), strict=True
            ):
                files, prefixes = _split_level(parent, entries)
                yield files
                if prefixes is None:  # a prefix that is no folder level ("a//b"): whole
                    whole.append(parent)
                else:
                    deeper += prefixes
            frontier = deeper
        pending: deque = deque()
        for prefix in whole + frontier:
            pending.append(pool.submit(_find, fs, storage, prefix))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _split_level(parent: str, entries: list[dict]):
    """(files, prefixes) of one delimiter listing of `parent`; prefixes is None when one of
    them names no level below `parent` (an empty path segment, as in the key "a//b"): such a
    parent is listed whole instead."""
    files, prefixes = {}, []
    under = parent + "/"
    for e in entries:
        name = e["name"]
        if e.get("type") == "directory":
            child = name.rstrip("/")
            if not child.startswith(under) or len(child) <= len(under):
                return files, None
            prefixes.append(child)
        elif name.startswith(under):  # not a file named like a prefix that went away
            files[name] = e
    return files, prefixes


def _ls(fs, storage: Storage, path: str) -> list[dict]:
    """One level of `path` (files and common prefixes), never from a listings cache; nothing
    if it is gone."""
    try:
        return storage.retry(lambda: fs.ls(path, detail=True, refresh=True), what=f"listing {path}")
    except FileNotFoundError:
        return []


def _find(fs, storage: Storage, path: str) -> dict[str, dict]:
    """Every file under the prefix `path/` (nothing if it is gone)."""
    try:
        found = storage.retry(lambda: fs.find(path, detail=True), what=f"listing {path}")
    except FileNotFoundError:
        return {}
    under = path + "/"
    # a gone prefix can come back as the file named like it: that file is its parent's
    return {p: info for p, info in found.items() if p.startswith(under)}


def _unstrip(uri: str, fs, path: str) -> str:
    """A path from `fs.find` back to a URI with the source's scheme."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if _is_local(fs) else f"{protocol}://{path}"


def _list_image_files(uri: str, storage: Storage) -> Inputs:
    """The image files under `uri`, built as columns a listing part at a time (no InputItem
    per file, and no info dict kept past its part)."""
    fs, root, parts = _file_parts(uri, storage)
    folders: dict[str | None, str] = {}  # one meta text per folder, shared
    tables = []
    for part in parts:
        columns: dict[str, list] = {"image_id": [], "uri": [], "version": [], "meta": []}
        for p, info in part.items():
            if not p.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = posixpath.relpath(p, root)
            folder = posixpath.basename(posixpath.dirname(p)) if "/" in rel else None
            if folder not in folders:
                folders[folder] = json_text({"folder": folder})
            columns["image_id"].append(rel)
            columns["uri"].append(_unstrip(uri, fs, p))
            columns["version"].append(file_version(info))
            columns["meta"].append(folders[folder])
        n = len(columns["image_id"])
        columns["member"] = columns["label"] = pa.nulls(n, pa.string())
        tables.append(pa.table(columns, schema=INPUT_SCHEMA))
    return Inputs(pa.concat_tables(tables) if tables else INPUT_SCHEMA.empty_table())
