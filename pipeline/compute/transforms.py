"""Geometric transforms with exact inverses for maps (seed 004: EVET and the stability index).

A transform is a 2x2 linear map about the image centre in pixel coordinates (x right, y down):
a pixel at p moves to A p. `apply` transforms images, `invert` brings a map computed on the
transformed image back to the original frame (A^-1). Horizontal flips are done by index
permutation, so they and their inverses are exact; the others resample bilinearly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Transform:
    name: str
    matrix: tuple[tuple[float, float], tuple[float, float]]
    flip: bool = False  # a horizontal flip applied before `matrix`

    def apply(self, x: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B,C,H,W] -> transformed images. Uncovered pixels take `fill` ([1,C,1,1] in the
        images' space, e.g. black in model space) or 0."""
        if self.flip:
            x = x.flip(-1)
        return _warp(x, _mat(self.matrix, x), fill)

    def invert(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps [B,H,W] or [B,C,H,W] on transformed images -> the original frame (0 outside)."""
        squeeze = maps.ndim == 3
        m = maps[:, None] if squeeze else maps
        m = _warp(m, torch.linalg.inv(_mat(self.matrix, m)), None)
        if self.flip:
            m = m.flip(-1)
        return m[:, 0] if squeeze else m


def _mat(matrix, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(matrix, dtype=torch.float32, device=like.device)


def _warp(x: torch.Tensor, a: torch.Tensor, fill: torch.Tensor | None) -> torch.Tensor:
    """out(p) = x(A^-1 p), p about the centre; identity is returned untouched."""
    if torch.equal(a, torch.eye(2, device=a.device)):
        return x
    h, w = x.shape[-2:]
    # normalised coords u = p / (size/2); theta maps output coords to input coords
    n = torch.diag(torch.tensor([2.0 / w, 2.0 / h], device=a.device))
    theta2 = n @ torch.linalg.inv(a) @ torch.linalg.inv(n)
    theta = torch.cat([theta2, torch.zeros(2, 1, device=a.device)], 1)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if fill is not None:
        covered = F.grid_sample(
            torch.ones_like(x[:, :1]).float(), grid, mode="bilinear", align_corners=False
        )
        out = out + (1 - covered) * fill
    return out.to(x.dtype)


def _rotation(degrees: float):
    r = math.radians(degrees)
    return ((math.cos(r), -math.sin(r)), (math.sin(r), math.cos(r)))


_IDENTITY = ((1.0, 0.0), (0.0, 1.0))


def make_transform(kind: str, amount: float | None = None, flip: bool = False) -> Transform:
    """kind: identity | hflip | scale (factor 0.9) | rotate (degrees 10) | shear (x-shear 0.2)."""
    defaults = {"scale": 0.9, "rotate": 10.0, "shear": 0.2}
    a = defaults.get(kind) if amount is None else amount
    if kind == "identity":
        return Transform("identity", _IDENTITY, flip)
    if kind == "hflip":
        return Transform("hflip", _IDENTITY, True)
    if kind == "scale":
        return Transform(f"{'hflip_' if flip else ''}scale", ((a, 0.0), (0.0, a)), flip)
    if kind == "rotate":
        return Transform(f"{'hflip_' if flip else ''}rotate", _rotation(a), flip)
    if kind == "shear":
        return Transform(f"{'hflip_' if flip else ''}shear", ((1.0, a), (0.0, 1.0)), flip)
    raise ValueError(f"unknown transform {kind!r}; known: identity, hflip, scale, rotate, shear")


# The seven transforms of seed 004: hflip, scale 0.9, rotate 10 deg, shear 0.2, and each of the
# last three after a horizontal flip.
EVET_TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in [
        make_transform("hflip"),
        make_transform("scale"),
        make_transform("rotate"),
        make_transform("shear"),
        make_transform("scale", flip=True),
        make_transform("rotate", flip=True),
        make_transform("shear", flip=True),
    ]
}
TRANSFORMS: dict[str, Transform] = {"identity": make_transform("identity"), **EVET_TRANSFORMS}
# what a `transforms` parameter may name (EVET, the stability index): the keys of TRANSFORMS
TransformName = Literal[
    "identity", "hflip", "scale", "rotate", "shear", "hflip_scale", "hflip_rotate", "hflip_shear"
]
