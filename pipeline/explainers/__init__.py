"""Explainers: `build_explainer(name, model, **params)(x, targets) -> [B,H,W]`.

One registry (EXPLAINERS); each family's module registers its classes on import.
"""

from . import (  # noqa: F401  (registration)
    attribution_vis,
    cam,
    deeplift,
    evet,
    extremal,
    glas,
    gradients,
    lrp,
    perturbation,
)
from .base import (
    EXPLAINERS,
    Explainer,
    build_explainer,
    explainer_class,
    explainer_params,
)

__all__ = [
    "EXPLAINERS",
    "Explainer",
    "build_explainer",
    "explainer_class",
    "explainer_params",
]
