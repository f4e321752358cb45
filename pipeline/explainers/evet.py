"""EVET (seed 004): enhance any explainer with transformed copies of the input.

Steps (METHODS.md, Wrappers): (1) M^(0) = J(x), M^(i) = T_i^-1(J(T_i(x))), each min-max
normalised; (2) drop M^(j) when f_k(Phi(x, M^(j))) <= Gamma f_k(Phi(x, M^(0))), with
Phi(x, M) = x ⊙ M + x_d ⊙ (1 - M), x_d black; (3) M_hat = sum w_i M^(i), w_i ∝ f_k(Phi(x, M^(i)));
(4) sigma = per-pixel sample std of the kept maps over its bound for that sample size,
M_tilde = clip(M_hat + alpha (M_hat - 0.5), 0, 1), M* = sigma M_hat + (1 - sigma) M_tilde,
min-max normalised.

Choices where the paper is silent: M^(0) is always among the kept maps (it can never fail its
own test); each map is normalised before the inverse transform, so pixels the transform did not
cover come back as 0 (least salient); with a single kept map the std is undefined and sigma is
taken as 1 (no boost: EVET then returns the base map normalised).
"""

from __future__ import annotations

import math

import torch

from ..chunks import chunks
from ..compute.maps import normalise01
from ..compute.perturbed_forward import blend, perturbed_scores
from ..compute.transforms import EVET_TRANSFORMS, TRANSFORMS, TransformName
from ..params import FiniteNonNegativeFloat, PositiveInt, Score, UnitInterval
from .base import EXPLAINERS, Explainer, Explanation, build_explainer, register


def std_bound(n: int) -> float:
    """Largest sample std (ddof=1) of n values in [0,1]: half at 0, half at 1."""
    if n < 2:
        return 0.0
    lo, hi = n // 2, n - n // 2
    return math.sqrt(lo * hi / (n * (n - 1)))


def evet_combine(
    maps: torch.Tensor, probs: torch.Tensor, *, gamma: float = 0.99, alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2-4 on precomputed maps [B,n,H,W] in [0,1] (index 0 = M^(0)) and their perturbed
    probabilities [B,n]. -> (M* [B,H,W], kept [B,n] bool, weights [B,n])."""
    kept = probs > gamma * probs[:, :1]
    kept[:, 0] = True
    w = probs.clamp_min(0) * kept
    w_sum = w.sum(1, keepdim=True)
    # all kept probabilities 0 (degenerate): fall back to equal weights over the kept maps
    w = torch.where(w_sum > 0, w / w_sum.clamp_min(1e-30), kept / kept.sum(1, keepdim=True))
    m_hat = torch.einsum("bn,bnhw->bhw", w, maps)
    count = kept.sum(1)  # [B]
    km = kept[:, :, None, None].float()
    mean = (maps * km).sum(1) / count[:, None, None]
    var = ((maps - mean[:, None]) ** 2 * km).sum(1) / (count - 1).clamp_min(1)[:, None, None]
    bound = torch.tensor([std_bound(int(c)) for c in count], device=maps.device)
    sigma = torch.where(
        (count >= 2)[:, None, None],
        (var.sqrt() / bound.clamp_min(1e-12)[:, None, None]).clamp(0, 1),
        torch.ones_like(var),
    )
    m_tilde = (m_hat + alpha * (m_hat - 0.5)).clamp(0, 1)
    m_star = sigma * m_hat + (1 - sigma) * m_tilde
    return normalise01(m_star), kept, w


@register
class EVET(Explainer):
    """EVET around a registered explainer `base`, built with the dict `base_params` (a dict, not
    **kwargs, so `build_explainer` can validate EVET's own parameter names).

    The base explainer runs once on all B * (1 + n) original and transformed images (in chunks
    of `base_batch` images when given). Cost: (1 + n) x base cost + (1 + n) forwards for the
    filter. `extras`: `kept` [B, 1+n] bool, `weights` [B, 1+n], `probs` [B, 1+n], in the
    order ["original", *transforms].
    """

    name = "evet"
    default_score = "prob"

    def __init__(
        self,
        model,
        *,
        base: str = "gradcam",
        transforms: list[TransformName] | tuple[TransformName, ...] | None = None,
        alpha: FiniteNonNegativeFloat = 1.0,
        gamma: UnitInterval = 0.99,
        base_batch: PositiveInt | None = None,
        max_batch: PositiveInt | None = None,
        base_params: dict | None = None,
        score: Score | None = None,
    ):
        super().__init__(model, score=score)
        if base == self.name or base not in EXPLAINERS:
            known = ", ".join(sorted(k for k in EXPLAINERS if k != self.name))
            raise ValueError(f"evet: base must be a registered explainer ({known}), got {base!r}")
        names = list(EVET_TRANSFORMS) if transforms is None else list(transforms)
        self.base = build_explainer(base, model, **(base_params or {}))
        self.transforms = [TRANSFORMS[t] for t in names]
        self.transform_names = names
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.base_batch, self.max_batch = base_batch, max_batch

    def attribute(self, x, targets):
        b, _, h, w = x.shape
        n = 1 + len(self.transforms)
        black = self.model.preprocess.pixel_value(0.0, device=x.device)
        # step 1: one base call over [B, 1+n] images (image-major), chunked if asked
        copies = torch.stack([x] + [t.apply(x, black) for t in self.transforms], 1)
        flat_x, flat_t = copies.flatten(0, 1), targets.repeat_interleave(n)
        step = self.base_batch or flat_x.shape[0]
        raw = torch.cat(
            [self.base(flat_x[part], flat_t[part]) for part in chunks(len(flat_x), step)]
        ).view(b, n, h, w)
        normed = normalise01(raw.flatten(0, 1)).view(b, n, h, w)
        maps = torch.stack(
            [normed[:, 0]] + [t.invert(normed[:, i + 1]) for i, t in enumerate(self.transforms)],
            1,
        ).clamp(0, 1)

        # step 2: f_k(Phi(x, M^(i))) for every map, through the shared perturbed-forward core
        def make(img, k):
            return blend(x, maps[img, k][:, None], img, black)

        probs = perturbed_scores(
            self.model, targets, n, make, score=self.score, max_batch=self.max_batch
        )
        out, kept, weights = evet_combine(maps, probs, gamma=self.gamma, alpha=self.alpha)
        return Explanation(out, {"kept": kept, "weights": weights, "probs": probs})
