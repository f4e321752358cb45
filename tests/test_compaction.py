"""Compaction with real Ray Data: the rows read back are the same before and after, the files
are few, sorted and partitioned, and a crash at each step leaves a readable, resumable run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.runstore import (
    ERROR_SCHEMA,
    METRIC_SCHEMA,
    BlockMarker,
    finished_block_ids,
    heatmap_schema,
    heatmap_table,
    read_heatmap,
    read_markers,
    read_table,
    remove_stale_outputs,
    write_block,
)
from pipeline.runstore import compaction as compaction_module
from pipeline.runstore.commit import read_commit
from pipeline.runstore.compaction import compact, needs_compaction

SIZE = 4
EXPLAINERS = ("gradcam", "rise")


def _block(root: str, b: int, images: int = 3) -> str:
    """Block `b`: `images` images (ids interleaved across blocks, so sorting has work to do),
    each with a row per explainer, a metric row each, and an error row for every third."""
    schema = heatmap_schema(SIZE, "uint8")
    ids = [f"img{i * 7 + b:04d}" for i in range(images)]
    heat, metrics = [], []
    for j, image in enumerate(ids):
        for e in EXPLAINERS:
            row = dict.fromkeys(schema.names)
            row.update(
                image_id=image,
                explainer=e,
                target=b,
                heatmap=np.full((SIZE, SIZE), (b * 10 + j) % 255, np.uint8),
                map_min=0.0,
                map_max=1.0,
            )
            heat.append(row)
            metrics.append(
                {"image_id": image, "explainer": e, "target": b, "metric": "m", "value": b + j / 10}
            )
    errors = [
        {"image_id": f"bad{b:04d}", "stage": "decode", "fatal": True} for _ in range(b % 3 == 0)
    ]
    tables = {
        "heatmaps": heatmap_table(heat, schema),
        "metrics": pa.Table.from_pylist(metrics, schema=METRIC_SCHEMA),
        "errors": pa.Table.from_pylist(errors, schema=ERROR_SCHEMA),
    }
    bid = f"blk{b:02d}"
    write_block(root, BlockMarker(bid, n_inputs=images, images_ok=images), tables)
    return bid


def _rows(root: str, table: str) -> list[tuple]:
    t = read_table(root, table)
    if t.num_rows == 0:
        return []
    cols = [
        c
        for c in ("image_id", "explainer", "target", "metric", "value", "stage")
        if c in t.column_names
    ]
    out = [tuple(r[c] for c in cols) for r in t.select(cols).to_pylist()]
    if "heatmap" in t.column_names:
        maps = t.column("heatmap").combine_chunks().to_numpy_ndarray()
        out = [(*r, int(m[0, 0])) for r, m in zip(out, maps, strict=True)]
    return sorted(out)


def _files(root: str) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file())


@pytest.fixture
def run(tmp_path):
    root = str(tmp_path / "run")
    blocks = {_block(root, b) for b in range(6)}
    before = {t: _rows(root, t) for t in ("heatmaps", "metrics", "errors")}
    return root, blocks, before


def test_compaction_keeps_every_row_in_few_sorted_partitioned_files(ray_local, run):
    root, blocks, before = run
    assert needs_compaction(root, blocks)
    record = compact(root, blocks)
    assert not needs_compaction(root, blocks)
    for table, rows in before.items():
        assert _rows(root, table) == rows, table  # nothing lost, nothing twice
    files = _files(root)
    assert not [f for f in files if "part-" in f or f.startswith("_blocks/")]
    heat = [f for f in files if f.startswith("heatmaps/")]
    assert sorted({f.split("/")[1] for f in heat}) == ["explainer=gradcam", "explainer=rise"]
    assert len(heat) == 2 and len([f for f in files if f.startswith("errors/")]) == 1
    import pyarrow.parquet as pq

    for f in heat:  # each file sorted by image id
        ids = pq.read_table(Path(root) / f).column("image_id").to_pylist()
        assert ids == sorted(ids) and len(ids) == 18
    # markers, finished blocks and single heatmaps read alike from the compacted run
    assert finished_block_ids(root) == blocks == set(record.blocks)
    assert {m.block_id: m.n_inputs for m in read_markers(root, blocks)} == dict.fromkeys(blocks, 3)
    assert read_heatmap(root, "blk04", "img0011", "rise", 4)[0, 0] == pytest.approx(41 / 255)
    # DuckDB over the files as they lie (what the README shows)
    import duckdb

    ((n, mean),) = duckdb.sql(
        f"SELECT count(*), avg(value) FROM read_parquet('{root}/metrics/*/*.parquet', "
        "hive_partitioning=true) WHERE explainer = 'rise'"
    ).fetchall()
    assert n == 18 and mean == pytest.approx(
        np.mean([b + j / 10 for b in range(6) for j in range(3)])
    )


@pytest.mark.parametrize("crash_at", ["commit", "clean_up"])
def test_a_crash_during_compaction_leaves_a_readable_resumable_run(
    ray_local, run, monkeypatch, crash_at
):
    root, blocks, before = run
    target = {"commit": "write_commit", "clean_up": "_clean_up"}[crash_at]
    real = getattr(compaction_module, target)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt(f"driver killed before {crash_at}")

    monkeypatch.setattr(compaction_module, target, crash)
    with pytest.raises(KeyboardInterrupt):
        compact(root, blocks)
    monkeypatch.setattr(compaction_module, target, real)
    # readable: every row once, from the parts (no commit) or the committed files (parts of
    # the blocks they hold are ignored)
    for table, rows in before.items():
        assert _rows(root, table) == rows, (crash_at, table)
    assert finished_block_ids(root) == blocks
    assert (read_commit(root) is None) == (crash_at == "commit")
    # resumable: the next compaction finishes the job and leaves no stray file
    assert needs_compaction(root, blocks)
    compact(root, blocks)
    for table, rows in before.items():
        assert _rows(root, table) == rows
    record = read_commit(root)
    committed = {f for files in record.files.values() for f in files}
    data = {f for f in _files(root) if f.split("/")[0] in ("heatmaps", "metrics", "errors")}
    assert data == committed


def test_a_block_that_left_the_plan_is_gone_from_reads_then_from_the_files(ray_local, run):
    root, blocks, before = run
    compact(root, blocks)
    new = _block(root, 6)  # computed after the compaction: read from its part
    keep = (blocks - {"blk02"}) | {new}
    remove_stale_outputs(root, keep, set())
    gone = {f"img{i * 7 + 2:04d}" for i in range(3)} | {f"img{i * 7 + 6:04d}" for i in range(3)}
    rows = _rows(root, "heatmaps")
    assert {r[0] for r in rows} == ({r[0] for r in before["heatmaps"]} | gone) - {
        f"img{i * 7 + 2:04d}" for i in range(3)
    }
    assert len(rows) == len(before["heatmaps"])  # one block out, one in, same size
    compact(root, keep)
    assert _rows(root, "heatmaps") == rows
    import pyarrow.parquet as pq

    physical = pq.read_table(Path(root) / "heatmaps", partitioning="hive")
    assert "blk02" not in set(physical.column("block_id").to_pylist())
