"""What a report needs from a run, in a size that does not grow with the run: per explainer,
the extreme images of every metric (and of the target score), a uniform sample, per-class
metric histograms, top-1 accuracy counts and the first errors.

Each block's worker computes the digest of its own rows and puts it in its marker; digests
merge exactly (keep the k extremes, the k smallest sample keys, add counts), so the end of a run
folds markers as they arrive, never reading a row. Directions are not needed here: both ends are
kept and the report picks best and worst by the metric's direction.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

EXTREMES = 6  # images kept at each end of each metric, per explainer (>= the thumbnails)
SAMPLE = 12  # uniform sample per explainer
FIRST_ERRORS = 100
HIST_BINS = 10  # over [0, 1], plus one bin each for values below and above
SCORE = "score"  # the extremes key of the target's score (ranking without metrics)

# what a candidate row carries: enough to find its heatmap row and draw its thumbnail
CANDIDATE_FIELDS = ("image_id", "target", "target_name", "score", "source_uri", "source_member")


def sample_key(image_id: str, target: int, seed: int = 0) -> str:
    """A uniform, reproducible sample: the rows with the smallest keys (merges exactly)."""
    return hashlib.sha1(f"{seed}\0{image_id}\0{target}".encode()).hexdigest()[:16]


def _top(rows: list[dict], k: int, highest: bool) -> list[dict]:
    # ties by image id, so a page is reproducible whatever order the blocks arrived in
    return sorted(rows, key=lambda r: (-r["value"] if highest else r["value"], r["image_id"]))[:k]


def _bin(v: float) -> int:
    if v < 0:
        return 0
    if v > 1:
        return HIST_BINS + 1
    return 1 + min(int(v * HIST_BINS), HIST_BINS - 1)  # 1.0 falls in the last bin


def _histogram(values: list[float]) -> list[float]:
    """[n, sum, sum of squares, min, max, below 0, HIST_BINS bins over [0,1], above 1]."""
    counts = [0] * (HIST_BINS + 2)
    for v in values:
        counts[
            0 if v < 0 else HIST_BINS + 1 if v > 1 else 1 + min(int(v * HIST_BINS), HIST_BINS - 1)
        ] += 1
    return [len(values), sum(values), sum(v * v for v in values), min(values), max(values), *counts]


def _merge_histogram(a: list[float], b: list[float]) -> list[float]:
    return [a[0] + b[0], a[1] + b[1], a[2] + b[2], min(a[3], b[3]), max(a[4], b[4])] + [
        x + y for x, y in zip(a[5:], b[5:], strict=True)
    ]


def histogram_stats(h: list[float]) -> dict:
    """n, mean, std (population), min, max and the bin counts of a merged histogram."""
    n, total, squares = h[0], h[1], h[2]
    mean = total / n if n else None
    var = max(0.0, squares / n - mean * mean) if n else None
    return {
        "n": int(n),
        "mean": mean,
        "std": math.sqrt(var) if var is not None else None,
        "min": h[3],
        "max": h[4],
        "below": int(h[5]),
        "bins": [int(c) for c in h[6 : 6 + HIST_BINS]],
        "above": int(h[6 + HIST_BINS]),
    }


@dataclass
class Digest:
    # explainer -> metric key (or SCORE) -> {"top": rows, "bottom": rows}
    extremes: dict = field(default_factory=dict)
    # explainer -> rows with a "key" (sample_key), the SAMPLE smallest
    sample: dict = field(default_factory=dict)
    # explainer -> metric key -> class name -> histogram list (see _histogram)
    classes: dict = field(default_factory=dict)
    # top-1 accuracy over distinct images with a label: [labelled, correct]
    accuracy: list = field(default_factory=lambda: [0, 0])
    # "stage\terror_type" -> count, and the first errors by image id
    error_counts: dict = field(default_factory=dict)
    first_errors: list = field(default_factory=list)

    @classmethod
    def of_block(
        cls, block_id: str, heatmaps: list[dict], metrics: list[dict], errors: list[dict], seed=0
    ) -> Digest:
        """The digest of one block's rows (heatmap rows without their maps are enough)."""
        d = cls()
        meta = {(r["image_id"], r["explainer"], r["target"]): r for r in heatmaps}

        def candidate(r: dict, value: float) -> dict:
            return {**{f: r[f] for f in CANDIDATE_FIELDS}, "value": value, "block_id": block_id}

        per_key: dict[tuple[str, str], list[dict]] = {}
        for r in heatmaps:
            per_key.setdefault((r["explainer"], SCORE), []).append(candidate(r, float(r["score"])))
            d.sample.setdefault(r["explainer"], []).append(
                {
                    **candidate(r, float(r["score"])),
                    "key": sample_key(r["image_id"], r["target"], seed),
                }
            )
        values: dict[tuple[str, str, str], list[float]] = {}
        for m in metrics:
            v = m["value"]
            r = meta.get((m["image_id"], m["explainer"], m["target"]))
            if v is None or not math.isfinite(v) or r is None:
                continue
            per_key.setdefault((m["explainer"], m["metric"]), []).append(candidate(r, v))
            values.setdefault((m["explainer"], m["metric"], r["target_name"]), []).append(v)
        for (explainer, key), rows in per_key.items():
            d.extremes.setdefault(explainer, {})[key] = {
                "top": _top(rows, EXTREMES, True),
                "bottom": _top(rows, EXTREMES, False),
            }
        for explainer, rows in d.sample.items():
            d.sample[explainer] = sorted(rows, key=lambda r: r["key"])[:SAMPLE]
        for (explainer, metric, name), vs in values.items():
            d.classes.setdefault(explainer, {}).setdefault(metric, {})[name] = _histogram(vs)
        labelled = {
            r["image_id"]: r["predicted"] == r["label"] for r in heatmaps if r["label"] is not None
        }
        d.accuracy = [len(labelled), sum(labelled.values())]
        for e in errors:
            key = f"{e['stage']}\t{e['error_type']}"
            d.error_counts[key] = d.error_counts.get(key, 0) + 1
        d.first_errors = _first_errors(
            {k: e[k] for k in ("image_id", "stage", "error_type", "message", "fatal")}
            | {"message": e["message"][:300]}
            for e in errors
        )
        return d

    def merge(self, other: Digest) -> Digest:
        for explainer, per_key in other.extremes.items():
            mine = self.extremes.setdefault(explainer, {})
            for key, ends in per_key.items():
                have = mine.get(key, {"top": [], "bottom": []})
                mine[key] = {
                    "top": _top(have["top"] + ends["top"], EXTREMES, True),
                    "bottom": _top(have["bottom"] + ends["bottom"], EXTREMES, False),
                }
        for explainer, rows in other.sample.items():
            both = self.sample.get(explainer, []) + rows
            self.sample[explainer] = sorted(both, key=lambda r: r["key"])[:SAMPLE]
        for explainer, per_metric in other.classes.items():
            for metric, per_class in per_metric.items():
                mine = self.classes.setdefault(explainer, {}).setdefault(metric, {})
                for name, h in per_class.items():
                    mine[name] = _merge_histogram(mine[name], h) if name in mine else list(h)
        self.accuracy = [a + b for a, b in zip(self.accuracy, other.accuracy, strict=True)]
        for key, n in other.error_counts.items():
            self.error_counts[key] = self.error_counts.get(key, 0) + n
        self.first_errors = _first_errors(self.first_errors + other.first_errors)
        return self

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> Digest:
        return cls(**(data or {}))


def _first_errors(errors) -> list[dict]:
    return sorted(errors, key=lambda e: (not e["fatal"], e["image_id"], e["stage"]))[:FIRST_ERRORS]
