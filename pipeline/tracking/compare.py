"""The regression gate: compare a run's aggregate metrics with a baseline run's, per tolerance.

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
DIRECTION_TAG = "salient.direction."


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


def is_evaluation_metric(key: str) -> bool:
    """`<explainer>.<metric>` aggregates, not run counters or throughput (hardware-dependent)."""
    return "." in key and not key.endswith(".images_per_s")


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
    status: str  # ok | regressed | improved | missing | info


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
) -> list[Change]:
    """One Change per metric of either run. Raises ValueError when the gate would compare
    nothing: a tolerance pattern that matches no metric, or no gated metric in both runs."""
    keys = sorted(set(current) | set(baseline))
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
        if worse > allowed + 1e-12:
            status = "regressed"
        elif hib is not None and -worse > allowed:
            status = "improved"
        else:
            status = "ok"
        changes.append(Change(key, base, cur, delta, _s(tol), hib, status))
    if not any(c.tolerance is not None and c.delta is not None for c in changes):
        raise ValueError(
            "nothing to compare: the two runs share no gated metric "
            f"(current has {len(current)} metrics, baseline {len(baseline)})"
        )
    return changes


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
