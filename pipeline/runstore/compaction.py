"""Compaction: after a run, the per-block parts become a few large files per table, sorted by
image id, heatmaps and metrics partitioned by explainer (`heatmaps/explainer=<key>/...`), and the
block markers one table (`_markers-<token>.parquet`). Written with Ray Data (read_parquet, sort,
write_parquet), so it scales with the cluster, not the driver.

Crash safety: the new files carry a token in their names; `_compacted.json` (written last, in
one PUT) is the commit. Before it, readers use the parts and markers as if nothing happened, and
the next attempt removes the uncommitted files; after it, readers use the committed files (and
ignore parts of blocks it covers) until the clean-up removes the parts and markers.
"""

from __future__ import annotations

import math
import posixpath
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import Storage
from .codec import TABLES
from .commit import Compacted, arrow_filesystem, part_block, read_commit, write_commit

FILE_BYTES = 256 * 2**20  # target size of a compacted file (Parquet readers like 128-512 MB)
PARTITIONED = ("heatmaps", "metrics")  # by explainer; errors are few


def _ls(storage: Storage, fs, path: str) -> dict[str, int]:
    """path -> size of every file under `path` (one listing; the sizes come with it)."""
    try:
        found = storage.retry(lambda: fs.find(path, detail=True), what=f"listing {path}")
    except FileNotFoundError:
        return {}
    return {p: int(info.get("size") or 0) for p, info in found.items()}


def needs_compaction(root: str, keep: set[str], storage: Storage = Storage()) -> bool:
    """True while a part exists or the commit does not hold exactly the blocks in `keep`."""
    commit = read_commit(root, storage)
    if commit is None or set(commit.blocks) != keep:
        return True
    fs, base = storage.filesystem(root)
    fs.invalidate_cache(base)
    return any(part_block(p) for table in TABLES for p in _ls(storage, fs, f"{base}/{table}"))


def compact(
    root: str,
    keep: set[str],
    storage: Storage = Storage(),
    file_bytes: int = FILE_BYTES,
) -> Compacted:
    """Fold every table's rows of the blocks in `keep` (from parts and from an earlier
    compaction) into new compacted files, commit, then remove what they replace. The tables
    are compacted at once (three Ray Data pipelines side by side)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    fs, base = storage.filesystem(root)
    fs.invalidate_cache(base)
    previous = read_commit(root, storage)
    committed = {p for files in (previous.files.values() if previous else []) for p in files}
    listed = {table: _ls(storage, fs, f"{base}/{table}") for table in TABLES}
    # files of a compaction that never committed: not ours to read, ours to remove
    stray = [p for t in TABLES for p in listed[t] if not part_block(p)]
    stray = [p for p in stray if p[len(base) + 1 :] not in committed]
    storage.remove_many(_uris(root, base, stray))
    token = uuid.uuid4().hex[:12]
    record = Compacted(token, sorted(keep))
    old_blocks = set(previous.blocks) if previous else set()
    jobs = {}
    for table in TABLES:
        parts = {p: n for p, n in listed[table].items() if part_block(p) in keep - old_blocks}
        old = [f"{base}/{p}" for p in (previous.files.get(table, []) if previous else [])]
        if parts or old:
            jobs[table] = (parts, {p: listed[table].get(p, 0) for p in old})
    with ThreadPoolExecutor(len(TABLES)) as pool:
        futures = {
            table: pool.submit(
                _compact_table,
                storage,
                fs,
                base,
                table,
                parts,
                old,
                keep & old_blocks,
                token,
                file_bytes,
            )
            for table, (parts, old) in jobs.items()
        }
        for table, future in futures.items():
            record.files[table] = future.result()
    record.markers = f"_markers-{token}.parquet"
    _fold_markers(root, keep, previous, record.markers, storage)
    write_commit(root, record, storage)
    _clean_up(root, storage, fs, base, record, previous)
    return record


_PLANNING = threading.Lock()  # DataContext is process-wide; a dataset copies it when created


def _compact_table(storage, fs, base, table, parts: dict, old: dict, old_keep, token, file_bytes):
    """One table's rows -> its compacted files (run-relative paths)."""
    import ray
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy
    from ray.data.datasource import FilenameProvider, Partitioning

    afs = arrow_filesystem(fs)
    groups = len(_explainers(list(parts), list(old), afs)) if table in PARTITIONED else 1
    size = sum(parts.values()) + sum(old.values())
    files = max(1, math.ceil(size / (file_bytes * max(1, groups))))
    # read tasks sized by the files to write; the sort's partitions are the files (Ray's
    # default, 200 whatever the size, makes a shuffle of 200 x 200 tasks for a small run)
    tasks = max(1, min(len(parts) + len(old), 4 * files))
    ctx = DataContext.get_current()
    with _PLANNING:
        saved = ctx.default_hash_shuffle_parallelism, ctx.shuffle_strategy
        ctx.default_hash_shuffle_parallelism = files
        # the sort as tasks (Ray's task-based sort): the default hash shuffle starts
        # aggregator actors, a process each, which a small run waits for far longer than it sorts
        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
        try:
            datasets = []
            if parts:
                ds = ray.data.read_parquet(
                    list(parts), filesystem=afs, include_paths=True, override_num_blocks=tasks
                )
                datasets.append(ds.map_batches(_block_id_from_path, batch_format="pyarrow"))
            if old:
                ds = ray.data.read_parquet(
                    list(old),
                    filesystem=afs,
                    partitioning=Partitioning("hive", base_dir=f"{base}/{table}"),
                    override_num_blocks=tasks,
                )
                blocks = sorted(old_keep)
                datasets.append(
                    ds.map_batches(
                        _keep_blocks, fn_kwargs={"blocks": blocks}, batch_format="pyarrow"
                    )
                )
            ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
            ds = ds.sort("image_id")
        finally:
            ctx.default_hash_shuffle_parallelism, ctx.shuffle_strategy = saved
    ds.write_parquet(
        f"{base}/{table}",
        filesystem=afs,
        partition_cols=["explainer"] if table in PARTITIONED else None,
        filename_provider=FilenameProvider(dataset_uuid=f"c{token}", file_format="parquet"),
        compression="zstd",
        # blocks out of the sort are small; gather them into files of the target size
        min_bytes_per_file=file_bytes,
    )
    fs.invalidate_cache(f"{base}/{table}")
    written = _ls(storage, fs, f"{base}/{table}")
    return sorted(p[len(base) + 1 :] for p in written if f"c{token}_" in p)


def _uris(root: str, base: str, paths: list[str]) -> list[str]:
    """Paths on the run's filesystem (under `base`, as listed) -> URIs under `root`."""
    return [f"{root}/{p[len(base) + 1 :]}" for p in paths]


def _block_id_from_path(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    blocks = pc.replace_substring_regex(batch.column("path"), r"^.*/part-(.*)\.parquet$", r"\1")
    return batch.drop_columns(["path"]).append_column("block_id", blocks)


def _keep_blocks(batch: pa.Table, blocks: list[str]) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column("block_id"), pa.array(blocks, pa.string())))


def _explainers(parts: list[str], old: list[str], afs) -> set[str]:
    """The explainer partition values (one footer-free look: parts' explainer column is small)."""
    names: set[str] = set()
    for p in old:
        for piece in p.split("/"):
            if piece.startswith("explainer="):
                names.add(piece)
    for p in parts[:64]:  # every block holds every explainer: a few parts tell them all
        t = pq.read_table(p, filesystem=afs, columns=["explainer"])
        names |= set(t.column("explainer").unique().to_pylist())
    return names


def _fold_markers(root, keep, previous, name, storage: Storage) -> None:
    """Every kept block's marker into one table (block_id, marker JSON), streamed: markers of
    the earlier compaction from its table, the rest from `_blocks/`."""
    from .markers import read_markers

    schema = pa.schema([("block_id", pa.string()), ("marker", pa.string())])
    fs, base = storage.filesystem(root)
    folded: set[str] = set()
    with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
        with pq.ParquetWriter(tmp.name, schema, compression="zstd") as writer:
            if previous and previous.markers:
                old = pq.read_table(f"{base}/{previous.markers}", filesystem=arrow_filesystem(fs))
                old = _keep_blocks(old, sorted(keep))
                writer.write_table(old)
                folded = set(old.column("block_id").to_pylist())
            batch: list[dict] = []
            for marker in read_markers(root, sorted(keep - folded), storage, folded=False):
                batch.append({"block_id": marker.block_id, "marker": marker.to_json()})
                if len(batch) == 1024:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        with open(tmp.name, "rb") as f:
            storage.write_bytes_atomic(f"{root}/{name}", f.read())


def _clean_up(root, storage: Storage, fs, base, record: Compacted, previous) -> None:
    """After the commit: the parts, markers and earlier compacted files it replaces."""
    doomed = [
        f"{base}/{p}" for files in (previous.files.values() if previous else []) for p in files
    ]
    if previous and previous.markers:
        doomed.append(f"{base}/{previous.markers}")
    for table in TABLES:
        doomed += [p for p in _ls(storage, fs, f"{base}/{table}") if part_block(p) is not None]
    folded = set(record.blocks)
    doomed += [p for p in _ls(storage, fs, f"{base}/_blocks") if _marker_block(p) in folded]
    storage.remove_many(_uris(root, base, doomed))


def _marker_block(path: str) -> str | None:
    base = posixpath.basename(path)
    return base[: -len(".json")] if base.endswith(".json") else None
