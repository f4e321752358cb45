"""The plan as columns: the same blocks, ids and resume decisions as the one-object-per-input
definition (written out here as the reference), on random runs with changed, removed, added
and doubly-finished inputs; the block-id digest across digest passes; the manifest's ids,
versions and order."""

from __future__ import annotations

import hashlib
import json
import posixpath
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.engine.job import finished_inputs, plan_run
from pipeline.runstore import BlockMarker
from pipeline.runstore.layout import marker_uri
from pipeline.runstore.plan import read_plan, write_plan
from pipeline.sources import inputs as inputs_mod
from pipeline.sources.inputs import Block, InputItem, Inputs, block_id, make_blocks
from pipeline.sources.listing import list_inputs
from pipeline.sources.manifest import _ids_from_uris
from pipeline.spec import parse_spec
from pipeline.storage import Storage


def _spec(block_size: int):
    return parse_spec(
        {
            "source": {"uri": "x"},
            "explainers": [{"name": "gradcam"}],
            "compute": {"block_size": block_size},
        }
    )


def _reference_plan(items: list[InputItem], finished: dict[str, dict[str, str]], size: int):
    """The plan as it was defined over Python objects, one per input (the known answer)."""
    current = {it.image_id: it for it in items}
    kept, covered, stale, stale_images = {}, set(), [], set()
    for bid in sorted(finished):
        inputs = finished[bid]
        unchanged = bool(inputs) and all(
            i in current and current[i].version == v for i, v in inputs.items()
        )
        if unchanged and covered.isdisjoint(inputs):
            kept[bid] = Block(bid, tuple(current[i] for i in sorted(inputs)))
            covered.update(inputs)
        else:
            stale.append(bid)
            stale_images.update(inputs)
    rest = [it for it in items if it.image_id not in covered]
    chunks = [tuple(rest[s : s + size]) for s in range(0, len(rest), size)]
    fresh = [Block(block_id(c), c) for c in chunks]
    blocks = sorted([*kept.values(), *fresh], key=lambda b: b.items[0].image_id)
    return blocks, set(kept), sorted(stale), stale_images - covered


@pytest.mark.parametrize("seed", range(6))
def test_the_columnar_plan_decides_as_the_per_object_definition(seed, monkeypatch):
    # small digest passes, so that a plan's ids are hashed over several of them
    monkeypatch.setattr(inputs_mod, "ROWS_PER_DIGEST_PASS", 7)
    rng = random.Random(seed)
    size = rng.choice([2, 3, 5])
    before = [
        InputItem(f"img{i:03d}", f"s3://b/{i}.jpg", label=i % 3, meta={"f": i % 2}, version="1")
        for i in range(rng.randint(20, 40))
    ]
    earlier = make_blocks(before, size)
    finished = {b.block_id: {it.image_id: it.version for it in b.items} for b in earlier}
    for b in rng.sample(list(earlier), k=len(earlier) // 3):
        del finished[b.block_id]  # never finished
    finished["legacy"] = {}  # a marker from before versions were recorded
    # leftovers of another cut of the same inputs: an image finished in two blocks
    other = make_blocks(before[1:], size + 1)
    for b in list(other)[: rng.randint(1, 3)]:
        finished[b.block_id] = {it.image_id: it.version for it in b.items}
    now = []
    for it in before:
        fate = rng.random()
        if fate < 0.1:
            continue  # removed
        if fate < 0.2:  # its bytes changed
            it = InputItem(it.image_id, it.uri, None, it.label, it.meta, "2")
        now.append(it)
    now += [InputItem(f"img{i:03d}x", f"s3://b/{i}x.jpg", version="1") for i in range(5)]
    now.sort(key=lambda it: it.image_id)

    plan = plan_run(_spec(size), now, finished)
    blocks, done, stale, stale_images = _reference_plan(now, finished, size)
    assert list(plan.blocks) == blocks
    assert (plan.done, sorted(plan.stale), plan.stale_images) == (done, stale, stale_images)
    assert plan.todo == [b for b in blocks if b.block_id not in done]
    # every block's id is the digest of what it holds, and every input is in one block
    assert all(b.block_id == block_id(b.items) for b in blocks if b.block_id not in done)
    held = [it.image_id for b in plan.blocks for it in b.items]
    assert sorted(held) == [it.image_id for it in now]


def test_a_stored_plan_resumes_to_the_same_decisions(tmp_path):
    items = [InputItem(f"i{k}", f"/d/{k}", version="1") for k in range(9)]
    root = str(tmp_path / "run")
    plan = plan_run(_spec(4), items, {})
    write_plan(root, plan.blocks)
    for b in list(plan.blocks)[:2]:  # two of three blocks finished (their markers)
        marker = BlockMarker(b.block_id).to_json().encode()
        Storage().write_bytes_atomic(marker_uri(root, b.block_id), marker)
    stored = read_plan(root)
    assert list(stored) == list(plan.blocks)
    again = plan_run(_spec(4), items, finished_inputs(root, stored))
    assert again.done == set(plan.blocks.ids[:2]) and again.todo == list(plan.blocks)[2:]


def test_block_ids_are_hashed_from_the_columns_as_from_the_items(monkeypatch):
    monkeypatch.setattr(inputs_mod, "ROWS_PER_DIGEST_PASS", 3)
    items = [InputItem(f"k{i}", f"/d/{i}", version=f"v{i}" if i % 3 else "") for i in range(11)]
    blocks = make_blocks(items, 4)
    assert [len(b.items) for b in blocks] == [4, 4, 3]
    assert blocks.ids == [block_id(tuple(items[s : s + 4])) for s in (0, 4, 8)]
    text = "\n".join(f"{it.image_id}\t{it.version}" for it in items[8:])
    assert blocks.ids[2] == hashlib.sha256(text.encode()).hexdigest()[:20]


def test_inputs_are_columns_that_give_back_the_items():
    items = [
        InputItem("b", "s3://x/b", None, "cat", {"annotation": {"label": "cat"}}, "1"),
        InputItem("a", "s3://x/a", "3", 7, {"shard": "s3://x/s.parquet", "row_group": 0}, "2"),
        InputItem("c", "s3://x/c"),
    ]
    inputs = Inputs.from_items(items)
    assert list(inputs) == items and [it.meta for it in inputs] == [it.meta for it in items]
    assert inputs[1] == items[1] and inputs[-1] == items[-1] and list(inputs[1:]) == items[1:]
    ordered = inputs.sorted()
    assert [it.image_id for it in ordered] == ["a", "b", "c"]
    assert ordered.sorted() is ordered  # already in order: the same table, no copy
    assert Inputs.from_items([*items, items[0]]).first_duplicate() == "b"
    assert ordered.first_duplicate() is None


def test_ids_from_uris_are_the_paths_below_the_shared_folder():
    def reference(uris: list[str]) -> list[str]:
        # the definition: each uri's key below the deepest folder all keys share
        split = [u.split("://", 1)[1].partition("/")[::2] if "://" in u else ("", u) for u in uris]
        if len({b for b, _ in split}) != 1:
            return uris
        keys = [k for _, k in split]
        common = posixpath.commonpath([posixpath.dirname(k) for k in keys])
        return [k[len(common) :].lstrip("/") for k in keys]

    cases = [
        ["s3://b/data/x/1.jpg", "s3://b/data/y/2.jpg"],
        ["s3://b/data/x/1.jpg", "s3://b/data/xy/2.jpg"],  # a shared prefix is not a folder
        ["s3://b/k/q.jpg"],
        ["s3://b/a/b/c.jpg", "s3://b/a/b/c.jpg2/d.jpg"],
        ["/data/x/1.jpg", "/data/y/2.jpg"],
        ["s3://one/a.jpg", "s3://two/a.jpg"],
        ["s3://bucket1/a.jpg", "s3://bucket12/a.jpg"],
    ]
    for uris in cases:
        assert _ids_from_uris(pa.array(uris)).to_pylist() == reference(uris), uris
    assert _ids_from_uris(pa.array(["s3://b/a.jpg", "/local/a.jpg"])).to_pylist() == [
        "s3://b/a.jpg",
        "/local/a.jpg",
    ]


def test_a_manifest_rows_version_follows_its_etag_uri_and_annotation(tmp_path):
    def listed(rows: list[dict]) -> dict[str, InputItem]:
        path = tmp_path / "m.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return {it.image_id: it for it in list_inputs(str(path), "manifest")}

    rows = [
        {"image_id": f"i{k}", "uri": f"s3://b/{k}.jpg", "etag": f"e{k}", "label": k % 2}
        for k in range(5)
    ]
    base = listed(rows)
    assert list(base) == [f"i{k}" for k in range(5)]  # sorted by id
    assert base["i1"].meta == {"annotation": {"label": 1}} and base["i1"].label == 1
    changes = {
        "etag": {"etag": "e1-new"},
        "uri": {"uri": "s3://b/moved.jpg"},
        "label": {"label": 0},
    }
    for what, change in changes.items():
        edited = [dict(r, **change) if r["image_id"] == "i1" else r for r in rows]
        now = listed(edited)
        assert now["i1"].version != base["i1"].version, what
        assert all(now[i].version == base[i].version for i in now if i != "i1"), what
    # rows in any order list the same inputs, in id order
    shuffled = listed(list(reversed(rows)))
    assert list(shuffled.values()) == list(base.values())


def test_a_manifest_is_read_a_batch_at_a_time_with_the_same_answer(tmp_path, monkeypatch):
    from pipeline.sources import manifest as manifest_mod

    rows = [{"uri": f"s3://b/imgs/{k % 3}/{k}.jpg", "label": k % 4} for k in range(23)]
    rng = np.random.default_rng(0)
    rng.shuffle(rows)
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    whole = list(list_inputs(str(path), "manifest"))
    monkeypatch.setattr(manifest_mod, "ROWS_PER_BATCH", 4)
    assert list(list_inputs(str(path), "manifest")) == whole
    assert [it.image_id for it in whole] == sorted(f"{k % 3}/{k}.jpg" for k in range(23))
    assert all(json.loads(json.dumps(it.meta))["annotation"]["label"] == it.label for it in whole)
