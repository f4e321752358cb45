"""Localisation metrics (need boxes, masks or landmarks): pointing game and its variants,
energy pointing game, relevance rank accuracy, IoU curve, localisation error, landmark distance.
METHODS.md "Metrics".

Boxes are [x0, y0, x1, y1] in pixels of the model input, corners inclusive (ImageNet). An image
without the needed ground truth gets None. Signed maps: the peak of the raw map points; energy
and area use the positive part.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from ..compute.maps import normalise01
from ..params import NonNegativeFloat, PositiveInt, UnitInterval
from .base import CurveMetric, ExplainedBatch, Metric, positive, register


def box_mask(boxes, h: int, w: int, device=None) -> torch.Tensor:
    """Union of inclusive pixel boxes as a bool [H,W] mask."""
    ys = torch.arange(h, device=device)[:, None]
    xs = torch.arange(w, device=device)[None, :]
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    for x0, y0, x1, y1 in boxes:
        mask |= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return mask


def ground_truth(ann: dict, h: int, w: int, device=None) -> torch.Tensor | None:
    """The image's mask if it has one, else the union of its boxes (None: neither)."""
    if ann.get("mask") is not None:
        return torch.as_tensor(np.asarray(ann["mask"], dtype=bool), device=device)
    if ann.get("boxes"):
        return box_mask(ann["boxes"], h, w, device)
    return None


def peak(m: torch.Tensor) -> tuple[int, int]:
    """(y, x) of the first maximum."""
    idx = int(torch.argmax(m))
    return idx // m.shape[1], idx % m.shape[1]


def blob_centroid(m: torch.Tensor, frac: float = 0.95) -> tuple[int, int]:
    """Seed 000's pointing: threshold at `frac` of the max, centroid of the biggest blob."""
    from scipy import ndimage

    a = m.detach().float().cpu().numpy()
    labels, n = ndimage.label(a >= frac * a.max())
    if n == 0:
        return peak(m)
    sizes = ndimage.sum_labels(np.ones_like(a), labels, index=np.arange(1, n + 1))
    biggest = int(np.argmax(sizes)) + 1
    cy, cx = ndimage.center_of_mass(labels == biggest)
    return int(round(cy)), int(round(cx))


def distance_to_boxes(y: float, x: float, boxes) -> float:
    """Euclidean distance from a pixel to the nearest box (0 inside)."""
    best = math.inf
    for x0, y0, x1, y1 in boxes:
        dx = max(x0 - x, 0.0, x - x1)
        dy = max(y0 - y, 0.0, y - y1)
        best = min(best, math.hypot(dx, dy))
    return best


Variant = Literal["max", "blob"]  # the pointing game's point: the maximum or seed 000's blob


@register
class PointingGame(Metric):
    """Hit (1) if the map's maximum lies in a ground-truth box (within `tolerance` px), else 0;
    the aggregate is hits / (hits + misses). variant "max" (plain maximum) or "blob" (seed 000:
    0.95 of the max, centroid of the biggest blob)."""

    name = "pointing_game"
    needs = "boxes|mask"
    proportion = 1.0

    def __init__(self, tolerance: NonNegativeFloat = 0.0, variant: Variant = "max"):
        super().__init__()
        self.tolerance, self.variant = float(tolerance), variant

    def hit(self, m: torch.Tensor, ann: dict) -> float:
        h, w = m.shape
        y, x = blob_centroid(m) if self.variant == "blob" else peak(m)
        if ann.get("boxes"):
            return float(distance_to_boxes(y, x, ann["boxes"]) <= self.tolerance)
        gt = ground_truth(ann, h, w)
        if gt[y, x]:
            return 1.0
        if self.tolerance == 0:
            return 0.0
        ys, xs = torch.nonzero(gt, as_tuple=True)
        d = torch.sqrt((ys.float() - y) ** 2 + (xs.float() - x) ** 2).min()
        return float(d <= self.tolerance)

    def select(self, ann: dict, h: int, w: int) -> bool:
        return True

    def values(self, b: ExplainedBatch):
        out = []
        for m, ann in zip(b.maps, b.annotations, strict=True):
            h, w = m.shape
            out.append(self.hit(m, ann) if self.select(ann, h, w) else None)
        return out


@register
class PointingGameSmall(PointingGame):
    """The pointing game on images whose target boxes cover < 1/4 of the image (seed 000);
    other images are null."""

    name = "pointing_game_small"

    def __init__(
        self,
        tolerance: NonNegativeFloat = 0.0,
        variant: Variant = "max",
        max_area: UnitInterval = 0.25,
    ):
        super().__init__(tolerance, variant)
        self.max_area = max_area

    def select(self, ann: dict, h: int, w: int) -> bool:
        return float(ground_truth(ann, h, w).float().mean()) < self.max_area


@register
class EnergyPointingGame(Metric):
    """Share of the (positive) map's energy inside the boxes or mask."""

    name = "energy_pointing_game"
    needs = "boxes|mask"

    def values(self, b: ExplainedBatch):
        out = []
        for m, ann in zip(positive(b.maps), b.annotations, strict=True):
            gt = ground_truth(ann, *m.shape, device=m.device)
            total = float(m.sum())
            out.append(float(m[gt].sum()) / total if total > 0 else 0.0)
        return out


def rank_accuracies(maps: torch.Tensor, gts: torch.Tensor) -> list[float | None]:
    """Per row of [B,H,W] maps and masks: the share of the K = |gt| highest map pixels inside
    gt (None for an empty gt). Pixels tied with the K-th value share the places left at that
    value: each counts as the fraction of those places per tied pixel, the expected share under
    a random order of the ties (so a constant map scores K / N, chance, not the share of the
    first pixels in raster order). One sort for the batch, no per-image host round trips."""
    flat, inside = maps.flatten(1).double(), gts.flatten(1).bool()
    k = inside.sum(1)
    ordered = flat.sort(1, descending=True).values
    kth = ordered.gather(1, (k - 1).clamp_min(0)[:, None])
    above, tied = flat > kth, flat == kth
    places = (k - above.sum(1)).double()
    hits = (above & inside).sum(1) + places * (tied & inside).sum(1) / tied.sum(1).clamp_min(1)
    share = hits / k.clamp_min(1)
    return [None if n == 0 else v for n, v in zip(k.tolist(), share.tolist(), strict=True)]


def rank_accuracy(m: torch.Tensor, gt: torch.Tensor) -> float | None:
    """`rank_accuracies` of one map and mask."""
    return rank_accuracies(m[None], gt[None])[0]


@register
class RelevanceRankAccuracy(Metric):
    """Arras et al. 2022 (CLEVR-XAI): with K the number of ground-truth pixels (mask, else the
    union of the boxes), the fraction of the K highest-ranked map pixels that lie inside it. The
    raw map is ranked (positive evidence first); ties at the K-th value count by their expected
    share (`rank_accuracy`). An image whose ground truth covers no pixel gets None."""

    name = "relevance_rank_accuracy"
    needs = "boxes|mask"

    def values(self, b: ExplainedBatch):
        h, w = b.maps.shape[-2:]
        gts = torch.stack([ground_truth(a, h, w, device=b.maps.device) for a in b.annotations])
        return rank_accuracies(b.maps, gts)


@register
class IoUCurve(CurveMetric):
    """IoU of the [0,1]-normalised map thresholded at t with the ground truth, for `thresholds`
    evenly spaced t in [0, 1); the value is the mean IoU over t (the curve is kept too)."""

    name = "iou_curve"
    needs = "boxes|mask"

    def __init__(self, thresholds: PositiveInt = 20):
        super().__init__(thresholds)
        self.t = torch.arange(thresholds) / thresholds

    def values(self, b: ExplainedBatch):
        out = []
        for m, ann in zip(normalise01(positive(b.maps)), b.annotations, strict=True):
            gt = ground_truth(ann, *m.shape, device=m.device)
            binary = m[None] >= self.t.to(m.device)[:, None, None]  # [T,H,W]
            inter = (binary & gt).flatten(1).sum(1).double()
            union = (binary | gt).flatten(1).sum(1).double()
            iou = (inter / union.clamp_min(1)).cpu()
            self.add_curves(iou[None])
            out.append(float(iou.mean()))
        return out


def energy_box(m: torch.Tensor, energy: float = 0.95) -> list[int] | None:
    """Tightest box around the fewest highest pixels holding `energy` of the map's mass."""
    flat = m.flatten()
    total = float(flat.sum())
    if total <= 0:
        return None
    values, order = torch.sort(flat, descending=True)
    k = int(torch.searchsorted(torch.cumsum(values, 0), energy * total)) + 1
    keep = order[: min(k, flat.numel())]
    ys, xs = keep // m.shape[1], keep % m.shape[1]
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


def box_iou(a, b) -> float:
    """IoU of two inclusive pixel boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@register
class LocalisationError(Metric):
    """Seed 002 Table 1: box around 95% of the map's energy; correct if IoU > 0.5 with some
    ground-truth box. The value is the error (1 wrong, 0 correct), so lower is better."""

    name = "localisation_error"
    higher_is_better = False
    needs = "boxes"

    def __init__(self, energy: UnitInterval = 0.95, iou: UnitInterval = 0.5):
        super().__init__()
        self.energy, self.iou = energy, iou

    def values(self, b: ExplainedBatch):
        out = []
        for m, ann in zip(positive(b.maps), b.annotations, strict=True):
            box = energy_box(m, self.energy)
            ok = box is not None and max(box_iou(box, b) for b in ann["boxes"]) > self.iou
            out.append(0.0 if ok else 1.0)
        return out


@register
class LandmarkDistance(Metric):
    """Pixel distance from the map's peak to the nearest landmark (seed 000 Table 1)."""

    name = "landmark_distance"
    higher_is_better = False
    needs = "landmarks"

    def values(self, b: ExplainedBatch):
        out = []
        for m, ann in zip(b.maps, b.annotations, strict=True):
            y, x = peak(m)
            out.append(min(math.hypot(px - x, py - y) for px, py in ann["landmarks"]))
        return out
