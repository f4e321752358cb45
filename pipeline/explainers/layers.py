"""Finding the layer a CAM-family method reads, and reading it through hooks that always go away."""

from __future__ import annotations

import difflib
import math
from contextlib import contextmanager

import torch
from torch import nn

from ..models.loaded import LoadedModel
from .hooks import forward_hooks, trace

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
    post-activation head (`bn2`) on timm EfficientNets. Vision transformers (token outputs
    [B,T,C] after the last spatial map): the first norm of the last block (`blocks.N.norm1` in
    timm, `encoder.layers.encoder_layer_N.ln_1` in torchvision), the usual ViT Grad-CAM layer: a
    class-token head reads only the class token of the last block's output, so patch tokens get
    gradient only through the last block's attention.
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
    size = model.input_size
    for call in trace(model.module, torch.zeros(1, 3, size, size, device=model.device)):
        shape = call.shape
        if shape is None or not call.name:
            continue
        tokens = len(shape) == 3 and call.name.endswith((".norm1", ".ln_1"))
        if tokens and _token_prefix(shape[1]) is not None:
            found.append(call.name)
        spatial = len(shape) == 4 and shape[-1] * shape[-2] > 1
        if spatial and not isinstance(call.module, _POOLING):
            found.append(call.name)
    if not found:
        raise ValueError(f"model {model.id!r} has no spatial feature map for CAM methods")
    return found[-1], modules[found[-1]]


def _token_prefix(t: int, max_prefix: int = 8) -> int | None:
    """Number of leading non-patch tokens (class, distillation, registers) among t tokens: the
    smallest p <= max_prefix with t - p a perfect square (unambiguous while p < 2 sqrt(t-p) + 1)."""
    for p in range(max_prefix + 1):
        n = t - p
        if n > 0 and math.isqrt(n) ** 2 == n:
            return p
    return None


def tokens_to_grid(tokens: torch.Tensor, prefix: int | None = None):
    """[B,T,C] transformer tokens -> (patch tokens as [B,C,h,w], number of prefix tokens dropped).

    Assumes a square patch grid in row-major order after `prefix` class/distillation tokens
    (timm ViT/DeiT, torchvision VisionTransformer)."""
    if prefix is None:
        prefix = _token_prefix(tokens.shape[1])
        if prefix is None:
            raise ValueError(f"cannot read {tokens.shape[1]} tokens as a square patch grid")
    b, t, c = tokens.shape
    side = math.isqrt(t - prefix)
    if side * side != t - prefix:
        raise ValueError(f"{t - prefix} patch tokens do not form a square grid")
    grid = tokens[:, prefix:].transpose(1, 2).reshape(b, c, side, side)
    return grid, prefix


def grid_to_tokens(grid: torch.Tensor, prefix_tokens: torch.Tensor) -> torch.Tensor:
    """Inverse of `tokens_to_grid`: [B,C,h,w] + [B,p,C] -> [B,p+h*w,C]."""
    return torch.cat([prefix_tokens, grid.flatten(2).transpose(1, 2)], 1)


def channels_last_output(model: LoadedModel, layer: nn.Module) -> bool:
    """Whether the layer's 4-D output is [B,H,W,C]: the feature maps of timm models whose
    `output_fmt` is NHWC (Swin and other hierarchical transformers); convolutions still give
    [B,C,H,W]."""
    fmt = getattr(model.module, "output_fmt", "NCHW")
    return getattr(fmt, "value", fmt) == "NHWC" and not isinstance(layer, nn.Conv2d)


@contextmanager
def record_activations(
    layer: nn.Module,
    *,
    with_grad: bool = False,
    replace: torch.Tensor | None = None,
    channels_last: bool = False,
):
    """Yield a dict that receives the layer's output "A" on the next forward.

    Token outputs [B,T,C] (vision transformers) are given as the patch grid [B,C,h,w] (class and
    distillation tokens dropped, see `tokens_to_grid`), and with `channels_last` a [B,H,W,C]
    output (`channels_last_output`) as [B,C,H,W], so every CAM method works on ViTs and Swins.

    with_grad: the output is replaced by a leaf that requires grad (its clone flows on, so in-place
    ops downstream stay legal), so gradients w.r.t. A exist even though neither the input nor the
    weights require grad, and the graph is built only from A onwards.

    replace: the layer outputs this [B,C,h,w] tensor instead (for token layers: as patch tokens
    beside the layer's own class/distillation tokens), and "A" is it (attribution
    visualization's path integral in the layer's space).
    """
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inp, out):
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"CAM layer returned {type(out).__name__}, expected a tensor")
        if replace is not None:
            store["A"] = replace
            if out.ndim == 3:
                return grid_to_tokens(replace, out[:, : tokens_to_grid(out)[1]])
            if channels_last:
                return replace.permute(0, 2, 3, 1).clone()
            return replace.clone()  # the clone flows on: in-place ops cannot touch the leaf
        if channels_last and out.ndim == 4:  # [B,H,W,C] feature map: seen as [B,C,H,W]
            grid = out.permute(0, 3, 1, 2)
            if with_grad:
                leaf = grid.detach().requires_grad_(True)
                store["A"] = leaf
                return leaf.permute(0, 2, 3, 1)
            store["A"] = grid
            return None
        if out.ndim == 3:  # transformer tokens: CAM methods see the patch grid [B,C,h,w]
            grid, p = tokens_to_grid(out)
            if with_grad:
                leaf = grid.detach().requires_grad_(True)
                store["A"] = leaf
                return grid_to_tokens(leaf, out[:, :p].detach())
            store["A"] = grid
            return None
        if with_grad:
            leaf = out.detach().requires_grad_(True)
            store["A"] = leaf
            return leaf.clone()
        store["A"] = out
        return None

    with forward_hooks([(layer, hook)]):
        yield store
