"""The run's summary, folded from block markers one at a time: what the driver holds at the end
of a run is the merged state (counts, metric states, the digest), never the markers, so it does
not grow with the number of blocks or images."""

from __future__ import annotations

from ..metrics import metric_class
from ..runstore import BlockMarker, Digest
from ..spec import JobSpec


def metric_directions(spec: JobSpec) -> list[dict]:
    return [
        {
            "key": m.key,
            "name": m.name,
            "higher_is_better": bool(metric_class(m.name).higher_is_better),
        }
        for m in spec.metrics
    ]


def metric_details(metric) -> dict:
    """What a metric knows beyond its mean: curves, per-transform values, a verdict."""
    out = {}
    if hasattr(metric, "mean_curve"):
        out["curve"] = metric.mean_curve()
        band = metric.curve_band()
        if band is not None:
            out["curve_band"] = {"low": band[0], "high": band[1]}
    if hasattr(metric, "by_transform"):
        out["by_transform"] = metric.by_transform()
    if hasattr(metric, "report"):
        out.update(metric.report())
    return out


class RunTotals:
    """A streaming reduce over the markers of a plan's blocks (in any order)."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.blocks = self.computed = 0
        self.inputs = 0  # what the blocks held: a whole-shard block's samples are found reading it
        self.ok = self.fatal = self.explained = 0  # explained: images of this attempt's blocks
        self.rows = {"heatmaps": 0, "metrics": 0, "errors": 0}
        keys = [m.key for m in spec.explainers]
        self.seconds = dict.fromkeys(keys, 0.0)
        self.images = dict.fromkeys(keys, 0)
        self.passes = dict.fromkeys(keys, 0)
        self.metrics: dict[str, dict] = {k: {} for k in keys}  # explainer -> key -> Metric
        self.workers: set[str] = set()
        self.first_error: dict | None = None
        self.digest = Digest()

    def add(self, marker: BlockMarker, computed: bool) -> None:
        self.blocks += 1
        self.inputs += marker.n_inputs
        self.ok += marker.images_ok
        self.fatal += marker.fatal_errors
        for t in self.rows:
            self.rows[t] += marker.rows.get(t, 0)
        for key in self.seconds:
            self.seconds[key] += marker.seconds.get(key, 0.0)
            self.images[key] += marker.images.get(key, 0)
            self.passes[key] += marker.forward_passes.get(key, 0)
            merged = self.metrics[key]
            for mkey, entry in marker.metric_states.get(key, {}).items():
                if mkey not in merged:
                    merged[mkey] = metric_class(entry["name"])(**entry["params"])
                merged[mkey].merge(entry["state"])
        if computed:
            self.computed += 1
            self.explained += marker.images_ok
            self.workers.add(marker.worker)
        # the first by image id, whatever order the blocks arrive in
        e = marker.first_error
        if e and (self.first_error is None or e["image_id"] < self.first_error["image_id"]):
            self.first_error = e
        self.digest.merge(marker.digest)

    def summary(self, run_id: str, compute_seconds: float, wall_seconds: float) -> dict:
        """Counts, per-explainer metric means and throughput."""
        inputs = self.inputs
        per_explainer: dict[str, dict] = {}
        for m in self.spec.explainers:
            images, seconds, passes = self.images[m.key], self.seconds[m.key], self.passes[m.key]
            merged = dict(sorted(self.metrics[m.key].items()))
            per_explainer[m.key] = {
                "method": m.name,
                "images": images,
                "images_per_s": images / seconds if seconds and images else None,
                "forward_passes_per_image": passes / images if images else None,
                "metrics": {k: metric.compute() for k, metric in merged.items()},
                "metric_counts": {k: metric.n for k, metric in merged.items()},
                # 95% intervals of the means (Wilson for 0/1 metrics) and the values' spread,
                # from states merged exactly across blocks; None below two values
                "metric_intervals": {
                    k: None if (ci := metric.interval()) is None else list(ci)
                    for k, metric in merged.items()
                },
                "metric_sd": {k: metric.sd() for k, metric in merged.items()},
                "metric_details": {
                    k: d for k, metric in merged.items() if (d := metric_details(metric))
                },
            }
        explained = self.explained
        return {
            "run_id": run_id,
            # the spec's metrics in its order, with their direction: what the report ranks by
            # and what every table prints beside a value
            "metrics": metric_directions(self.spec),
            "inputs": inputs,
            "images_ok": self.ok,
            "errors": self.fatal,
            "lost": inputs - self.ok - self.fatal,
            "rows": dict(self.rows),
            "blocks": self.blocks,
            "blocks_computed": self.computed,
            "blocks_resumed": self.blocks - self.computed,
            # actors that computed this attempt's blocks; more than `compute.actors` means Ray
            # restarted at least one (a killed or crashed worker)
            "worker_instances": len(self.workers),
            "actor_restarts": max(0, len(self.workers) - self.spec.compute.actors),
            "wall_seconds": wall_seconds,
            "compute_seconds": compute_seconds,
            "images_per_s": explained / compute_seconds if explained and compute_seconds else None,
            "explainers": per_explainer,
            "first_error": self.first_error,
            "warnings": [
                f"{key}: metric {metric!r} produced no values"
                for key, e in per_explainer.items()
                for metric, n in e["metric_counts"].items()
                if n == 0
            ],
        }
