"""Perturbation baselines: RISE and occlusion (definitions: METHODS.md, black-box section).

Both build their perturbed copies on the device inside `make`, chunk by chunk, and score them
through `perturbed_scores`; neither ever holds all full-size masks at once.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from ..compute.perturbed_forward import blend, perturbed_scores
from ..compute.seeds import generator, image_seeds
from ..params import (
    NonNegativeFloat,
    OpenUnitInterval,
    PixelValue,
    PositiveFloat,
    PositiveInt,
    Score,
)
from .base import Explainer, register


@register
class RISE(Explainer):
    """RISE (Petsiuk et al.): S = 1/(N p) sum_i P_c(x ⊙ M_i) M_i with M_i a random s x s binary
    grid (keep prob p), bilinearly upsampled to (s+1) cells and cropped at a random shift.

    Each image's grids and shifts are drawn from its own content seed (tiny: N x s x s), the
    full-size masks are made per chunk inside `make`, and sum_i score_i M_i is accumulated in the
    `on_chunk` callback while that chunk's masks exist. Masked pixels show `fill` (pixel value,
    0 = black). Cost: N forwards per image.
    """

    name = "rise"
    default_score = "prob"

    def __init__(
        self,
        model,
        *,
        n_masks: PositiveInt = 4000,
        grid: PositiveInt = 7,
        p: Annotated[float, Field(gt=0, le=1)] = 0.5,
        fill: PixelValue = 0.0,
        seed: int = 0,
        max_batch: PositiveInt | None = None,
        score: Score | None = None,
    ):
        super().__init__(model, score=score)
        self.n_masks, self.grid, self.p = n_masks, grid, float(p)
        self.fill, self.seed, self.max_batch = float(fill), seed, max_batch

    def attribute(self, x, targets):
        b, _, h, w = x.shape
        dev = x.device
        s, n = self.grid, self.n_masks
        cell_h, cell_w = math.ceil(h / s), math.ceil(w / s)
        up_h, up_w = (s + 1) * cell_h, (s + 1) * cell_w
        grids = torch.empty(b, n, s, s, device=dev)
        shifts = torch.empty(b, n, 2, dtype=torch.long, device=dev)
        for i, sd in enumerate(image_seeds(x, self.seed)):
            g = generator(dev, sd)
            grids[i] = (torch.rand(n, s, s, generator=g, device=dev) < self.p).float()
            shifts[i, :, 0] = torch.randint(0, cell_h, (n,), generator=g, device=dev)
            shifts[i, :, 1] = torch.randint(0, cell_w, (n,), generator=g, device=dev)
        baseline = self.model.preprocess.pixel_value(self.fill, device=dev)
        ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
        current: dict[str, torch.Tensor] = {}
        total = torch.zeros(b, h, w, device=dev)

        def make(img, k):
            big = F.interpolate(
                grids[img, k][:, None], size=(up_h, up_w), mode="bilinear", align_corners=False
            )[:, 0]
            sh = shifts[img, k]
            rows = (sh[:, 0, None] + ar_h[None])[:, :, None]
            cols = (sh[:, 1, None] + ar_w[None])[:, None, :]
            masks = big[torch.arange(len(img), device=dev)[:, None, None], rows, cols]
            current["masks"] = masks  # [n,H,W], read by `accumulate` for this chunk
            return blend(x, masks[:, None], img, baseline)

        def accumulate(img, _k, scores):
            total.index_add_(0, img, scores[:, None, None] * current["masks"])

        perturbed_scores(
            self.model,
            targets,
            n,
            make,
            score=self.score,
            max_batch=self.max_batch,
            on_chunk=accumulate,
        )
        return total / (n * self.p)


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """0, s, 2s, ... up to size - window, plus size - window so the far border is covered."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


@register
class Occlusion(Explainer):
    """Occlusion (Zeiler & Fergus): map(p) = S_c(x) - S_c(x with a `fill` window over p),
    averaged over the windows covering p. Signed (occluding can raise the score).

    `window`/`stride` in pixels; None scales the defaults 32/16 at 224 px with the input size.
    Cost: 1 + (#window positions) forwards per image (170 at 224 px).
    """

    name = "occlusion"
    signed = True
    default_score = "prob"

    def __init__(
        self,
        model,
        *,
        window: PositiveInt | None = None,
        stride: PositiveInt | None = None,
        fill: PixelValue = 0.5,
        max_batch: PositiveInt | None = None,
        score: Score | None = None,
    ):
        super().__init__(model, score=score)
        self.window, self.stride, self.fill, self.max_batch = window, stride, float(fill), max_batch

    def attribute(self, x, targets):
        _, _, h, w = x.shape
        dev = x.device
        scale = min(h, w) / 224
        win = self.window or max(1, round(32 * scale))
        stride = self.stride or max(1, round(16 * scale))
        win_h, win_w = min(win, h), min(win, w)
        ys = torch.tensor(_window_starts(h, win_h, stride), device=dev)
        xs = torch.tensor(_window_starts(w, win_w, stride), device=dev)
        # indicator of each window's rows / columns: [ny,H], [nx,W]
        in_y = ((torch.arange(h, device=dev)[None] >= ys[:, None]) &
                (torch.arange(h, device=dev)[None] < ys[:, None] + win_h)).float()  # fmt: skip
        in_x = ((torch.arange(w, device=dev)[None] >= xs[:, None]) &
                (torch.arange(w, device=dev)[None] < xs[:, None] + win_w)).float()  # fmt: skip
        ny, nx = len(ys), len(xs)
        baseline = self.model.preprocess.pixel_value(self.fill, device=dev)

        def make(img, k):
            # copy 0 is the unoccluded image, copy 1 + j*nx + i the window at (ys[j], xs[i])
            j = (k - 1).clamp_min(0)
            window = in_y[j // nx][:, :, None] * in_x[j % nx][:, None, :]
            window = window * (k > 0).float()[:, None, None]
            return blend(x, (1 - window)[:, None], img, baseline)

        s = perturbed_scores(
            self.model, targets, 1 + ny * nx, make, score=self.score, max_batch=self.max_batch
        )
        diff = (s[:, :1] - s[:, 1:]).view(-1, ny, nx)
        total = torch.einsum("bij,ih,jw->bhw", diff, in_y, in_x)
        count = torch.einsum("ih,jw->hw", in_y, in_x)
        return total / count.clamp_min(1)


@register
class LIME(Explainer):
    """LIME for images (Ribeiro et al.): SLIC superpixels of the pixel image, `n_samples` random
    on/off patterns (the first is all on), off superpixels show `fill`; a weighted ridge fit
    (kernel exp(-d^2 / width^2) on the cosine distance to all-on, lambda = `ridge`) gives one
    coefficient per superpixel, painted back. Signed. Cost: n_samples forwards per image.
    """

    name = "lime"
    signed = True
    default_score = "prob"

    def __init__(
        self,
        model,
        *,
        n_samples: Annotated[int, Field(ge=2)] = 1000,
        n_segments: PositiveInt = 50,
        compactness: PositiveFloat = 10.0,
        keep_prob: OpenUnitInterval = 0.5,
        kernel_width: PositiveFloat = 0.25,
        ridge: NonNegativeFloat = 1.0,
        fill: PixelValue = 0.0,
        seed: int = 0,
        max_batch: PositiveInt | None = None,
        score: Score | None = None,
    ):
        super().__init__(model, score=score)
        self.n_samples, self.n_segments, self.compactness = n_samples, n_segments, compactness
        self.keep_prob, self.kernel_width, self.ridge = keep_prob, kernel_width, ridge
        self.fill, self.seed, self.max_batch = float(fill), seed, max_batch

    def segments(self, x: torch.Tensor) -> torch.Tensor:
        """SLIC labels [B,H,W] (long, from 0) of the pixel-space images, computed on the host."""
        from skimage.segmentation import slic

        pix = self.model.preprocess.denormalise(x).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        labels = [
            slic(
                im.astype("float64"),
                n_segments=self.n_segments,
                compactness=self.compactness,
                start_label=0,
                channel_axis=-1,
            )
            for im in pix
        ]
        return torch.stack([torch.from_numpy(lab).long() for lab in labels]).to(x.device)

    def attribute(self, x, targets):
        b, _, h, w = x.shape
        dev, n = x.device, self.n_samples
        segs = self.segments(x)
        counts = segs.flatten(1).amax(1) + 1  # superpixels per image
        s_max = int(counts.max())
        z = torch.zeros(b, n, s_max, device=dev)
        for i, sd in enumerate(image_seeds(x, self.seed)):
            g = generator(dev, sd)
            z[i] = (torch.rand(n, s_max, generator=g, device=dev) < self.keep_prob).float()
        z[:, 0] = 1.0  # the unperturbed image, as LIME samples it
        z = z * (torch.arange(s_max, device=dev)[None] < counts[:, None])[:, None]
        baseline = self.model.preprocess.pixel_value(self.fill, device=dev)

        def make(img, k):
            masks = z[img, k].gather(1, segs[img].flatten(1)).view(-1, h, w)
            return blend(x, masks[:, None], img, baseline)

        y = perturbed_scores(
            self.model, targets, n, make, score=self.score, max_batch=self.max_batch
        )  # [B,N]
        out = torch.empty(b, h, w, device=dev)
        for i in range(b):
            zi = z[i, :, : int(counts[i])].double()
            on = zi.sum(1)
            cos = on / (on.sqrt() * float(counts[i]) ** 0.5).clamp_min(1e-12)
            pi = torch.exp(-((1 - cos) ** 2) / self.kernel_width**2)
            wsum = pi.sum()
            zm = (pi[:, None] * zi).sum(0) / wsum  # weighted centring = fitted intercept
            ym = (pi * y[i].double()).sum() / wsum
            zc, yc = zi - zm, y[i].double() - ym
            a = zc.T @ (pi[:, None] * zc) + self.ridge * torch.eye(zi.shape[1], device=dev)
            coef = torch.linalg.solve(a, zc.T @ (pi * yc))
            out[i] = coef.float()[segs[i]]
        return out
