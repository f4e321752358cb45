"""GLAS and recursive GLAS (seed 000: Gaussian light and shadow, equations (1)-(3), Algorithm 1).

Conventions fixed here (the paper leaves them open; tests rely on them):
- Search points are the centres of a k x k grid: mu = ((a + 0.5) H/k, (b + 0.5) W/k) in pixel
  coordinates where pixel j has its centre at j + 0.5.
- G(mu, sigma) is a Gaussian bump with peak 1: exp(-|p - mu|^2 / (2 sigma^2)).
- `sigma_unit="cells"` (default) measures sigmas and the distance D in grid cells (one cell is
  H/k pixels vertically, W/k horizontally), so the paper's k=15, sigma 5/3/6 keeps its meaning
  at any input size; `"pixels"` measures them in pixels.
- D in equation (3) is the squared Euclidean distance (`distance="squared"`), which makes the
  fusion the Gaussian mixture the paper describes; `"euclidean"` uses the plain distance.
- "I ⊙ G" multiplies the image in pixel space, i.e. blends towards the `fill` pixel value
  (0 = black) in model space.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from ..compute.maps import normalise01
from ..compute.perturbed_forward import blend, perturbed_scores
from ..params import (
    FinitePositiveFloat,
    NonNegativeFloat,
    PixelValue,
    PositiveFloat,
    PositiveInt,
    Score,
)
from .base import Explainer, Explanation, register

_ORIG, _LIGHT, _SHADOW = 0, 1, 2

Mode = Literal["fusion", "light", "shadow"]
SigmaUnit = Literal["cells", "pixels"]
Distance = Literal["squared", "euclidean"]


@register
class GLAS(Explainer):
    """Gaussian light and shadow (seed 000). fusion: S = 1/|M| sum_mu K(x, mu) f_l(mu) f_s(mu);
    light / shadow keep one factor (the paper's ablation). Returns the raw S of equation (3).

    Cost per image: fusion 2k^2 + 1 forwards, light k^2, shadow k^2 + 1, all in batches of
    `max_batch` (image x search point) copies through `perturbed_scores`.
    """

    name = "glas"
    default_score = "prob"

    def __init__(
        self,
        model,
        *,
        mode: Mode = "fusion",
        k: PositiveInt = 15,
        sigma_light: FinitePositiveFloat = 5.0,
        sigma_shadow: FinitePositiveFloat = 3.0,
        sigma_spatial: FinitePositiveFloat = 6.0,
        sigma_unit: SigmaUnit = "cells",
        distance: Distance = "squared",
        gamma: NonNegativeFloat = 1e-5,
        fill: PixelValue = 0.0,
        max_batch: PositiveInt | None = None,
        score: Score | None = None,
    ):
        super().__init__(model, score=score)
        self.mode, self.k = mode, k
        self.sigma_light, self.sigma_shadow = float(sigma_light), float(sigma_shadow)
        self.sigma_spatial = float(sigma_spatial)
        self.sigma_unit, self.distance, self.gamma = sigma_unit, distance, float(gamma)
        self.fill, self.max_batch = float(fill), max_batch

    # -- geometry -----------------------------------------------------------------------------
    def _coords(self, h: int, w: int, device) -> tuple[torch.Tensor, ...]:
        """Pixel centres and grid centres, both in sigma units: (ys [H], xs [W], cy [k], cx [k])."""
        uy, ux = (h / self.k, w / self.k) if self.sigma_unit == "cells" else (1.0, 1.0)
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / uy
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / ux
        centres = torch.arange(self.k, device=device, dtype=torch.float32) + 0.5
        return ys, xs, centres * (h / self.k) / uy, centres * (w / self.k) / ux

    def point_pixels(self, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer pixel (row, col) of each search point, flattened [k*k] (point i = a*k + b)."""
        c = torch.arange(self.k, device=device, dtype=torch.float32) + 0.5
        rows = (c * h / self.k).floor().long().clamp_max(h - 1)
        cols = (c * w / self.k).floor().long().clamp_max(w - 1)
        return rows.repeat_interleave(self.k), cols.repeat(self.k)

    # -- equations (1) and (2) ----------------------------------------------------------------
    def point_scores(
        self,
        x: torch.Tensor,
        targets: torch.Tensor,
        active: torch.Tensor,
        p0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (P(y|I) [B], f_l [B,K], f_s [B,K]) for the active search points (others 0).

        One flat row per (image, point, light|shadow) plus one unperturbed row per image, all
        through `perturbed_scores`, so the point count may differ between images (RGLAS).
        `p0` skips the unperturbed rows when P(y|I) is already known.
        """
        b, _, h, w = x.shape
        dev = x.device
        kk = self.k * self.k
        kinds = {"fusion": (_LIGHT, _SHADOW), "light": (_LIGHT,), "shadow": (_SHADOW,)}[self.mode]
        need_p0 = _SHADOW in kinds and p0 is None
        img_pt = active.nonzero()  # [P,2] (image, point)
        parts_img, parts_pt, parts_kind = [], [], []
        if need_p0:
            parts_img.append(torch.arange(b, device=dev))
            parts_pt.append(torch.zeros(b, dtype=torch.long, device=dev))
            parts_kind.append(torch.full((b,), _ORIG, device=dev))
        for kind in kinds:
            parts_img.append(img_pt[:, 0])
            parts_pt.append(img_pt[:, 1])
            parts_kind.append(torch.full((len(img_pt),), kind, device=dev))
        row_img, row_pt = torch.cat(parts_img), torch.cat(parts_pt)
        row_kind = torch.cat(parts_kind)

        ys, xs, cy, cx = self._coords(h, w, dev)
        baseline = self.model.preprocess.pixel_value(self.fill, device=dev)
        sig = torch.tensor([1.0, self.sigma_light, self.sigma_shadow], device=dev)

        def make(rows, _copy):
            pt, kind = row_pt[rows], row_kind[rows]
            s2 = 2 * sig[kind] ** 2
            gy = torch.exp(-((ys[None] - cy[pt // self.k, None]) ** 2) / s2[:, None])
            gx = torch.exp(-((xs[None] - cx[pt % self.k, None]) ** 2) / s2[:, None])
            g = gy[:, :, None] * gx[:, None, :]  # [n,H,W], peak 1
            mask = torch.where(
                (kind == _LIGHT)[:, None, None],
                g,
                torch.where((kind == _SHADOW)[:, None, None], 1 - g, torch.ones_like(g)),
            )
            return blend(x, mask[:, None], row_img[rows], baseline)

        s = perturbed_scores(
            self.model, targets[row_img], 1, make, score=self.score, max_batch=self.max_batch
        )[:, 0]
        fl = torch.zeros(b, kk, device=dev)
        fs = torch.zeros(b, kk, device=dev)
        if need_p0:
            p0 = s[row_kind == _ORIG]
        if p0 is None:  # light-only mode never needs P(y|I)
            p0 = torch.full((b,), float("nan"), device=dev)
        light, shadow = row_kind == _LIGHT, row_kind == _SHADOW
        fl[row_img[light], row_pt[light]] = s[light]
        fs[row_img[shadow], row_pt[shadow]] = (p0[row_img[shadow]] - s[shadow]).abs() + self.gamma
        return p0, fl, fs

    # -- equation (3) -------------------------------------------------------------------------
    def fuse(self, fl, fs, active, size: tuple[int, int]) -> torch.Tensor:
        """S(x) = 1/|M| sum_{mu in M} exp(-D(x,mu)/sigma_spatial^2) f(mu), M = active points."""
        h, w = size
        f = {"fusion": fl * fs, "light": fl, "shadow": fs}[self.mode] * active
        ys, xs, cy, cx = self._coords(h, w, f.device)
        s2 = self.sigma_spatial**2
        v = f.view(-1, self.k, self.k)
        if self.distance == "squared":  # separable: exp(-(dy^2+dx^2)/s2) = ky * kx
            ky = torch.exp(-((ys[None] - cy[:, None]) ** 2) / s2)  # [k,H]
            kx = torch.exp(-((xs[None] - cx[:, None]) ** 2) / s2)  # [k,W]
            total = torch.einsum("bij,ih,jw->bhw", v, ky, kx)
        else:
            d = torch.sqrt(
                (ys[None, :, None, None] - cy[:, None, None, None]) ** 2
                + (xs[None, None, None, :] - cx[None, None, :, None]) ** 2
            )  # [k(a), H, k(b), W]
            total = torch.einsum("bij,ihjw->bhw", v, torch.exp(-d / s2))
        count = active.sum(1).clamp_min(1).float()
        return total / count[:, None, None]

    def attribute(self, x, targets):
        active = torch.ones(x.shape[0], self.k * self.k, dtype=torch.bool, device=x.device)
        _, fl, fs = self.point_scores(x, targets, active)
        return self.fuse(fl, fs, active, x.shape[-2:])


@register
class RGLAS(GLAS):
    """Recursive GLAS (seed 000, Algorithm 1): find the strongest evidence, drop its search
    points, darken it (I <- I ⊙ (1 - S)), repeat until sqrt(mean(S) / f(y|I)) > t2 or `max_iter`.

    Returns normalised S_fuse. `extras["evidence"]`: [B, T, H, W], the normalised S of each
    accepted iteration (T = the most iterations any image took; zero-padded beyond
    `extras["iterations"][b]`, a [B] long tensor). Cost: 1 + sum over iterations of
    (2 |M_t| + 1) forwards in fusion mode (the +1 is f(y|I) of the darkened image, reused as the
    next iteration's P(y|I)).

    Deviation: the first iteration's map is always accepted, so S_fuse is never empty (the
    paper's stop test could otherwise reject it when P(y|I) is already small).
    """

    name = "rglas"

    def __init__(
        self,
        model,
        *,
        t1: Annotated[float, Field(ge=0, lt=1)] = 0.8,
        t2: PositiveFloat = 5.0,
        max_iter: PositiveInt = 5,
        mode: Mode = "fusion",
        k: PositiveInt = 15,
        sigma_light: FinitePositiveFloat = 5.0,
        sigma_shadow: FinitePositiveFloat = 3.0,
        sigma_spatial: FinitePositiveFloat = 6.0,
        sigma_unit: SigmaUnit = "cells",
        distance: Distance = "squared",
        gamma: NonNegativeFloat = 1e-5,
        fill: PixelValue = 0.0,
        max_batch: PositiveInt | None = None,
        score: Score | None = None,
    ):
        super().__init__(
            model,
            mode=mode,
            k=k,
            sigma_light=sigma_light,
            sigma_shadow=sigma_shadow,
            sigma_spatial=sigma_spatial,
            sigma_unit=sigma_unit,
            distance=distance,
            gamma=gamma,
            fill=fill,
            max_batch=max_batch,
            score=score,
        )
        self.t1, self.t2, self.max_iter = float(t1), float(t2), max_iter

    def attribute(self, x, targets):
        b, _, h, w = x.shape
        dev = x.device
        active = torch.ones(b, self.k * self.k, dtype=torch.bool, device=dev)
        alive = torch.ones(b, dtype=torch.bool, device=dev)
        image = x.clone()
        p0: torch.Tensor | None = None
        fused = torch.zeros(b, h, w, device=dev)
        evidence = torch.zeros(b, self.max_iter, h, w, device=dev)
        iterations = torch.zeros(b, dtype=torch.long, device=dev)
        rows_px, cols_px = self.point_pixels(h, w, dev)
        black = self.model.preprocess.pixel_value(self.fill, device=dev)
        for it in range(self.max_iter):
            idx = alive.nonzero()[:, 0]
            if len(idx) == 0:
                break
            p_known = None if p0 is None else p0[idx]
            _, fl, fs = self.point_scores(image[idx], targets[idx], active[idx], p_known)
            s = normalise01(self.fuse(fl, fs, active[idx], (h, w)))  # line 4, normalised
            # lines 5-7: drop the search points inside B = S > t1
            inside = s[:, rows_px, cols_px] > self.t1
            active[idx] &= ~inside
            # line 8: I <- I ⊙ (1 - S), in pixel space
            image[idx] = blend(image, (1 - s)[:, None], idx, black)
            # line 9: f(y|I) of the updated image (also next iteration's P(y|I))
            p_new = perturbed_scores(
                self.model,
                targets[idx],
                1,
                lambda r, _c, idx=idx: image[idx[r]],
                score=self.score,
                max_batch=self.max_batch,
            )[:, 0]
            if p0 is None:
                p0 = torch.zeros(b, device=dev)
            p0[idx] = p_new
            stop = torch.sqrt(s.flatten(1).mean(1) / p_new.clamp_min(1e-30)) > self.t2
            if it == 0:
                stop = torch.zeros_like(stop)  # always keep the first evidence (see docstring)
            keep = idx[~stop]
            fused[keep] += s[~stop]  # line 10
            evidence[keep, it] = s[~stop]
            iterations[keep] += 1
            alive[idx[stop]] = False
            alive &= active.any(1)  # no search points left: nothing more to find
        t = int(iterations.max())
        extras = {"evidence": evidence[:, :t], "iterations": iterations}
        return Explanation(normalise01(fused), extras)  # line 11
