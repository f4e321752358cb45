"""The model actor: loads the model and builds explainers once, then turns decoded blocks into
heatmap, metric and error rows, written as one set of files per block.

`explain_block` is the pure part (a decoded block in -> tables, files and marker out, no I/O);
`process_block` writes what it returns. The Ray actor, the in-process path and the bench call
the same function.

Per-input failures never reach Ray (an exception in a Ray Data UDF fails the job): an image that
fails an explainer is retried alone, and if it still fails it becomes an error row.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ..chunks import chunks, run_in_chunks
from ..explainers import build_explainer, explainer_params
from ..metrics import ExplainedBatch, build_metric
from ..models import LoadedModel, RunPolicy, load_model
from ..report.overlay import overlay_png, picture_png
from ..runstore import (
    ERROR_SCHEMA,
    METRIC_SCHEMA,
    BlockMarker,
    Digest,
    encode_heatmaps,
    heatmap_schema,
    heatmap_table,
    safe_name,
    write_block,
)
from ..spec import JobSpec, MethodSpec, ModelSpec
from ..storage import Storage, pause_on_outage


@dataclass
class Pairs:
    """The (image, target) pairs of a block: one heatmap per pair and explainer."""

    image: torch.Tensor  # index into the block's decoded images
    target: torch.Tensor
    rank: torch.Tensor  # 0 = top-1 / first class asked for
    score: torch.Tensor  # the target's class score (the model's score function)


@dataclass
class BlockResult:
    heatmaps: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)
    # explainer -> metric key -> {"name", "params", "state"}: merged by the driver
    metric_states: dict[str, dict] = field(default_factory=dict)
    # run-relative path -> bytes: overlays and pictures, written beside the tables
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class BlockOutput:
    """Everything a block produced; writing it is the caller's business."""

    marker: BlockMarker
    tables: dict[str, pa.Table]
    files: dict[str, bytes]


def load_job_model(
    m: ModelSpec, device: str | None, registry_uri: str | None = None
) -> LoadedModel:
    """The spec's model, loaded the same way on the driver and in every actor (`models:/` URIs
    are looked up in the job's MLflow tracking server)."""
    return load_model(
        m.uri,
        weights=m.weights,
        device=device,
        resize=m.resize,
        size=m.size,
        num_classes=m.num_classes,
        trust_pickle=m.trust_pickle,
        registry_uri=registry_uri,
        random_init=m.random_init,
        score=m.score,
    )


def run_policy(c) -> RunPolicy:
    """The spec's `compute` settings for how forwards run."""
    return RunPolicy(autocast=c.autocast, autocast_cpu=c.autocast_cpu, compile=c.compile)


def build_explainers(model: LoadedModel, specs: list[MethodSpec], max_batch: int | None, seed: int):
    out = {}
    for m in specs:
        params = dict(m.params)
        accepted = explainer_params(m.name)
        if max_batch is not None and "max_batch" in accepted:
            params.setdefault("max_batch", max_batch)
        if "seed" in accepted:
            params.setdefault("seed", seed)
        out[m.key] = build_explainer(m.name, model, **params)
    return out


def torch_threads(c, node_cpus: int | None = None, nodes: int = 1) -> int:
    """Threads for torch in an actor. Ray sets OMP_NUM_THREADS to the actor's whole CPUs (1 for
    the default 0.5), which left a laptop's model on one core: an actor that reserved >= 1 CPU
    uses what it reserved; with a fraction, the cores of the actor's node are shared among the
    actors on that node (the job's actors spread over the `nodes` with CPUs; dividing by the
    cluster-wide count gave 96-core nodes one thread per actor), the decode tasks beside them
    being light."""
    if c.threads_per_actor:
        return c.threads_per_actor
    if c.cpus_per_actor >= 1:
        return int(c.cpus_per_actor)
    cpus = node_cpus or os.cpu_count() or 1
    here = min(math.ceil(c.actors / max(nodes, 1)), max(1, int(cpus / c.cpus_per_actor)))
    return max(1, cpus // max(here, 1))


def _node_cpus() -> tuple[int | None, int]:
    """(CPUs of the node this actor runs on, nodes with CPUs) from Ray; (None, 1) outside it."""
    import ray

    if not ray.is_initialized():
        return None, 1
    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    mine = [int(n["Resources"]["CPU"]) for n in nodes if n["NodeID"] == here]
    return (mine[0] if mine else None), max(len(nodes), 1)


def choose_targets(
    spec: JobSpec, model: LoadedModel, probs: torch.Tensor, labels: list
) -> tuple[Pairs, dict[int, tuple[str, str]]]:
    """Targets per the spec's mode; images that cannot have one (no label, no class above the
    threshold) are returned apart. `probs` are the model's class scores."""
    b = probs.shape[0]
    mode = spec.targets.mode
    missing: dict[int, tuple[str, str]] = {}  # image -> (error kind, message)
    img, tgt, rank = [], [], []
    if mode in ("predicted", "topk"):
        k = 1 if mode == "predicted" else spec.targets.k
        top = probs.topk(k, dim=1).indices.cpu()
        for i in range(b):
            for r in range(k):
                img.append(i), tgt.append(int(top[i, r])), rank.append(r)
    elif mode == "threshold":
        k = min(spec.targets.k, probs.shape[1])
        values, top = (t.cpu() for t in probs.topk(k, dim=1))
        for i in range(b):
            passed = [int(c) for c, v in zip(top[i], values[i], strict=True) if v > spec.targets.t]
            if not passed:
                best = float(values[i, 0])
                missing[i] = (
                    "no_target",
                    f"no class scores above t={spec.targets.t} (best {best:.4g})",
                )
            for r, c in enumerate(passed):
                img.append(i), tgt.append(c), rank.append(r)
    elif mode == "classes":
        for i in range(b):
            for r, c in enumerate(spec.targets.classes):
                if not 0 <= c < model.num_classes:
                    raise ValueError(f"targets.classes: {c} out of range ({model.num_classes})")
                img.append(i), tgt.append(c), rank.append(r)
    else:  # label
        for i in range(b):
            label = resolve_label(labels[i], model.labels)
            if label is None:
                missing[i] = ("no_label", f"no ground-truth label (got {labels[i]!r})")
                continue
            img.append(i), tgt.append(label), rank.append(0)
    image = torch.tensor(img, dtype=torch.long)
    target = torch.tensor(tgt, dtype=torch.long)
    score = probs.cpu()[image, target] if len(img) else torch.zeros(0)
    return Pairs(image, target, torch.tensor(rank), score), missing


def resolve_label(raw, names: list[str]) -> int | None:
    """An int index, a digit string, or a class name (folder name) -> index, else None."""
    if raw is None:
        return None
    if isinstance(raw, int | np.integer) or (isinstance(raw, str) and raw.isdigit()):
        idx = int(raw)
        return idx if 0 <= idx < len(names) else None
    return names.index(raw) if raw in names else None


class ExplainWorker:
    """Callable class for `Dataset.map_batches` (one instance per actor)."""

    def __init__(self, spec_json: str, run_id: str, root: str, storage: Storage):
        self.spec = JobSpec.model_validate_json(spec_json)
        self.run_id, self.root, self.storage = run_id, root, storage
        # who computed a block: a restarted actor shows up as a new instance in the markers
        self.instance = f"{os.getpid()}-{time.time_ns()}"
        self.created_at = time.time()
        torch.manual_seed(self.spec.seed)
        torch.set_num_threads(torch_threads(self.spec.compute, *_node_cpus()))
        self.model = load_job_model(
            self.spec.model, self.spec.compute.device, self.spec.tracking.uri
        )
        self.model.set_policy(run_policy(self.spec.compute))
        self.explainers = build_explainers(
            self.model, self.spec.explainers, self.spec.compute.max_batch, self.spec.seed
        )
        self.schema = heatmap_schema(self.spec.output.heatmap_size, self.spec.output.heatmap_dtype)
        self.batch_size = self.spec.compute.batch_for(self.model.device)
        # the job gives each actor two calls at once: one block computes (holding this lock: one
        # model, one device) while the one before it uploads its files
        self.computing = threading.Lock()
        self.init_seconds = time.time() - self.created_at  # imports excluded: they came before

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"block_id": [], "marker": []}
        for i in range(len(batch["block_id"])):
            row = {k: batch[k][i] for k in batch}
            with pause_on_outage(self.spec.storage.block_retry_delay_s):  # then Ray retries
                marker = self.process_block(row)
            out["block_id"].append(row["block_id"])
            out["marker"].append(marker.to_json())
        return out

    def process_block(self, row: dict) -> BlockMarker:
        """Explain one decoded block and write its files, the marker last."""
        with self.computing:
            output = self.explain_block(row)
        for path, data in output.files.items():
            self.storage.write_bytes_atomic(f"{self.root}/{path}", data)
        write_block(self.root, output.marker, output.tables, self.storage)
        return output.marker

    # -- one block ----------------------------------------------------------------------------
    def explain_block(self, row: dict) -> BlockOutput:
        """A decoded block (sources.reader.read_block's columns) -> its tables, files and
        marker. No I/O: the same block gives the same rows wherever it runs."""
        t0, started_at = time.perf_counter(), time.time()
        ids = list(row["image_ids"])
        uris = list(row["uris"])
        members = json.loads(row["members"])
        labels = json.loads(row["labels"])
        anns = [json.loads(a) for a in row["annotations"]]
        errors = [dict(e, fatal=True) for e in json.loads(row["errors"])]
        result = BlockResult(errors=errors)
        if ids:
            self._explain_images(row, ids, (uris, members), labels, anns, result)
        tables = self._tables(result)
        fatal = [e for e in result.errors if e["fatal"]]
        marker = BlockMarker(
            block_id=row["block_id"],
            n_inputs=int(row["n_inputs"]),
            images_ok=len({r["image_id"] for r in result.heatmaps}),
            fatal_errors=len(fatal),
            first_error=(
                {k: fatal[0][k] for k in ("image_id", "stage", "error_type", "message")}
                if fatal
                else None
            ),
            rows={name: tables[name].num_rows for name in tables},
            seconds=result.seconds,
            images=result.images,
            forward_passes=result.passes,
            metric_states=result.metric_states,
            digest=Digest.of_block(
                row["block_id"],
                result.heatmaps,
                result.metrics,
                tables["errors"].to_pylist(),
                self.spec.seed,
            ),
            wall_seconds=time.perf_counter() - t0,
            started_at=started_at,
            worker=self.instance,
            worker_created_at=self.created_at,
            worker_init_seconds=self.init_seconds,
            torch_threads=torch.get_num_threads(),
            max_batch_cap=self.model.max_batch_cap,
        )
        return BlockOutput(marker, tables, result.files)

    def _explain_images(self, row, ids, sources, labels, anns, result: BlockResult) -> None:
        uris = sources[0]
        device = self.model.device
        pixels = torch.from_numpy(np.ascontiguousarray(row["pixels"]))
        x = self.model.preprocess.normalise(pixels.to(device))
        probs = torch.cat(
            [
                self.model.class_scores(self.model.logits(x[part]))
                for part in chunks(x.shape[0], self.batch_size)
            ]
        )
        predicted = probs.argmax(1).cpu()
        pairs, missing = choose_targets(self.spec, self.model, probs, labels)
        failed: dict[int, tuple[str, str, str]] = {
            i: ("targets", kind, msg) for i, (kind, msg) in missing.items()
        }
        maps_by_explainer: dict[str, torch.Tensor] = {}
        pictures_by_explainer: dict[str, dict[str, torch.Tensor]] = {}
        for key, explainer in self.explainers.items():
            t0 = time.perf_counter()
            before = self.model.forward_passes
            maps, bad, pictures = self._run_explainer(explainer, x, pairs)
            result.seconds[key] = time.perf_counter() - t0
            result.passes[key] = self.model.forward_passes - before
            for i, err in bad.items():
                failed.setdefault(i, (f"explain:{key}", type(err).__name__, str(err)))
            maps_by_explainer[key] = maps
            pictures_by_explainer[key] = pictures
        keep = torch.tensor([int(i) not in failed for i in pairs.image], dtype=torch.bool)
        explained = len({int(i) for i in pairs.image[keep]})
        for key in self.explainers:  # images with a heatmap: 0 when every image failed
            result.images[key] = explained
        for i, (stage, kind, msg) in failed.items():
            result.errors.append(
                {
                    "image_id": ids[i],
                    "uri": uris[i],
                    "stage": stage,
                    "error_type": kind,
                    "message": msg[:2000],
                    "fatal": True,
                }
            )
        if row["write_overlays"]:  # a few overlays from the first block of the plan
            self._overlays(maps_by_explainer, pairs, keep, ids, row["pixels"], result)
        self._pictures(pictures_by_explainer, pairs, keep, ids, result)
        kept = _select(pairs, keep)
        for key, maps in maps_by_explainer.items():
            self._heatmap_rows(key, maps[keep], kept, ids, sources, labels, predicted, result)
        if self.spec.metrics:
            self._metric_rows(
                {k: m[keep] for k, m in maps_by_explainer.items()}, x, kept, ids, anns, result
            )

    def _overlays(self, maps_by_explainer, pairs: Pairs, keep, ids, pixels, result, n: int = 4):
        for key, maps in maps_by_explainer.items():
            signed = self.explainers[key].signed
            for j in [j for j in range(len(pairs.image)) if keep[j]][:n]:
                i = int(pairs.image[j])
                name = safe_name(f"{ids[i]}.t{int(pairs.target[j])}.png")
                result.files[f"overlays/{key}/{name}"] = overlay_png(
                    pixels[i], maps[j], signed=signed
                )

    def _pictures(self, pictures_by_explainer, pairs: Pairs, keep, ids, result):
        """The explainers' image extras (e.g. attribution visualization's image and mask), one
        PNG per kept pair: pictures/<explainer>/<image>.t<target>.<name>.png."""
        for key, pictures in pictures_by_explainer.items():
            for name, tensor in pictures.items():
                for j in [j for j in range(len(pairs.image)) if keep[j]]:
                    i, t = int(pairs.image[j]), int(pairs.target[j])
                    path = f"pictures/{key}/{safe_name(f'{ids[i]}.t{t}.{name}.png')}"
                    result.files[path] = picture_png(tensor[j])

    def _run_explainer(self, explainer, x, pairs: Pairs):
        """Maps (and image extras) for every pair, in chunks of batch_size; a failing chunk is
        retried pair by pair so that one bad image does not take its neighbours down."""
        n = len(pairs.image)
        h, w = x.shape[-2:]
        maps = torch.zeros(n, h, w)
        pictures: dict[str, torch.Tensor] = {}

        def run(part: slice):
            got = explainer.explain(x[pairs.image[part]], pairs.target[part])
            maps[part] = got.maps.cpu()
            for name in explainer.image_extras:
                picture = got.extras[name].cpu()
                if name not in pictures:
                    pictures[name] = torch.zeros(n, *picture.shape[1:])
                pictures[name][part] = picture

        failed = run_in_chunks(run, n, self.batch_size)
        bad = {int(pairs.image[j]): e for j, e in failed.items()}
        return maps, bad, pictures

    def _heatmap_rows(self, key, maps, pairs: Pairs, ids, sources, labels, predicted, result):
        uris, members = sources
        size, dtype = self.spec.output.heatmap_size, self.spec.output.heatmap_dtype
        stored, lo, hi = encode_heatmaps(maps, size, dtype)
        explainer = self.explainers[key]
        passes = result.passes[key] // max(1, len(ids))
        for j in range(len(pairs.image)):
            i, t = int(pairs.image[j]), int(pairs.target[j])
            result.heatmaps.append(
                {
                    "run_id": self.run_id,
                    "image_id": ids[i],
                    "source_uri": uris[i],
                    "source_member": members[i],
                    "model_id": self.model.id,
                    "explainer": key,
                    "method": explainer.name,
                    "target": t,
                    "target_name": self.model.labels[t],
                    "target_rank": int(pairs.rank[j]),
                    "score": float(pairs.score[j]),
                    "predicted": int(predicted[i]),
                    "predicted_name": self.model.labels[int(predicted[i])],
                    "label": resolve_label(labels[i], self.model.labels),
                    "heatmap": stored[j].numpy(),
                    "h": size,
                    "w": size,
                    "map_min": float(lo[j]),
                    "map_max": float(hi[j]),
                    "forward_passes": passes,
                }
            )

    def _metric_rows(self, maps_by_explainer, x, pairs: Pairs, ids, anns, result) -> None:
        """Every metric of the spec on every explainer's maps, batch by batch (a failing batch
        is retried pair by pair); a pair a metric cannot score gets a null value and a
        (non-fatal) error row, never a lost heatmap."""
        device = self.model.device
        n = len(pairs.image)
        for key, maps in maps_by_explainer.items():
            states = result.metric_states.setdefault(key, {})
            for mspec in self.spec.metrics:
                metric = build_metric(mspec.name, **mspec.params)
                values: list = [None] * n

                def score(part: slice, metric=metric, key=key, maps=maps, values=values):
                    img = pairs.image[part]
                    batch = ExplainedBatch(
                        maps[part].to(device),
                        [anns[int(i)] for i in img],
                        model=self.model,
                        x=x[img.to(device)],
                        targets=pairs.target[part].to(device),
                        explainer=self.explainers[key],
                        maps_by_explainer={
                            k: m[part].to(device) for k, m in maps_by_explainer.items()
                        },
                    )
                    values[part] = metric.update(batch)

                failed = run_in_chunks(score, n, self.batch_size)
                first = {}  # one error row per image, the first pair's error
                for j, e in sorted(failed.items()):
                    first.setdefault(int(pairs.image[j]), e)
                for i, e in first.items():
                    result.errors.append(
                        {
                            "image_id": ids[i],
                            "uri": "",
                            "stage": f"metric:{mspec.key}",
                            "error_type": type(e).__name__,
                            "message": str(e)[:2000],
                            "fatal": False,
                        }
                    )
                for j, v in enumerate(values):
                    ok = v is not None and math.isfinite(v)
                    result.metrics.append(
                        {
                            "run_id": self.run_id,
                            "image_id": ids[int(pairs.image[j])],
                            "explainer": key,
                            "target": int(pairs.target[j]),
                            "metric": mspec.key,
                            "value": float(v) if ok else None,
                        }
                    )
                states[mspec.key] = {
                    "name": mspec.name,
                    "params": mspec.params,
                    "state": metric.state(),
                }

    def _tables(self, result: BlockResult) -> dict[str, pa.Table]:
        heatmaps = heatmap_table(result.heatmaps, self.schema)
        metrics = pa.Table.from_pylist(result.metrics, schema=METRIC_SCHEMA)
        errors = pa.Table.from_pylist(
            [
                {
                    "run_id": self.run_id,
                    "image_id": e["image_id"],
                    "source_uri": e["uri"],
                    "stage": e["stage"],
                    "error_type": e["error_type"],
                    "message": e["message"],
                    "fatal": e["fatal"],
                }
                for e in result.errors
            ],
            schema=ERROR_SCHEMA,
        )
        return {"heatmaps": heatmaps, "metrics": metrics, "errors": errors}


def _select(p: Pairs, keep: torch.Tensor) -> Pairs:
    return Pairs(p.image[keep], p.target[keep], p.rank[keep], p.score[keep])
