"""Robustness metrics (no ground truth): infidelity and max-sensitivity (Yeh et al., "On the
(In)fidelity and Sensitivity of Explanations", NeurIPS 2019). METHODS.md "Added with the metrics
and analysis work"; Captum's `infidelity` and `sensitivity_max` are the reference.

Both perturb the image with seeded noise. Noise is given as a fraction of the pixel range [0, 1]
and moved into model space per channel (the width of [0, 1] after the model's normalisation), so
a value means the same on every model. Each (image, copy) draws its noise from its own generator,
seeded by the image's content and the run's seed (`image_seeds`) and by the copy index: the same
draw whichever batch the image sits in, whichever chunk asks for it, and on a rerun.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..compute.maps import upsample
from ..compute.perturbed_forward import perturbed_scores
from ..compute.seeds import generator, image_seeds
from ..params import FinitePositiveFloat, PositiveInt, Score
from .base import ExplainedBatch, Metric, register

Noise = Literal["normal", "uniform"]

_COPY_STRIDE = 0x9E37_79B9_7F4A_7C15  # odd: copies of one image get distinct generator seeds


def pixel_span(model, device=None) -> torch.Tensor:
    """[1,3,1,1]: the width of the pixel range [0, 1] in model space, per channel."""
    return model.preprocess.pixel_value(1.0, device) - model.preprocess.pixel_value(0.0, device)


def copy_noise(
    seeds: list[int],
    img: torch.Tensor,
    k: torch.Tensor,
    shape: tuple[int, ...],
    kind: Noise,
    device=None,
) -> torch.Tensor:
    """Unit noise [len(img), *shape] for the rows (image img[i], copy k[i]): standard normal or
    uniform in [-1, 1], each row from its own generator (image seed, copy index)."""
    out = torch.empty(len(img), *shape, device=device)
    for row, (i, j) in enumerate(zip(img.tolist(), k.tolist(), strict=True)):
        g = generator(out.device, (seeds[i] + _COPY_STRIDE * (j + 1)) % 2**63)
        if kind == "normal":
            out[row].normal_(generator=g)
        else:
            out[row].uniform_(-1.0, 1.0, generator=g)
    return out


def perturbations(
    model, x: torch.Tensor, n: int, scale: float, kind: Noise, seed: int = 0
) -> torch.Tensor:
    """[B, n, 3, H, W]: the noise the metrics below add to (max_sensitivity) or take from
    (infidelity) each image, in model space: unit noise x `scale` of the pixel range. Exposed so
    a reference implementation can be fed the very same draws."""
    b = x.shape[0]
    img = torch.arange(b).repeat_interleave(n)
    k = torch.arange(n).repeat(b)
    unit = copy_noise(image_seeds(x, seed), img, k, x.shape[1:], kind, x.device)
    return (unit * (scale * pixel_span(model, x.device))).view(b, n, *x.shape[1:])


@register
class Infidelity(Metric):
    """Yeh et al. 2019 eq. 1: E_I[(I^T Phi(x) - (f(x) - f(x - I)))^2], lower is better.

    I is Gaussian noise of standard deviation `std` of the pixel range ([0, 1]; 0.003 is just
    under one 8-bit grey level, Captum's documented perturbation), `n_perturb` (10) draws per
    image. f is the target's class score (`score`: "prob", the model's score function, as the
    faithfulness metrics; or "logit"). Phi is the map upsampled to the input size and broadcast
    over the three channels (a per-pixel relevance counts once per channel of I), which is the
    attribution Captum's `infidelity` receives.

    `normalize` (default on) scales Phi by the beta that minimises the error,
    beta = sum(I^T Phi * delta f) / sum((I^T Phi)^2), before taking the mean: maps are given on
    arbitrary scales (CAMs in [0, 1], gradients in logit units), and the paper's own evaluation
    code applies this optimal scaling to every explanation (Captum's `normalize=True`). A map
    with sum((I^T Phi)^2) = 0 gets beta = 0 (Captum's safe division).

    n_perturb + 1 forwards per image (f(x) once), all through the perturbed-forward core in
    fp32: differences of near-equal scores are meaningless under bf16 autocast.
    """

    name = "infidelity"
    higher_is_better = False

    def __init__(
        self,
        n_perturb: PositiveInt = 10,
        std: FinitePositiveFloat = 0.003,
        normalize: bool = True,
        score: Score = "prob",
        seed: int = 0,
        max_batch: PositiveInt | None = None,
    ):
        super().__init__()
        self.n_perturb, self.std, self.normalize = n_perturb, std, normalize
        self.score, self.seed, self.max_batch = score, seed, max_batch

    def values(self, b: ExplainedBatch):
        model, x = b.model, b.x
        n, (bsz, _, h, w) = self.n_perturb, x.shape
        phi = upsample(b.maps.to(x.device).float(), (h, w))[:, None]  # [B,1,H,W]
        seeds = image_seeds(x, self.seed)
        sigma = self.std * pixel_span(model, x.device)
        dots = torch.zeros(bsz, n + 1, dtype=torch.float64, device=x.device)

        def make(img, k):  # copy 0 is x itself (f(x)); copy k >= 1 is x - I_{k-1}
            unit = copy_noise(seeds, img, (k - 1).clamp_min(0), x.shape[1:], "normal", x.device)
            noise = unit * sigma * (k > 0).view(-1, 1, 1, 1)
            dots[img, k] = (noise * phi[img]).flatten(1).double().sum(1)
            return x[img] - noise

        scores = perturbed_scores(
            model,
            b.targets.to(x.device),
            n + 1,
            make,
            score=self.score,
            max_batch=self.max_batch,
            autocast=False,
        ).double()
        a = dots[:, 1:]  # I^T Phi
        diff = scores[:, :1] - scores[:, 1:]  # f(x) - f(x - I)
        if self.normalize:
            den = (a * a).sum(1, keepdim=True)
            beta = torch.where(den > 0, (a * diff).sum(1, keepdim=True) / den, 0.0)
            a = beta * a
        return ((a - diff) ** 2).mean(1).tolist()


@register
class MaxSensitivity(Metric):
    """Yeh et al. 2019 eq. 3: max over `n_perturb` (10) draws y uniform in the L_inf ball of
    radius `radius` (0.02 of the pixel range) around x of ||Phi(y) - Phi(x)||_F / ||Phi(x)||_F,
    lower is better (Captum `sensitivity_max`'s defaults). Phi(x) is the batch's map; Phi(y) is
    recomputed by the batch's explainer, one batch of the same size per draw. An image whose map
    is all zeros gets None (its relative change is undefined). Cost: n_perturb x explainer.
    """

    name = "max_sensitivity"
    higher_is_better = False
    needs_explainer = True

    def __init__(
        self, n_perturb: PositiveInt = 10, radius: FinitePositiveFloat = 0.02, seed: int = 0
    ):
        super().__init__()
        self.n_perturb, self.radius, self.seed = n_perturb, radius, seed

    def values(self, b: ExplainedBatch):
        model, x, targets, explainer = b.model, b.x, b.targets, b.explainer
        base = b.maps.to(x.device).double().flatten(1)
        seeds = image_seeds(x, self.seed)
        r = self.radius * pixel_span(model, x.device)
        img = torch.arange(x.shape[0])
        worst = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for k in range(self.n_perturb):
            unit = copy_noise(seeds, img, torch.full_like(img, k), x.shape[1:], "uniform", x.device)
            moved = explainer(x + unit * r, targets)
            change = (moved.to(x.device).double().flatten(1) - base).norm(dim=1)
            worst = torch.maximum(worst, change)
        norm = base.norm(dim=1)
        return [float(c / s) if s > 0 else None for c, s in zip(worst, norm, strict=True)]
