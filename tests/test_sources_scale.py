"""Sources at scale, measured on the real local S3 endpoint: every request the server answers is
counted (method, key, body bytes), so a source that reads a byte twice, or asks before it
reads, fails here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import parse_qs

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes

from pipeline.models import Preprocess
from pipeline.sources import listing, reader
from pipeline.sources.inputs import make_blocks
from pipeline.sources.listing import list_inputs
from pipeline.sources.reader import read_block, read_input_bytes
from pipeline.storage import Storage, StorageUnavailable

PRE = Preprocess(size=32, policy="squash")


@dataclass
class Request:
    method: str
    path: str
    body_bytes: int
    query: str = ""


class RequestLog:
    """Wraps the moto server's WSGI app: what it answered, and how many GETs ran at once."""

    def __init__(self, app):
        self.app = app
        self.requests: list[Request] = []
        self.delay_s = 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s and method == "GET":
                time.sleep(self.delay_s)  # a store's latency, so overlapping GETs can be seen
            body = b"".join(self.app(environ, start_response))
        finally:
            with self.lock:
                self.in_flight -= 1
        self.requests.append(Request(method, path, len(body), environ.get("QUERY_STRING", "")))
        return [body]

    def of(self, bucket: str, method: str | None = None) -> list[Request]:
        return [
            r
            for r in self.requests
            if r.path.startswith(f"/{bucket}/") and (method is None or r.method == method)
        ]

    def clear(self):
        self.requests.clear()
        self.max_in_flight = 0


@pytest.fixture
def s3_log(s3_server):
    server = s3_server.server._server  # werkzeug calls server.app for every request
    log = RequestLog(server.app)
    server.app = log
    yield log
    server.app = log.app


def _noise_png(seed: int, size: int = 32) -> bytes:
    """Random pixels: PNG cannot compress them, so the image bytes dominate every file."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return image_bytes(pixels, "PNG")


def _bucket(s3, name: str) -> str:
    s3.create_bucket(Bucket=name)
    return name


# -- plain files: one GET each, concurrently, in block order ---------------------------------
def test_a_block_of_files_is_one_get_per_image_fetched_concurrently(s3, s3_endpoint, s3_log):
    bucket = _bucket(s3, "scale-files")
    n = 8
    for i in range(n):
        s3.put_object(Bucket=bucket, Key=f"imgs/{i:02d}.png", Body=_noise_png(i))
    items = list_inputs(f"s3://{bucket}/imgs/", storage=Storage(endpoint_url=s3_endpoint))
    (block,) = make_blocks(items, n)
    s3_log.clear()
    s3_log.delay_s = 0.1
    row = read_block(block, PRE, storage=Storage(endpoint_url=s3_endpoint))
    s3_log.delay_s = 0.0
    gets, heads = s3_log.of(bucket, "GET"), s3_log.of(bucket, "HEAD")
    assert (len(gets), len(heads), len(s3_log.of(bucket))) == (n, 0, n)
    assert sorted(r.path for r in gets) == [f"/{bucket}/imgs/{i:02d}.png" for i in range(n)]
    # the GETs overlapped, and the rows keep the block's order whatever finished first
    assert s3_log.max_in_flight >= 4
    assert row["image_ids"] == [f"{i:02d}.png" for i in range(n)]
    assert row["pixels"].shape == (n, 32, 32, 3) and row["n_inputs"] == n


def test_missing_and_broken_files_are_error_rows_and_an_outage_fails_the_block(
    s3, s3_endpoint, tmp_path, monkeypatch
):
    bucket = _bucket(s3, "scale-errors")
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"e/{i}.png", Body=_noise_png(i))
    s3.put_object(Bucket=bucket, Key="e/3.png", Body=b"not a png")
    items = list_inputs(f"s3://{bucket}/e/", storage=Storage(endpoint_url=s3_endpoint))
    s3.delete_object(Bucket=bucket, Key="e/1.png")  # gone after the listing
    row = read_block(make_blocks(items, 8)[0], PRE, storage=Storage(endpoint_url=s3_endpoint))
    errors = [(e["image_id"], e["stage"], e["error_type"]) for e in json.loads(row["errors"])]
    assert errors == [("1.png", "read", "not_found"), ("3.png", "decode", "not_an_image")]
    assert (row["image_ids"], row["n_inputs"]) == (["0.png", "2.png"], 4)

    def away(*_, **__):
        raise StorageUnavailable("reading: storage unreachable after 6 attempts")

    monkeypatch.setattr(reader, "read_object", away)
    with pytest.raises(StorageUnavailable):
        read_block(make_blocks(items, 8)[0], PRE, storage=Storage(endpoint_url=s3_endpoint))


def _object_gets(log: RequestLog, bucket: str) -> list[Request]:
    """GETs of objects (not of the bucket's listing, whose XML is not data)."""
    return [r for r in log.of(bucket, "GET") if r.path != f"/{bucket}/"]


# -- Parquet: the driver reads footers and ids, each block the image column of its row groups -
def _write_parquet(path, rows: int, row_group: int, offset: int = 0) -> None:
    ids = [f"img{offset + i:03d}" for i in range(rows)]
    table = pa.table(
        {"image_id": ids, "image": [_noise_png(offset + i) for i in range(rows)], "label": ids}
    )
    # real photos (over 4 KiB) get no min/max statistics; these small ones would fill the
    # footer with copies of images
    pq.write_table(table, path, row_group_size=row_group, write_statistics=["image_id", "label"])


def test_parquet_bytes_are_read_once_over_listing_and_blocks(s3, s3_endpoint, s3_log, tmp_path):
    bucket = _bucket(s3, "scale-parquet")
    _write_parquet(tmp_path / "a.parquet", rows=24, row_group=6)
    _write_parquet(tmp_path / "b.parquet", rows=10, row_group=10, offset=24)
    sizes = {}
    for name in ("a.parquet", "b.parquet"):
        data = (tmp_path / name).read_bytes()
        sizes[name] = len(data)
        s3.put_object(Bucket=bucket, Key=f"pq/{name}", Body=data)
    s3_log.clear()
    items = list_inputs(f"s3://{bucket}/pq/", "parquet", storage=Storage(endpoint_url=s3_endpoint))
    listing_bytes = sum(r.body_bytes for r in _object_gets(s3_log, bucket))
    assert [it.meta["row_group"] for it in items[:7]] == [0, 0, 0, 0, 0, 0, 1]
    assert items[0].meta["shard"] == f"s3://{bucket}/pq/a.parquet"
    blocks = make_blocks(items, 12)
    # whole row groups: a's two pairs of 6, then b's row group of 10 alone (it fits no pair)
    assert [len(b.items) for b in blocks] == [12, 12, 10]
    heads = len(s3_log.of(bucket, "HEAD"))
    rows = [read_block(b, PRE, storage=Storage(endpoint_url=s3_endpoint)) for b in blocks]
    assert len(s3_log.of(bucket, "HEAD")) == heads  # sizes from the listing: no HEAD per block
    assert sum(len(r["image_ids"]) for r in rows) == 34 and not any(
        json.loads(r["errors"]) for r in rows
    )
    assert json.loads(rows[2]["labels"]) == [f"img{i:03d}" for i in range(24, 34)]
    total = sum(r.body_bytes for r in _object_gets(s3_log, bucket))
    print(f"parquet: listing {listing_bytes} B, all {total} B of {sum(sizes.values())} B")
    assert total <= 1.1 * sum(sizes.values())
    assert listing_bytes < 0.2 * sum(sizes.values())  # footers and ids, no image
    # a report's thumbnail: one cell, by the row a heatmap row carries (no meta)
    cell = read_input_bytes(
        reader.InputItem(items[7].image_id, items[7].uri, items[7].member),
        Storage(endpoint_url=s3_endpoint),
    )
    assert cell == _noise_png(7)


def test_row_groups_stay_whole_in_blocks_and_huge_ones_are_sliced_evenly():
    from pipeline.sources.inputs import InputItem

    def rows(shard, group, n, start=0):
        return [
            InputItem(f"{shard}/{start + i:04d}", shard, str(start + i), None, meta)
            for i in range(n)
            for meta in [{"shard": shard, "row_group": group}]
        ]

    items = rows("a", 0, 3) + rows("a", 1, 3, 3) + rows("a", 2, 3, 6) + rows("a", 3, 9, 9)
    items += rows("b", 0, 40)  # over 4 blocks' worth: sliced into 3 equal parts
    blocks = make_blocks(list(reversed(items)), 4)  # whatever the order of the ids
    assert [[it.image_id for it in b.items][:1] + [len(b.items)] for b in blocks] == [
        ["a/0000", 3],
        ["a/0003", 3],
        ["a/0006", 3],
        ["a/0009", 9],
        ["b/0000", 14],
        ["b/0014", 14],
        ["b/0028", 12],
    ]
    # files without shards are cut as they always were
    plain = [InputItem(f"{i}.png", f"/d/{i}.png") for i in range(5)]
    assert [len(b.items) for b in make_blocks(plain, 2)] == [2, 2, 1]


# -- WebDataset: the listing never opens a shard, each block reads its shard once ------------
def _tar(samples: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, image, label in samples:
            for name, payload in ((f"{key}.png", image), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_webdataset_shards_are_read_once_by_one_block_each(s3, s3_endpoint, s3_log):
    bucket = _bucket(s3, "scale-tar")
    shards = {
        f"train/shard-{s}.tar": _tar(
            [(f"s{s}/{i:03d}", _noise_png(10 * s + i), i) for i in range(6)]
        )
        for s in range(2)
    }
    shards["train/shard-9.tar"] = os.urandom(3000)  # not a tar at all
    whole = _tar([(f"s8/{i:03d}", _noise_png(80 + i), i) for i in range(4)])
    shards["train/shard-7.tar"] = whole[:10240]  # cut between samples: no end of archive
    shards["train/shard-8.tar"] = whole[:12000]  # cut in the middle of the third image
    for key, data in shards.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    s3_log.clear()
    items = list_inputs(f"s3://{bucket}/", "webdataset", storage=Storage(endpoint_url=s3_endpoint))
    assert not _object_gets(s3_log, bucket)  # the listing opens no shard
    assert [(it.image_id, it.member) for it in items] == [
        ("train/shard-0.tar", "*"),
        ("train/shard-1.tar", "*"),
        ("train/shard-7.tar", "*"),
        ("train/shard-8.tar", "*"),
        ("train/shard-9.tar", "*"),
    ]
    assert list_inputs(f"s3://{bucket}/train/shard-1.tar", "webdataset")[0].image_id == (
        "shard-1.tar"
    )
    blocks = make_blocks(items, 64)
    assert [len(b.items) for b in blocks] == [1, 1, 1, 1, 1]  # one shard per block
    rows = [read_block(b, PRE, storage=Storage(endpoint_url=s3_endpoint)) for b in blocks]
    gets = _object_gets(s3_log, bucket)
    total = sum(r.body_bytes for r in gets)
    print(f"webdataset: {len(gets)} GETs, {total} B of {sum(map(len, shards.values()))} B")
    assert len(gets) == len(shards) and total <= 1.1 * sum(map(len, shards.values()))
    good = rows[0]
    assert good["image_ids"] == [f"train/shard-0.tar/s0/{i:03d}" for i in range(6)]
    assert json.loads(good["labels"]) == list(range(6)) and good["n_inputs"] == 6
    assert json.loads(good["inputs"]) == {"train/shard-0.tar": items[0].version}
    # a cut shard keeps the samples before the cut; an unreadable one is one error row
    for cut, shard in ((rows[2], "train/shard-7.tar"), (rows[3], "train/shard-8.tar")):
        assert cut["image_ids"] == [f"{shard}/s8/000", f"{shard}/s8/001"]
        assert [e["image_id"] for e in json.loads(cut["errors"])] == [shard]
        assert cut["n_inputs"] == 3
    garbage = rows[4]
    assert (garbage["image_ids"], garbage["n_inputs"]) == ([], 1)
    (error,) = json.loads(garbage["errors"])
    assert (error["image_id"], error["stage"], error["error_type"]) == (
        "train/shard-9.tar",
        "read",
        "ReadError",
    )
    # what a heatmap row carries is enough to read one sample again (a report's thumbnail)
    member = json.loads(rows[1]["members"])[2]
    sample = reader.InputItem(rows[1]["image_ids"][2], rows[1]["uris"][2], member)
    assert read_input_bytes(sample, Storage(endpoint_url=s3_endpoint)) == _noise_png(12)


# -- manifest: the rows name the images; only the manifest's own columns are read -------------
def test_parquet_manifest_on_s3_reads_only_its_columns(s3, s3_endpoint, s3_log, tmp_path):
    bucket = _bucket(s3, "scale-manifest")
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"photos/{i}.png", Body=_noise_png(i))
    etags = [s3.head_object(Bucket=bucket, Key=f"photos/{i}.png")["ETag"] for i in range(3)]
    table = pa.table(
        {
            "uri": [f"s3://{bucket}/photos/{i}.png" for i in range(3)],
            "etag": etags,
            "boxes": [[[0.0, 0.0, 9.0, 9.0]], None, [[1.0, 2.0, 3.0, 4.0], [5, 6, 7, 8]]],
            "embedding": [os.urandom(20_000) for _ in range(3)],  # not ours to read
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    size = (tmp_path / "m.parquet").stat().st_size
    s3.put_object(Bucket=bucket, Key="m.parquet", Body=(tmp_path / "m.parquet").read_bytes())
    s3_log.clear()
    items = list_inputs(
        f"s3://{bucket}/m.parquet", "manifest", storage=Storage(endpoint_url=s3_endpoint)
    )
    read = sum(r.body_bytes for r in _object_gets(s3_log, bucket))
    print(f"manifest: read {read} B of a {size} B file")
    assert read < 0.1 * size
    assert [it.image_id for it in items] == ["0.png", "1.png", "2.png"]
    assert [it.meta.get("annotation") for it in items] == [
        {"boxes": [[0.0, 0.0, 9.0, 9.0]]},
        None,
        {"boxes": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]},
    ]
    # the version digests the row's etag (what its bytes are), uri and annotation (none here)
    text = f"{etags[1]}|s3://{bucket}/photos/1.png|"
    assert items[1].version == "m:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    s3_log.clear()
    row = read_block(make_blocks(items, 8)[0], PRE, storage=Storage(endpoint_url=s3_endpoint))
    assert row["image_ids"] == ["0.png", "1.png", "2.png"]
    assert (len(_object_gets(s3_log, bucket)), len(s3_log.of(bucket, "HEAD"))) == (3, 0)


# -- listing: an object store is listed over its common prefixes, concurrently ---------------
def _put_many(s3, bucket: str, keys: list[str]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=k.encode()), keys))


def _listings(log: RequestLog, bucket: str) -> list[tuple[str, str]]:
    """(prefix, delimiter) of every ListObjectsV2 page the server answered for `bucket`, less
    the one-key probes (max-keys=1) with which `fs.info` tells a folder from a file."""
    out = []
    for r in log.requests:
        q = parse_qs(r.query, keep_blank_values=True)
        listing_page = r.method == "GET" and r.path.rstrip("/") == f"/{bucket}"
        if listing_page and "list-type" in q and q.get("max-keys") != ["1"]:
            out.append((q["prefix"][0], q.get("delimiter", [""])[0]))
    return sorted(out)


def _serial(bucket: str, prefix: str) -> dict:
    """What `_files_under` returned before: one `fs.find`, sorted."""
    fs, root = Storage().filesystem(f"s3://{bucket}/{prefix}")
    found = fs.find(root, detail=True)
    return {p: found[p] for p in sorted(found)}


def test_an_object_store_is_listed_over_its_prefixes_concurrently(s3, s3_endpoint, s3_log):
    bucket = _bucket(s3, "scale-listing")
    keys = [f"tree/d{d:02d}/{i:03d}.png" for d in range(20) for i in range(15)]
    keys += [f"tree/d{d:02d}/sub/{i}.png" for d in range(5) for i in range(3)]  # deeper
    keys += [f"tree/top-{i}.png" for i in range(3)] + ["tree/d03/"]  # files, a folder marker
    keys += ["treeline/x.png", "other/y.png"]  # beside the prefix, not under it
    # few prefixes at the top: listed one level deeper so that there is parallelism
    keys += [f"deep/{t}/s{s:02d}/{i}.png" for t in "ab" for s in range(10) for i in range(10)]
    _put_many(s3, bucket, keys)
    for prefix, expected_lists in (
        ("tree/", [("tree/", "/")] + [(f"tree/d{d:02d}/", "") for d in range(20)]),
        (
            "deep",
            [("deep/", "/"), ("deep/a/", "/"), ("deep/b/", "/")]
            + [(f"deep/{t}/s{s:02d}/", "") for t in "ab" for s in range(10)],
        ),
    ):
        s3_log.clear()
        s3_log.delay_s = 0.05  # a store's latency per page, so overlapping LISTs can be seen
        t0 = time.perf_counter()
        fs, root, files = listing._files_under(
            f"s3://{bucket}/{prefix}", Storage(endpoint_url=s3_endpoint)
        )
        seconds = time.perf_counter() - t0
        s3_log.delay_s = 0.0
        lists = _listings(s3_log, bucket)
        print(
            f"listing {prefix}: {len(files)} files, {len(lists)} LISTs in {seconds:.2f} s, "
            f"at most {s3_log.max_in_flight} at once"
        )
        assert root == f"{bucket}/{prefix.rstrip('/')}"
        serial = _serial(bucket, prefix)
        assert list(files) == list(serial) and files == serial  # same paths, sizes, ETags
        assert len(files) == sum(k.startswith(prefix.rstrip("/") + "/") for k in keys)
        # one LIST per prefix the structure implies (each fits a page), several at once
        assert lists == sorted(expected_lists)
        assert len(s3_log.of(bucket, "HEAD")) == 1  # fs.info: is the root a file?
        assert s3_log.max_in_flight >= 4


def test_a_second_listing_sees_what_changed_even_through_a_listings_cache(
    s3, s3_endpoint, monkeypatch
):
    """The job lists again on resume: neither the filesystem's listings cache nor the first
    listing may answer for the second. Here the filesystem caches listings (s3fs's dircache,
    which `Storage.options` turns off for s3:// but gcsfs and others keep)."""
    import s3fs

    bucket = _bucket(s3, "scale-relist")
    _put_many(s3, bucket, [f"p/{t}/s{s}/{i}.png" for t in "ab" for s in range(3) for i in range(4)])
    cached = s3fs.S3FileSystem(
        endpoint_url=s3_endpoint, use_listings_cache=True, skip_instance_cache=True
    )

    class CachingStorage(Storage):
        def filesystem(self, uri):
            return cached, cached._strip_protocol(uri)

    store = CachingStorage(endpoint_url=s3_endpoint)
    first = listing._files_under(f"s3://{bucket}/p", store)[2]
    assert first == _serial(bucket, "p")
    assert cached.ls(f"{bucket}/p/a/s0", detail=False)  # s3fs kept that listing
    s3.delete_object(Bucket=bucket, Key="p/a/s0/1.png")
    s3.put_object(Bucket=bucket, Key="p/a/s0/9.png", Body=b"new")
    s3.put_object(Bucket=bucket, Key="p/b/s2/0.png", Body=b"changed")  # a new ETag
    s3.put_object(Bucket=bucket, Key="p/c/s0/0.png", Body=b"a new prefix")
    gone = [{"Key": f"p/b/s1/{i}.png"} for i in range(4)]  # a prefix that went away
    s3.delete_objects(Bucket=bucket, Delete={"Objects": gone})
    # the cache still answers with the old listing ...
    assert f"{bucket}/p/a/s0/1.png" in cached.ls(f"{bucket}/p/a/s0", detail=False)
    second = listing._files_under(f"s3://{bucket}/p", store)[2]
    # ... the listing does not
    assert second == _serial(bucket, "p") and second != first
    assert f"{bucket}/p/a/s0/9.png" in second and f"{bucket}/p/a/s0/1.png" not in second
    assert not any(p.startswith(f"{bucket}/p/b/s1/") for p in second)
    # and a source that is gone is gone, whatever was cached about it
    everything = [{"Key": p.split("/", 1)[1]} for p in second]
    s3.delete_objects(Bucket=bucket, Delete={"Objects": everything})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        listing._files_under(f"s3://{bucket}/p", store)


class _Flaky:
    """A filesystem whose listings fail once per path in `fail`, and which runs `after[path]`
    once `path` has been listed a level deep."""

    def __init__(self, fs, fail: set[str], after: dict):
        self.fs, self.fail, self.after, self.calls = fs, set(fail), dict(after), []

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def _call(self, what, path, fn):
        self.calls.append((what, path))
        if path in self.fail:
            self.fail.discard(path)
            raise ConnectionError(f"connection reset while listing {path}")
        return fn()

    def ls(self, path, **kw):
        out = self._call("ls", path, lambda: self.fs.ls(path, **kw))
        if path in self.after:
            self.after.pop(path)()
        return out

    def find(self, path, **kw):
        return self._call("find", path, lambda: self.fs.find(path, **kw))


def test_listing_retries_each_request_and_a_prefix_gone_between_levels_lists_nothing(
    s3, s3_endpoint, monkeypatch
):
    monkeypatch.setattr(listing, "LISTING_FANOUT", 4)  # v's 3 prefixes by level, then finds
    bucket = _bucket(s3, "scale-vanish")
    _put_many(
        s3, bucket, [f"v/{t}/s{s}/{i}.png" for t in "abc" for s in range(4) for i in range(3)]
    )

    def delete(prefix, n):
        gone = [{"Key": f"{prefix}/s{s}/{i}.png"} for s in range(n) for i in range(3)]
        return lambda: s3.delete_objects(Bucket=bucket, Delete={"Objects": gone})

    fs, root = Storage().filesystem(f"s3://{bucket}/v")
    # c is gone before its level is listed; a/s0 once a's level named it, before its find
    after = {root: delete("v/c", 4), f"{root}/a": delete("v/a", 1)}
    flaky = _Flaky(fs, {f"{bucket}/v/b", f"{bucket}/v/a/s1"}, after)
    found = listing._list_tree(flaky, root, Storage(retry_delay_s=0.01))
    assert {p: found[p] for p in sorted(found)} == _serial(bucket, "v")
    assert len(found) == 4 * 3 + 3 * 3  # b's four prefixes, a's three left
    assert flaky.calls.count(("ls", f"{bucket}/v/b")) == 2  # failed once, retried
    assert flaky.calls.count(("find", f"{bucket}/v/a/s1")) == 2
    assert ("find", f"{bucket}/v/a/s0") in flaky.calls  # listed, found empty
    assert not any(path.startswith(f"{bucket}/v/c/") for _, path in flaky.calls)
