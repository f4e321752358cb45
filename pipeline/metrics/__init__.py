"""Metrics: `build_metric(name, **params)`; `update(ExplainedBatch(maps, annotations, model=,
x=, targets=, explainer=))` per batch (per-image values, None where the image lacks the ground
truth the metric needs), `state()`/`merge()` across workers, `compute()` for the aggregate. One
registry (METRICS); one module per family."""

from . import faithfulness, localisation, robustness, sanity, stability  # noqa: F401  (registration)
from .base import METRICS, ExplainedBatch, Metric, build_metric, metric_class, metric_params

__all__ = ["METRICS", "ExplainedBatch", "Metric", "build_metric", "metric_class", "metric_params"]
