"""Metrics: `build_metric(name, **params)`; `update(model, x, targets, maps, annotations)` per
batch (per-image values, None where ground truth is missing), `state()`/`merge()` across
workers, `compute()` for the aggregate. One registry (METRICS); one module per family."""

from . import faithfulness, localisation, sanity, stability  # noqa: F401  (registration)
from .base import METRICS, Metric, build_metric, metric_class, metric_params

__all__ = ["METRICS", "Metric", "build_metric", "metric_class", "metric_params"]
