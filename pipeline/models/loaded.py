"""The one object every explainer, metric and worker receives: a model ready to run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .preprocess import Preprocess

# how a class is scored from the logits: one class of many (softmax), each class on its own
# (sigmoid: multi-label models), or the raw logit
ScoreFunction = Literal["softmax", "sigmoid", "logit"]

# What a loaded model lets a method do beyond forward passes. A torch module offers all four;
# an exported program no layer types when a torch.nn layer in it could not be rebuilt from its
# graph ops (models/exported.py); an ONNX session only forwards. Explainers and metrics
# declare what they need (`requires`).
Capability = Literal["gradients", "activations", "layer_types", "weights"]
ALL_CAPABILITIES: frozenset[str] = frozenset(("gradients", "activations", "layer_types", "weights"))


@dataclass(frozen=True)
class RunPolicy:
    """How this process runs the model's perturbation forwards: a setting of the run (spec
    `compute`), not part of what the model is. Set with `LoadedModel.set_policy`."""

    # bf16 autocast for perturbation forwards on CUDA; off for exact fp32
    autocast: bool = True
    # the same on CPU: twice as fast where the CPU has bf16 units (AVX512-BF16, AMX), slower
    # where it has none, hence opt-in
    autocast_cpu: bool = False
    # torch.compile the module for the hook-free perturbation forwards
    compile: bool = False


@dataclass
class LoadedModel:
    """An eval-mode classifier on its device with everything needed to feed and read it.

    What the model is (the same wherever it is loaded):
    module      the torch module, in eval mode, channels_last, on `device`
    preprocess  images -> model input tensor (and the geometry for annotations)
    labels      one class name per output logit
    id          the URI it was loaded from
    weights_hash  sha256 of the weights file (or of the state dict when built in memory)
    cam_layer   name of the default layer for CAM-family explainers ("" -> resolved by search)
    score       how a class is scored from the logits (`class_scores`): softmax, sigmoid for
                multi-label models, or the logit itself
    capabilities  what it offers beyond forwards: gradients to the input, activations of named
                layers, layers of known nn.Module types, weights to re-initialise
                (ALL_CAPABILITIES for torch modules)

    How this process runs it: `policy` (a RunPolicy), and what running it has counted and
    learned: `forward_passes`, `max_batch_cap`.
    """

    module: nn.Module
    preprocess: Preprocess
    labels: list[str]
    id: str
    weights_hash: str = ""
    cam_layer: str = ""
    meta: dict = field(default_factory=dict)
    score: ScoreFunction = "softmax"
    capabilities: frozenset[str] = ALL_CAPABILITIES
    policy: RunPolicy = field(default_factory=RunPolicy)
    # images pushed through `forward` so far: explainers report their cost as the difference
    forward_passes: int = 0
    # the largest perturbation chunk that fitted after an out-of-memory split (None: no split)
    max_batch_cap: int | None = None
    # the module torch.compile made for `policy.compile` (None: eager)
    _compiled: Callable | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        p = next(self.module.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_size(self) -> int:
        return self.preprocess.size

    def to(self, device: str | torch.device) -> LoadedModel:
        self.module.to(device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The one way explainers and metrics run the model: channels_last, counted."""
        self.forward_passes += x.shape[0]
        return self.module(x.contiguous(memory_format=torch.channels_last))

    def set_policy(self, policy: RunPolicy) -> LoadedModel:
        """Run the perturbation forwards under `policy`. With `compile`, the module is compiled
        for them (RISE, GLAS, occlusion, LIME, Score-CAM's masked copies): they run without
        hooks, so the graph holds. Forwards that hooks or autograd act on (gradients, CAM
        activations, LRP) stay eager."""
        if policy.compile and self._compiled is None:
            self._compiled = torch.compile(self.module, dynamic=False)
        elif not policy.compile:
            self._compiled = None
        self.policy = policy
        return self

    @property
    def perturbed_module(self) -> Callable:
        """What perturbation forwards run: the compiled module under `policy.compile`."""
        return self._compiled if self._compiled is not None else self.module

    def forward_perturbed(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` for batches of perturbed copies: the compiled module when there is one."""
        if self._compiled is None:
            return self.forward(x)
        self.forward_passes += x.shape[0]
        return self._compiled(x.contiguous(memory_format=torch.channels_last))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Forward without autograd; for prediction, not for gradients."""
        with torch.inference_mode():
            return self.forward(x.to(self.device))

    def class_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, classes] logits -> the model's class scores (float32), by `score`. What every
        "prob" explainer score, metric and target choice uses."""
        logits = logits.float()
        if self.score == "softmax":
            return logits.softmax(-1)
        if self.score == "sigmoid":
            return logits.sigmoid()
        return logits

    def predict(self, x: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k class scores (`class_scores`) and class indices, each [B,k]."""
        return self.class_scores(self.logits(x)).topk(k, dim=-1)
