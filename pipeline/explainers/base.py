"""Explainer base class and the registry (the one extension point for methods)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..models.loaded import LoadedModel
from ..params import Score
from ..registry import Registry

EXPLAINERS = Registry("explainer", skip=("self", "model"))
register = EXPLAINERS.register
explainer_class = EXPLAINERS.lookup
explainer_params = EXPLAINERS.params


def build_explainer(name: str, model: LoadedModel, **params) -> Explainer:
    """Names checked here, values by the class as it is built (the registry's check)."""
    EXPLAINERS.check_params(name, params)
    return explainer_class(name)(model, **params)


def methods_for(model: LoadedModel) -> list[str]:
    """The registered methods whose needs the model meets (EVET and SmoothGrad run around any
    of them)."""
    return sorted(n for n, cls in EXPLAINERS.items() if cls.requires <= model.capabilities)


@dataclass(frozen=True)
class Explanation:
    """What one `Explainer.explain` call gives back.

    maps            [B,H,W] float32, finite
    extras          per-call side outputs by name (RGLAS's evidence maps, LRP's absorbed
                    relevance, attribution visualization's image and mask, ...)
    forward_passes  images this call pushed through the model (counted, not declared)
    """

    maps: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    forward_passes: int = 0


class Explainer:
    """Maps a batch [B,3,H,W] in model space and targets [B] to heatmaps [B,H,W] (float32).

    `explain(x, targets)` validates the inputs, runs the method and returns an `Explanation`
    (maps, extras, the forwards it cost); `explainer(x, targets)` is `explain(...).maps`.
    Subclasses implement `attribute`, returning the maps or an `Explanation` with extras.
    `signed` methods may return negative values; others return >= 0. The arguments an explainer
    was built with are in `params` (the registry records them), so it can be rebuilt on another
    model (the sanity checks do).
    Constructor parameters carry their legal values in their annotations (pipeline/params.py),
    which the registry enforces; a constructor checks only what they cannot state (a layer the
    model lacks, a base explainer that is not registered).
    """

    name: ClassVar[str] = ""
    signed: ClassVar[bool] = False
    # "logit" for white-box methods, "prob" for black-box ones (METHODS.md, Conventions)
    default_score: ClassVar[str] = "logit"
    # extras that are per-image pictures ([B,H,W] in [0,1] or [B,3,H,W] pixels in [0,1]): the job
    # writes them as PNGs beside the heatmaps (attribution visualization's image and mask)
    image_extras: ClassVar[tuple[str, ...]] = ()
    # every forward is followed by a backward to the input (gradient methods, LRP, DeepLIFT): the
    # benchmark's bound is then forward+backward throughput, not forward alone
    input_gradient: ClassVar[bool] = False
    # what the method needs from the model beyond forwards (LoadedModel.capabilities); a model
    # that lacks it is refused when the explainer is built, so `salient validate` says so.
    # Methods around a base explainer (EVET, SmoothGrad) need what their base needs.
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: LoadedModel, *, score: Score | None = None):
        missing = self.requires - model.capabilities
        if missing:
            raise ValueError(
                f"{self.name} needs {' and '.join(sorted(missing))} of the model, which "
                f"{model.id!r} does not offer; methods that run on it: "
                + ", ".join(methods_for(model))
            )
        self.model = model
        self.score = score or self.default_score

    # -- public -------------------------------------------------------------------------------
    def explain(self, x: torch.Tensor, targets) -> Explanation:
        x, targets = self.check_inputs(x, targets)
        before = self.model.forward_passes
        got = self.attribute(x, targets)
        passes = self.model.forward_passes - before
        out = got if isinstance(got, Explanation) else Explanation(got)
        maps = out.maps
        if maps.shape != (x.shape[0], x.shape[2], x.shape[3]):
            raise RuntimeError(
                f"{self.name} returned {tuple(maps.shape)} for input {tuple(x.shape)}"
            )
        maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0).detach()
        extras = {k: v.detach() if torch.is_tensor(v) else v for k, v in out.extras.items()}
        return Explanation(maps, extras, passes)

    def __call__(self, x: torch.Tensor, targets) -> torch.Tensor:
        return self.explain(x, targets).maps

    def attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | Explanation:
        """The method itself, on checked inputs (float32 on the model's device, long targets)."""
        raise NotImplementedError

    # -- helpers for subclasses ---------------------------------------------------------------
    def check_inputs(self, x, targets) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: input must be a float tensor [B,3,H,W], got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: input must be floating point, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"{self.name}: input batch is empty")
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.name}: input contains NaN or infinite values")
        targets = torch.as_tensor(targets)
        if targets.ndim == 0:
            targets = targets.expand(x.shape[0])
        if targets.ndim != 1 or targets.shape[0] != x.shape[0]:
            raise ValueError(
                f"{self.name}: targets must hold exactly one class per image ([{x.shape[0]}]), "
                f"got shape {tuple(targets.shape)}"
            )
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise ValueError(
                f"{self.name}: targets must be integer class indices, got {targets.dtype}"
            )
        n = self.model.num_classes
        bad = (targets < 0) | (targets >= n)
        if bad.any():
            raise ValueError(
                f"{self.name}: target {int(targets[bad][0])} out of range for a model with "
                f"{n} classes"
            )
        device = self.model.device
        return x.detach().to(device, torch.float32), targets.to(device, torch.long)

    def scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The explained quantity per row: the target's logit, or ("prob") its class score by
        the model's score function (softmax; sigmoid for multi-label models)."""
        if self.score == "prob":
            outputs = self.model.class_scores(outputs)
        return outputs.gather(1, targets[:, None])[:, 0]
