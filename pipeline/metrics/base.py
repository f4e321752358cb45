"""Metric base class and the registry (the one extension point for metrics).

A metric is a streaming reducer: `update(batch)` takes one `ExplainedBatch` (the model, the
images, their targets and maps, their annotations and the explainer) and returns one value per
image, folded into a small `state()`; states from many Ray workers combine with `merge`, and
`compute()` gives the aggregate. The default aggregate is the mean of the non-null values; a
metric that needs more (curves, verdicts) extends the state.

What a metric `needs` is honoured here, once, for every metric: images without that ground truth
are left out before `values` runs and get None (a null, never a zero), so `values` only sees
images it can score.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

import torch

from ..models.loaded import LoadedModel
from ..registry import Registry
from ..stats import LEVEL, Moments, mean_interval, wilson_interval, z_for

if TYPE_CHECKING:  # metrics receive explainers; they never build on the explainers' module
    from ..explainers.base import Explainer

METRICS = Registry("metric")
register = METRICS.register
metric_class = METRICS.lookup
metric_params = METRICS.params


def build_metric(name: str, **params) -> Metric:
    """Names checked here, values by the class as it is built (the registry's check)."""
    METRICS.check_params(name, params)
    return metric_class(name)(**params)


@dataclass(frozen=True)
class ExplainedBatch:
    """One batch of explained images: everything a metric may score. Ground-truth metrics read
    only `maps` and `annotations`; the others need the model, the images and the targets too.

    maps                [B,H,W] the explainer's maps
    annotations         one dict per row ({} where the image has none): boxes, mask, landmarks
    model               the model that was explained
    x                   [B,3,H,W] the images in model space, on the model's device
    targets             [B] the explained class of each row
    explainer           the explainer that made `maps` (metrics that recompute maps use it)
    maps_by_explainer   every explainer's maps for the same rows, by key (`win` compares them)
    """

    maps: torch.Tensor
    annotations: list[dict] = field(default_factory=list)
    model: LoadedModel | None = None
    x: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    explainer: Explainer | None = None
    maps_by_explainer: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.maps)
        if not self.annotations:
            object.__setattr__(self, "annotations", [{} for _ in range(n)])
        sizes = {"annotations": len(self.annotations)}
        sizes |= {k: len(v) for k, v in (("x", self.x), ("targets", self.targets)) if v is not None}
        sizes |= {f"maps_by_explainer[{k!r}]": len(m) for k, m in self.maps_by_explainer.items()}
        wrong = {k: v for k, v in sizes.items() if v != n}
        if wrong:
            raise ValueError(
                f"a metric batch needs one row per map ({n}); got "
                + ", ".join(f"{v} {k}" for k, v in wrong.items())
            )

    def rows(self, keep: list[int]) -> ExplainedBatch:
        """The same batch restricted to the rows `keep`."""
        idx = torch.tensor(keep, dtype=torch.long)

        def on(t):
            return None if t is None else t[idx.to(t.device)]

        return replace(
            self,
            maps=on(self.maps),
            annotations=[self.annotations[i] for i in keep],
            x=on(self.x),
            targets=on(self.targets),
            maps_by_explainer={k: on(m) for k, m in self.maps_by_explainer.items()},
        )


def has_ground_truth(annotation: dict, needs: str) -> bool:
    """Whether an image's annotation holds what `needs` names ("boxes|mask": either)."""
    if needs == "none":
        return True
    for kind in needs.split("|"):
        value = annotation.get(kind)
        if value is not None and not (isinstance(value, list | tuple) and len(value) == 0):
            return True
    return False


class Metric:
    name: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    # ground truth needed: "none", "boxes", "boxes|mask" (either), "landmarks"; images without
    # it are nulled by `update` before `values` runs
    needs: ClassVar[str] = "none"
    # recomputes maps with the explainer that made them: `update` refuses a batch without one
    needs_explainer: ClassVar[bool] = False
    # what it needs of the model beyond forwards (LoadedModel.capabilities); checked by
    # `salient validate`, so a metric a model cannot support never reaches the actors
    requires: ClassVar[frozenset[str]] = frozenset()

    # the value that counts as a success for a 0/1 metric (1, or 100 for a percentage): its
    # aggregate is a proportion and gets a Wilson interval; None: a mean, mean +- z s / sqrt(n)
    proportion: ClassVar[float | None] = None

    def __init__(self):
        self.n = 0
        self.total = 0.0
        self.m2: float | None = 0.0  # None: merged from a state that did not keep it

    def update(self, batch: ExplainedBatch) -> list[float | None]:
        """Values for every row of the batch (None where the image lacks the ground truth the
        metric needs, or the metric cannot score it), folded into the state."""
        if self.needs_explainer and batch.explainer is None:
            raise ValueError(
                f"{self.name} needs the explainer that made the maps; the batch has none"
            )
        keep = [i for i, a in enumerate(batch.annotations) if has_ground_truth(a, self.needs)]
        values: list[float | None] = [None] * len(batch.maps)
        if len(keep) == len(values):
            values = list(self.values(batch))
        elif keep:
            for i, v in zip(keep, self.values(batch.rows(keep)), strict=True):
                values[i] = v
        self._fold(Moments.of(v for v in values if v is not None))
        return values

    def moments(self) -> Moments | None:
        """Count, mean and M2 of the values so far (None: a merged state lacked M2)."""
        if self.m2 is None:
            return None
        return Moments(self.n, self.total / self.n if self.n else 0.0, self.m2)

    def _fold(self, new: Moments) -> None:
        merged = self.moments().merge(new) if self.m2 is not None else None
        self.n += new.n
        self.total += new.mean * new.n
        self.m2 = merged.m2 if merged is not None else None

    def interval(self, level: float = LEVEL) -> tuple[float, float] | None:
        """The aggregate's interval: Wilson for a proportion, else mean +- z s / sqrt(n)."""
        if not self.n:
            return None
        if self.proportion:
            lo, hi = wilson_interval(self.total / self.proportion, self.n, level)
            return lo * self.proportion, hi * self.proportion
        m = self.moments()
        return None if m is None else mean_interval(m, level)

    def sd(self) -> float | None:
        m = self.moments()
        return None if m is None else m.sd

    def values(self, batch: ExplainedBatch) -> list[float | None]:
        """One value per row; every row has the ground truth `needs` names."""
        raise NotImplementedError

    def state(self) -> dict:
        return {"n": self.n, "total": self.total, "m2": self.m2}

    def merge(self, state: dict) -> Metric:
        n, m2 = state["n"], state.get("m2")  # states written before intervals have no M2
        if m2 is None or self.m2 is None:
            self.n += n
            self.total += state["total"]
            self.m2 = None
        else:
            self._fold(Moments(n, state["total"] / n if n else 0.0, m2))
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
        self.curve_sq: torch.Tensor | None = torch.zeros(length, dtype=torch.float64)

    def add_curves(self, curves: torch.Tensor) -> None:
        """curves [B, length] of the images just scored."""
        c = curves.detach().double().cpu()
        self.curve += c.sum(0)
        if self.curve_sq is not None:
            self.curve_sq += (c * c).sum(0)

    def state(self) -> dict:
        sq = None if self.curve_sq is None else self.curve_sq.tolist()
        return {**super().state(), "curve": self.curve.tolist(), "curve_sq": sq}

    def merge(self, state: dict) -> Metric:
        super().merge(state)
        self.curve += torch.tensor(state["curve"], dtype=torch.float64)
        if self.curve_sq is not None and state.get("curve_sq") is not None:
            self.curve_sq += torch.tensor(state["curve_sq"], dtype=torch.float64)
        else:
            self.curve_sq = None
        return self

    def mean_curve(self) -> list[float]:
        return (self.curve / max(self.n, 1)).tolist()

    def curve_band(self, level: float = LEVEL) -> tuple[list[float], list[float]] | None:
        """Pointwise mean +- z s / sqrt(n) of the curves (a band around `mean_curve`). Sums of
        squares are exact enough here: curve values are scores and IoUs in [0, 1]."""
        if self.curve_sq is None or self.n < 2:
            return None
        mean = self.curve / self.n
        var = ((self.curve_sq - self.n * mean * mean) / (self.n - 1)).clamp_min(0)
        half = z_for(level) * var.sqrt() / self.n**0.5
        return (mean - half).tolist(), (mean + half).tolist()


def positive(maps: torch.Tensor) -> torch.Tensor:
    """Signed maps count only their positive evidence in energy- and area-based metrics."""
    return maps.clamp_min(0)
