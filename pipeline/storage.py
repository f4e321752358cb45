"""One factory for filesystems, so every URI (local, file://, s3://, gs://) is opened alike.

S3-compatible endpoints: `AWS_ENDPOINT_URL` (or an explicit endpoint_url) is honoured for both
fsspec and pyarrow; credentials only ever come from the environment or a profile.
"""

from __future__ import annotations

import os
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
        opts: dict = {}
        if endpoint:
            opts["endpoint_url"] = endpoint
        return opts
    return {}


@lru_cache(maxsize=16)
def _filesystem(protocol: str, endpoint_url: str | None) -> fsspec.AbstractFileSystem:
    opts = storage_options(f"{protocol}://", endpoint_url)
    return fsspec.filesystem(protocol, **opts)


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URI or a local path."""
    protocol = _protocol(uri)
    fs = _filesystem(protocol, endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
    return fs, fs._strip_protocol(uri)


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    fs, path = filesystem(uri, endpoint_url)
    with fs.open(path, "rb") as f:
        return f.read()
