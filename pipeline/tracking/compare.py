"""The regression gate: compare a run's aggregate metrics with a baseline run's, per tolerance,
and flag a regression only when it is also significant.

A change beyond tolerance fails the gate only when a test says it is not noise (p < alpha,
default 0.05): a paired t-test on per-image differences when both runs scored the same images
(`paired.py` reads them from the runs' metrics tables), else Welch's t-test on the two runs'
count, mean and standard deviation (logged beside each metric as `<metric>.n` and `.sd`). A
change beyond tolerance that is not significant is reported as `noise` and passes; runs logged
without those numbers are gated on tolerance alone, as before. Each change records its test,
p-value, interval of the difference and standardised effect.

Tolerances are per metric key (globs allowed: `*.pointing_game`): a number is an absolute
tolerance, "5%" a relative one. Only metrics that match a tolerance are gated; the others are
reported. With no tolerances at all, every evaluation metric both runs have
(`<explainer>.<metric>`) is gated at DEFAULT_TOLERANCE. A gate never passes on nothing: a pattern
that matches no metric, or runs that share no gated metric, are errors. The direction of each
metric (higher or lower is better) comes from the run's `salient.direction.<metric>` tags, else
the metric registry; unknown metrics fail on a change beyond tolerance in either direction.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from ..stats import Difference, Moments, paired_test, welch_test

# Run-level metrics (not in the metric registry) and their direction.
RUN_METRICS = {
    "images_per_s": True,
    "images_ok": True,
    "inputs": None,
    "errors": False,
    "lost": False,
    "actor_restarts": False,
}


DEFAULT_TOLERANCE = "5%"
DEFAULT_ALPHA = 0.05
DIRECTION_TAG = "salient.direction."
# logged beside each aggregate metric `<explainer>.<metric>`: its count, the values' standard
# deviation and its 95% interval; statistics of a metric, not metrics to gate
STAT_SUFFIXES = ("n", "sd", "ci_low", "ci_high")


def parse_tolerance(text: str | float, what: str = "tolerance") -> str | float:
    """A tolerance as given (a number, or 'N%'), checked: a non-number or a negative value is a
    ValueError that names it."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) if raw.endswith("%") else float(raw)
    except ValueError:
        raise ValueError(f"{what}: must be a number or 'N%', got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise ValueError(f"{what}: must be >= 0, got {text!r}")
    return raw if raw.endswith("%") else value


def is_statistic(key: str, keys) -> bool:
    """`<metric>.n`, `.sd`, `.ci_low`, `.ci_high` beside a metric `<metric>` of the run."""
    base, _, suffix = key.rpartition(".")
    return suffix in STAT_SUFFIXES and base in keys


def is_evaluation_metric(key: str) -> bool:
    """`<explainer>.<metric>` aggregates, not run counters or throughput (hardware-dependent)."""
    return "." in key and not key.endswith(".images_per_s")


def moments(metrics: dict[str, float], key: str) -> Moments | None:
    """A logged metric's count, mean and spread as Moments (None when the run lacks them)."""
    n, sd = metrics.get(f"{key}.n"), metrics.get(f"{key}.sd")
    if n is None or sd is None or metrics.get(key) is None:
        return None
    n = int(n)
    return Moments(n, float(metrics[key]), float(sd) ** 2 * (n - 1))


def directions_from_tags(tags: dict[str, str]) -> dict[str, bool]:
    """metric key -> higher is better, from the `salient.direction.<metric>` tags of a run."""
    return {
        k[len(DIRECTION_TAG) :]: v == "higher_is_better"
        for k, v in tags.items()
        if k.startswith(DIRECTION_TAG)
    }


def direction_tags(directions: dict[str, bool]) -> dict[str, str]:
    return {
        f"{DIRECTION_TAG}{k}": "higher_is_better" if hib else "lower_is_better"
        for k, hib in directions.items()
    }


@dataclass
class Change:
    metric: str
    baseline: float | None
    current: float | None
    delta: float | None
    tolerance: str | None
    higher_is_better: bool | None
    status: str  # ok | regressed | improved | noise (beyond tolerance, not significant) | ...
    # missing | info; the evidence, when the runs carry it:
    test: str | None = None  # "paired t" | "welch t"
    n: int | None = None  # pairs, or the smaller sample
    p_value: float | None = None
    interval: list[float] | None = None  # 95% interval of current - baseline
    effect: float | None = None  # the difference in standard deviations (d, or d_z paired)


def higher_is_better(key: str, directions: dict[str, bool] | None = None) -> bool | None:
    name = key.rsplit(".", 1)[-1]
    if directions and name in directions:
        return directions[name]
    if name in RUN_METRICS:
        return RUN_METRICS[name]
    try:
        from ..metrics import METRICS
    except ImportError:
        return None
    for metric_name, cls in METRICS.items():
        if name == metric_name or name.startswith(metric_name + "_"):
            return getattr(cls, "higher_is_better", None)
    return None


def _tolerance_for(key: str, tolerances: dict) -> str | float | None:
    if key in tolerances:
        return tolerances[key]
    for pattern, tol in tolerances.items():
        if fnmatch.fnmatchcase(key, pattern):
            return tol
    return None


def _allowed(tol: str | float, baseline: float) -> float:
    if isinstance(tol, str) and tol.strip().endswith("%"):
        return abs(baseline) * float(tol.strip()[:-1]) / 100
    return float(tol)


def compare_metrics(
    current: dict[str, float],
    baseline: dict[str, float],
    tolerances: dict[str, str | float],
    fail_on_missing: bool = False,
    directions: dict[str, bool] | None = None,
    alpha: float = DEFAULT_ALPHA,
    paired: dict[str, Moments] | None = None,
) -> list[Change]:
    """One Change per metric of either run. `paired`: per metric key, the moments of per-image
    differences (current - baseline) over the images both runs scored, when they scored the
    same ones. Raises ValueError when the gate would compare nothing: a tolerance pattern that
    matches no metric, or no gated metric in both runs."""
    every = set(current) | set(baseline)
    keys = sorted(k for k in every if not is_statistic(k, every))
    for pattern, tol in tolerances.items():
        parse_tolerance(tol, f"tolerance {pattern!r}")
        if not any(k == pattern or fnmatch.fnmatchcase(k, pattern) for k in keys):
            raise ValueError(
                f"tolerance {pattern!r} matches no metric of the runs (they have: "
                f"{', '.join(k for k in keys if is_evaluation_metric(k)) or ', '.join(keys)})"
            )
    if not tolerances:
        shared = set(current) & set(baseline)
        tolerances = {k: DEFAULT_TOLERANCE for k in keys if k in shared and is_evaluation_metric(k)}
    changes = []
    for key in keys:
        cur, base = current.get(key), baseline.get(key)
        tol = _tolerance_for(key, tolerances)
        hib = higher_is_better(key, directions)
        if cur is None or base is None:
            status = "missing" if tol is not None and fail_on_missing and cur is None else "info"
            changes.append(Change(key, base, cur, None, _s(tol), hib, status))
            continue
        delta = cur - base
        if tol is None:
            changes.append(Change(key, base, cur, delta, None, hib, "info"))
            continue
        allowed = _allowed(tol, base)
        worse = -delta if hib else delta if hib is False else abs(delta)
        diff = _difference(key, current, baseline, paired or {})
        significant = diff is None or diff.p_value < alpha
        if worse > allowed + 1e-12:
            status = "regressed" if significant else "noise"
        elif hib is not None and -worse > allowed:
            status = "improved" if significant else "noise"
        else:
            status = "ok"
        evidence = {}
        if diff is not None:
            evidence = {
                "test": diff.test,
                "n": diff.n,
                "p_value": diff.p_value,
                "interval": list(diff.interval),
                "effect": diff.effect,
            }
        changes.append(Change(key, base, cur, delta, _s(tol), hib, status, **evidence))
    if not any(c.tolerance is not None and c.delta is not None for c in changes):
        raise ValueError(
            "nothing to compare: the two runs share no gated metric "
            f"(current has {len(current)} metrics, baseline {len(baseline)})"
        )
    return changes


def _difference(key: str, current: dict, baseline: dict, paired: dict) -> Difference | None:
    """The paired test where per-image differences are given, else Welch's on the moments."""
    if key in paired:
        diff = paired_test(paired[key])
        if diff is not None:
            return diff
    a, b = moments(current, key), moments(baseline, key)
    return None if a is None or b is None else welch_test(a, b)


def _s(tol) -> str | None:
    return None if tol is None else str(tol)


def gate(changes: list[Change]) -> str:
    return "fail" if any(c.status in ("regressed", "missing") for c in changes) else "pass"


def find_baseline(client, experiment_id: str, current_run, match_tags: list[str]):
    """The last successful run of the same experiment with the same values of `match_tags`,
    started before `current_run` (and not itself failed by its gate)."""
    filters = ["attributes.status = 'FINISHED'"]
    for tag in match_tags:
        value = current_run.data.tags.get(tag)
        if value is None:
            filters.append(f"tags.`{tag}` IS NULL")
        else:
            filters.append(f"tags.`{tag}` = '{value}'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=" and ".join(filters),
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        if run.info.run_id == current_run.info.run_id:
            continue
        if run.info.start_time > current_run.info.start_time:
            continue
        if run.data.tags.get("salient.gate") == "fail":
            continue
        return run
    return None


def paired_for(current_run, baseline_run, storage) -> tuple[dict[str, Moments], str]:
    """Per-image differences of the metrics both MLflow runs logged, read from their output
    tables (tag `salient.output_uri`), and a note saying how the pairing went. Where a run's
    tables cannot be read, nothing is paired and the gate uses Welch's test."""
    from .paired import paired_differences

    roots = [r.data.tags.get("salient.output_uri") for r in (current_run, baseline_run)]
    if not all(roots):
        return {}, "not paired: a run has no salient.output_uri tag"
    shared = set(current_run.data.metrics) & set(baseline_run.data.metrics)
    keys = sorted(k for k in shared if is_evaluation_metric(k) and not is_statistic(k, shared))
    try:
        paired = paired_differences(roots[0], roots[1], keys, storage)
    except Exception as e:  # the verdict still stands on the logged moments
        return {}, f"not paired: reading the runs' metrics tables failed ({type(e).__name__}: {e})"
    return paired, f"paired on per-image values for {len(paired)} of {len(keys)} metrics"


def resolve_run(client, run: str, experiment_ids: list[str] | None = None):
    """An MLflow run id, or a salient run id (tag `salient.run_id`) -> the MLflow run."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run)
    except MlflowException:
        pass
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(
        experiment_ids,
        filter_string=f"tags.`salient.run_id` = '{run}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        raise ValueError(f"no MLflow run {run!r} (neither a run id nor a salient.run_id tag)")
    return found[0]


def as_dicts(changes: list[Change]) -> list[dict]:
    return [asdict(c) for c in changes]
