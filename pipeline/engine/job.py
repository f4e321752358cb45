"""The distributed job: spec -> inputs -> Ray Data (decode tasks -> model actors) -> Parquet per
block -> summary and MLflow. Data flows one way; the driver only lists inputs, skips finished
blocks, watches progress and merges the blocks' markers into the summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from ..report.html import ReportInputs, render_report
from ..runstore import (
    BlockMarker,
    Digest,
    finished_block_ids,
    finished_blocks,
    read_markers,
    remove_stale_outputs,
    run_root,
)
from ..runstore.commit import read_commit
from ..runstore.compaction import compact, needs_compaction
from ..runstore.layout import plan_blocks_uri
from ..runstore.plan import (
    block_from_row,
    blocks_from_plan_table,
    plan_table,
    read_plan,
    write_plan,
)
from ..secrets import redact
from ..sources.annotations import load_annotations, to_model_space
from ..sources.inputs import (
    ALL_SAMPLES,
    INPUT_SCHEMA,
    Blocks,
    InputItem,
    Inputs,
    make_blocks,
)
from ..sources.listing import list_inputs
from ..spec import JobSpec, flatten
from ..storage import Storage, StorageUnavailable, absolute_uri, pause_on_outage
from ..tracking import JobTracker
from ..tracking.compare import direction_tags
from ..tracking.mlflow_run import code_version
from .preflight import preflight
from .progress import Progress
from .summary import RunTotals, metric_directions
from .worker import ExplainWorker


class JobFailed(RuntimeError):
    """The job could not complete; the message says why. Finished blocks are kept for resume."""


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C: `saved` of `total` blocks are finished on storage; the same spec resumes."""

    def __init__(self, saved: int, total: int):
        super().__init__(f"interrupted: {saved}/{total} blocks saved")
        self.saved, self.total = saved, total


@dataclass
class JobResult:
    run_id: str
    root: str
    mlflow_run_id: str | None
    summary: dict = field(default_factory=dict)
    digest: Digest = field(default_factory=Digest)
    gate: dict | None = None  # the regression gate's verdict when the spec has compare_to


def default_run_id(spec: JobSpec) -> str:
    """Same spec -> same run id, so running the same command again resumes the same run."""
    data = spec.model_dump(mode="json", exclude={"tracking", "compute", "compare_to"})
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    return f"run-{digest}"


def list_job_inputs(spec: JobSpec) -> Inputs:
    """The inputs of the job, sorted, with their annotations and versions."""
    src = spec.source
    items = list_inputs(
        src.uri,
        src.format,
        image_column=src.image_column,
        label_column=src.label_column,
        storage=Storage.from_spec(spec.storage),
    )
    if src.limit:
        items = items[: src.limit]
    if not len(items):
        raise JobFailed(f"source.uri: no inputs found under {src.uri!r}")
    if src.annotations:
        annotations = _by_image_id(
            load_annotations(src.annotations, Storage.from_spec(spec.storage)),
            items.image_ids.to_pylist(),
        )
        items = Inputs.from_items(_annotated(it, annotations.get(it.image_id)) for it in items)
    return items


def plan_blocks(spec: JobSpec) -> Blocks:
    """The blocks of a fresh run (no earlier attempt)."""
    return plan_run(spec, list_job_inputs(spec), {}).blocks


def _annotated(it: InputItem, annotation: dict | None) -> InputItem:
    """The item with its annotation; the annotation is part of its version, so a block scored
    against an edited annotation is recomputed."""
    digest = hashlib.sha256(json.dumps(annotation, sort_keys=True).encode()).hexdigest()[:12]
    return InputItem(
        it.image_id,
        it.uri,
        it.member,
        it.label,
        {**it.meta, "annotation": annotation},
        f"{it.version}+a{digest}" if annotation is not None else it.version,
    )


# what an earlier attempt finished: one row per input of each finished block
FINISHED_SCHEMA = pa.schema(
    [("block_id", pa.string()), ("image_id", pa.string()), ("version", pa.string())]
)


@dataclass
class Plan:
    """The blocks of this attempt: those an earlier attempt finished on the same inputs
    (`done`: their ids) and those to compute; `stale` are finished blocks whose inputs
    changed or went away, and `stale_images` their image ids (their files must go)."""

    blocks: Blocks
    done: set[str]  # ids of the blocks an earlier attempt finished, kept
    stale: list[str]
    stale_images: set[str]

    @property
    def todo(self) -> Blocks:
        return self.blocks.select(set(self.todo_ids))

    @property
    def todo_ids(self) -> list[str]:
        """The ids of the blocks to compute, in plan order (no copy of their rows)."""
        return [bid for bid in self.blocks.ids if bid not in self.done]


def plan_run(
    spec: JobSpec,
    items: Inputs | list[InputItem],
    finished: pa.Table | dict[str, dict[str, str]],
) -> Plan:
    """Keep every finished block whose inputs are all still listed with the same version; cut
    the other inputs (new, changed, or left over from a block that changed) into new blocks.
    The same inputs give the same blocks, so a fresh run and a resumed one hold the same rows.
    Column by column: a replan of 10M inputs makes no Python object per input."""
    inputs = Inputs.of(items).table
    finished = _finished_table(finished)
    kept, stale = _kept_blocks(inputs, finished)
    kept_rows = _rows_of(finished, kept)
    covered = kept_rows.column("image_id")
    stale_rows = _rows_of(finished, stale)
    leftover = stale_rows.filter(pc.invert(pc.is_in(stale_rows.column("image_id"), covered)))
    stale_images = set(pc.drop_null(leftover.column("image_id")).to_pylist())
    if not kept:  # a fresh plan: the inputs as they are, no copy
        fresh = make_blocks(Inputs(inputs), spec.compute.block_size)
        return Plan(fresh, set(), stale, stale_images)
    # the kept blocks hold the inputs as listed now (same versions), grouped by block
    now = inputs.join(kept_rows.select(["image_id", "block_id"]), "image_id", join_type="inner")
    now = now.sort_by([("block_id", "ascending"), ("image_id", "ascending")])
    kept_blocks = blocks_from_plan_table(now.select(["block_id", *INPUT_SCHEMA.names]))
    rest = inputs.filter(pc.invert(pc.is_in(inputs.column("image_id"), covered)))
    fresh = make_blocks(Inputs(rest), spec.compute.block_size)
    blocks = Blocks.concat([kept_blocks, fresh]).sorted_by_first_image()
    return Plan(blocks, set(kept), stale, stale_images)


def _finished_table(finished: pa.Table | dict[str, dict[str, str]]) -> pa.Table:
    if isinstance(finished, pa.Table):
        return finished
    rows = [(bid, i, v) for bid, inputs in finished.items() for i, v in inputs.items()]
    columns = list(zip(*rows, strict=True)) if rows else [[], [], []]
    table = pa.table(dict(zip(FINISHED_SCHEMA.names, columns, strict=True)), FINISHED_SCHEMA)
    # a marker with no inputs finished nothing that can be kept: a row of its own, no image
    empty = [bid for bid, inputs in finished.items() if not inputs]
    if empty:
        blank = pa.table(
            {"block_id": empty, "image_id": [None] * len(empty), "version": [None] * len(empty)},
            FINISHED_SCHEMA,
        )
        table = pa.concat_tables([table, blank])
    return table


def _rows_of(table: pa.Table, block_ids) -> pa.Table:
    """The rows of `table` that belong to the blocks `block_ids`."""
    ids = pa.array(sorted(block_ids), pa.string())
    return table.filter(pc.is_in(table.column("block_id"), ids))


def _kept_blocks(inputs: pa.Table, finished: pa.Table) -> tuple[set[str], list[str]]:
    """(ids of the finished blocks kept, ids of the stale ones, sorted): a block is kept when
    every one of its inputs is listed now with the same version and no block before it (by
    id) kept one of them."""
    if finished.num_rows == 0:
        return set(), []
    current = inputs.select(["image_id", "version"]).rename_columns(["image_id", "current"])
    joined = finished.join(current, "image_id", join_type="left outer")
    same = pc.fill_null(pc.equal(joined.column("version"), joined.column("current")), False)
    verdict = (
        pa.table({"block_id": joined.column("block_id"), "same": same})
        .group_by("block_id")
        .aggregate([("same", "all")])
    )
    ids = verdict.column("block_id").to_pylist()
    unchanged = verdict.column("same_all").to_pylist()
    candidates = {bid for bid, ok in zip(ids, unchanged, strict=True) if ok}
    # an image in two unchanged blocks (leftovers of an earlier plan): the first by id keeps it
    rows = _rows_of(finished, candidates)
    counts = rows.group_by("image_id").aggregate([("block_id", "count")])
    shared = counts.filter(pc.greater(counts.column("block_id_count"), 1)).column("image_id")
    if len(shared):
        clashing = rows.filter(pc.is_in(rows.column("image_id"), shared))
        contested = sorted(set(clashing.column("block_id").to_pylist()))
        members = _rows_of(rows, contested)
        by_block: dict[str, set[str]] = {}
        for bid, image_id in zip(
            members.column("block_id").to_pylist(),
            members.column("image_id").to_pylist(),
            strict=True,
        ):
            by_block.setdefault(bid, set()).add(image_id)
        taken: set[str] = set()
        for bid in contested:
            if taken.isdisjoint(by_block[bid]):
                taken.update(by_block[bid])
            else:
                candidates.discard(bid)
    return candidates, sorted(set(ids) - candidates)


def finished_inputs(root: str, stored: Blocks | None, storage: Storage = Storage()) -> pa.Table:
    """(block_id, image_id, version) of every input of every block an earlier attempt
    finished: from the stored plan (one listing of the markers' names, no marker read); a run
    written before plans were stored has them in its markers."""
    if stored is None:
        markers = finished_blocks(root, storage)
        return _finished_table({bid: m.inputs for bid, m in markers.items()})
    done = finished_block_ids(root, storage)
    return _rows_of(plan_table(stored).select(FINISHED_SCHEMA.names), done)


def source_changes(
    stored: Blocks | None, items: Inputs | list[InputItem], replanned: bool
) -> str | None:
    """One line on how the inputs differ from the stored plan's; None when they do not.
    `replanned`: the plan was cut again from `items` (else the run kept its plan)."""
    if stored is None:
        return None
    before = stored.inputs.select(["image_id", "version"])
    now = Inputs.of(items).table.select(["image_id", "version"])
    added = len(now) - pc.sum(pc.is_in(now.column("image_id"), before.column("image_id"))).as_py()
    removed = (
        len(before) - pc.sum(pc.is_in(before.column("image_id"), now.column("image_id"))).as_py()
    )
    both = before.join(now.rename_columns(["image_id", "now"]), "image_id", join_type="inner")
    changed = pc.sum(pc.not_equal(both.column("version"), both.column("now"))).as_py() or 0
    if not (added or removed or changed):
        return None
    then = (
        "the blocks they touch are computed again"
        if replanned
        else "this run kept its plan: run it with --replan to compute the changes"
    )
    return (
        f"the source changed since this run was planned: {added} inputs added, {removed} "
        f"removed, {changed} changed; {then}"
    )


def expand_run_id(template: str) -> str:
    """`nightly-{date}` -> `nightly-2026-11-24` (UTC), so a schedule gets one run per day."""
    now = time.gmtime()
    return template.format(date=time.strftime("%Y-%m-%d", now), time=time.strftime("%H%M%S", now))


def _by_image_id(annotations: dict[str, dict], ids: list[str]) -> dict[str, dict]:
    """Annotation keys are paths relative to wherever the annotation file was made; match
    them to image ids exactly, else by the id being a path suffix of the key."""
    by_suffix = {}
    for key, ann in annotations.items():
        parts = key.split("/")
        for i in range(len(parts)):
            by_suffix.setdefault("/".join(parts[i:]), ann)
    out = {}
    for image_id in ids:
        ann = annotations.get(image_id) or by_suffix.get(image_id)
        if ann is not None:
            out[image_id] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in ann.items()}
    return out


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    progress=None,
    on_plan=None,
    replan: bool = False,
) -> JobResult:
    """Run (or resume) the job. A resume keeps the stored plan (no listing before the compute;
    the source is listed beside it and `summary["source_changes"]` says how it changed);
    `replan` lists the source first and cuts a new plan over what is there now, keeping the
    finished blocks whose inputs are unchanged. `on_plan(finished, total, source_changes)` is
    called once the blocks are known (source_changes: a line when replanning found changes),
    `progress(marker, Progress)` as each block finishes."""
    run_id = expand_run_id(spec.run_id) if spec.run_id else default_run_id(spec)
    root = run_root(spec.output.uri, run_id)
    storage = Storage.from_spec(spec.storage)
    t_start = time.perf_counter()
    _apply_overwrite_policy(spec, root, storage)
    tracker = JobTracker(spec.tracking.uri, spec.tracking.experiment, run_id, spec.tracking.enabled)
    blocks = Blocks.empty()
    listing = None
    try:
        stored = read_plan(root, storage)
        if stored is None or replan:
            items = list_job_inputs(spec)
        else:
            # a resume keeps its plan and starts at once; the source is listed beside the
            # compute, only to say whether it changed since
            items = Inputs(stored.inputs)
            listing = ThreadPoolExecutor(1, thread_name_prefix="listing")
            relisted = listing.submit(list_job_inputs, spec)
        # on the driver, before Ray starts: what `salient validate` checks (the model loaded on
        # the CPU, every explainer and metric built); the model gives the hash and preprocessing
        model = preflight(spec, items=items)
        tags = {
            "salient.model_uri": spec.model.uri,
            "salient.model_weights_sha256": model.weights_hash,
            "salient.data_uri": absolute_uri(spec.source.uri),
            "salient.output_uri": absolute_uri(root),
            "salient.code_version": code_version(),
            **direction_tags({m["key"]: m["higher_is_better"] for m in metric_directions(spec)}),
            "mlflow.note.content": _run_description(spec),
            **spec.tracking.tags,
        }
        tracker.start(flatten(spec), tags)
        if listing is None:
            plan = plan_run(spec, items, finished_inputs(root, stored, storage))
            changes = source_changes(stored, items, replanned=True)
            # the plan first: a crash from here on leaves a plan that names every finished block
            write_plan(root, plan.blocks, storage)
        else:
            # the kept plan needs only the finished blocks' names (one listing)
            done = finished_block_ids(root, storage) & set(stored.ids)
            plan, changes = Plan(stored, done, [], set()), None
        # parts of blocks that are no longer in the plan (inputs changed or removed, or a block
        # that never finished) would mix stale rows into every table read
        remove_stale_outputs(root, set(plan.blocks.ids), plan.stale_images, storage)
        blocks, todo = plan.blocks, plan.todo_ids
        if on_plan:
            on_plan(len(plan.done), len(blocks), changes)
        # the copy beside the outputs hides secrets as the MLflow params and tags do
        spec_yaml = yaml.safe_dump(redact(spec.model_dump(mode="json"))).encode()
        storage.write_bytes_atomic(f"{root}/spec.yaml", spec_yaml)
        # the finished blocks' markers are folded as they arrive (read concurrently), then
        # this attempt's as the actors finish them: nothing here grows with the run
        totals = RunTotals(spec)
        for marker in read_markers(root, sorted(plan.done), storage):
            totals.add(marker, computed=False)
        if todo:
            init_ray(address)  # Ray's start-up is not compute: images/s leaves it out
        t_compute = time.perf_counter()
        if todo:
            first = blocks.ids[0]  # the first block of the plan writes a few overlays
            state = Progress(len(blocks), len(plan.done))
            arrived: set[str] = set()
            with _CtrlC() as ctrl_c:
                for marker in _execute(
                    spec, storage, run_id, root, model.preprocess, todo, len(blocks), first, address
                ):
                    ctrl_c.check()
                    arrived.add(marker.block_id)
                    totals.add(marker, computed=True)
                    state.add(marker.n_inputs)
                    point = state.series_point()
                    if point:
                        tracker.log_metrics(point, step=state.finished)
                    if progress:
                        progress(marker, state)
                ctrl_c.check()
            # a summary over part of the plan would look like a finished run: never report one
            missing = set(todo) - arrived
            if missing:
                raise JobFailed(
                    f"{len(missing)} of {len(blocks)} blocks did not finish (the Ray job ended "
                    "without them); run the same command to resume"
                )
        compute_seconds = time.perf_counter() - t_compute
        if listing is not None:
            changes = _changes_since(stored, relisted)
        summary = totals.summary(run_id, compute_seconds, time.perf_counter() - t_start)
        summary["source_changes"] = changes
        # how images became model inputs: what a viewer needs to lay maps over the sources
        summary["preprocess"] = dataclasses.asdict(model.preprocess)
        digest = totals.digest
        if spec.output.compact:
            summary["files"] = _compact(root, set(blocks.ids), storage, address)
        storage.write_bytes_atomic(f"{root}/summary.json", json.dumps(summary, indent=2).encode())
        storage.write_bytes_atomic(f"{root}/digest.json", json.dumps(digest.to_json()).encode())
        tracker.log_metrics(_flat_metrics(summary))
        # the gate before the report, so the report shows its verdict and evidence
        gate = tracker.regression_gate(spec.compare_to, storage) if spec.compare_to else None
        report = render_report(
            ReportInputs(
                root,
                summary,
                digest,
                f"Salient run {run_id}",
                model.preprocess,
                storage,
                gate=gate,
            )  # fmt: skip
        )
        storage.write_bytes_atomic(f"{root}/report.html", report.encode())
        tracker.log_artifacts(
            {
                "spec.yaml": spec_yaml,
                "summary.json": json.dumps(summary, indent=2).encode(),
                "summary.csv": _summary_csv(summary).encode(),
                "report.html": report.encode(),
                **_overlays(root, storage),
            }
        )
        if summary["lost"] != 0:
            raise JobFailed(f"{summary['lost']} inputs are neither in heatmaps nor in errors")
        check_outcome(spec, summary)
        tracker.finish()
        return JobResult(run_id, root, tracker.mlflow_run_id, summary, digest, gate)
    except KeyboardInterrupt as e:
        tracker.fail(e)
        # what is on storage now: an actor may have finished a block the driver never heard of
        saved = finished_block_ids(root, storage) & set(blocks.ids)
        raise JobInterrupted(len(saved), len(blocks)) from e
    except BaseException as e:
        tracker.fail(e)
        raise
    finally:
        if listing is not None:
            listing.shutdown(wait=False, cancel_futures=True)


class _CtrlC:
    """Remembers a Ctrl-C for the compute loop: the KeyboardInterrupt Python raises can land in
    library code that swallows it (seen under load), and the loop must still stop."""

    def __enter__(self):
        self.pressed, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame):
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def _changes_since(stored: Blocks, relisted) -> str:
    """The line on how the source differs from the kept plan (None: it does not)."""
    try:
        items = relisted.result()
    except Exception as e:  # the run is complete either way: say what could not be checked
        return f"could not list the source to check it against the plan: {e}"
    return source_changes(stored, items, replanned=False)


def _compact(root: str, keep: set[str], storage: Storage, address: str | None) -> dict:
    """Compact the run's outputs when they are not already (table -> files after it)."""
    if needs_compaction(root, keep, storage):
        init_ray(address)
        try:
            compact(root, keep, storage)
        except StorageUnavailable:
            raise
        except Exception as e:
            raise JobFailed(
                f"compacting the outputs failed ({_root_cause(e)}); every row is intact in the "
                "per-block parts: run the same command to retry"
            ) from e
    commit = read_commit(root, storage)
    return {table: len(files) for table, files in commit.files.items()} if commit else {}


def _apply_overwrite_policy(spec: JobSpec, root: str, storage: Storage) -> None:
    fs, path = storage.filesystem(root)
    if spec.output.overwrite == "resume" or not fs.exists(path):
        return
    if spec.output.overwrite == "error":
        raise JobFailed(f"output.uri: {root} exists and output.overwrite is 'error'")
    fs.rm(path, recursive=True)


def _execute(
    spec: JobSpec,
    storage: Storage,
    run_id: str,
    root: str,
    preprocess,
    todo: list[str],
    n_planned: int,
    overlay_block: str,
    address: str | None,
):
    """Stream the Ray Data plan over the blocks `todo`; yield each finished block's marker as
    it arrives."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    from ..sources.reader import read_block

    init_ray(address)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI shows its own bar, per finished block
    ctx.max_errored_blocks = 0  # per-input errors are rows; a block error is a real failure
    ctx.issue_detectors_config.detectors = []
    ds = _planned_blocks(root, storage, set(todo), n_planned)

    # a block that still meets an outage after the in-process retries is run again by Ray
    # (after a jittered pause); only an outage that outlasts those fails the job
    block_retries, pause_s = spec.storage.block_retries, spec.storage.block_retry_delay_s
    labels_from = spec.source.labels_from
    ctx.actor_task_retry_on_errors = [StorageUnavailable]
    retry = {"retry_exceptions": [StorageUnavailable], "max_retries": block_retries}

    def decode(row: dict) -> dict:
        block = block_from_row(row)
        annotations = {
            it.image_id: it.meta["annotation"] for it in block.items if it.meta.get("annotation")
        }
        with pause_on_outage(pause_s):
            decoded = read_block(
                block, preprocess, annotations, to_model_space, storage, labels_from=labels_from
            )
        # every listed input is an image or an error row (a whole shard's samples are counted
        # as they are found); anything else is a reader bug that would lose inputs silently
        whole_shards = any(it.member == ALL_SAMPLES for it in block.items)
        if not whole_shards and decoded["n_inputs"] != len(block.items):
            raise RuntimeError(
                f"block {block.block_id}: {len(block.items)} inputs listed, "
                f"{decoded['n_inputs']} read"
            )
        decoded["write_overlays"] = block.block_id == overlay_block
        return decoded

    # Ray warns, as the job runs, when a run has fewer blocks than decode tasks: nothing to act on
    warnings.filterwarnings("ignore", message=".*maximum number of concurrent tasks.*")
    c = spec.compute
    cluster_cpus = ray.cluster_resources().get("CPU", os.cpu_count() or 1)
    # a bounded number of decode tasks: unbounded, Ray starts a worker process per 0.25 CPU, and
    # on a small machine their start-up (each imports torch) delays the actors' first block
    # Ray 2.60 takes retry settings only as **ray_remote_args, which it marks deprecated (removal
    # announced for 2.64, beyond our pin): the warning says nothing a user can act on
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ds.map(
            decode,
            num_cpus=0.25,
            compute=TaskPoolStrategy(size=c.decode_tasks or decode_tasks(c, cluster_cpus)),
            **retry,
        )
        ds = ds.map_batches(
            ExplainWorker,
            fn_constructor_kwargs={
                "spec_json": spec.model_dump_json(),
                "run_id": run_id,
                "root": root,
                "storage": storage,
            },
            batch_size=1,
            # two calls per actor: a block's upload overlaps the next block's compute (the
            # worker computes one block at a time)
            compute=ActorPoolStrategy(
                size=c.actors, max_concurrent_calls_per_actor=2, enable_true_multi_threading=True
            ),
            num_cpus=c.cpus_per_actor,
            num_gpus=c.gpus_per_actor or None,
            batch_format="numpy",
            zero_copy_batch=True,
            max_task_retries=block_retries,  # with actor_task_retry_on_errors above
        )
    try:
        for row in ds.iter_rows():
            yield BlockMarker.from_json(row["marker"])
    except Exception as e:
        raise JobFailed(_root_cause(e)) from e


def decode_tasks(c, cluster_cpus: float) -> int:
    """Concurrent read+decode tasks by default: what the cluster's CPUs leave beside the actors,
    at most 4 per actor (a cheap explainer eats blocks faster than one decode task per actor
    reads them; more than 4 only queues decoded blocks in the object store), at least 2."""
    spare = int(cluster_cpus - c.actors * c.cpus_per_actor)
    return max(2, min(spare, 4 * c.actors))


def _root_cause(error: BaseException) -> str:
    """The first line a person needs from a Ray failure: the original error, not the wrappers."""
    chain, e = [], error
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = getattr(e, "cause", None) or e.__cause__
    for e in chain:
        if isinstance(e, StorageUnavailable):
            return str(e)
    lines = [ln.strip() for e in chain for ln in str(e).splitlines() if ln.strip()]
    for needle in ("storage unreachable", "Error:", "Exception:"):
        for ln in reversed(lines):
            if needle in ln:
                return ln.split("StorageUnavailable: ", 1)[-1]
    return lines[-1] if lines else f"the Ray job failed ({type(error).__name__})"


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )


def _planned_blocks(root: str, storage: Storage, todo: set[str], n_planned: int):
    """The blocks to compute, read by Ray Data from the stored plan (`_plan/blocks.parquet`):
    streamed row group by row group, one block per Ray block so that each decode task takes
    one, and the finished blocks of an earlier attempt filtered out on the way."""
    import ray
    from ray.data.expressions import col

    from ..runstore.commit import arrow_filesystem

    fs, path = storage.filesystem(plan_blocks_uri(root))
    ds = ray.data.read_parquet(path, filesystem=arrow_filesystem(fs))
    if len(todo) < n_planned:
        ds = ds.filter(expr=col("block_id").is_in(sorted(todo)))
    return ds.repartition(target_num_rows_per_block=1)


def check_outcome(spec: JobSpec, summary: dict) -> None:
    """A run that explained nothing, or fewer inputs than the spec accepts, has failed (its
    rows, summary and report are kept for a look)."""
    inputs, ok, errors = summary["inputs"], summary["images_ok"], summary["errors"]
    first = summary.get("first_error")
    why = f"; first error: {first['image_id']}: {first['message'][:300]}" if first else ""
    if ok == 0:
        raise JobFailed(f"no image was explained: all {inputs} inputs are error rows{why}")
    if errors / inputs > spec.max_error_share:
        raise JobFailed(
            f"{errors} of {inputs} inputs failed ({errors / inputs:.0%}), more than "
            f"max_error_share {spec.max_error_share:.0%}{why}"
        )


def _run_description(spec: JobSpec) -> str:
    """The MLflow run's description: what ran, and which way each metric is better."""
    lines = [
        f"Salient job over `{spec.source.uri}` with `{spec.model.uri}`: "
        + ", ".join(e.key for e in spec.explainers)
    ]
    for m in metric_directions(spec):
        better = "higher" if m["higher_is_better"] else "lower"
        lines.append(f"- `<explainer>.{m['key']}`: {better} is better")
    return "\n".join(lines)


def _overlays(root: str, storage: Storage) -> dict[str, bytes]:
    """The overlay PNGs the first block left under <root>/overlays/ (artifact name -> bytes)."""
    fs, path = storage.filesystem(f"{root}/overlays")
    fs.invalidate_cache(path)
    return {
        "overlays/" + p[len(path) :].lstrip("/"): fs.cat_file(p)
        for p in sorted(fs.find(path))
        if p.endswith(".png")
    }


def _flat_metrics(summary: dict) -> dict[str, float]:
    out = {
        "inputs": summary["inputs"],
        "images_ok": summary["images_ok"],
        "errors": summary["errors"],
        "lost": summary["lost"],
        "actor_restarts": summary["actor_restarts"],
    }
    if summary["images_per_s"]:
        out["images_per_s"] = summary["images_per_s"]
    for key, e in summary["explainers"].items():
        if e["images_per_s"]:
            out[f"{key}.images_per_s"] = e["images_per_s"]
        for metric, value in e["metrics"].items():
            if value is None:
                continue
            out[f"{key}.{metric}"] = value
            # what the gate's test needs from a run, and the interval a reader wants
            counts, sds = e.get("metric_counts", {}), e.get("metric_sd", {})
            stats = {"n": counts.get(metric), "sd": sds.get(metric)}
            ci = e.get("metric_intervals", {}).get(metric)
            if ci is not None:
                stats |= {"ci_low": ci[0], "ci_high": ci[1]}
            out |= {f"{key}.{metric}.{k}": v for k, v in stats.items() if v is not None}
    return out


def _summary_csv(summary: dict) -> str:
    metrics = sorted({m for e in summary["explainers"].values() for m in e["metrics"]})
    lines = [",".join(["explainer", "images", "images_per_s", *metrics])]
    for key, e in summary["explainers"].items():
        cells = [key, str(e["images"]), f"{e['images_per_s'] or ''}"]
        cells += ["" if e["metrics"].get(m) is None else str(e["metrics"][m]) for m in metrics]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"
