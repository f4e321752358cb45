"""What a job reads: the list of inputs under a source URI, cut into deterministic blocks.

A block is the unit of work, of output files and of resume. Its id is a digest of its inputs'
ids and versions (size + ETag or mtime), never of its position: the same inputs give the same
blocks, and a block whose inputs changed gets a new id, so a re-run can tell what it finished.
"""

from __future__ import annotations

import hashlib
import itertools
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from ..storage import filesystem, with_retries

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
DEMO_IMAGES = ("chelsea", "coffee", "astronaut", "rocket", "cat", "horse", "immunohistochemistry")
# the `member` of an item that stands for every sample of a container (a WebDataset shard):
# the block that reads it lists its samples
ALL_SAMPLES = "*"
# a row group bigger than a block stays whole in one block up to this many blocks' worth
MAX_ROW_GROUP_BLOCKS = 4
# An object store is listed by prefix, concurrently: the top level with a delimiter (its files
# and common prefixes), levels with fewer prefixes than LISTING_FANOUT one level deeper (at
# most LISTING_LEVELS delimiter levels), then every prefix found in full, LISTING_THREADS at once.
LISTING_THREADS = 32
LISTING_FANOUT = 16
LISTING_LEVELS = 3


@dataclass(frozen=True)
class InputItem:
    """One input image. `uri` is where its bytes are; `member` names it inside a container
    (a tar member, a Parquet row index, or ALL_SAMPLES: a whole shard); `image_id` is unique
    within the job. Items read from a container carry meta["shard"] (its uri) and, for Parquet,
    meta["row_group"]."""

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
    """Every input under `uri`, sorted by image id (so blocks are deterministic). A WebDataset
    source lists one item per shard (member ALL_SAMPLES), never opening a shard; a manifest
    source lists the rows of the file `uri` names."""
    if uri.startswith("skimage:"):
        return [InputItem(name, f"skimage:{name}") for name in DEMO_IMAGES]
    if fmt == "images":
        items = _list_image_files(uri, endpoint_url)
    elif fmt == "webdataset":
        from .webdataset import list_shards

        items = list_shards(uri, endpoint_url)
    elif fmt == "parquet":
        from .parquet import list_parquet

        items = list_parquet(uri, image_column, label_column, endpoint_url)
    elif fmt == "manifest":
        from .manifest import list_manifest

        items = list_manifest(uri, endpoint_url)
    else:
        raise ValueError(f"source.format: unknown format {fmt!r}")
    ids = [it.image_id for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"source {uri!r}: duplicate image ids")
    return sorted(items, key=lambda it: it.image_id)


def make_blocks(items: list[InputItem], block_size: int) -> list[Block]:
    """Blocks named by the digest of their inputs. Plain files: consecutive runs of
    `block_size` items. Items of containers (meta["shard"]) are cut so that each container part
    is read by one block: a WebDataset shard is a block of its own; Parquet rows are grouped by
    row group, a block holding whole row groups up to `block_size` rows, a bigger row group
    alone up to MAX_ROW_GROUP_BLOCKS x block_size rows and, beyond that, cut into the fewest
    equal slices of at most that, each of which reads the whole row group's image column."""
    plain = [it for it in items if "shard" not in it.meta]
    chunks = [plain[s : s + block_size] for s in range(0, len(plain), block_size)]
    chunks += _container_chunks([it for it in items if "shard" in it.meta], block_size)
    return [Block(block_id(tuple(chunk)), tuple(chunk)) for chunk in chunks]


def _container_chunks(items: list[InputItem], block_size: int) -> list[list[InputItem]]:
    # by file and row group, whatever the id order, so that a row group's rows are together
    def part(it: InputItem):
        whole = it.member == ALL_SAMPLES
        return (it.meta["shard"], it.meta.get("row_group", -1), it.image_id if whole else "")

    def row(it: InputItem) -> int:
        return int(it.member) if it.member and it.member.isdigit() else -1

    ordered = sorted(items, key=lambda it: (part(it), row(it), it.image_id))
    chunks: list[list[InputItem]] = []
    current: list[InputItem] = []
    for _, group in itertools.groupby(ordered, key=part):
        unit = list(group)
        small = unit[0].member != ALL_SAMPLES and len(unit) <= block_size
        if small and len(current) + len(unit) <= block_size:
            current += unit
            continue
        if current:
            chunks.append(current)
            current = []
        if small:
            current = unit
            continue
        # a whole shard, or a row group bigger than a block: alone, sliced only when huge
        slices = -(-len(unit) // (MAX_ROW_GROUP_BLOCKS * block_size))
        step = -(-len(unit) // slices)
        chunks += [unit[s : s + step] for s in range(0, len(unit), step)]
    if current:
        chunks.append(current)
    return chunks


def block_id(items: tuple[InputItem, ...]) -> str:
    text = "\n".join(f"{it.image_id}\t{it.version}" for it in items)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_version(info: dict) -> str:
    """size + ETag (object stores) or mtime (file systems) from an fsspec info dict."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{str(tag).strip(chr(34))}"


def _files_under(uri: str, endpoint_url: str | None):
    """(fs, root, {path: info}) for every file under `uri` (or the one file it names), sorted.
    A local folder is walked; an object store is listed over its common prefixes in parallel
    (`_list_tree`), which gives what one `fs.find(root, detail=True)` gives."""
    fs, root = filesystem(uri, endpoint_url)
    # a listing this process made before (a resume lists again) must not answer for this one
    fs.invalidate_cache(root)
    try:
        info = with_retries(lambda: fs.info(root), what=f"listing {uri}")
    except FileNotFoundError:
        raise FileNotFoundError(f"source {uri!r} does not exist") from None
    if info.get("type") == "file":
        return fs, posixpath.dirname(root), {root: info}
    root = root.rstrip("/")
    found = fs.find(root, detail=True) if _is_local(fs) else _list_tree(fs, root)
    return fs, root, {p: found[p] for p in sorted(found)}


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _list_tree(fs, root: str, threads: int = LISTING_THREADS) -> dict[str, dict]:
    """{path: info} of every file under the folder `root` of an object store: what one
    `fs.find(root, detail=True)` gives (one serial chain of pages), listed over common
    prefixes by `threads` requests at once. The top level is listed with a delimiter; a level
    with fewer than LISTING_FANOUT prefixes is listed one level deeper; each prefix found is
    then listed in full. Every request is retried (`with_retries`) and bypasses a listings
    cache; a prefix that is gone by the time it is listed lists nothing."""
    found: dict[str, dict] = {}
    frontier, whole = [root], []
    with ThreadPoolExecutor(threads, thread_name_prefix="listing") as pool:
        for level in range(LISTING_LEVELS):
            if not frontier or (level and len(frontier) >= LISTING_FANOUT):
                break
            deeper = []
            for parent, entries in zip(frontier, pool.map(partial(_ls, fs), frontier), strict=True):
                files, prefixes = _split_level(parent, entries)
                found.update(files)
                if prefixes is None:  # a prefix that is no folder level ("a//b"): whole
                    whole.append(parent)
                else:
                    deeper += prefixes
            frontier = deeper
        for part in pool.map(partial(_find, fs), whole + frontier):
            found.update(part)
    return found


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


def _ls(fs, path: str) -> list[dict]:
    """One level of `path` (files and common prefixes), never from a listings cache; nothing
    if it is gone."""
    try:
        return with_retries(lambda: fs.ls(path, detail=True, refresh=True), what=f"listing {path}")
    except FileNotFoundError:
        return []


def _find(fs, path: str) -> dict[str, dict]:
    """Every file under the prefix `path/` (nothing if it is gone)."""
    try:
        found = with_retries(lambda: fs.find(path, detail=True), what=f"listing {path}")
    except FileNotFoundError:
        return {}
    under = path + "/"
    # a gone prefix can come back as the file named like it: that file is its parent's
    return {p: info for p, info in found.items() if p.startswith(under)}


def _unstrip(uri: str, fs, path: str) -> str:
    """A path from `fs.find` back to a URI with the source's scheme."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if _is_local(fs) else f"{protocol}://{path}"


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
