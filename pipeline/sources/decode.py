"""Bytes -> RGB image, with a clear error for every way an input can be bad.

The one image decoder: the local CLI and the Ray decode stage both call `decode_image`.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from ..models.preprocess import MAX_PIXELS, to_rgb_image


class BadImage(ValueError):
    """An input that cannot become an image; `kind` is a short stable label for error rows."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    if not data:
        raise BadImage("empty", f"{name}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise BadImage(
                    "too_large",
                    f"{name}: {image.width}x{image.height} pixels exceeds the limit of "
                    f"{MAX_PIXELS}",
                )
            image.load()
    except BadImage:
        raise
    except UnidentifiedImageError as e:
        raise BadImage("not_an_image", f"{name}: not a recognised image format") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", f"{name}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage("corrupt", f"{name}: cannot decode ({e})") from e
    try:
        return to_rgb_image(image)
    except (ValueError, OSError) as e:
        raise BadImage("unsupported_mode", f"{name}: mode {image.mode}: {e}") from e
