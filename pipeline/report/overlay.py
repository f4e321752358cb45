"""Heatmap overlays: a map in [0,1] coloured and blended over the image the model saw."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _turbo_like(v: np.ndarray) -> np.ndarray:
    """A perceptually ordered blue->cyan->yellow->red ramp (values in [0,1]) -> uint8 RGB."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def normalise_for_display(heatmap: torch.Tensor | np.ndarray, signed: bool = False) -> np.ndarray:
    """[H,W] -> [0,1]. Signed maps are shown by magnitude of their positive part."""
    m = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else heatmap
    m = np.asarray(m, dtype=np.float64)
    if signed:
        m = np.clip(m, 0, None)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def overlay(image: Image.Image, heatmap, *, signed: bool = False, alpha: float = 0.5):
    """Blend the coloured heatmap over `image` (resized to the map's size if needed)."""
    v = normalise_for_display(heatmap, signed)
    colour = Image.fromarray(_turbo_like(v))
    base = image.convert("RGB")
    if base.size != colour.size:
        base = base.resize(colour.size, Image.Resampling.BILINEAR)
    return Image.blend(base, colour, alpha)


def picture_png(picture: torch.Tensor) -> bytes:
    """A [H,W] or [3,H,W] tensor with values in [0,1] -> PNG bytes (grey or RGB)."""
    import io

    arr = (picture.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if arr.ndim == 3:
        arr = np.ascontiguousarray(arr.transpose(1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def overlay_png(pixels: np.ndarray, heatmap, *, signed: bool = False) -> bytes:
    """uint8 [H,W,3] pixels + a heatmap of the same size -> PNG bytes."""
    import io

    buf = io.BytesIO()
    overlay(Image.fromarray(pixels), heatmap, signed=signed).save(buf, format="PNG")
    return buf.getvalue()


def heatmap_png(heatmap, size: int = 96, *, signed: bool = False) -> bytes:
    """A map alone, coloured like the overlays, enlarged to size x size -> PNG bytes (a
    cluster's mean map, where there is no one image to lay it over)."""
    import io

    colour = Image.fromarray(_turbo_like(normalise_for_display(heatmap, signed)))
    buf = io.BytesIO()
    colour.resize((size, size), Image.Resampling.NEAREST).save(buf, format="PNG")
    return buf.getvalue()
