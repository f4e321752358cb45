"""Reads that cost one request each: a whole object in one GET, or exactly a byte range.

`Storage.read_bytes` opens a file, which on s3fs costs a HEAD before the GET and reads ahead in
blocks; at millions of inputs a source pays per request and per byte, so it reads with these.
"""

from __future__ import annotations

import io

from ..storage import Storage


def read_object(uri: str, storage: Storage = Storage()) -> bytes:
    """The whole object in one GET (no HEAD), retried as every storage read is."""
    fs, path = storage.filesystem(uri)
    # s3fs sizes an object first (a HEAD) to split a big one into parallel ranged GETs
    options = {"max_concurrency": 1} if getattr(fs, "max_concurrency", 1) > 1 else {}
    return storage.retry(lambda: fs.cat_file(path, **options), what=f"reading {uri}")


class RangeFile(io.RawIOBase):
    """A read-only file over a remote object where each `read(n)` is one ranged GET of exactly
    those bytes: no read-ahead, so a reader that seeks to what it needs (Parquet's footer and
    column chunks) costs only the bytes it asks for."""

    def __init__(self, fs, path: str, size: int, uri: str, storage: Storage):
        super().__init__()
        self.fs, self.path, self.size, self.uri = fs, path, size, uri
        self.storage = storage
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        start = self.pos
        data = self.storage.retry(
            lambda: self.fs.cat_file(self.path, start=start, end=end),
            what=f"reading {self.uri} bytes {start}-{end}",
        )
        self.pos = start + len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)
