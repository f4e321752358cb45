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
from pipeline.sources.inputs import make_blocks
from pipeline.sources.listing import list_inputs
from pipeline.sources.reader import read_block
from pipeline.storage import Storage

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


@pytest.mark.parametrize(
    ("labels_from", "want"),
    [
        ("annotations", [5, "class1", "class2"]),  # the annotation's label, else the folder
        ("folder", ["class0", "class1", "class2"]),
        ("none", [None, None, None]),
    ],
)
def test_labels_from_chooses_where_a_class_comes_from(tmp_path, demo_images, labels_from, want):
    for i, data in enumerate(_photos(demo_images)):
        (tmp_path / f"class{i}").mkdir()
        (tmp_path / f"class{i}" / f"z{i}.jpg").write_bytes(data)
    box = {"label": 5, "boxes": [[0, 0, 3, 3]]}
    row = read_block(
        make_blocks(list_inputs(str(tmp_path)), 8)[0],
        PRE,
        {"class0/z0.jpg": box},
        labels_from=labels_from,
    )
    assert json.loads(row["labels"]) == want
    assert json.loads(row["annotations"][0])["boxes"] == [[0, 0, 3, 3]]  # boxes kept in any mode


def test_labels_from_folder_needs_image_folders():
    from pipeline.spec import SourceSpec

    with pytest.raises(ValueError, match="labels_from 'folder' needs format 'images'"):
        SourceSpec(uri="s3://b/shards", format="webdataset", labels_from="folder")


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
    # the listing names the shard without opening it; its block expands it into samples
    (shard,) = list_inputs(str(tmp_path), "webdataset")
    assert (shard.image_id, shard.member, shard.meta["shard"]) == ("shard-000.tar", "*", shard.uri)
    row = read_block(make_blocks([shard], 8)[0], PRE)
    assert row["image_ids"] == [
        "shard-000.tar/s/0000",
        "shard-000.tar/s/0001",
        "shard-000.tar/s/0002",
    ]
    assert row["pixels"].shape == (3, 32, 32, 3) and json.loads(row["labels"]) == [5, 6, 7]
    assert json.loads(row["members"]) == ["s/0000.jpg", "s/0001.jpg", "s/0002.jpg"]
    assert (row["n_inputs"], json.loads(row["inputs"])) == (3, {"shard-000.tar": shard.version})


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
    (tmp_path / "part.parquet").unlink()  # gone after the listing: one error row per row
    row = read_block(make_blocks(items, 8)[0], PRE)
    assert [e["error_type"] for e in json.loads(row["errors"])] == ["not_found"] * 4


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
    row = read_block(make_blocks(list_inputs(str(tmp_path / "tars"), "webdataset"), 8)[0], PRE)
    assert list(zip(row["image_ids"], json.loads(row["labels"]), strict=True)) == [
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
    (item,) = list_inputs("s3://listing/imgs/", storage=Storage(endpoint_url=s3_endpoint))
    assert (item.image_id, item.uri) == ("a.jpg", "s3://listing/imgs/a.jpg")
    etag = s3.head_object(Bucket="listing", Key="imgs/a.jpg")["ETag"].strip('"')
    assert item.version == f"{len(photo)}:{etag}"
    s3.put_object(Bucket="listing", Key="imgs/a.jpg", Body=photo[:-1] + b"\0")  # same size
    (again,) = list_inputs("s3://listing/imgs/", storage=Storage(endpoint_url=s3_endpoint))
    assert again.version != item.version and again.version.startswith(f"{len(photo)}:")


def _engine_annotations(block) -> dict:
    """What the job's decode stage hands read_block: each item's meta["annotation"]."""
    return {it.image_id: it.meta["annotation"] for it in block.items if it.meta.get("annotation")}


def test_manifest_csv_lists_its_rows_with_labels_and_boxes(tmp_path, demo_images):
    from pipeline.sources.annotations import to_model_space

    for folder, name in (("a", "x.png"), ("b", "y.png")):
        (tmp_path / "imgs" / folder).mkdir(parents=True)
        (tmp_path / "imgs" / folder / name).write_bytes(
            image_bytes(demo_images[0][:64, :64], "PNG")
        )
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "note,uri,label,boxes\n"
        'ignored,imgs/b/y.png,7,"[[0, 0, 63, 31]]"\n'
        "ignored,imgs/a/x.png,cat,\n"
    )
    items = list_inputs(str(manifest), "manifest")
    # ids: paths below the folder every uri shares; uris relative to the manifest
    # (a label column of names and indices is text: the worker reads "7" as index 7)
    assert [(it.image_id, it.uri, it.label) for it in items] == [
        ("a/x.png", str(tmp_path / "imgs/a/x.png"), "cat"),
        ("b/y.png", str(tmp_path / "imgs/b/y.png"), "7"),
    ]
    assert [it.meta for it in items] == [
        {"annotation": {"label": "cat"}},
        {"annotation": {"label": "7", "boxes": [[0.0, 0.0, 63.0, 31.0]]}},
    ]
    block = make_blocks(items, 8)[0]
    row = read_block(block, PRE, _engine_annotations(block), to_model_space)
    assert row["image_ids"] == ["a/x.png", "b/y.png"] and json.loads(row["labels"]) == ["cat", "7"]
    assert json.loads(row["annotations"][1]) == {"label": "7", "boxes": [[0.0, 0.0, 31.0, 15.0]]}
    # no version column: the manifest's own version is each row's, so an edit is a new input
    manifest.write_text(manifest.read_text() + "ignored,imgs/a/z.png,1,\n")
    again = {it.image_id: it.version for it in list_inputs(str(manifest), "manifest")}
    assert again["b/y.png"] != items[1].version and len(again) == 3


def test_manifest_without_annotation_columns_and_its_clear_errors(tmp_path):
    def manifest(text: str, name: str = "m.csv"):
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    # a version column versions the rows: adding a row leaves the others' versions alone
    m = manifest("image_id,uri,version\nq,s3://b/k/q.jpg,v1\n")
    (item,) = list_inputs(m, "manifest")
    assert (item.image_id, item.uri, item.label, item.meta) == ("q", "s3://b/k/q.jpg", None, {})
    manifest("image_id,uri,version\nq,s3://b/k/q.jpg,v1\nr,s3://b/k/r.jpg,v1\n")
    assert list_inputs(m, "manifest")[0].version == item.version
    # ids default to the uris when they share no bucket
    m = manifest("uri\ns3://one/a.jpg\ns3://two/a.jpg\n")
    assert [it.image_id for it in list_inputs(m, "manifest")] == [
        "s3://one/a.jpg",
        "s3://two/a.jpg",
    ]
    cases = [
        ("path,label\na.jpg,1\n", r"m\.csv: no column 'uri' \(it has: path, label\)"),
        ("uri\n", r"m\.csv: no rows"),
        ("uri\nx/a.jpg\ny/a.jpg\nx/a.jpg\n", r"m\.csv: column 'uri': duplicate image id"),
        ("image_id,uri\nk,a.jpg\nk,b.jpg\n", r"column 'image_id': duplicate image id 'k'"),
        ('uri,boxes\na.jpg,"[1, 2]"\n', r"m\.csv: column 'boxes': row 0"),
    ]
    for text, message in cases:
        with pytest.raises(ValueError, match=message):
            list_inputs(manifest(text), "manifest")
    with pytest.raises(ValueError, match=r"m\.txt: not a \.parquet or \.csv file"):
        list_inputs(manifest("uri\na.jpg\n", "m.txt"), "manifest")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_inputs(str(tmp_path / "none.csv"), "manifest")
