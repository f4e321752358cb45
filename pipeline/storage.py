"""One factory for filesystems, so every URI (local, file://, s3://, gs://) is opened alike, and
one value, `Storage`, that says where objects live and how hard to try.

S3-compatible endpoints: `AWS_ENDPOINT_URL` (or an explicit endpoint_url) is honoured for both
fsspec and pyarrow; credentials only ever come from the environment or a profile.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TypeVar
from urllib.parse import urlparse

import fsspec

from .chunks import chunks

T = TypeVar("T")

# object stores delete at most this many keys in one request
DELETE_BATCH = 1000


def _protocol(uri: str) -> str:
    scheme = urlparse(uri).scheme
    # a Windows drive letter or a bare path is a local file
    return scheme if len(scheme) > 1 else "file"


@dataclass(frozen=True)
class Storage:
    """Where a job's objects live (an S3-compatible endpoint and region) and its retry policy
    for every read and write. A value, not process state: two jobs in one process keep their
    own policies, and Ray tasks and actors receive it pickled."""

    endpoint_url: str | None = None
    region: str | None = None
    retries: int = 6  # attempts per request while storage is unreachable
    retry_delay_s: float = 0.5  # the first backoff; it doubles

    def __post_init__(self):
        if self.retries < 1:
            raise ValueError(f"retries must be at least 1, got {self.retries}")

    @classmethod
    def from_spec(cls, spec) -> Storage:
        """From a job spec's `storage:` section (a StorageSpec)."""
        return cls(spec.endpoint_url, spec.region, spec.retries, spec.retry_delay_s)

    def options(self, uri: str) -> dict:
        """The fsspec options of `uri`'s filesystem."""
        if _protocol(uri) not in ("s3", "s3a"):
            return {}
        # listings change under us (markers of finished blocks, overlays written by workers):
        # a cached listing would make a resume recompute or a summary miss files
        opts: dict = {
            "use_listings_cache": False,
            # one retry policy, ours (`retry`): s3fs and botocore each retrying on top of it
            # would turn a 15 s backoff into minutes before an outage is reported
            "config_kwargs": {
                "retries": {"max_attempts": 2, "mode": "standard"},
                "connect_timeout": 5,
                "read_timeout": 60,
                # botocore's default of 10 would cap a block's concurrent GETs and the listing's
                # concurrent LISTs (both up to 32 threads)
                "max_pool_connections": 32,
            },
        }
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        if self.region:
            opts["client_kwargs"] = {"region_name": self.region}
        return opts

    def filesystem(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, path within it) for a URI or a local path."""
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        fs = _filesystem(_protocol(uri), endpoint, self.region)
        return fs, fs._strip_protocol(uri)

    def retry(self, fn: Callable[[], T], *, what: str) -> T:
        """Call fn(); on a transient error wait retry_delay_s, then twice as long each time
        (0.5, 1, 2, 4, 8 s by default) and retry, then give up with a message that names
        `what`."""
        delay = self.retry_delay_s
        for attempt in range(1, self.retries + 1):
            try:
                return fn()
            except Exception as e:
                if not _transient(e) or attempt == self.retries:
                    if _transient(e):
                        raise StorageUnavailable(
                            f"{what}: storage unreachable after {self.retries} attempts "
                            f"({type(e).__name__}: {e})"
                        ) from e
                    raise
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.filesystem(uri)

        def read():
            with fs.open(path, "rb") as f:
                return f.read()

        return self.retry(read, what=f"reading {uri}")

    def write_bytes_atomic(self, uri: str, data: bytes) -> None:
        """Readers see the old object or the whole new one, never a part: object stores replace
        objects atomically on PUT; local files are written beside and renamed."""
        fs, path = self.filesystem(uri)
        if _protocol(uri) == "file":
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        self.retry(lambda: fs.pipe_file(path, data), what=f"writing {uri}")

    def remove(self, uri: str) -> None:
        """Delete one file or object if it is there (absent is fine: one DELETE, no HEAD)."""
        fs, path = self.filesystem(uri)
        if _protocol(uri) == "file":
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return

        def delete():
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)

        self.retry(delete, what=f"removing {uri}")

    def remove_many(self, uris: Iterable[str]) -> None:
        """Delete files or objects, absent ones included: DELETE_BATCH keys per request on an
        object store, one by one on a local disk."""
        remote: dict[str, list[str]] = {}  # protocol -> its URIs
        for uri in uris:
            if _protocol(uri) == "file":
                self.remove(uri)
            else:
                remote.setdefault(_protocol(uri), []).append(uri)
        for group in remote.values():
            fs, _ = self.filesystem(group[0])
            for part in chunks(len(group), DELETE_BATCH):
                chunk = group[part]
                # one bulk DELETE, which answers for absent keys as for deleted ones
                self.retry(
                    partial(fs.rm, [fs._strip_protocol(uri) for uri in chunk]),
                    what=f"removing {len(chunk)} objects ({chunk[0]}, ...)",
                )


@lru_cache(maxsize=16)
def _filesystem(
    protocol: str, endpoint_url: str | None, region: str | None
) -> fsspec.AbstractFileSystem:
    opts = Storage(endpoint_url, region).options(f"{protocol}://")
    return fsspec.filesystem(protocol, **opts)


def absolute_uri(uri: str) -> str:
    """A local relative path made absolute (what a record such as an MLflow tag should hold);
    URIs with a scheme are returned as they are."""
    if _protocol(uri) != "file" or uri.startswith("file://"):
        return uri
    trailing = "/" if uri.endswith("/") else ""
    return os.path.abspath(uri) + trailing


# Errors that say "try again": a dropped connection or an endpoint that is briefly away.
# FileNotFoundError and PermissionError are answers, not outages, and are never retried.
def _transient(e: BaseException) -> bool:
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    name = type(e).__name__
    return isinstance(e, ConnectionError | TimeoutError | OSError) or name in (
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
    )


def describe_error(e: BaseException) -> str:
    """One line for a storage error a person can act on (type, first line, what to do)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    line = f"{type(e).__name__}: {text}" if text else type(e).__name__
    if type(e).__name__ == "NoCredentialsError":
        line += "; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    return line


class StorageUnavailable(ConnectionError):
    """Storage did not answer after all retries."""


@contextlib.contextmanager
def pause_on_outage(delay_s: float):
    """Around a Ray task that Ray retries on StorageUnavailable: wait a jittered while before
    letting the error go, so the retry comes after a pause and retried blocks do not all hit
    a recovering store at the same moment."""
    try:
        yield
    except StorageUnavailable:
        time.sleep(delay_s * random.uniform(0.5, 1.5))
        raise
