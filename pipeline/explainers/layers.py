"""Finding the layer a CAM-family method reads, and reading it through hooks that always go away."""

from __future__ import annotations

import difflib
from contextlib import contextmanager

import torch
from torch import nn

from ..models.loaded import LoadedModel

_POOLING = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.Flatten,
    nn.Dropout,
    nn.Identity,
)


def resolve_layer(model: LoadedModel, name: str | None = None) -> tuple[str, nn.Module]:
    """The named layer, or by default the last spatial feature map before global pooling.

    Default: `model.cam_layer` when the loader set one, else the module that finishes last (in
    forward order) with a 4-D output of spatial size > 1 that is not a pooling layer. That is
    `layer4` on torchvision ResNets, `features` on VGG/EfficientNet/MobileNet, and the
    post-activation head (`bn2`) on timm EfficientNets.
    """
    modules = dict(model.module.named_modules())
    name = name if name is not None else (model.cam_layer or None)
    if name is not None:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ValueError(f"model {model.id!r} has no layer {name!r}{hint}")
        return name, modules[name]
    found: list[str] = []
    names = {id(m): n for n, m in modules.items()}

    def hook(module, _inp, out):
        if (
            isinstance(out, torch.Tensor)
            and out.ndim == 4
            and out.shape[-1] * out.shape[-2] > 1
            and not isinstance(module, _POOLING)
            and names.get(id(module))
        ):
            found.append(names[id(module)])

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    try:
        size = model.input_size
        with torch.inference_mode():
            model.module(torch.zeros(1, 3, size, size, device=model.device))
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise ValueError(f"model {model.id!r} has no spatial feature map for CAM methods")
    return found[-1], modules[found[-1]]


@contextmanager
def record_activations(layer: nn.Module, *, with_grad: bool):
    """Yield a dict that receives the layer's output "A" on the next forward.

    with_grad: the output is replaced by a leaf that requires grad (its clone flows on, so in-place
    ops downstream stay legal), so gradients w.r.t. A exist even though neither the input nor the
    weights require grad, and the graph is built only from A onwards.
    """
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inp, out):
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"CAM layer returned {type(out).__name__}, expected a tensor")
        if with_grad:
            leaf = out.detach().requires_grad_(True)
            store["A"] = leaf
            return leaf.clone()
        store["A"] = out
        return None

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
