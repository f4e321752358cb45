"""Sources: image folders, WebDataset shards and Parquet tables -> blocks -> decoded pixels."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes

from pipeline.models import Preprocess
from pipeline.sources.listing import list_inputs, make_blocks
from pipeline.sources.reader import read_block

PRE = Preprocess(size=32, policy="squash")


def _photos(demo_images, n=3):
    return [image_bytes(demo_images[i % 4][::8, ::8]) for i in range(n)]


def test_image_folder_listing_is_sorted_with_folder_labels(tmp_path, demo_images):
    for i, data in enumerate(_photos(demo_images)):
        (tmp_path / f"class{i}").mkdir()
        (tmp_path / f"class{i}" / f"z{i}.JPG").write_bytes(data)
    (tmp_path / "readme.txt").write_text("not an input: wrong extension")
    items = list_inputs(str(tmp_path))
    assert [it.image_id for it in items] == ["class0/z0.JPG", "class1/z1.JPG", "class2/z2.JPG"]
    row = read_block(make_blocks(items, 8)[0], PRE)
    assert row["pixels"].shape == (3, 32, 32, 3) and row["pixels"].dtype == np.uint8
    assert json.loads(row["labels"]) == ["class0", "class1", "class2"]


def test_blocks_are_deterministic_and_cover_every_input(tmp_path, demo_images):
    for i in range(7):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(demo_images[0][::16, ::16], "PNG"))
    items = list_inputs(str(tmp_path))
    a, b = make_blocks(items, 3), make_blocks(list(reversed(items))[::-1], 3)
    assert [x.block_id for x in a] == [x.block_id for x in b]
    assert [len(x.items) for x in a] == [3, 3, 1]
    assert make_blocks(items[1:], 3)[0].block_id != a[0].block_id  # content in the id


def test_webdataset_shards(tmp_path, demo_images):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, data in enumerate(_photos(demo_images)):
            for name, payload in (
                (f"s/{i:04d}.jpg", data),
                (f"s/{i:04d}.cls", str(i + 5).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "shard-000.tar").write_bytes(buf.getvalue())
    items = list_inputs(str(tmp_path), "webdataset")
    assert [(it.image_id, it.label) for it in items] == [
        ("shard-000.tar/s/0000", 5),
        ("shard-000.tar/s/0001", 6),
        ("shard-000.tar/s/0002", 7),
    ]
    row = read_block(make_blocks(items, 8)[0], PRE)
    assert row["pixels"].shape == (3, 32, 32, 3) and json.loads(row["labels"]) == [5, 6, 7]


def test_parquet_table_with_bytes_column_and_bad_row(tmp_path, demo_images):
    photos = _photos(demo_images) + [b"garbage"]
    table = pa.table({"image_id": ["a", "b", "c", "d"], "image": photos, "label": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "part.parquet")
    items = list_inputs(str(tmp_path), "parquet")
    row = read_block(make_blocks(items, 8)[0], PRE)
    assert row["image_ids"] == ["part.parquet/a", "part.parquet/b", "part.parquet/c"]
    errors = json.loads(row["errors"])
    assert [(e["image_id"], e["error_type"]) for e in errors] == [
        ("part.parquet/d", "not_an_image")
    ]


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs(str(tmp_path / "nope"))


def test_labels_from_json_sidecars_and_parquet_without_labels(tmp_path, demo_images):
    buf = io.BytesIO()
    photo = _photos(demo_images)[0]
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in (
            ("k/a.jpg", photo),
            ("k/a.json", json.dumps({"label": 7}).encode()),
            ("k/b.jpg", photo),
            ("k/b.json", json.dumps({"label_index": 9}).encode()),
            ("k/c.jpg", photo),  # no sidecar: no label
        ):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "s.tar").write_bytes(buf.getvalue())
    items = list_inputs(str(tmp_path / "tars"), "webdataset")
    assert [(it.image_id, it.label) for it in items] == [
        ("s.tar/k/a", 7),
        ("s.tar/k/b", 9),
        ("s.tar/k/c", None),
    ]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"image": [photo]}), tmp_path / "pq" / "p.parquet")  # no label column
    (item,) = list_inputs(str(tmp_path / "pq"), "parquet")
    assert (item.image_id, item.label, item.member) == ("p.parquet/0", None, "0")
    assert list_inputs(str(tmp_path / "pq"), "parquet", label_column=None)[0].label is None
    # a local source keeps local paths (no scheme prepended); versions are size:mtime
    assert item.uri == str(tmp_path / "pq" / "p.parquet")
    size = (tmp_path / "pq" / "p.parquet").stat().st_size
    assert item.version.startswith(f"{size}:")


def test_s3_listing_keeps_the_scheme_and_versions_by_etag(s3, s3_endpoint, demo_images):
    """On the real local S3 endpoint: URIs keep s3://, versions are size + ETag, and replacing
    an object's bytes under the same key changes its version (what resume relies on)."""
    s3.create_bucket(Bucket="listing")
    photo = _photos(demo_images)[0]
    s3.put_object(Bucket="listing", Key="imgs/a.jpg", Body=photo)
    (item,) = list_inputs("s3://listing/imgs/", endpoint_url=s3_endpoint)
    assert (item.image_id, item.uri) == ("a.jpg", "s3://listing/imgs/a.jpg")
    etag = s3.head_object(Bucket="listing", Key="imgs/a.jpg")["ETag"].strip('"')
    assert item.version == f"{len(photo)}:{etag}"
    s3.put_object(Bucket="listing", Key="imgs/a.jpg", Body=photo[:-1] + b"\0")  # same size
    (again,) = list_inputs("s3://listing/imgs/", endpoint_url=s3_endpoint)
    assert again.version != item.version and again.version.startswith(f"{len(photo)}:")
