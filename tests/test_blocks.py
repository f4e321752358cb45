"""The engine without Ray, fast and exact: block ids, the resume plan, a block's writes with a
fault injected at each step, stale outputs, the heatmap codec, target choice in every mode (a
real worker in this process), the summary and the run's outcome."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import image_bytes

from pipeline.engine.job import (
    JobFailed,
    check_outcome,
    finished_inputs,
    plan_run,
    source_changes,
)
from pipeline.engine.summary import RunTotals
from pipeline.engine.worker import ExplainWorker, choose_targets, resolve_label
from pipeline.runstore import (
    ERROR_SCHEMA,
    METRIC_SCHEMA,
    BlockMarker,
    decode_heatmaps,
    encode_heatmaps,
    finished_blocks,
    heatmap_schema,
    read_table,
    remove_stale_outputs,
    shrink,
    write_block,
)
from pipeline.sources.annotations import to_model_space
from pipeline.sources.inputs import Block, InputItem, block_id, make_blocks
from pipeline.sources.reader import read_block
from pipeline.spec import parse_spec
from pipeline.storage import Storage


def _items(*pairs: tuple[str, str]) -> list[InputItem]:
    return [InputItem(i, f"/data/{i}", version=v) for i, v in pairs]


def _spec(**extra) -> object:
    return parse_spec({"source": {"uri": "x"}, "explainers": [{"name": "gradcam"}], **extra})


# -- block ids and the resume plan -----------------------------------------------------------
def test_block_id_is_the_digest_of_ids_and_versions_never_of_position():
    a, b, c = _items(("a", "1:x"), ("b", "2:y"), ("c", "3:z"))
    want = hashlib.sha256(b"a\t1:x\nb\t2:y").hexdigest()[:20]
    assert block_id((a, b)) == want
    assert [blk.block_id for blk in make_blocks([a, b, c], 2)] == [want, block_id((c,))]
    assert [len(blk.items) for blk in make_blocks([a, b, c], 2)] == [2, 1]
    assert block_id((a, InputItem("b", "/data/b", version="2:CHANGED"))) != want
    assert len(make_blocks([], 2)) == 0


def _as_dict(finished) -> dict[str, dict[str, str]]:
    """finished_inputs' table as {block id: {image id: version}}."""
    out: dict[str, dict[str, str]] = {}
    for r in finished.to_pylist():
        out.setdefault(r["block_id"], {})[r["image_id"]] = r["version"]
    return out


def _marker(block: Block) -> BlockMarker:
    return BlockMarker(block.block_id, inputs={it.image_id: it.version for it in block.items})


def test_plan_keeps_unchanged_blocks_and_recuts_the_rest():
    before = _items(("a", "1"), ("b", "1"), ("c", "1"), ("d", "1"), ("e", "1"), ("f", "1"))
    finished = {blk.block_id: _marker(blk).inputs for blk in make_blocks(before, 2)}
    ab, cd, ef = (blk.block_id for blk in make_blocks(before, 2))
    finished["legacy"] = {}  # a marker from before versions were recorded
    # a removed, d replaced, g added
    now = _items(("b", "1"), ("c", "1"), ("d", "2"), ("e", "1"), ("f", "1"), ("g", "1"))
    plan = plan_run(_spec(compute={"block_size": 2}), now, finished)
    assert plan.done == {ef}
    assert sorted(plan.stale) == sorted([ab, cd, "legacy"])
    assert plan.stale_images == {"a", "b", "c", "d"}
    assert [[it.image_id for it in blk.items] for blk in plan.blocks] == [
        ["b", "c"],
        ["d", "g"],
        ["e", "f"],
    ]
    assert [blk.block_id for blk in plan.todo] == [
        block_id(tuple(now[:2])),
        block_id((now[2], now[5])),
    ]
    # nothing changed: everything is done, nothing to compute, nothing stale
    again = plan_run(
        _spec(compute={"block_size": 2}),
        now,
        {blk.block_id: _marker(blk).inputs for blk in plan.blocks},
    )
    assert (len(again.done), again.todo, again.stale) == (3, [], [])


def test_plan_never_counts_an_image_twice():
    items = _items(("a", "1"), ("b", "1"), ("c", "1"))
    small = make_blocks(items, 1)
    big = make_blocks(items, 3)
    finished = {blk.block_id: _marker(blk).inputs for blk in [*small, *big]}
    plan = plan_run(_spec(compute={"block_size": 3}), items, finished)
    counted = [it.image_id for blk in plan.blocks for it in blk.items]
    assert sorted(counted) == ["a", "b", "c"] and plan.todo == []
    assert len(plan.stale) == len(finished) - len(plan.done)
    assert plan.stale_images == set()  # every stale block's images are covered by a kept one


# -- a block's writes, with a fault at each step ----------------------------------------------
def _tables(n: int, size: int = 4, errors: int = 0) -> dict[str, pa.Table]:
    schema = heatmap_schema(size, "uint8")
    cols = {f.name: [None] * n for f in schema if f.name != "heatmap"}
    cols["image_id"] = [f"img{i}" for i in range(n)]
    cols["explainer"] = ["gradcam"] * n
    cols["target"] = list(range(n))
    flat = np.arange(n * size * size, dtype=np.uint8)
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat), size * size)
    cols["heatmap"] = pa.ExtensionArray.from_storage(schema.field("heatmap").type, storage)
    heat = pa.table({name: cols[name] for name in schema.names}, schema=schema)
    metrics = pa.Table.from_pylist(
        [{"image_id": f"img{i}", "metric": "deletion", "value": 0.5} for i in range(n)],
        schema=METRIC_SCHEMA,
    )
    errors = pa.Table.from_pylist(
        [{"image_id": "bad", "stage": "decode", "fatal": True}] * errors, schema=ERROR_SCHEMA
    )
    return {"heatmaps": heat, "metrics": metrics, "errors": errors}


@pytest.mark.parametrize("fail_at", [0, 1, 2, 3, None])
def test_a_block_is_finished_only_when_its_marker_is_written_last(tmp_path, fail_at):
    """Writes: heatmaps, metrics, errors, then the marker. A fault before, between or after the
    data files leaves no marker, so the block is recomputed and its files replaced whole."""
    root = str(tmp_path / "run")
    items = _items(("img0", "1"), ("img1", "1"))
    (block,) = make_blocks(items, 2)
    written = []

    class Flaky(Storage):
        def write_bytes_atomic(self, uri: str, data: bytes) -> None:
            if len(written) == fail_at:
                raise ConnectionError(f"injected fault at write {fail_at}")
            written.append(uri.removeprefix(root))
            super().write_bytes_atomic(uri, data)

    if fail_at is None:
        write_block(root, _marker(block), _tables(2, errors=1), Flaky())
    else:
        with pytest.raises(ConnectionError, match="injected"):
            write_block(root, _marker(block), _tables(2, errors=1), Flaky())
    bid = block.block_id
    order = [f"/{t}/part-{bid}.parquet" for t in ("heatmaps", "metrics", "errors")]
    assert written == [*order, f"/_blocks/{bid}.json"][: 4 if fail_at is None else fail_at]
    finished = finished_inputs(root, None)
    assert (bid in _as_dict(finished)) == (fail_at is None)

    # the next attempt: the plan recomputes what has no marker, then writes it whole; this
    # time the block has no error, so the errors part an earlier attempt left must go
    plan = plan_run(_spec(compute={"block_size": 2}), items, finished)
    assert [b.block_id for b in plan.todo] == ([] if fail_at is None else [bid])
    remove_stale_outputs(root, {b.block_id for b in plan.blocks}, plan.stale_images)
    for b in plan.todo:
        write_block(root, _marker(b), _tables(2))
    assert read_table(root, "heatmaps").num_rows == 2  # never duplicated
    assert read_table(root, "metrics").num_rows == 2
    assert read_table(root, "errors").num_rows == (1 if fail_at is None else 0)
    assert list(finished_blocks(root)) == [bid]


def test_an_empty_table_is_not_written(tmp_path):
    root = tmp_path / "run"
    write_block(str(root), BlockMarker("b1"), _tables(1))
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "_blocks/b1.json",
        "heatmaps/part-b1.parquet",
        "metrics/part-b1.parquet",
    ]


def test_a_lost_marker_recomputes_the_same_block_in_place(tmp_path):
    root = str(tmp_path / "run")
    items = _items(("img0", "1"), ("img1", "1"))
    (block,) = make_blocks(items, 2)
    write_block(root, _marker(block), _tables(2))
    Path(root, "_blocks", f"{block.block_id}.json").unlink()
    plan = plan_run(_spec(compute={"block_size": 2}), items, finished_inputs(root, None))
    assert [b.block_id for b in plan.todo] == [block.block_id]
    write_block(root, _marker(block), _tables(2))
    assert read_table(root, "heatmaps").num_rows == 2


def test_stale_outputs_go_and_nothing_else(tmp_path):
    root = tmp_path / "run"
    files = {
        "_blocks/keep.json": True,
        "_blocks/old.json": False,
        "heatmaps/part-keep.parquet": True,
        "heatmaps/part-old.parquet": False,
        "metrics/part-orphan.parquet": False,  # a crash before its marker, block now gone
        "errors/part-keep.parquet": True,
        "heatmaps/notes.txt": True,  # not ours: left alone
        "heatmaps/part-notes.txt": True,  # our prefix, not our suffix: not a part
        "_blocks/README": True,
        "pictures/av/a.png.t1.image.png": False,
        "pictures/av/a.png.t12.mask.png": False,
        "pictures/av/a.png.tiff.t1.image.png": True,  # another image whose id starts alike
        "pictures/av/b.png.t1.image.png": True,
        "overlays/gradcam/dir__a.png.t3.png": False,
        "overlays/gradcam/a.png.t3.png": False,
        "overlays/gradcam/c.png.t3.png": True,
        "summary.json": True,
    }
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    remove_stale_outputs(str(root), {"keep"}, {"a.png", "dir/a.png"})
    left = {name for name in files if (root / name).exists()}
    assert left == {name for name, kept in files.items() if kept}


# -- the heatmap codec -----------------------------------------------------------------------
def test_codec_known_answers():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    stored, lo, hi = encode_heatmaps(maps, 2, "uint8")
    assert stored.dtype == torch.uint8
    assert stored[0].tolist() == [[0, 85], [170, 255]]
    assert stored[1].tolist() == [[0, 0], [0, 0]]  # a constant map
    assert lo.tolist() == [0.0, 5.0] and hi.tolist() == [3.0, 5.0]
    halves, _, _ = encode_heatmaps(maps, 2, "float16")
    assert halves.dtype == torch.float16 and torch.equal(halves.float(), maps)
    # shrinking averages areas (energy kept); growing interpolates
    big = torch.arange(16.0).reshape(1, 4, 4)
    assert shrink(big, 2)[0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert torch.equal(shrink(big, 4), big)  # the stored size already: unchanged
    assert shrink(torch.ones(1, 2, 2), 4).shape == (1, 4, 4)
    # decoding gives the maps back, within one quantisation step
    for dtype in ("uint8", "float16"):
        stored, lo, hi = encode_heatmaps(maps, 2, dtype)
        schema = heatmap_schema(2, dtype)
        flat = pa.array(stored.numpy().reshape(-1))
        tensor = pa.ExtensionArray.from_storage(
            schema.field("heatmap").type, pa.FixedSizeListArray.from_arrays(flat, 4)
        )
        table = pa.table({"heatmap": tensor, "map_min": lo.numpy(), "map_max": hi.numpy()})
        back = decode_heatmaps(table)
        assert back.shape == (2, 2, 2)
        np.testing.assert_allclose(back, maps.numpy(), atol=(3 / 255) / 2 + 1e-6)
        # no rows decode to no maps (not one empty map)
        assert decode_heatmaps(table.slice(0, 0)).shape == (0, 0, 0)


# -- target choice ----------------------------------------------------------------------------
def test_choose_targets_in_every_mode_by_hand():
    model = SimpleNamespace(num_classes=4, labels=["cat", "dog", "cup", "car"])
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.05, 0.25, 0.2]])
    pairs, missing = choose_targets(_spec(), model, probs, [None, None])
    assert pairs.image.tolist() == [0, 1] and pairs.target.tolist() == [3, 0]
    assert pairs.rank.tolist() == [0, 0] and pairs.score.tolist() == pytest.approx([0.4, 0.5])
    pairs, _ = choose_targets(_spec(targets={"mode": "topk", "k": 3}), model, probs, [None] * 2)
    assert pairs.image.tolist() == [0, 0, 0, 1, 1, 1]
    assert pairs.target.tolist() == [3, 2, 1, 0, 2, 3]
    assert pairs.rank.tolist() == [0, 1, 2, 0, 1, 2]
    assert pairs.score.tolist() == pytest.approx([0.4, 0.3, 0.2, 0.5, 0.25, 0.2])
    spec = _spec(targets={"mode": "classes", "classes": [2, 0]})
    pairs, _ = choose_targets(spec, model, probs, [None] * 2)
    assert pairs.target.tolist() == [2, 0, 2, 0] and pairs.rank.tolist() == [0, 1, 0, 1]
    assert pairs.score.tolist() == pytest.approx([0.3, 0.1, 0.25, 0.5])
    with pytest.raises(ValueError, match="targets.classes: 7 out of range"):
        choose_targets(_spec(targets={"mode": "classes", "classes": [7]}), model, probs, [None])
    pairs, missing = choose_targets(_spec(targets={"mode": "label"}), model, probs, ["dog", 9])
    assert pairs.image.tolist() == [0] and pairs.target.tolist() == [1]
    assert pairs.score.tolist() == pytest.approx([0.2])
    assert list(missing) == [1] and missing[1][0] == "no_label" and "9" in missing[1][1]
    # threshold: every class above t, at most k, highest first; none above t -> no target
    probs = torch.tensor([[0.9, 0.7, 0.1, 0.6], [0.4, 0.3, 0.2, 0.45], [0.55, 0.8, 0.5, 0.0]])
    spec = _spec(targets={"mode": "threshold", "t": 0.5, "k": 2})
    pairs, missing = choose_targets(spec, model, probs, [None] * 3)
    assert pairs.image.tolist() == [0, 0, 2, 2] and pairs.target.tolist() == [0, 1, 1, 0]
    assert pairs.rank.tolist() == [0, 1, 0, 1]
    assert pairs.score.tolist() == pytest.approx([0.9, 0.7, 0.8, 0.55])
    assert list(missing) == [1] and missing[1][0] == "no_target" and "0.45" in missing[1][1]
    # t is strict: a score equal to t does not pass (0.5 of image 2's class 2)
    pairs, _ = choose_targets(
        _spec(targets={"mode": "threshold", "k": 4}), model, probs, [None] * 3
    )
    assert 2 not in pairs.target[pairs.image == 2].tolist()


def test_resolve_label():
    names = ["cat", "dog"]
    assert [resolve_label(v, names) for v in (0, 1, "1", "dog", np.int64(1))] == [0, 1, 1, 1, 1]
    assert [resolve_label(v, names) for v in (None, 2, -1, "2", "Dog", "cow")] == [None] * 6


# -- a real worker in this process, one test per target mode ----------------------------------
@pytest.fixture(scope="module")
def tiny_block(tmp_path_factory, demo_images):
    folder = tmp_path_factory.mktemp("blockimages")
    for i, img in enumerate(demo_images[:3]):
        (folder / f"im{i}.png").write_bytes(image_bytes(img[::8, ::8], "PNG"))
    return folder


def _worker(
    tmp_path, folder: Path, targets: dict, score: str = "softmax"
) -> tuple[ExplainWorker, str, dict]:
    spec = parse_spec(
        {
            "source": {"uri": str(folder)},
            "model": {
                "uri": "torchvision:resnet18",
                "random_init": True,
                "size": 32,
                "num_classes": 6,
                "score": score,
            },
            "targets": targets,
            "explainers": [{"name": "gradcam"}, {"name": "saliency"}],
            "metrics": [{"name": "average_drop"}],
            "output": {"uri": str(tmp_path), "heatmap_size": 8},
            "compute": {"device": "cpu", "batch_size": 2},
        }
    )
    root = str(tmp_path / "run")
    worker = ExplainWorker(spec.model_dump_json(), "run", root, Storage())
    items = [
        InputItem(f"im{i}.png", str(folder / f"im{i}.png"), version="1", label=label)
        for i, label in enumerate(["2", "5", None])
    ]
    (block,) = make_blocks(items, 3)
    row = read_block(block, worker.model.preprocess, {}, to_model_space)
    return worker, root, {**row, "write_overlays": False}


def _probs(worker, row) -> torch.Tensor:
    x = worker.model.preprocess.normalise(torch.from_numpy(row["pixels"]))
    return worker.model.class_scores(worker.model.logits(x))


def test_worker_threshold_targets_on_a_multi_label_model(tmp_path, tiny_block):
    """score: sigmoid and targets.mode: threshold: every class whose sigmoid passes t, at most
    k, highest first; an image with none is an error row (targets, no_target), not lost."""
    worker, root, row = _worker(tmp_path, tiny_block, {"mode": "threshold", "k": 2}, "sigmoid")
    marker = worker.process_block(row)
    x = worker.model.preprocess.normalise(torch.from_numpy(row["pixels"]))
    probs = worker.model.logits(x).float().sigmoid()
    t = 0.5
    want, none = [], []
    for i in range(3):
        above = [(float(p), c) for c, p in enumerate(probs[i]) if p > t]
        ranked = sorted(above, reverse=True)[:2]
        want += [(i, c, r) for r, (_, c) in enumerate(ranked)]
        if not ranked:
            none.append(f"im{i}.png")
    assert want, "the random model should pass the threshold on some class"
    heat = read_table(root, "heatmaps").drop_columns(["heatmap"]).to_pylist()
    got = [(int(r["image_id"][2]), r["target"], r["target_rank"]) for r in heat]
    assert sorted(got) == sorted(want * 2)  # two explainers
    for r in heat:
        assert r["score"] == pytest.approx(float(probs[int(r["image_id"][2]), r["target"]]))
    errors = read_table(root, "errors").to_pylist()
    assert sorted(e["image_id"] for e in errors) == none
    assert all((e["stage"], e["error_type"]) == ("targets", "no_target") for e in errors)
    assert marker.images_ok + marker.fatal_errors == 3


@pytest.mark.parametrize(
    "targets",
    [
        {"mode": "predicted"},
        {"mode": "topk", "k": 2},
        {"mode": "classes", "classes": [4, 1]},
        {"mode": "label"},
    ],
    ids=lambda t: t["mode"],
)
def test_worker_block_per_target_mode(tmp_path, tiny_block, targets):
    worker, root, row = _worker(tmp_path, tiny_block, targets)
    marker = worker.process_block(row)
    probs = _probs(worker, row)
    heat = read_table(root, "heatmaps").drop_columns(["heatmap"]).to_pylist()
    mode = targets["mode"]
    want = []  # (image, target, rank), computed here from the model's own probabilities
    for i in range(3):
        if mode == "predicted":
            want.append((i, int(probs[i].argmax()), 0))
        elif mode == "topk":
            want += [(i, int(t), r) for r, t in enumerate(probs[i].topk(2).indices)]
        elif mode == "classes":
            want += [(i, 4, 0), (i, 1, 1)]
        elif i < 2:  # label: the third image has none
            want.append((i, [2, 5][i], 0))
    for explainer in ("gradcam", "saliency"):
        got = [
            (int(r["image_id"][2]), r["target"], r["target_rank"])
            for r in heat
            if r["explainer"] == explainer
        ]
        assert sorted(got) == sorted(want), (explainer, got)
    for r in heat:
        assert r["score"] == pytest.approx(float(probs[int(r["image_id"][2]), r["target"]]))
        assert r["predicted"] == int(probs[int(r["image_id"][2])].argmax())
    explained = 2 if mode == "label" else 3
    assert marker.images_ok == explained and marker.images["gradcam"] == explained
    assert marker.fatal_errors == 3 - explained
    metrics = read_table(root, "metrics").to_pylist()
    assert len(metrics) == 2 * len(want)
    assert marker.metric_states["gradcam"]["average_drop"]["state"]["n"] == len(want)
    if mode == "label":
        (error,) = read_table(root, "errors").to_pylist()
        assert (error["image_id"], error["stage"], error["fatal"]) == ("im2.png", "targets", True)
        assert marker.first_error["image_id"] == "im2.png"


def test_an_explainer_failing_on_one_image_takes_only_that_image(tmp_path, tiny_block):
    worker, root, row = _worker(tmp_path, tiny_block, {"mode": "predicted"})
    explainer = worker.explainers["saliency"]
    real = explainer.explain
    bad = worker.model.preprocess.normalise(torch.from_numpy(row["pixels"][1:2]))[0]

    def explain(x, targets):  # raises whenever the batch holds image 1
        if any(torch.allclose(xi, bad) for xi in x):
            raise RuntimeError("this image breaks saliency")
        return real(x, targets)

    explainer.explain = explain
    marker = worker.process_block(row)
    heat = read_table(root, "heatmaps").drop_columns(["heatmap"]).to_pylist()
    assert sorted({r["image_id"] for r in heat}) == ["im0.png", "im2.png"]
    assert len(heat) == 2 * 2  # both explainers, the two good images
    (error,) = read_table(root, "errors").to_pylist()
    assert (error["image_id"], error["stage"]) == ("im1.png", "explain:saliency")
    assert marker.images_ok == 2 and marker.fatal_errors == 1


def test_a_metric_that_raises_gives_nulls_and_a_non_fatal_error(tmp_path, tiny_block, monkeypatch):
    import pipeline.engine.worker as worker_module

    real = worker_module.build_metric

    class Broken:
        def __init__(self, metric):
            self.metric = metric

        def update(self, *args, **kwargs):
            raise ArithmeticError("this metric cannot score these maps " + "x" * 3000)

        def state(self):
            return self.metric.state()

    monkeypatch.setattr(worker_module, "build_metric", lambda n, **p: Broken(real(n, **p)))
    worker, root, row = _worker(tmp_path, tiny_block, {"mode": "predicted"})
    marker = worker.process_block(row)
    assert marker.images_ok == 3 and marker.fatal_errors == 0  # heatmaps are kept
    values = read_table(root, "metrics").column("value").to_pylist()
    assert len(values) == 2 * 3 and values == [None] * 6
    errors = read_table(root, "errors").to_pylist()
    assert {(e["stage"], e["error_type"], e["fatal"]) for e in errors} == {
        ("metric:average_drop", "ArithmeticError", False)
    }
    assert len(errors) == 2 * 3  # per explainer and image
    # a long message is cut to 2000 characters, so one bad metric cannot bloat the table
    assert {len(e["message"]) for e in errors} == {2000}


def test_a_metric_that_fails_on_one_image_nulls_that_image_only(tmp_path, tiny_block, monkeypatch):
    """A failing batch is retried pair by pair: the neighbours of the bad image keep values."""
    import pipeline.engine.worker as worker_module

    real = worker_module.build_metric
    worker, root, row = _worker(tmp_path, tiny_block, {"mode": "predicted"})
    pixels = torch.from_numpy(row["pixels"])
    poisoned = worker.model.preprocess.normalise(pixels[1:2])  # im1, as the worker sees it

    class FailsOnIm1:
        def __init__(self, metric):
            self.metric = metric

        def update(self, batch):
            if any(torch.equal(xi, poisoned[0]) for xi in batch.x):
                raise ArithmeticError("cannot score im1")
            return self.metric.update(batch)

        def state(self):
            return self.metric.state()

    monkeypatch.setattr(worker_module, "build_metric", lambda n, **p: FailsOnIm1(real(n, **p)))
    worker.process_block(row)
    rows = read_table(root, "metrics").to_pylist()
    nulls = {(r["explainer"], r["image_id"]) for r in rows if r["value"] is None}
    assert nulls == {("gradcam", "im1.png"), ("saliency", "im1.png")}
    assert sum(r["value"] is not None for r in rows) == 2 * 2
    errors = read_table(root, "errors").to_pylist()
    assert (
        sorted((e["image_id"], e["stage"], e["fatal"]) for e in errors)
        == [("im1.png", "metric:average_drop", False)] * 2
    )


# -- the summary and the run's outcome -----------------------------------------------------------
def _block_marker(bid: str, ok: int, fatal: int, images: int, seconds: float) -> BlockMarker:
    return BlockMarker(
        bid,
        n_inputs=ok + fatal,
        images_ok=ok,
        fatal_errors=fatal,
        rows={"heatmaps": ok, "metrics": 0, "errors": fatal},
        seconds={"gradcam": seconds},
        images={"gradcam": images},
        forward_passes={"gradcam": images},
        first_error={"image_id": f"{bid}-bad", "message": "boom"} if fatal else None,
    )


def _summarise(spec, blocks, markers, computed, order=None):
    """Fold the plan's blocks' markers as the job does (in `order`, default the plan's)."""
    totals = RunTotals(spec)
    for b in order or blocks:
        totals.add(markers[b.block_id], computed=b in computed)
    return totals.summary("r", 2.0, 3.0)


def test_summary_folds_the_plans_markers_in_any_order():
    items = _items(*[(f"i{k}", "1") for k in range(5)])
    blocks = make_blocks(items, 2)  # 2, 2, 1
    markers = {
        blocks[0].block_id: _block_marker("a", 2, 0, 2, 1.0),
        blocks[1].block_id: _block_marker("b", 1, 1, 1, 0.5),
        blocks[2].block_id: _block_marker("c", 1, 0, 1, 0.5),
    }
    s = _summarise(_spec(), blocks, markers, blocks[1:])
    assert (s["inputs"], s["images_ok"], s["errors"], s["lost"]) == (5, 4, 1, 0)
    assert s["explainers"]["gradcam"]["images"] == 4
    assert s["explainers"]["gradcam"]["images_per_s"] == pytest.approx(4 / 2.0)
    assert s["images_per_s"] == pytest.approx((1 + 1) / 2.0)  # explained this attempt / compute s
    assert s["first_error"]["image_id"] == "b-bad"
    assert (s["blocks"], s["blocks_computed"], s["blocks_resumed"]) == (3, 2, 1)
    assert _summarise(_spec(), blocks, markers, blocks[1:], order=blocks[::-1]) == s
    nothing = {b.block_id: _block_marker("z", 0, len(b.items), 0, 1.0) for b in blocks}
    s = _summarise(_spec(), blocks, nothing, blocks)
    assert s["images_per_s"] is None and s["explainers"]["gradcam"]["images_per_s"] is None


def test_summary_merges_metric_states_and_keeps_the_first_error_by_image_id():
    spec = _spec(metrics=[{"name": "pointing_game"}])
    items = _items(*[(f"i{k}", "1") for k in range(4)])
    blocks = make_blocks(items, 2)
    state = {"pointing_game": {"name": "pointing_game", "params": {}, "state": {}}}
    markers = {}
    for b, (n, total, bad) in zip(blocks, [(2, 1.0, "z9"), (1, 1.0, "a1")], strict=True):
        m = _block_marker(b.block_id, 2, 0, 2, 1.0)
        m.metric_states = {
            "gradcam": {k: {**v, "state": {"n": n, "total": total}} for k, v in state.items()}
        }
        m.first_error = {"image_id": bad, "message": "x"}
        markers[b.block_id] = m
    s = _summarise(spec, blocks, markers, blocks)
    assert s["explainers"]["gradcam"]["metrics"] == {"pointing_game": pytest.approx(2 / 3)}
    assert s["explainers"]["gradcam"]["metric_counts"] == {"pointing_game": 3}
    assert s["first_error"]["image_id"] == "a1"


@pytest.mark.parametrize(
    "ok, errors, share, fails",
    [(0, 4, 1.0, "no image was explained"), (5, 5, 0.5, None), (4, 6, 0.5, "6 of 10 inputs")],
)
def test_outcome_thresholds(ok, errors, share, fails):
    summary = {"inputs": ok + errors, "images_ok": ok, "errors": errors, "first_error": None}
    spec = _spec(max_error_share=share)
    if fails is None:
        check_outcome(spec, summary)
    else:
        with pytest.raises(JobFailed, match=fails):
            check_outcome(spec, summary)


def test_marker_json_round_trip(tmp_path):
    root = str(tmp_path / "run")
    marker = _block_marker("b1", 2, 1, 2, 0.5)
    marker.inputs = {"img0": "1"}
    write_block(root, marker, _tables(1))
    assert json.loads(Path(root, "_blocks", "b1.json").read_text())["inputs"] == {"img0": "1"}
    assert finished_blocks(root) == {"b1": marker}
    # a marker written by a newer version with fields this one does not know still reads
    text = json.dumps({**json.loads(marker.to_json()), "from_the_future": 1})
    assert BlockMarker.from_json(text) == marker


# -- the smaller pieces of the job, by hand ------------------------------------------------------
def test_run_ids():
    from pipeline.engine.job import default_run_id, expand_run_id

    a = _spec()
    assert default_run_id(a) == default_run_id(_spec())
    assert default_run_id(a).startswith("run-") and len(default_run_id(a)) == 16
    # tracking and compute do not change what is computed: the same run
    assert default_run_id(_spec(compute={"actors": 4}, tracking={"experiment": "x"})) == (
        default_run_id(a)
    )
    assert default_run_id(_spec(seed=1)) != default_run_id(a)
    import time

    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert expand_run_id("nightly-{date}") == f"nightly-{day}"
    assert expand_run_id("fixed") == "fixed"


def test_annotations_matched_by_path_suffix_and_part_of_the_version():
    from pipeline.engine.job import _annotated, _by_image_id

    anns = {"val/images/cat/1.jpg": {"label": 3, "boxes": np.array([[1, 2, 3, 4]])}}
    got = _by_image_id(anns, ["cat/1.jpg", "1.jpg", "dog/1.jpg", "val/images/cat/1.jpg"])
    assert set(got) == {"cat/1.jpg", "1.jpg", "val/images/cat/1.jpg"}
    assert got["cat/1.jpg"] == {"label": 3, "boxes": [[1, 2, 3, 4]]}  # numpy -> lists
    item = InputItem("cat/1.jpg", "/d/cat/1.jpg", version="10:5")
    a = _annotated(item, {"label": 3})
    assert a.meta["annotation"] == {"label": 3} and a.version.startswith("10:5+a")
    assert _annotated(item, {"label": 4}).version != a.version  # an edited annotation
    assert _annotated(item, None).version == "10:5"


def test_flat_metrics_and_csv():
    from pipeline.engine.job import _flat_metrics, _summary_csv

    summary = {
        "inputs": 5,
        "images_ok": 4,
        "errors": 1,
        "lost": 0,
        "actor_restarts": 0,
        "images_per_s": None,
        "explainers": {
            "gradcam": {
                "images": 4, "images_per_s": 2.5, "metrics": {"deletion": 0.25},
                "metric_counts": {"deletion": 4}, "metric_sd": {"deletion": 0.1},
                "metric_intervals": {"deletion": [0.152, 0.348]},
            },
            "rise": {"images": 4, "images_per_s": None, "metrics": {"deletion": None},
                     "metric_counts": {"deletion": 0}},  # a summary from before intervals
        },
    }  # fmt: skip
    assert _flat_metrics(summary) == {
        "inputs": 5,
        "images_ok": 4,
        "errors": 1,
        "lost": 0,
        "actor_restarts": 0,
        "gradcam.images_per_s": 2.5,
        "gradcam.deletion": 0.25,
        "gradcam.deletion.n": 4,
        "gradcam.deletion.sd": 0.1,
        "gradcam.deletion.ci_low": 0.152,
        "gradcam.deletion.ci_high": 0.348,
    }
    assert _summary_csv(summary) == (
        "explainer,images,images_per_s,deletion\ngradcam,4,2.5,0.25\nrise,4,,\n"  # no "None"
    )


def test_root_cause_is_the_first_useful_line():
    from pipeline.engine.job import _root_cause
    from pipeline.storage import StorageUnavailable

    wrapped = RuntimeError("ray.exceptions.RayTaskError: wrapper\nValueError: the real reason")
    assert _root_cause(wrapped) == "ValueError: the real reason"
    outage = RuntimeError("task failed")
    outage.__cause__ = StorageUnavailable("reading s3://b/k: storage unreachable after 6 attempts")
    assert _root_cause(outage) == "reading s3://b/k: storage unreachable after 6 attempts"
    assert _root_cause(RuntimeError("")) == "the Ray job failed (RuntimeError)"


def test_the_stored_plan_names_each_finished_blocks_inputs_and_the_changes(tmp_path):
    from pipeline.runstore.plan import read_plan, write_plan

    root = str(tmp_path / "run")
    items = _items(("a", "1"), ("b", "1"), ("c", "1"))
    items[0] = InputItem("a", "/data/a", label=3, meta={"folder": "x"}, version="1")
    blocks = make_blocks(items, 2)
    assert read_plan(root) is None and _as_dict(finished_inputs(root, None)) == {}
    write_plan(root, blocks)
    stored = read_plan(root)
    assert [(b.block_id, b.items) for b in stored] == [(b.block_id, b.items) for b in blocks]
    assert stored[0].items[0].label == 3 and stored[0].items[0].meta == {"folder": "x"}
    # the per-block shape Ray Data reads holds the same blocks, in the same order
    import pyarrow.parquet as pq

    from pipeline.runstore.layout import plan_blocks_uri
    from pipeline.runstore.plan import block_from_row

    feed = pq.read_table(plan_blocks_uri(root)).to_pylist()
    assert [block_from_row(r) for r in feed] == blocks
    assert [block_from_row(r).items[0].meta for r in feed] == [{"folder": "x"}, {}]
    write_block(root, BlockMarker(blocks[1].block_id), _tables(1))  # only (c) finished
    assert _as_dict(finished_inputs(root, stored)) == {blocks[1].block_id: {"c": "1"}}
    assert source_changes(stored, items, replanned=True) is None
    now = [items[0], InputItem("b", "/data/b", version="2"), InputItem("d", "/data/d")]
    assert source_changes(stored, now, replanned=True) == (
        "the source changed since this run was planned: 1 inputs added, 1 removed, 1 changed; "
        "the blocks they touch are computed again"
    )


def test_progress_eta_and_a_bounded_mlflow_series(monkeypatch):
    from pipeline.engine import progress as mod

    clock = [100.0]
    monkeypatch.setattr(mod.time, "perf_counter", lambda: clock[0])
    p = mod.Progress(total_blocks=40_000, done_before=10_000, started=clock[0])
    assert p.eta_s is None and "left" not in p.line()
    points = []
    for _ in range(30_000):
        clock[0] += 0.5  # a block every half second, 256 inputs each
        p.add(256)
        if point := p.series_point():
            points.append(point)
    assert p.finished == 40_000 and p.eta_s == 0
    assert p.images_per_s == 512
    # at most SERIES_POINTS (+ the start) points, whatever the number of blocks, the last at the end
    assert 140 <= len(points) <= mod.SERIES_POINTS + 1
    assert points[-1]["progress_blocks"] == 40_000
    assert not any("." in key for point in points for key in point)  # never gated as metrics
    clock[0] = 0.0
    halfway = mod.Progress(total_blocks=100, started=0.0)
    for _ in range(25):
        clock[0] += 2.0
        halfway.add(10)
    assert halfway.eta_s == 150.0  # 75 blocks at 2 s
    assert halfway.line() == "250 inputs in 50 s (5.00/s), about 2 min left"


def test_a_blocks_upload_overlaps_the_next_blocks_compute(tmp_path, tiny_block, monkeypatch):
    """Two calls on one actor (as the job runs them): the computes take turns, and the second
    block computes while the first one's files are still being written."""
    import threading
    import time

    from pipeline.engine import worker as worker_module

    worker, _, row = _worker(tmp_path, tiny_block, {"mode": "predicted"})
    spans: dict[str, list[tuple[float, float]]] = {"compute": [], "write": []}
    explain, write = worker.explain_block, worker_module.write_block

    def timed(kind, fn, *args, **kwargs):
        t0 = time.perf_counter()
        if kind == "write":
            time.sleep(1.0)  # a slow store
        out = fn(*args, **kwargs)
        spans[kind].append((t0, time.perf_counter()))
        return out

    monkeypatch.setattr(worker, "explain_block", lambda r: timed("compute", explain, r))
    monkeypatch.setattr(
        worker_module, "write_block", lambda *a, **k: timed("write", write, *a, **k)
    )
    rows = [{**row, "block_id": f"blk{i}"} for i in range(2)]
    threads = [threading.Thread(target=worker.process_block, args=(r,)) for r in rows]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    (a, b) = sorted(spans["compute"])
    assert a[1] <= b[0]  # one block computes at a time
    first_write = min(spans["write"])
    assert b[0] < first_write[1]  # the second computed while the first was uploading
    assert len(spans["write"]) == 2
