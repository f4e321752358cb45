"""Metric base class and the registry (the one extension point for metrics).

A metric is a streaming reducer: `update(model, x, targets, maps, annotations, **context)`
returns one value per image (None where the image lacks the ground truth the metric needs: a
null, never a zero) and folds them into a small `state()`; states from many Ray workers combine
with `merge`, and `compute()` gives the aggregate. The default aggregate is the mean of the
non-null values; a metric that needs more (curves, verdicts) extends the state.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..registry import Registry

METRICS = Registry("metric")
register = METRICS.register
metric_class = METRICS.lookup
metric_params = METRICS.params


def build_metric(name: str, **params) -> Metric:
    """Names checked here, values by the class as it is built (the registry's check)."""
    METRICS.check_params(name, params)
    return metric_class(name)(**params)


class Metric:
    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    # ground truth needed: "none", "boxes", "boxes|mask" (either), "landmarks"
    needs: ClassVar[str] = "none"
    # needs the explainer object (context `explainer`) to recompute maps
    needs_explainer: ClassVar[bool] = False

    def __init__(self):
        self.n = 0
        self.total = 0.0

    @property
    def forward_passes(self) -> int:
        """Model forwards per image this metric costs (0 for ground-truth metrics)."""
        return 0

    def update(self, model, x, targets, maps, annotations, **context) -> list[float | None]:
        values = self.values(model, x, targets, maps, annotations, **context)
        for v in values:
            if v is not None:
                self.n += 1
                self.total += float(v)
        return values

    def values(self, model, x, targets, maps, annotations, **context) -> list[float | None]:
        raise NotImplementedError

    def state(self) -> dict:
        return {"n": self.n, "total": self.total}

    def merge(self, state: dict) -> Metric:
        self.n += state["n"]
        self.total += state["total"]
        return self

    def compute(self) -> float | None:
        return self.total / self.n if self.n else None

    @classmethod
    def from_states(cls, states: list[dict], **params) -> Metric:
        m = cls(**params)
        for s in states:
            m.merge(s)
        return m


class CurveMetric(Metric):
    """A metric that also sums one curve per image (deletion/insertion scores, IoU by
    threshold), so reports can show the mean curve across every worker's images."""

    def __init__(self, length: int):
        super().__init__()
        self.curve = torch.zeros(length, dtype=torch.float64)

    def add_curves(self, curves: torch.Tensor) -> None:
        """curves [B, length] of the images just scored."""
        self.curve += curves.detach().double().sum(0).cpu()

    def state(self) -> dict:
        return {**super().state(), "curve": self.curve.tolist()}

    def merge(self, state: dict) -> Metric:
        super().merge(state)
        self.curve += torch.tensor(state["curve"], dtype=torch.float64)
        return self

    def mean_curve(self) -> list[float]:
        return (self.curve / max(self.n, 1)).tolist()


def positive(maps: torch.Tensor) -> torch.Tensor:
    """Signed maps count only their positive evidence in energy- and area-based metrics."""
    return maps.clamp_min(0)
