"""One factory for filesystems, so every URI (local, file://, s3://, gs://) is opened alike.

S3-compatible endpoints: `AWS_ENDPOINT_URL` (or an explicit endpoint_url) is honoured for both
fsspec and pyarrow; credentials only ever come from the environment or a profile.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from functools import lru_cache
from urllib.parse import urlparse

import fsspec


def _protocol(uri: str) -> str:
    scheme = urlparse(uri).scheme
    # a Windows drive letter or a bare path is a local file
    return scheme if len(scheme) > 1 else "file"


def storage_options(uri: str, endpoint_url: str | None = None) -> dict:
    if _protocol(uri) in ("s3", "s3a"):
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        # listings change under us (markers of finished blocks, overlays written by workers):
        # a cached listing would make a resume recompute or a summary miss files
        opts: dict = {
            "use_listings_cache": False,
            # one retry policy, ours (with_retries): s3fs and botocore each retrying on top of it
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
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts
    return {}


def absolute_uri(uri: str) -> str:
    """A local relative path made absolute (what a record such as an MLflow tag should hold);
    URIs with a scheme are returned as they are."""
    if _protocol(uri) != "file" or uri.startswith("file://"):
        return uri
    trailing = "/" if uri.endswith("/") else ""
    return os.path.abspath(uri) + trailing


@lru_cache(maxsize=16)
def _filesystem(protocol: str, endpoint_url: str | None) -> fsspec.AbstractFileSystem:
    opts = storage_options(f"{protocol}://", endpoint_url)
    return fsspec.filesystem(protocol, **opts)


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URI or a local path."""
    protocol = _protocol(uri)
    fs = _filesystem(protocol, endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
    return fs, fs._strip_protocol(uri)


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


RETRY_POLICY = {"attempts": 6, "first_delay": 0.5}


def configure_retries(attempts: int, first_delay: float) -> None:
    """Set the retry policy of this process (the job sets it from `storage:` in every task)."""
    RETRY_POLICY.update(attempts=max(1, int(attempts)), first_delay=float(first_delay))


def with_retries(fn, *, what: str, attempts: int | None = None, first_delay: float | None = None):
    """Call fn(); on a transient error wait first_delay, then twice as long each time (0.5, 1,
    2, 4, 8 s by default) and retry, then give up with a message that names `what`."""
    attempts = attempts or RETRY_POLICY["attempts"]
    delay = RETRY_POLICY["first_delay"] if first_delay is None else first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if not _transient(e) or attempt == attempts:
                if _transient(e):
                    raise StorageUnavailable(
                        f"{what}: storage unreachable after {attempts} attempts "
                        f"({type(e).__name__}: {e})"
                    ) from e
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


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


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    fs, path = filesystem(uri, endpoint_url)

    def read():
        with fs.open(path, "rb") as f:
            return f.read()

    return with_retries(read, what=f"reading {uri}")


def write_bytes_atomic(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Readers see the old object or the whole new one, never a part: object stores replace
    objects atomically on PUT; local files are written beside and renamed."""
    fs, path = filesystem(uri, endpoint_url)
    if _protocol(uri) == "file":
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with_retries(lambda: fs.pipe_file(path, data), what=f"writing {uri}")


def remove_file(uri: str, endpoint_url: str | None = None) -> None:
    """Delete one file or object if it is there (absent is fine: one DELETE, no HEAD first)."""
    fs, path = filesystem(uri, endpoint_url)
    if _protocol(uri) == "file":
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return

    def delete():
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)

    with_retries(delete, what=f"removing {uri}")
