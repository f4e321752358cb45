"""Extremal perturbation (Fong, Patrick, Vedaldi, ICCV 2019, "Understanding Deep Networks via
Extremal Perturbations and Smooth Masks"; TorchRay's `extremal_perturbation` is the reference
behaviour, METHODS.md).

For each area a in `areas`, a mask m of area a is optimised so that the image it preserves
(`variant="preserve"`: x m + blur(x) (1 - m)) scores the target as high as possible, or the image
it deletes (`"delete"`: x (1 - m) + blur(x) m) as low as possible:

    min over m_bar   -+ S_c(perturbed) + lambda_t * mean((sort(m) - r_a)^2)

r_a is (1 - a) N zeros then a N ones (N = pixels), so the rank term is zero exactly when m is a
binary mask of area a. lambda_t = `rank_weight` * `rank_growth`^t grows over the iterations.

The mask m is smooth by construction: its parameters m_bar live on a coarse grid (one every
`step` px, cell centres), and each pixel u takes the smooth max of its neighbours' parameters
weighted by a kernel of the distance d from u to their centre,

    m(u) = smax_T { k(d(u, v) / sigma) m_bar(v) : |v - cell(u)| <= R cells },
    smax_T(z) = sum_i z_i softmax(T z)_i,   k(z) = exp(-2 max(z - 1/2, 0)^2),

with T = `coldness` and R = 1 + ceil(sigma / step) (TorchRay's kernel, temperature and window;
neighbours outside the grid count as parameters of 0, TorchRay's zero padding), evaluated at
every pixel (so it is also the upsampling to the input size) and clamped to [0, 1].

Defaults are TorchRay's where it has one: 800 iterations, SGD with lr 0.01, momentum 0.9 and
dampening 0.9, parameters initialised to 1 and clamped to [0, 1] after each step, lambda from
300 growing x1.0035 per iteration (x16.4 over 800), step 7 px and sigma 21 px at 224 px (scaled
with the input), coldness 20, the reward the target's logit (`score="logit"`), jitter (the
perturbed image is flipped horizontally on even iterations). The blur is one Gaussian of sigma
10 px at 224 px (the paper's x m + blur(x) (1 - m)); the areas 0.05, 0.1, 0.2 and the summed
map follow METHODS.md. The map is sum_a m_a; `extras["masks"]` [B, A, H, W] holds each area's.

Deviations from TorchRay (documented choices):
- TorchRay blurs through an 8-level pyramid (sigma 20 down to 0, picked per pixel by the mask
  value); here the perturbation is the single blend with one blurred image, in model space with
  reflect padding.
- The area (rank) term is measured over the image's pixels; TorchRay measures it over the mask
  with a margin of sigma around the image.
- Ties in sort(m) (pixels clamped at exactly 0 or 1 tie, and all of them do at the start) get
  the mean of r_a over the tied group as their target, a symmetric subgradient of the rank term;
  TorchRay's sort assigns tied pixels the targets of their positions, i.e. by pixel index, which
  prefers the bottom rows of the image.
- No randomness: the map is a function of the image (jitter alternates deterministically).

Cost per image: `iterations` x len(`areas`) forwards and backwards (2400 F+B at the defaults).
All images and areas are optimised together: B x A masks in one parameter
tensor, B x A perturbed images per iteration, pushed through the model in chunks of
`max_batch`. The loss is a sum of per-mask terms and SGD is elementwise, so a mask's trajectory
does not depend on the batch around it.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torchvision.transforms.functional import gaussian_blur

from ..chunks import chunks
from ..compute.perturbed_forward import blend, default_max_batch
from ..params import (
    FiniteNonNegativeFloat,
    FinitePositiveFloat,
    OpenUnitInterval,
    PositiveInt,
    Score,
)
from .base import Explainer, Explanation, register

Variant = Literal["preserve", "delete"]


def smooth_kernel(z: torch.Tensor) -> torch.Tensor:
    """TorchRay's mask kernel of the distance in sigma units: flat to 1/2, then a Gaussian."""
    return torch.exp(-2 * (z - 0.5).clamp_min(0) ** 2)


class _SmoothMax(torch.autograd.Function):
    """y = sum_k z_k softmax(T z)_k over the last dim, with the gradient written out,
    dy/dz_k = p_k (1 + T (z_k - y)), so autograd keeps two tensors instead of five."""

    @staticmethod
    def forward(ctx, z, coldness):
        p = torch.softmax(coldness * z, dim=-1)
        y = (z * p).sum(-1)
        ctx.save_for_backward(z, p, y)
        ctx.coldness = coldness
        return y

    @staticmethod
    def backward(ctx, grad):
        z, p, y = ctx.saved_tensors
        return grad[..., None] * p * (1 + ctx.coldness * (z - y[..., None])), None


def smooth_max(z: torch.Tensor, coldness: float) -> torch.Tensor:
    """sum_k z_k softmax(coldness z)_k over the last dim (TorchRay's softmax pooling)."""
    return _SmoothMax.apply(z, coldness)


class SmoothMask:
    """Parameters [N, gh, gw] on a grid of `step` px cells -> smooth masks [N, H, W] (see the
    module docstring: the smooth max of kernel-weighted neighbouring parameters, clamped).

    Grid: gh = ceil(H / step) cells, parameter i centred at (i + 1/2) H / gh in pixel coordinates
    where pixel j's centre is j + 1/2 (so a horizontal flip maps the grid onto itself). Pixel j
    lies in cell floor((j + 1/2) gh / H); its neighbours are the cells within R of it.
    """

    def __init__(self, size: tuple[int, int], step: int, sigma: float, coldness: float, device):
        h, w = size
        self.size = size
        self.grid = (math.ceil(h / step), math.ceil(w / step))
        self.radius = 1 + math.ceil(sigma / step)
        self.coldness = float(coldness)
        offs = torch.arange(-self.radius, self.radius + 1, device=device)
        self.cell_y, dy = self._axis(h, self.grid[0], offs, device)
        self.cell_x, dx = self._axis(w, self.grid[1], offs, device)
        o = len(offs)
        # neighbour k = ky * (2R+1) + kx (F.unfold's order) of pixel (r, c): the parameter at
        # cell (cell_y[r] + ky - R, cell_x[c] + kx - R), at distance sqrt(dy^2 + dx^2)
        dist = torch.sqrt(dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2)
        # [H, W, 1, K]: neighbours last, so the smooth max reduces over contiguous memory
        self.weight = smooth_kernel(dist / sigma).reshape(o * o, h, w).permute(1, 2, 0)[:, :, None]
        self.weight = self.weight.contiguous()

    @staticmethod
    def _axis(n: int, cells: int, offs: torch.Tensor, device):
        """Each pixel's cell [n], and per offset its distance to that neighbour's centre [O, n]."""
        centre = torch.arange(n, device=device, dtype=torch.float32) + 0.5
        own = (centre * cells / n).floor().long().clamp_max(cells - 1)
        dist = centre[None] - ((own[None] + offs[:, None]).float() + 0.5) * n / cells
        return own, dist

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        n = params.shape[0]
        side = 2 * self.radius + 1
        # every cell's (2R+1)^2 neighbourhood, cells outside the grid as 0 (the zero padding)
        hood = F.unfold(params[:, None], side, padding=self.radius)
        hood = hood.view(n, side * side, *self.grid).permute(2, 3, 0, 1)  # [gh, gw, n, K]
        z = hood.index_select(0, self.cell_y).index_select(1, self.cell_x) * self.weight
        return smooth_max(z, self.coldness).permute(2, 0, 1).clamp(0, 1)


def rank_targets(sorted_masks: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The rank term's target for each sorted value: r_a, averaged over runs of equal values
    (a symmetric subgradient at ties). sorted_masks, reference [N, P] -> [N, P]."""
    new = torch.ones_like(sorted_masks, dtype=torch.bool)
    new[:, 1:] = sorted_masks[:, 1:] != sorted_masks[:, :-1]
    group = new.long().cumsum(1) - 1
    sums = torch.zeros_like(reference).scatter_add_(1, group, reference)
    counts = torch.zeros_like(reference).scatter_add_(1, group, torch.ones_like(reference))
    return (sums / counts.clamp_min(1)).gather(1, group)


@register
class ExtremalPerturbation(Explainer):
    """Extremal perturbation (Fong et al., ICCV 2019): per area a in `areas`, a smooth mask of
    area a maximising the target's score on the image it preserves (or minimising it on the
    image it deletes), by gradient descent with a rank-loss area constraint; map = sum of the
    masks. Cost: iterations x len(areas) F+B per image (2400 at the defaults).
    """

    name = "extremal_perturbation"
    requires = frozenset({"gradients"})
    input_gradient = True

    def __init__(
        self,
        model,
        *,
        areas: list[OpenUnitInterval] | tuple[OpenUnitInterval, ...] = (0.05, 0.1, 0.2),
        variant: Variant = "preserve",
        iterations: PositiveInt = 800,
        lr: FinitePositiveFloat = 0.01,
        momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9,
        rank_weight: FiniteNonNegativeFloat = 300.0,
        rank_growth: Annotated[float, Field(ge=1, allow_inf_nan=False)] = 1.0035,
        step: PositiveInt | None = None,
        sigma: FinitePositiveFloat | None = None,
        blur_sigma: FinitePositiveFloat | None = None,
        coldness: FinitePositiveFloat = 20.0,
        jitter: bool = True,
        max_batch: PositiveInt | None = None,
        score: Score | None = None,
    ):
        super().__init__(model, score=score)
        if len(areas) == 0:
            raise ValueError(f"{self.name}: areas must name at least one area")
        self.areas = [float(a) for a in areas]
        self.variant, self.iterations, self.lr = variant, iterations, float(lr)
        self.momentum = float(momentum)
        self.rank_weight, self.rank_growth = float(rank_weight), float(rank_growth)
        self.step, self.sigma, self.blur_sigma = step, sigma, blur_sigma
        self.coldness, self.jitter, self.max_batch = float(coldness), jitter, max_batch

    def geometry(self, h: int, w: int) -> tuple[int, float, float]:
        """(step px, sigma px, blur sigma px): given, or the paper's 7 / 21 / 10 at 224 px."""
        scale = min(h, w) / 224
        step = self.step or max(1, round(7 * scale))
        sigma = self.sigma or 21 * scale
        blur = self.blur_sigma or 10 * scale
        return step, sigma, blur

    def attribute(self, x, targets):
        b, _, h, w = x.shape
        dev = x.device
        n_areas = len(self.areas)
        step, sigma, blur_sigma = self.geometry(h, w)
        smooth = SmoothMask((h, w), step, sigma, self.coldness, dev)
        radius = min(math.ceil(3 * blur_sigma), h - 1, w - 1)
        blurred = gaussian_blur(x, kernel_size=2 * radius + 1, sigma=blur_sigma)
        pixels = h * w
        reference = torch.ones(n_areas, pixels, device=dev)
        for i, a in enumerate(self.areas):
            reference[i, : int(pixels * (1 - a))] = 0
        rows = b * n_areas  # row = image * A + area
        row_img = torch.arange(rows, device=dev) // n_areas
        row_area = torch.arange(rows, device=dev) % n_areas
        params = torch.ones(rows, *smooth.grid, device=dev)
        opt = torch.optim.SGD([params], lr=self.lr, momentum=self.momentum, dampening=self.momentum)
        chunk = self.max_batch or default_max_batch(self.model)
        lam = self.rank_weight
        # The forward needs autograd (the gradient flows to the mask), so `perturbed_scores`
        # cannot serve: it runs under inference_mode and bf16 autocast. The model is called here
        # in chunks of `chunk` rows instead, each chunk's loss differentiated on its own (the
        # loss is a sum over rows), so only one chunk's graph exists at a time.
        for t in range(self.iterations):
            grad = torch.empty_like(params)
            flip = self.jitter and t % 2 == 0
            for part in chunks(rows, chunk):
                grad[part] = self._chunk_grad(
                    params[part], row_img[part], row_area[part], x, blurred, targets,
                    smooth, reference, lam, flip,
                )  # fmt: skip
            params.grad = grad
            opt.step()
            with torch.no_grad():
                params.clamp_(0, 1)
            lam *= self.rank_growth
        with torch.no_grad():
            masks = torch.cat([smooth(params[part]) for part in chunks(rows, chunk)])
        masks = masks.view(b, n_areas, h, w)
        return Explanation(masks.sum(1), {"masks": masks})

    def _chunk_grad(
        self, p, img, area, x, blurred, targets, smooth, reference, lam, flip
    ) -> torch.Tensor:
        """d loss / d params for one chunk of rows (image, area)."""
        p = p.detach().requires_grad_(True)
        with torch.enable_grad():
            m = smooth(p)  # [n, H, W]
            keep = m if self.variant == "preserve" else 1 - m
            pert = blend(x, keep[:, None], img, blurred)
            if flip:
                pert = pert.flip(-1)
            s = self.scores(self.model.forward(pert), targets[img])
            reward = s if self.variant == "preserve" else -s
            ranked = m.flatten(1).sort(1).values
            target = rank_targets(ranked.detach(), reference[area])
            rank = ((ranked - target) ** 2).mean(1)
            (g,) = torch.autograd.grad((lam * rank - reward).sum(), p)
        return g
