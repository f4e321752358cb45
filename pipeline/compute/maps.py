"""Per-map arithmetic shared by explainers and metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalise01(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-map min-max to [0,1] over all but the first dimension; a constant map becomes all
    zeros (no NaN)."""
    flat = maps.float().flatten(1)
    lo = flat.min(1, keepdim=True).values
    hi = flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view(maps.shape)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B,h,w] -> [B,H,W], bilinear, align_corners=False (METHODS.md conventions)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[
        :, 0
    ]
