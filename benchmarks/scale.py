"""What the job costs at scale, measured here on synthetic inputs (real ones would take hours).

    .venv/bin/python benchmarks/scale.py            # every case at the README's sizes
    .venv/bin/python benchmarks/scale.py --quick    # small sizes: a smoke run
    .venv/bin/python benchmarks/scale.py --case end_of_run --rows 1000000

Each case runs in its own process, so its peak RSS (the process's high-water mark) is its own:

  plan         a manifest of N rows -> the plan (list, blocks, `_plan/plan.parquet`)
  resume       a run with B finished blocks (plan stored, markers present): the time to know
               what to compute (read the plan, list the markers, plan), on local disk
  resume_s3    the same with the run on the local S3 endpoint (B = 5k): time and requests
  end_of_run   R heatmap rows in 256-image blocks with their markers (made by another
               process, `make_run`): the time and peak RSS of folding the markers (summary +
               digest) and rendering report.html
  compaction   the same run compacted: files left, objects per million images, and a DuckDB
               query (mean metric per class for one explainer) over the compacted files
  view         `salient view` over the compacted run of R heatmap rows: open, each page's
               query (median of 5), the two-run map fingerprints, a page of the changes
  listing      N keys under ~1,000 prefixes of the tests' local S3 endpoint (moto, in a
               process of its own): `_files_under` (parallel over prefixes) vs one serial
               `fs.find`, in seconds and LIST requests, as the endpoint answers and with a
               store's latency added to every LIST page
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BLOCK = 256
EXPLAINERS = ("gradcam", "rise")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case_plan(n: int, work: Path) -> dict:
    from pipeline.engine.job import plan_run
    from pipeline.runstore.plan import write_plan
    from pipeline.sources.listing import list_inputs
    from pipeline.spec import parse_spec

    manifest = work / "manifest.parquet"
    schema = pa.schema([("uri", pa.string()), ("label", pa.int64()), ("etag", pa.string())])
    with pq.ParquetWriter(manifest, schema) as writer:  # in slices: the peak is the plan's
        for start in range(0, n, 100_000):
            rows = range(start, min(n, start + 100_000))
            uris = pa.array([f"s3://bucket/images/{i // 1000:05d}/{i:08d}.jpg" for i in rows])
            labels = pa.array(np.arange(rows.start, rows.stop) % 1000)
            writer.write_table(pa.table({"uri": uris, "label": labels, "etag": uris}, schema))
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    items = list_inputs(str(manifest), "manifest")
    spec = parse_spec(
        {
            "source": {"uri": str(manifest), "format": "manifest"},
            "explainers": [{"name": "gradcam"}],
            "compute": {"block_size": BLOCK},
        }
    )
    plan = plan_run(spec, items, {})
    write_plan(str(work / "run"), plan.blocks)
    seconds = time.perf_counter() - t0
    return {
        "rows": n,
        "blocks": len(plan.blocks),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss_before,
    }


def _synthetic_run(root: Path, rows: int, with_parts: bool = True) -> list[str]:
    """A run folder of rows/BLOCK blocks as the worker writes them: heatmap (8x8 uint8),
    metric and marker (with its digest) per block; the plan too."""
    from pipeline.runstore import (
        METRIC_SCHEMA,
        BlockMarker,
        Digest,
        heatmap_schema,
        heatmap_table,
        write_block,
    )
    from pipeline.runstore.plan import write_plan
    from pipeline.sources.inputs import Block, InputItem

    schema = heatmap_schema(8, "uint8")
    rng = np.random.default_rng(0)
    blocks, plan = [], []
    per_block = BLOCK * len(EXPLAINERS)
    for b in range(max(1, rows // per_block)):
        bid = f"b{b:07d}"
        heat, metrics = [], []
        ids = [f"img{b * BLOCK + i:09d}" for i in range(BLOCK)]
        for image in ids:
            cls = int(rng.integers(1000))
            for e in EXPLAINERS:
                heat.append(
                    {
                        "run_id": "r",
                        "image_id": image,
                        "source_uri": f"/nowhere/{image}.jpg",
                        "source_member": None,
                        "model_id": "m",
                        "explainer": e,
                        "method": e,
                        "target": cls,
                        "target_name": f"class{cls}",
                        "target_rank": 0,
                        "score": float(rng.random()),
                        "predicted": cls,
                        "predicted_name": "",
                        "label": cls,
                        "heatmap": rng.integers(0, 255, (8, 8), dtype=np.uint8),
                        "h": 8,
                        "w": 8,
                        "map_min": 0.0,
                        "map_max": 1.0,
                        "forward_passes": 1,
                    }
                )
                metrics.append(
                    {
                        "run_id": "r",
                        "image_id": image,
                        "explainer": e,
                        "target": cls,
                        "metric": "pointing_game",
                        "value": float(rng.random() < 0.7),
                    }
                )
        tables = {
            "heatmaps": heatmap_table(heat, schema),
            "metrics": pa.Table.from_pylist(metrics, schema=METRIC_SCHEMA),
            "errors": _empty_errors(),
        }
        state = {
            "name": "pointing_game",
            "params": {},
            "state": {"n": BLOCK, "total": sum(m["value"] for m in metrics) / 2},
        }
        marker = BlockMarker(
            bid,
            n_inputs=BLOCK,
            images_ok=BLOCK,
            rows={"heatmaps": len(heat), "metrics": len(metrics), "errors": 0},
            images=dict.fromkeys(EXPLAINERS, BLOCK),
            seconds=dict.fromkeys(EXPLAINERS, 1.0),
            forward_passes=dict.fromkeys(EXPLAINERS, BLOCK),
            metric_states={e: {"pointing_game": state} for e in EXPLAINERS},
            digest=Digest.of_block(bid, heat, metrics, []),
        )
        if with_parts:
            write_block(str(root), marker, tables)
        blocks.append(bid)
        plan.append(Block(bid, tuple(InputItem(i, f"/nowhere/{i}.jpg", version="1") for i in ids)))
    write_plan(str(root), plan)
    return blocks


def _empty_errors():
    from pipeline.runstore import ERROR_SCHEMA

    return ERROR_SCHEMA.empty_table()


def case_end_of_run(rows: int, work: Path) -> dict:
    from pipeline.engine.summary import RunTotals
    from pipeline.report.html import ReportInputs, render_report
    from pipeline.runstore import read_markers
    from pipeline.spec import parse_spec

    root = work / "run"
    blocks = json.loads((work / "blocks.json").read_text())  # made by case_make_run
    spec = parse_spec(
        {
            "source": {"uri": "x"},
            "explainers": [{"name": e} for e in EXPLAINERS],
            "metrics": [{"name": "pointing_game"}],
        }
    )
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    totals = RunTotals(spec)
    for marker in read_markers(str(root), blocks):
        totals.add(marker, computed=True)
    summary = totals.summary("r", 1.0, 1.0)
    page = render_report(ReportInputs(str(root), summary, totals.digest, n_thumbs=4))
    seconds = time.perf_counter() - t0
    return {
        "rows": rows,
        "blocks": len(blocks),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss_before,
        "report_kb": len(page) / 1024,
    }


def case_resume(blocks: int, work: Path) -> dict:
    """A resume of a run whose B blocks all finished: the default path (keep the stored plan:
    read it, list the markers' names) and `--replan` (plan again over an unchanged listing)."""
    from pipeline.engine.job import Plan, finished_inputs, plan_run
    from pipeline.runstore import finished_block_ids
    from pipeline.runstore.plan import read_plan
    from pipeline.sources.inputs import Inputs
    from pipeline.spec import parse_spec

    root = work / "run"
    if not (root / "_plan").exists():  # made by another process: this one's peak is the resume's
        run_case("make_resume_run", blocks, work)
    spec = parse_spec(
        {
            "source": {"uri": "x"},
            "explainers": [{"name": "gradcam"}],
            "compute": {"block_size": BLOCK},
        }
    )
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    stored = read_plan(str(root))
    done = finished_block_ids(str(root)) & set(stored.ids)
    kept = Plan(stored, done, [], set())
    seconds = time.perf_counter() - t0
    assert len(kept.done) == blocks and not kept.todo
    rss_kept = peak_rss_mb()
    t1 = time.perf_counter()
    items = Inputs(stored.inputs)  # the listing, as unchanged inputs
    plan = plan_run(spec, items, finished_inputs(str(root), stored))
    replan = time.perf_counter() - t1
    assert len(plan.done) == blocks and not plan.todo
    return {
        "blocks": blocks,
        "images": blocks * BLOCK,
        "seconds": seconds,
        "peak_rss_mb": rss_kept,
        "rss_before_mb": rss_before,
        "replan_seconds": replan,
        "replan_peak_rss_mb": peak_rss_mb(),
    }


def case_make_resume_run(blocks: int, work: Path) -> dict:
    """The run `resume` reads: B finished blocks (the plan and the markers' names, no parts)."""
    root = work / "run"
    _synthetic_run(root, blocks * BLOCK * len(EXPLAINERS), with_parts=False)
    (root / "_blocks").mkdir(parents=True, exist_ok=True)
    for b in range(blocks):  # the markers' names are what a resume lists
        (root / "_blocks" / f"b{b:07d}.json").write_text("{}")
    return {"blocks": blocks}


def case_make_run(rows: int, work: Path) -> dict:
    """The synthetic run end_of_run and compaction read, made in a process of its own."""
    blocks = _synthetic_run(work / "run", rows)
    (work / "blocks.json").write_text(json.dumps(blocks))
    return {"rows": rows, "blocks": len(blocks)}


def case_compaction(rows: int, work: Path) -> dict:
    import duckdb
    import ray

    from pipeline.runstore.compaction import compact

    root = work / "run"
    blocks = json.loads((work / "blocks.json").read_text())  # made by case_make_run
    ray.init(
        num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR"
    )
    t0 = time.perf_counter()
    record = compact(str(root), set(blocks))
    seconds = time.perf_counter() - t0
    files = sum(len(f) for f in record.files.values()) + 1  # + the folded markers
    images = len(blocks) * BLOCK
    t1 = time.perf_counter()
    result = duckdb.sql(
        f"SELECT target_name, avg(value) FROM read_parquet('{root}/metrics/*/*.parquet', "
        "hive_partitioning=true) m JOIN (SELECT DISTINCT image_id, target, target_name FROM "
        f"read_parquet('{root}/heatmaps/explainer=rise/*.parquet')) h USING (image_id, target) "
        "WHERE m.explainer = 'rise' GROUP BY target_name"
    ).fetchall()
    query = time.perf_counter() - t1
    return {
        "rows": rows,
        "images": images,
        "seconds": seconds,
        "files": files,
        "objects_per_million_images": files * 1e6 / images,
        "classes": len(result),
        "duckdb_seconds": query,
        "peak_rss_mb": peak_rss_mb(),
    }


def case_view(rows: int, work: Path) -> dict:
    """`salient view` over the compacted run: opening it, then each page's queries (median of
    5), the two-run fingerprints (the run against itself) and a page of the changes."""
    import statistics

    import ray

    from pipeline.runstore.compaction import compact
    from pipeline.storage import Storage
    from pipeline.view.changes import map_changes
    from pipeline.view.run_index import GridQuery, RunIndex

    root = work / "run"
    blocks = json.loads((work / "blocks.json").read_text())  # made by case_make_run
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")  # fmt: skip
    compact(str(root), set(blocks))
    ray.shutdown()
    summary = {"run_id": "r", "inputs": len(blocks) * BLOCK, "images_ok": len(blocks) * BLOCK,
               "errors": 0, "lost": 0, "explainers": {e: {"images": 0, "metrics": {}}
                                                     for e in EXPLAINERS},
               "metrics": [{"key": "pointing_game", "name": "pointing_game",
                            "higher_is_better": True}]}  # fmt: skip
    (root / "summary.json").write_text(json.dumps(summary))
    t0 = time.perf_counter()
    index = RunIndex(str(root))
    opened = time.perf_counter() - t0
    some = f"img{len(blocks) * BLOCK // 2:09d}"
    target = index.image(some)[0]["target"]
    queries = {
        "classes": index.classes,
        "grid_first_page": lambda: index.grid(GridQuery()),
        "grid_class_explainer_by_metric": lambda: index.grid(
            GridQuery(cls="7", explainer="rise", metric="pointing_game", sort="metric")
        ),
        "grid_metric_range_page_100": lambda: index.grid(
            GridQuery(metric="pointing_game", low=0.5, high=1.0, sort="score", page=100)
        ),
        "grid_wrong_predictions": lambda: index.grid(GridQuery(outcome="wrong")),
        "image": lambda: index.image(some),
        "heatmap_row": lambda: index.heatmap(some, "rise", target),
        "errors": index.errors,
    }
    seconds = {}
    for name, fn in queries.items():
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        seconds[name] = statistics.median(times)
    t = time.perf_counter()
    changes = map_changes(str(root), str(root), Storage())
    fingerprints = time.perf_counter() - t
    index.register_table("changes", changes)
    t = time.perf_counter()
    index.query("SELECT * FROM changes ORDER BY distance DESC, image_id LIMIT 48")
    seconds["changes_page"] = time.perf_counter() - t
    return {
        "rows": rows,
        "open_seconds": opened,
        "query_seconds": seconds,
        "slowest_query_seconds": max(seconds.values()),
        "changes_build_seconds": fingerprints,
        "peak_rss_mb": peak_rss_mb(),
    }


LISTING_PREFIXES = 1000
LISTING_LATENCY_MS = 50  # a ListObjectsV2 page's latency on a real store is 10s to 100s of ms


class _RequestCounter:
    """Wraps the endpoint's WSGI app as the tests' RequestLog does: LIST, GET, HEAD and other
    requests counted, how many ran at once, and a latency added to every LIST page."""

    def __init__(self, app):
        import threading

        self.app, self.latency_s, self.lock = app, 0.0, threading.Lock()
        self.reset()

    def reset(self):
        self.counts = {"LIST": 0, "GET": 0, "HEAD": 0, "other": 0}
        self.in_flight = self.max_in_flight = 0

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        is_list = method == "GET" and "list-type=" in environ.get("QUERY_STRING", "")
        kind = "LIST" if is_list else method if method in ("GET", "HEAD") else "other"
        with self.lock:
            self.counts[kind] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if is_list and self.latency_s:
                time.sleep(self.latency_s)
            return [b"".join(self.app(environ, start_response))]
        finally:
            with self.lock:
                self.in_flight -= 1


def _index_listing(bucket_name: str, names: list[str]) -> None:
    """Make moto answer ListObjectsV2 for `bucket_name` from `names`, the sorted names of its
    keys (the benchmark changes no key after it stored them). moto itself scans
    and sorts the whole bucket for every page, O(bucket) per request on one GIL: at 200k keys
    that, not the lister, is what would be measured. A real store's page costs O(page)."""
    import bisect

    from moto.s3.models import S3Backend

    original = S3Backend.list_objects_v2
    resume: dict[str, str] = {}  # continuation token -> the key or common prefix to list after

    def after_all(prefix: str) -> str:  # the least name above every name under prefix
        return prefix[:-1] + chr(ord(prefix[-1]) + 1)

    def list_objects_v2(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys):
        if bucket.name != bucket_name:
            return original(
                self, bucket, prefix, delimiter, continuation_token, start_after, max_keys
            )
        prefix = prefix or ""
        i = bisect.bisect_left(names, prefix)
        if continuation_token and continuation_token.startswith("prefix-"):
            i = max(i, bisect.bisect_left(names, after_all(resume[continuation_token])))
        elif continuation_token or start_after:
            i = max(i, bisect.bisect_right(names, resume.get(continuation_token, start_after)))
        out: list = []
        while i < len(names) and len(out) <= max_keys and names[i].startswith(prefix):
            cut = names[i].find(delimiter, len(prefix)) if delimiter else -1
            if cut < 0:
                out.append(bucket.keys[names[i]])
                i += 1
                continue
            common = names[i][: cut + len(delimiter)]
            out.append(common)
            i = bisect.bisect_left(names, after_all(common))
        if len(out) <= max_keys:
            return out, False, None
        out = out[:max_keys]
        last = out[-1]
        token = f"{'prefix' if isinstance(last, str) else 'key'}-{len(resume)}"
        resume[token] = last if isinstance(last, str) else last.name
        return out, True, token

    S3Backend.list_objects_v2 = list_objects_v2


def _s3_endpoint(conn, bucket: str, keys: list[str]) -> None:
    """The tests' local S3 endpoint (moto's ThreadedMotoServer) in a process of its own, so
    that it does not share the lister's GIL; `keys` are stored before it answers the first
    listing, straight into moto's in-memory store (concurrent PUTs if that is not there).
    Then it answers commands on `conn`: ("latency", s), "reset", "counts", "stop"."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    counter = _RequestCounter(server._server.app)
    server._server.app = counter  # werkzeug calls server.app for every request
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    t0 = time.perf_counter()
    try:
        from moto.s3.models import s3_backends

        partition, account = s3_backends.bucket_accounts[bucket]
        backend = s3_backends[account][partition]
        for key in keys:
            backend.put_object(bucket, key, b"")
        how = "moto backend"
    except (ImportError, KeyError, AttributeError, TypeError):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b""), keys))
        how = "concurrent PUTs"
    if os.environ.get("SALIENT_BENCH_MOTO_LISTING") != "as-is":
        _index_listing(bucket, sorted(keys))
        how += ", indexed listing"
    conn.send((endpoint, how, time.perf_counter() - t0))
    while (cmd := conn.recv()) != "stop":
        if cmd == "counts":
            cpu = {"max_in_flight": counter.max_in_flight, "cpu_s": time.process_time()}
            conn.send({**counter.counts, **cpu})
            continue
        if cmd == "reset":
            counter.reset()
        else:
            counter.latency_s = cmd[1]
        conn.send(None)
    server.stop()


def case_listing(n: int, work: Path) -> dict:
    import multiprocessing

    from pipeline.sources.listing import LISTING_THREADS, _files_under
    from pipeline.storage import Storage

    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench-key-id",
            "AWS_SECRET_ACCESS_KEY": "bench-secret-value-0123",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    bucket, prefixes = "bench-listing", min(LISTING_PREFIXES, max(1, n // 10))
    keys = [f"images/p{i % prefixes:04d}/{i:09d}.jpg" for i in range(n)]
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    endpoint_process = spawn.Process(target=_s3_endpoint, args=(theirs, bucket, keys))
    endpoint_process.start()
    del keys
    endpoint, how, populate_s = ours.recv()

    def ask(cmd):
        ours.send(cmd)
        return ours.recv()

    uri = f"s3://{bucket}/images/"
    fs, root = Storage(endpoint_url=endpoint).filesystem(uri)
    result = {
        "keys": n,
        "prefixes": prefixes,
        "populate": how,
        "populate_seconds": populate_s,
        "threads": LISTING_THREADS,
    }
    try:
        for latency_ms in (0, LISTING_LATENCY_MS):
            ask(("latency", latency_ms / 1000))
            ask("reset")
            server0, cpu0, t0 = ask("counts")["cpu_s"], time.process_time(), time.perf_counter()
            parallel = _files_under(uri, Storage(endpoint_url=endpoint))[2]
            parallel_s, parallel_cpu = time.perf_counter() - t0, time.process_time() - cpu0
            counts = ask("counts")
            ask("reset")
            server1, cpu0, t0 = ask("counts")["cpu_s"], time.process_time(), time.perf_counter()
            serial = fs.find(root, detail=True)
            serial_s, serial_cpu = time.perf_counter() - t0, time.process_time() - cpu0
            serial_counts = ask("counts")
            assert len(parallel) == n and parallel == {p: serial[p] for p in sorted(serial)}
            del parallel, serial
            tag = f"latency{latency_ms}ms"
            result |= {
                f"{tag}_parallel_seconds": parallel_s,
                f"{tag}_serial_seconds": serial_s,
                f"{tag}_speedup": serial_s / parallel_s,
                f"{tag}_parallel_lists": counts["LIST"],
                f"{tag}_parallel_heads": counts["HEAD"],
                f"{tag}_serial_lists": serial_counts["LIST"],
                f"{tag}_max_in_flight": counts["max_in_flight"],
                # CPU seconds of the lister's process and of the endpoint's
                f"{tag}_parallel_cpu": [parallel_cpu, counts["cpu_s"] - server0],
                f"{tag}_serial_cpu": [serial_cpu, serial_counts["cpu_s"] - server1],
            }
    finally:
        ours.send("stop")
        endpoint_process.join(30)
    return result | {"peak_rss_mb": peak_rss_mb()}


def case_resume_s3(blocks: int, work: Path) -> dict:
    """A resume whose run lives on the tests' local S3 endpoint (moto, in a process of its
    own): B finished blocks' plan and markers. The time and requests until the first new block
    could start: read `_plan/`, list the markers' names, decide."""
    import multiprocessing

    import boto3

    from pipeline.engine.job import Plan
    from pipeline.runstore import finished_block_ids
    from pipeline.runstore.plan import read_plan
    from pipeline.storage import Storage

    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench-key-id",
            "AWS_SECRET_ACCESS_KEY": "bench-secret-value-0123",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    local = work / "run"
    if not (local / "_plan").exists():
        run_case("make_resume_run", blocks, work)
    bucket = "bench-resume"
    markers = [f"run/_blocks/{p.name}" for p in sorted((local / "_blocks").iterdir())]
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    endpoint_process = spawn.Process(target=_s3_endpoint, args=(theirs, bucket, markers))
    endpoint_process.start()
    endpoint, _, _ = ours.recv()

    def ask(cmd):
        ours.send(cmd)
        return ours.recv()

    try:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for name in ("plan.parquet", "blocks.parquet"):
            body = (local / "_plan" / name).read_bytes()
            s3.put_object(Bucket=bucket, Key=f"run/_plan/{name}", Body=body)
        root = f"s3://{bucket}/run"
        ask("reset")
        t0 = time.perf_counter()
        store = Storage(endpoint_url=endpoint)
        stored = read_plan(root, store)
        done = finished_block_ids(root, store) & set(stored.ids)
        plan = Plan(stored, done, [], set())
        seconds = time.perf_counter() - t0
        counts = ask("counts")
        assert len(plan.done) == blocks and not len(plan.todo)
    finally:
        ours.send("stop")
        endpoint_process.join(30)
    return {
        "blocks": blocks,
        "images": blocks * BLOCK,
        "seconds": seconds,
        "lists": counts["LIST"],
        "gets": counts["GET"],
        "heads": counts["HEAD"],
        "peak_rss_mb": peak_rss_mb(),
    }


CASES = {
    "make_run": case_make_run,
    "make_resume_run": case_make_resume_run,
    "plan": case_plan,
    "end_of_run": case_end_of_run,
    "resume": case_resume,
    "resume_s3": case_resume_s3,
    "compaction": case_compaction,
    "listing": case_listing,
    "view": case_view,
}


def run_case(case: str, size: int, work: Path | None = None) -> dict:
    """One case in a fresh process (its own peak RSS)."""
    where = ["--work", str(work)] if work else []
    out = subprocess.run(
        [sys.executable, __file__, "--case", case, "--size", str(size), *where],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{case} ({size}) failed:\n{out.stderr[-3000:]}")
    # the result is the last JSON line (Ray may print after it)
    return json.loads(next(ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES))
    ap.add_argument("--size", type=int)
    ap.add_argument("--work", type=Path, help="the folder a case reads and writes")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", choices=sorted(CASES), help="these cases at their sizes")
    args = ap.parse_args()
    if args.case:
        work = args.work or Path(tempfile.mkdtemp(prefix="salient-scale-"))
        print(json.dumps(CASES[args.case](args.size, work)))
        return
    sizes = {
        "plan": [100_000] if args.quick else [10_000_000],
        "resume": [1_000] if args.quick else [20_000],
        "resume_s3": [500] if args.quick else [5_000],
        "end_of_run": [20_000, 200_000] if args.quick else [100_000, 1_000_000],
        "compaction": [20_000] if args.quick else [1_000_000],
        "listing": [20_000] if args.quick else [200_000],
        "view": [20_000] if args.quick else [1_000_000],
    }
    for case, ns in sizes.items():
        if args.only and case not in args.only:
            continue
        for n in ns:
            work = None
            if case in ("end_of_run", "compaction", "view"):  # their run is made by another process
                work = Path(tempfile.mkdtemp(prefix="salient-scale-"))
                run_case("make_run", n, work)
            print(case, json.dumps(run_case(case, n, work)), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
