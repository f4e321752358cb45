"""The commit record of a compaction (`_compacted.json`): which blocks the compacted files hold,
and the files. Readers that find it read those files (and the parts of other blocks); readers
that do not, read the parts."""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field

from ..storage import Storage

COMMIT = "_compacted.json"


@dataclass
class Compacted:
    """The commit record of a compaction: which blocks its files hold, and the files."""

    token: str
    blocks: list[str] = field(default_factory=list)
    files: dict[str, list[str]] = field(default_factory=dict)  # table -> run-relative paths
    markers: str | None = None  # run-relative path of the folded markers table


def read_commit(root: str, storage: Storage = Storage()) -> Compacted | None:
    try:
        return Compacted(**json.loads(storage.read_bytes(f"{root}/{COMMIT}")))
    except FileNotFoundError:
        return None


def write_commit(root: str, record: Compacted, storage: Storage = Storage()) -> None:
    storage.write_bytes_atomic(f"{root}/{COMMIT}", json.dumps(asdict(record)).encode())


def arrow_filesystem(fs):
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def part_block(path: str) -> str | None:
    """The block id of a per-block part's path, else None."""
    base = posixpath.basename(path)
    if base.startswith("part-") and base.endswith(".parquet"):
        return base[len("part-") : -len(".parquet")]
    return None
