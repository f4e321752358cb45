"""Stability index (seed 004, eq. 8-9): how much an explanation moves when the image is
transformed and the map transformed back.

Psi(M1, M2) = 1 - ||M1 - M2||_F / sqrt(#elements), maps in [0,1];
SI = mean over images of Psi(J(x), T^-1(J(T(x)))), per transform and averaged.
The inverse leaves uncovered borders empty, so Psi is taken over the pixels T^-1 covers.
"""

from __future__ import annotations

import torch

from ..compute.maps import normalise01
from ..compute.transforms import TRANSFORMS, TransformName
from .base import ExplainedBatch, Metric, register


def psi(m1: torch.Tensor, m2: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per map: 1 - ||m1 - m2||_F / sqrt(n) over the valid pixels (maps already in [0,1])."""
    d = (m1 - m2) ** 2
    if valid is None:
        return 1 - torch.sqrt(d.flatten(1).mean(1))
    v = valid.float().expand_as(d).flatten(1)
    return 1 - torch.sqrt((d.flatten(1) * v).sum(1) / v.sum(1).clamp_min(1))


@register
class StabilityIndex(Metric):
    """Needs the explainer (`batch.explainer`): cost = len(transforms) x its cost."""

    name = "stability_index"
    needs_explainer = True

    def __init__(self, transforms: list[TransformName] | None = None):
        super().__init__()
        names = transforms or [t for t in TRANSFORMS if t != "identity"]
        self.transforms = {n: TRANSFORMS[n] for n in names}
        self.per_transform = {n: [0, 0.0] for n in names}

    def values(self, b: ExplainedBatch):
        model, x, targets, explainer = b.model, b.x, b.targets, b.explainer
        base = normalise01(b.maps.to(x.device))
        black = model.preprocess.pixel_value(0.0, x.device)
        scores = []
        for name, t in self.transforms.items():
            back = t.invert(normalise01(explainer(t.apply(x, fill=black), targets)))
            valid = t.invert(torch.ones_like(base)) > 0.99
            s = psi(base, back, valid).cpu()
            self.per_transform[name][0] += len(s)
            self.per_transform[name][1] += float(s.sum())
            scores.append(s)
        return torch.stack(scores).mean(0).tolist()

    def state(self):
        return {**super().state(), "per_transform": self.per_transform}

    def merge(self, state):
        super().merge(state)
        for name, (n, total) in state["per_transform"].items():
            acc = self.per_transform.setdefault(name, [0, 0.0])
            acc[0] += n
            acc[1] += total
        return self

    def by_transform(self) -> dict[str, float | None]:
        return {k: (t / n if n else None) for k, (n, t) in self.per_transform.items()}
