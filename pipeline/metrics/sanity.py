"""Sanity checks: cascading parameter randomisation (Adebayo et al., seed 002 Table 3) and the
random logit test (Sixt et al. 2020, `RandomLogit` below).

On a deep copy of the model (the original is never touched) the parameterised layers are
re-initialised from the top (the classifier first) down, in `steps` cumulative groups; after each
group the explainer is rebuilt on the copy and the maps recomputed. Similarity to the original
maps: |Spearman rank correlation| and SSIM, both on [0,1]-normalised maps. A method passes when
its mean similarity over the cascade falls below `threshold`: its maps depend on what the model
learned. (The mean over the cascade, not the last step: a method that fails, like guided
backprop, keeps its maps while the top layers are randomised and only loses them once the
bottom layers go too, as in Adebayo et al.'s figures.)
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..compute.maps import normalise01
from ..compute.seeds import generator, image_seeds
from ..params import PositiveInt, UnitInterval
from .base import ExplainedBatch, Metric, register

_PARAMETERISED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)


def average_ranks(a: torch.Tensor) -> torch.Tensor:
    """Per row of [B,N]: 0-based ranks, tied values sharing their mean rank (scipy's
    rankdata 'average' minus one). Ranking ties by position would invent an order: the zero
    region of a rectified map would correlate with whatever lies at the same positions."""
    ordered = a.sort(dim=1).values.contiguous()
    below = torch.searchsorted(ordered, a.contiguous(), side="left")
    upto = torch.searchsorted(ordered, a.contiguous(), side="right")
    return (below + upto - 1).double() / 2


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row of [B,N]: Spearman's rho on average ranks. A constant row has no order to
    share: its rho is 0 (scipy gives nan), so a map the randomised model flattens counts as
    dissimilar, not as a number drawn from pixel positions."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    var = (ra * ra).sum(1) * (rb * rb).sum(1)
    rho = (ra * rb).sum(1) / torch.sqrt(var).clamp_min(1e-12)
    return torch.where(var > 0, rho, torch.zeros_like(rho)).float()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per pair of [B,H,W] maps in [0,1] (Gaussian window, C1=0.01², C2=0.03²)."""
    g = torch.exp(-((torch.arange(window, device=a.device) - window // 2) ** 2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    k = (g[:, None] * g[None, :])[None, None]
    a, b = a[:, None].float(), b[:, None].float()

    def blur(t):
        return F.conv2d(t, k, padding=window // 2)

    mu_a, mu_b = blur(a), blur(b)
    va = blur(a * a) - mu_a**2
    vb = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)


def cascade_groups(module: nn.Module, steps: int) -> list[list[nn.Module]]:
    """Parameterised layers from the output backwards, cut into `steps` cumulative groups."""
    layers = [m for m in module.modules() if isinstance(m, _PARAMETERISED)][::-1]
    steps = max(1, min(steps, len(layers)))
    bounds = [round(len(layers) * (i + 1) / steps) for i in range(steps)]
    return [layers[:b] for b in bounds]


@register
class ParameterRandomisation(Metric):
    """Per image: mean over the cascade steps of |Spearman| between the original and the
    randomised model's maps (lower means the method is sensitive to the weights). `report()`
    gives the per-step similarity curve and the verdict. Needs the explainer that made the maps
    (`batch.explainer`) or its name (`explainer=`)."""

    name = "parameter_randomisation"
    requires = frozenset({"weights"})
    higher_is_better = False

    def __init__(
        self,
        explainer: str | None = None,
        explainer_params: dict | None = None,
        steps: PositiveInt = 4,
        threshold: UnitInterval = 0.5,
        seed: int = 0,
    ):
        super().__init__()
        self.explainer_name, self.explainer_params = explainer, dict(explainer_params or {})
        self.steps, self.threshold, self.seed = steps, threshold, seed
        self.curve_spearman = [0.0] * steps
        self.curve_ssim = [0.0] * steps

    def values(self, b: ExplainedBatch):
        model, x, targets, maps, explainer = b.model, b.x, b.targets, b.maps, b.explainer
        from ..explainers import build_explainer
        from ..models import wrap_module

        name = self.explainer_name or (explainer.name if explainer is not None else None)
        if name is None:
            raise ValueError("parameter_randomisation needs an explainer (its name or the batch's)")
        params = self.explainer_params or (getattr(explainer, "params", {}) if explainer else {})
        original = normalise01(maps.to(x.device)).flatten(1)
        twin = copy.deepcopy(model.module)
        gen = torch.Generator().manual_seed(self.seed)
        groups = cascade_groups(twin, self.steps)
        done: set[int] = set()
        per_step = []
        for i, group in enumerate(groups):
            for layer in group:
                if id(layer) not in done:
                    _reinit(layer, gen)
                    done.add(id(layer))
            copy_model = wrap_module(
                twin,
                model.preprocess,
                id=f"{model.id}#randomised-{i}",
                device=model.device,
                labels=model.labels,
            )
            randomised = build_explainer(name, copy_model, **params)(x, targets)
            r = normalise01(randomised).flatten(1)
            rho = spearman(original, r).abs()
            sim = ssim(original.view_as(maps), r.view_as(maps))
            self.curve_spearman[i] += float(rho.sum())
            self.curve_ssim[i] += float(sim.sum())
            per_step.append(rho)
        return torch.stack(per_step).mean(0).tolist()

    def state(self):
        return {**super().state(), "spearman": self.curve_spearman, "ssim": self.curve_ssim}

    def merge(self, state):
        super().merge(state)
        self.curve_spearman = [
            a + b for a, b in zip(self.curve_spearman, state["spearman"], strict=True)
        ]
        self.curve_ssim = [a + b for a, b in zip(self.curve_ssim, state["ssim"], strict=True)]
        return self

    def report(self) -> dict:
        n = max(self.n, 1)
        final = self.compute()
        return {
            "verdict": None if final is None else ("pass" if final < self.threshold else "fail"),
            "mean_spearman": final,
            "spearman_by_step": [v / n for v in self.curve_spearman],
            "ssim_by_step": [v / n for v in self.curve_ssim],
            "threshold": self.threshold,
        }


def _reinit(layer: nn.Module, gen: torch.Generator) -> None:
    """Random weights drawn from a seeded generator (so the check is reproducible)."""
    with torch.no_grad():
        for name, p in layer.named_parameters(recurse=False):
            if name == "weight" and p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif name == "weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.zero_()
            layer.running_var.fill_(1.0)


def random_other_classes(x: torch.Tensor, targets: torch.Tensor, classes: int, seed: int):
    """[B]: per image a class drawn uniformly from the `classes` - 1 other than its target, from a
    generator seeded by the image's content and `seed` (the same draw in any batch)."""
    out = []
    for s, t in zip(image_seeds(x, seed), targets.tolist(), strict=True):
        r = int(torch.randint(classes - 1, (1,), generator=generator(torch.device("cpu"), s)))
        out.append(r + (r >= t))  # skip the target: uniform over the others
    return torch.tensor(out, dtype=torch.long, device=targets.device)


@register
class RandomLogit(Metric):
    """Random logit test (Sixt, Granz, Landgraf, ICML 2020, "When Explanations Lie"): SSIM (the
    one above, on [0,1]-normalised maps) between the map for the target and the map for a random
    other class, recomputed with the batch's explainer. Lower is better: a method whose map does
    not change with the explained class scores 1. The other class is uniform over the model's
    other classes, seeded by the image and `seed`; a model with one class gives None.
    Cost: 1 x explainer."""

    name = "random_logit"
    higher_is_better = False
    needs_explainer = True

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def values(self, b: ExplainedBatch):
        model, x, targets, maps = b.model, b.x, b.targets, b.maps
        classes = model.num_classes
        if classes < 2:
            return [None] * len(maps)
        others = random_other_classes(x, targets.to(x.device), classes, self.seed)
        other_maps = b.explainer(x, others).to(x.device)
        return ssim(normalise01(maps.to(x.device)), normalise01(other_maps)).tolist()
