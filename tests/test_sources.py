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
