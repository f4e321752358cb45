"""Faithfulness metrics (no ground truth): average drop, increase in confidence, win, deletion
and insertion AUC, ROAD. Every perturbed forward goes through the perturbed-forward core, so all
steps of many images run in a few large batches.
"""

from __future__ import annotations

from typing import Literal

import torch
from torchvision.transforms.functional import gaussian_blur

from ..compute.impute import linear_impute
from ..compute.maps import normalise01, upsample
from ..compute.perturbed_forward import blend, perturbed_scores
from ..compute.seeds import generator, image_seeds
from ..params import FiniteNonNegativeFloat, OpenUnitInterval, PixelValue, PositiveInt, Score
from .base import CurveMetric, ExplainedBatch, Metric, register
from .robustness import copy_noise, pixel_span


def explanation_map_scores(model, x, targets, maps, max_batch=None) -> torch.Tensor:
    """[B,2]: P_c(x) and P_c(x ⊙ M + x_d ⊙ (1-M)) with M the map in [0,1], x_d black (seed 004
    eq. 10-11)."""
    m = normalise01(maps.to(x.device))[:, None]
    black = model.preprocess.pixel_value(0.0, x.device)

    def make(img, k):
        kept = blend(x, m[img], img, black)
        return torch.where((k == 0)[:, None, None, None], x[img], kept)

    return perturbed_scores(model, targets.to(x.device), 2, make, max_batch=max_batch)


@register
class AverageDrop(Metric):
    """max(0, Y - O) / Y x 100 per image (lower is better); Y = P_c(x), O = P_c(explanation map
    image). 2 forwards per image."""

    name = "average_drop"
    higher_is_better = False

    def __init__(self, max_batch: PositiveInt | None = None):
        super().__init__()
        self.max_batch = max_batch

    def values(self, b: ExplainedBatch):
        s = explanation_map_scores(b.model, b.x, b.targets, b.maps, self.max_batch)
        y, o = s[:, 0], s[:, 1]
        return ((y - o).clamp_min(0) / y.clamp_min(1e-12) * 100).tolist()


@register
class IncreaseInConfidence(AverageDrop):
    """100 where O > Y, else 0: the mean is the % of images whose confidence rose."""

    name = "increase_in_confidence"
    higher_is_better = True
    proportion = 100.0

    def values(self, b: ExplainedBatch):
        s = explanation_map_scores(b.model, b.x, b.targets, b.maps, self.max_batch)
        return ((s[:, 1] > s[:, 0]).float() * 100).tolist()


@register
class Win(AverageDrop):
    """Image-by-image comparison of two explainers (seed 004): 100 where this explainer's
    explanation map keeps more of the target's probability than `against`'s (a lower drop),
    50 on a tie, else 0. Needs the other explainer's maps (`batch.maps_by_explainer`)."""

    name = "win"
    higher_is_better = True  # a win rate, not a drop (the base class's direction)

    def __init__(self, against: str = "", max_batch: PositiveInt | None = None):
        super().__init__(max_batch)
        if not against:
            raise ValueError("win: name the explainer to compare with (against=...)")
        self.against = against

    def values(self, b: ExplainedBatch):
        if self.against not in b.maps_by_explainer:
            raise ValueError(f"win: the job has no explainer {self.against!r} to compare with")
        mine = explanation_map_scores(b.model, b.x, b.targets, b.maps, self.max_batch)[:, 1]
        theirs = explanation_map_scores(
            b.model, b.x, b.targets, b.maps_by_explainer[self.against], self.max_batch
        )[:, 1]
        return torch.where(mine > theirs, 100.0, torch.where(mine == theirs, 50.0, 0.0)).tolist()


class _PixelCurve(CurveMetric):
    """Pixels are removed (deletion) or added (insertion) in order of saliency, `steps` steps of
    H*W/steps pixels; the target's softmax is scored at each of the steps+1 points and the AUC
    taken by the trapezoid rule over x in [0, 1]. steps+1 forwards per image, all batched."""

    deletion: bool

    def __init__(
        self,
        steps: PositiveInt = 224,
        substrate: Literal["black", "blur"] | PixelValue | None = None,
        max_batch: PositiveInt | None = None,
    ):
        super().__init__(steps + 1)
        self.steps, self.max_batch = steps, max_batch
        self.substrate = (
            substrate if substrate is not None else ("black" if self.deletion else "blur")
        )

    def _substrate(self, model, x) -> torch.Tensor:
        if self.substrate == "blur":
            return gaussian_blur(x, kernel_size=11, sigma=5.0)
        value = 0.0 if self.substrate == "black" else float(self.substrate)
        return model.preprocess.pixel_value(value, x.device).expand_as(x)

    def curves(self, model, x, targets, maps) -> torch.Tensor:
        b, _, h, w = x.shape
        n = h * w
        order = torch.argsort(maps.to(x.device).flatten(1), dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
        counts = torch.round(torch.arange(self.steps + 1, device=x.device) * n / self.steps)
        other = self._substrate(model, x)

        def make(img, k):
            touched = (rank[img] < counts[k][:, None]).view(-1, 1, h, w).float()
            if self.deletion:  # touched pixels show the substrate
                return x[img] * (1 - touched) + other[img] * touched
            return other[img] * (1 - touched) + x[img] * touched

        return perturbed_scores(
            model, targets.to(x.device), self.steps + 1, make, max_batch=self.max_batch
        )

    def values(self, b: ExplainedBatch):
        c = self.curves(b.model, b.x, b.targets, b.maps)
        self.add_curves(c)
        auc = ((c[:, 1:] + c[:, :-1]) / 2).sum(1) / self.steps
        return auc.tolist()


@register
class Deletion(_PixelCurve):
    """Deletion AUC: most salient pixels first, to black (lower is better)."""

    name = "deletion"
    higher_is_better = False
    deletion = True


@register
class Insertion(_PixelCurve):
    """Insertion AUC: most salient pixels first, onto a blurred image (higher is better)."""

    name = "insertion"
    deletion = False


@register
class Road(CurveMetric):
    """ROAD (Rong et al., ICML 2022): RemOve And Debias. At each of `percentages` (10%, ..., 90%)
    the pixels are removed most relevant first (MoRF) and, separately, least relevant first
    (LeRF), and filled by noisy linear imputation: the joint neighbour-mean solve of
    `compute.impute.linear_impute` plus Gaussian noise of `noise` (0.01) of the pixel range on
    each removed pixel (the reference code's `NoisyLinearImputer(noise=0.01)`, there added to
    whatever tensor it is given). The curves are the target's `score` (the model's score
    function by default) on each of the 2 x len(percentages) imputed copies.

    Value per image: the mean over the percentages of LeRF - MoRF, the area between the two
    curves over the removal range (higher is better: a faithful map loses the score fast when
    its top pixels go and keeps it when its bottom pixels go). Imputation leaves no trace of
    the removal's shape for the model to read, which is what makes MoRF and LeRF agree on the
    ranking of methods (the paper's point); their gap measures the map. The curve kept is MoRF
    at each percentage followed by LeRF at each; `report()` splits it.

    Pixels of equal relevance are ordered by a seeded permutation per image (content and
    `seed`), not by position, so a constant map gives MoRF and LeRF the same expected curve and
    a gap near zero; the noise is seeded per image and copy the same way. Maps at a lower
    resolution are upsampled. Cost: 2 x len(percentages) forwards and as many imputations.
    """

    name = "road"
    higher_is_better = True

    def __init__(
        self,
        percentages: list[OpenUnitInterval] | None = None,
        noise: FiniteNonNegativeFloat = 0.01,
        score: Score = "prob",
        seed: int = 0,
        max_batch: PositiveInt | None = None,
    ):
        self.percentages = list(percentages or [i / 10 for i in range(1, 10)])
        super().__init__(2 * len(self.percentages))
        self.noise, self.score, self.seed, self.max_batch = noise, score, seed, max_batch

    def ranks(self, maps: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """[B, H*W]: each pixel's place in MoRF order (0: the most relevant), ties by a seeded
        permutation."""
        flat = maps.flatten(1)
        b, n = flat.shape
        rank = torch.empty(b, n, dtype=torch.long, device=flat.device)
        for i in range(b):
            perm = torch.randperm(n, generator=generator(torch.device("cpu"), seeds[i]))
            perm = perm.to(flat.device)
            order = perm[torch.argsort(flat[i, perm], descending=True, stable=True)]
            rank[i, order] = torch.arange(n, device=flat.device)
        return rank

    def curves(self, model, x, targets, maps) -> torch.Tensor:
        """[B, 2K]: MoRF scores at the K percentages, then LeRF's."""
        b, c, h, w = x.shape
        n, k_count = h * w, len(self.percentages)
        seeds = image_seeds(x, self.seed)
        rank = self.ranks(upsample(maps.to(x.device).float(), (h, w)), seeds)
        counts = torch.tensor([round(p * n) for p in self.percentages], device=x.device)
        sigma = self.noise * pixel_span(model, x.device)

        def make(img, k):
            lerf = k >= k_count
            count = counts[k % k_count][:, None]
            r = rank[img]
            removed = torch.where(lerf[:, None], r >= n - count, r < count).view(-1, h, w)
            filled = linear_impute(x[img], removed)
            if self.noise > 0:
                unit = copy_noise(seeds, img, k, (c, h, w), "normal", x.device)
                filled = filled + unit * sigma * removed[:, None]
            return filled

        return perturbed_scores(
            model,
            targets.to(x.device),
            2 * k_count,
            make,
            score=self.score,
            max_batch=self.max_batch,
        )

    def values(self, b: ExplainedBatch):
        c = self.curves(b.model, b.x, b.targets, b.maps)
        self.add_curves(c)
        k = len(self.percentages)
        return (c[:, k:] - c[:, :k]).mean(1).tolist()

    def report(self) -> dict:
        curve, k = self.mean_curve(), len(self.percentages)
        return {"percentages": self.percentages, "morf": curve[:k], "lerf": curve[k:]}
