"""A block's files and its marker: the data files first, the marker last, so a block is
finished exactly when its marker exists. Markers are typed (BlockMarker) and read concurrently."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa

from ..storage import Storage
from .codec import TABLES, parquet_bytes
from .commit import arrow_filesystem, read_commit, write_commit
from .digest import Digest
from .layout import PAIR_FILE, marker_uri, part_uri, safe_name

# markers fetched at once when a run's markers are read (object stores answer in parallel)
READ_THREADS = 32


@dataclass
class BlockMarker:
    """What a finished block tells the driver: counts, timings, metric states (merged into the
    summary) and its digest (merged into the report)."""

    block_id: str
    n_inputs: int = 0
    images_ok: int = 0
    fatal_errors: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per explainer
    images: dict[str, int] = field(default_factory=dict)  # per explainer: images with a heatmap
    forward_passes: dict[str, int] = field(default_factory=dict)
    # explainer -> metric key -> {"name", "params", "state"}
    metric_states: dict[str, dict] = field(default_factory=dict)
    digest: Digest = field(default_factory=Digest)
    first_error: dict | None = None
    # image id -> version, in markers written before the plan was stored (runstore.plan), which
    # now holds what each block was made of
    inputs: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    started_at: float = 0.0  # epoch seconds: the pipeline's start-up and steady rate
    worker: str = ""  # actor instance: a restarted actor shows up as a new one
    worker_created_at: float = 0.0
    worker_init_seconds: float = 0.0
    torch_threads: int = 0
    max_batch_cap: int | None = None

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "digest": self.digest.to_json()})

    @classmethod
    def from_json(cls, text: str | bytes) -> BlockMarker:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # newer fields from a newer writer
        data["digest"] = Digest.from_json(data.get("digest"))
        return cls(**data)


def write_block(
    root: str, marker: BlockMarker, tables: dict[str, pa.Table], storage: Storage = Storage()
) -> None:
    """Data files first, the marker last: a block without a marker is recomputed on resume and
    its files are replaced whole (same names), so there are never duplicates. An empty table is
    not written (most blocks have no errors), and a part an earlier attempt left for it goes."""
    for name in TABLES:
        uri = part_uri(root, name, marker.block_id)
        if tables[name].num_rows:
            storage.write_bytes_atomic(uri, parquet_bytes(tables[name]))
        else:
            storage.remove(uri)
    storage.write_bytes_atomic(marker_uri(root, marker.block_id), marker.to_json().encode())


def finished_block_ids(root: str, storage: Storage = Storage()) -> set[str]:
    """The ids of every block a previous attempt finished: the markers' names (one listing, no
    reads) and the blocks a compaction folded."""
    fs, path = storage.filesystem(f"{root}/_blocks")
    fs.invalidate_cache(path)  # a resume must see the latest markers
    commit = read_commit(root, storage)
    done = set(commit.blocks) if commit else set()
    try:
        names = storage.retry(lambda: fs.ls(path, detail=False), what=f"listing {root}/_blocks")
    except FileNotFoundError:
        return done
    return done | {posixpath.basename(n)[: -len(".json")] for n in names if n.endswith(".json")}


def read_markers(
    root: str, block_ids: Iterable[str], storage: Storage = Storage(), folded: bool = True
) -> Iterator[BlockMarker]:
    """The markers of `block_ids`, yielded as they arrive (in no particular order), so a caller
    can fold them without holding them all: those a compaction folded from its table (unless
    `folded` is False), the others fetched READ_THREADS at a time."""
    wanted = list(block_ids)
    commit = read_commit(root, storage) if folded else None
    if commit and commit.markers:
        in_table = set(wanted) & set(commit.blocks)
        wanted = [b for b in wanted if b not in in_table]
        yield from _folded_markers(root, commit.markers, in_table, storage)
    ids = iter(wanted)
    with ThreadPoolExecutor(READ_THREADS) as pool:

        def submit(n: int) -> set:
            return {pool.submit(storage.read_bytes, marker_uri(root, bid)) for bid in _take(ids, n)}

        pending = submit(4 * READ_THREADS)
        while pending:
            done = next(as_completed(pending))
            pending.remove(done)
            pending |= submit(1)
            yield BlockMarker.from_json(done.result())


def _folded_markers(root, name, block_ids: set[str], storage: Storage) -> Iterator[BlockMarker]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not block_ids:
        return
    fs, base = storage.filesystem(root)
    parquet = pq.ParquetFile(f"{base}/{name}", filesystem=arrow_filesystem(fs))
    wanted = pa.array(sorted(block_ids), pa.string())
    for batch in parquet.iter_batches(batch_size=1024):  # streamed: never the whole table
        batch = batch.filter(pc.is_in(batch.column("block_id"), wanted))
        for text in batch.column("marker").to_pylist():
            yield BlockMarker.from_json(text)


def finished_blocks(root: str, storage: Storage = Storage()) -> dict[str, BlockMarker]:
    """block id -> its marker, for every block a previous attempt finished."""
    ids = finished_block_ids(root, storage)
    return {m.block_id: m for m in read_markers(root, sorted(ids), storage)}


def _take(it: Iterator, n: int) -> list:
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            break
    return out


def remove_stale_outputs(
    root: str, keep: set[str], stale_images: set[str], storage: Storage = Storage()
) -> None:
    """Remove every part and marker whose block is not in `keep`, and the per-image pictures
    and overlays of `stale_images`. Markers go first: a crash half-way leaves data files
    without a marker, which the next attempt removes or replaces."""
    fs, path = storage.filesystem(root)
    fs.invalidate_cache(path)

    def block_of(name: str, prefix: str, suffix: str) -> str | None:
        base = posixpath.basename(name)
        if base.startswith(prefix) and base.endswith(suffix):
            return base[len(prefix) : -len(suffix)]
        return None

    doomed = []
    for folder, prefix, suffix in [("_blocks", "", ".json")] + [
        (t, "part-", ".parquet") for t in TABLES
    ]:
        try:
            names = fs.ls(f"{path}/{folder}", detail=False)
        except FileNotFoundError:
            continue
        doomed += [n for n in names if (b := block_of(n, prefix, suffix)) and b not in keep]
    # per-pair files are named `<safe image id>.t<target>.<...>.png`
    stale_names = {safe_name(image) for image in stale_images}
    for folder in ("pictures", "overlays"):
        if stale_names and fs.exists(f"{path}/{folder}"):
            doomed += [
                p
                for p in fs.find(f"{path}/{folder}")
                if (m := PAIR_FILE.match(posixpath.basename(p))) and m[1] in stale_names
            ]
    for name in doomed:
        fs.rm_file(name)
    # rows of a compaction's blocks that left the plan stay in its files until the next
    # compaction rewrites them; readers only read the blocks the record names
    commit = read_commit(root, storage)
    if commit and not set(commit.blocks) <= keep:
        commit.blocks = sorted(set(commit.blocks) & keep)
        write_commit(root, commit, storage)
