"""Model loading: `load_model(uri)` -> LoadedModel. One registry of URI schemes (LOADERS)."""

from .loaded import ALL_CAPABILITIES, LoadedModel, RunPolicy
from .loaders import LOADERS, load_model, wrap_module
from .preprocess import Geometry, Preprocess, to_rgb_image

__all__ = [
    "ALL_CAPABILITIES",
    "LOADERS",
    "Geometry",
    "LoadedModel",
    "RunPolicy",
    "Preprocess",
    "load_model",
    "to_rgb_image",
    "wrap_module",
]
