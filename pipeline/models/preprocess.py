"""Images in any common mode -> the model's normalised input tensor.

The geometry of the resize (scale and crop offset) is exposed so that annotations (boxes, masks,
landmarks) can follow the image through exactly the same transform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

ResizePolicy = Literal["squash", "resize_crop"]

# Decoding a 20000x20000 image allocates ~1.2 GB; refuse before that happens.
MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class Geometry:
    """How a source image of (width, height) maps onto the model input: x' = x * sx - ox."""

    sx: float
    sy: float
    ox: float
    oy: float
    out_w: int
    out_h: int

    def box(self, box: list[float]) -> list[float] | None:
        """Map an inclusive pixel box; clip it to the output, None when cropped away entirely."""
        x0, y0, x1, y1 = box
        # inclusive corners: pixel x covers [x, x+1) in continuous coordinates
        nx0, nx1 = x0 * self.sx - self.ox, (x1 + 1) * self.sx - self.ox - 1
        ny0, ny1 = y0 * self.sy - self.oy, (y1 + 1) * self.sy - self.oy - 1
        nx0, ny0 = max(nx0, 0.0), max(ny0, 0.0)
        nx1, ny1 = min(nx1, self.out_w - 1.0), min(ny1, self.out_h - 1.0)
        if nx1 < nx0 or ny1 < ny0:
            return None
        return [nx0, ny0, nx1, ny1]

    def point(self, xy: list[float]) -> list[float] | None:
        x, y = (xy[0] + 0.5) * self.sx - self.ox - 0.5, (xy[1] + 0.5) * self.sy - self.oy - 0.5
        if not (0 <= x <= self.out_w - 1 and 0 <= y <= self.out_h - 1):
            return None
        return [x, y]


def to_rgb_image(image) -> Image.Image:
    """Any PIL image or array (L, LA, P, RGB, RGBA, CMYK, 16-bit, float) -> 8-bit RGB PIL image."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or an array, got {type(image).__name__}")
    if image.width * image.height > MAX_PIXELS:
        raise ValueError(
            f"image of {image.width}x{image.height} pixels exceeds the limit of {MAX_PIXELS}"
        )
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        image = _array_to_pil(arr / 257.0 if arr.max() > 255 else arr)
    elif image.mode == "F":
        image = _array_to_pil(np.asarray(image))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # composite on white: transparent regions are background, not black
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.dtype == np.uint16:
        arr = arr / 257.0
    if arr.dtype != np.uint8:
        arr = np.asarray(arr, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("image array contains NaN or infinite values")
        if arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@dataclass(frozen=True)
class Preprocess:
    """Resize policy + normalisation of one model. Callable on a list of images."""

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    policy: ResizePolicy = "resize_crop"
    crop_pct: float = 0.875

    def geometry(self, width: int, height: int) -> Geometry:
        if self.policy == "squash":
            return Geometry(self.size / width, self.size / height, 0.0, 0.0, self.size, self.size)
        short = round(self.size / self.crop_pct)
        scale = short / min(width, height)
        rw, rh = round(width * scale), round(height * scale)
        ox, oy = (rw - self.size) // 2, (rh - self.size) // 2
        return Geometry(rw / width, rh / height, float(ox), float(oy), self.size, self.size)

    def resize(self, image) -> Image.Image:
        """The RGB image the model sees, before normalisation (also what overlays are drawn on)."""
        image = to_rgb_image(image)
        g = self.geometry(image.width, image.height)
        rw, rh = round(image.width * g.sx), round(image.height * g.sy)
        image = image.resize((rw, rh), Image.Resampling.BILINEAR)
        return image.crop((int(g.ox), int(g.oy), int(g.ox) + self.size, int(g.oy) + self.size))

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B,H,W,3] or float [B,3,H,W] in [0,1] -> model space."""
        if pixels.dtype == torch.uint8:
            pixels = pixels.permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> pixels in [0,1] (float [B,3,H,W])."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x * std + mean

    def pixel_value(self, value: float, device=None) -> torch.Tensor:
        """A constant pixel value in [0,1] expressed in model space, shape [1,3,1,1]."""
        return self.normalise(torch.full((1, 3, 1, 1), float(value), device=device))

    def __call__(self, images) -> torch.Tensor:
        if not isinstance(images, list | tuple):
            images = [images]
        arrays = np.stack([np.asarray(self.resize(im)) for im in images])
        return self.normalise(torch.from_numpy(arrays))
