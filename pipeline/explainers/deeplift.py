"""DeepLIFT with the rescale rule (Shrikumar et al.; seed 001 section 5.2).

Written here, not wrapped from Captum: captum.attr.DeepLift (0.9.0) raises on torchvision
ResNet-18 ("A Module ReLU(inplace=True) ... used more than once") and on the builtin model
(tf_efficientnet_lite0) it treats ReLU6 as linear, so summation-to-delta fails there (measured at
64 px: attributions summed to -0.43 for S(x) - S(ref) = -2.00). Here the input and the reference
run as one batch [x; ref] through a deep copy (in-place activations made out-of-place; the
user's module is untouched). A rule table over `hooks.backward_rules` (removed after each
call) replaces the backward of every elementwise activation by the multiplier
dy/dx = (f(x) - f(ref)) / (x - ref) (the local gradient where |x - ref| < 1e-6) and of max
pooling by routing (max(x) - max(ref)) to x's argmax (or, where that position did not move, to
the window's largest |x - ref|, so the delta is never dropped).
Linear layers (conv, linear, eval BatchNorm, average pools, residual additions) keep their
gradient, which is the linear rule. Attribution = (x - ref) * multiplier, summed over
channels (signed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..params import PixelValue, Score
from .base import Explainer, Explanation, register
from .hooks import (
    ACTIVATIONS,
    backward_rules,
    fuse_batchnorm,
    identity_after_fusion,
    pass_through,
    private_copy,
)

_SMALL = 1e-6  # |x - ref| under this: the multiplier is the local gradient


def rescale_rule(m, inputs, out, grad):
    """Rescale for an elementwise function, rows [x; ref]: the multiplier
    (f(x) - f(ref)) / (x - ref) for both halves (the local gradient where |x - ref| < 1e-6)."""
    (a,) = inputs
    b = a.shape[0] // 2
    dx = a[:b] - a[b:]
    mult = (out[:b] - out[b:]) / dx  # inf/nan where dx = 0: replaced below
    small = dx.abs() < _SMALL
    if small.any():  # only then pay for the local gradient (a forward without hooks)
        with torch.enable_grad():
            leaf = a[:b].detach().requires_grad_(True)
            (local,) = torch.autograd.grad(m.forward(leaf).sum(), leaf)
        mult = torch.where(small, local, mult)
    # both halves times the same multiplier: one broadcast product, no concatenation
    return (grad.unflatten(0, (2, b)) * mult).flatten(0, 1)


def maxpool_rescale_rule(m, inputs, out, grad):
    """Max pooling, rows [x; ref]: (max(x) - max(ref)) routed to x's argmax per window, or,
    where that position did not move, to the window's largest |x - ref| (the delta is never
    dropped); the multiplier is the routed delta over x - ref."""
    (a,) = inputs
    b = a.shape[0] // 2
    dx, dy = a[:b] - a[b:], out[:b] - out[b:]
    args = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
    _, idx = F.max_pool2d(a[:b], *args)  # x's argmax per window (DeepLIFT's routing)
    _, idx_dx = F.max_pool2d(dx.abs(), *args)  # fallback where x's argmax did not move
    dx_flat = dx.flatten(2)
    moved = dx_flat.gather(2, idx.flatten(2)).abs() > _SMALL
    idx = torch.where(moved, idx.flatten(2), idx_dx.flatten(2))
    # scatter_add, not max_unpool: overlapping windows (ResNet's 3x3/2) share argmaxes
    routed = torch.zeros_like(dx_flat).scatter_add_(2, idx, (grad[:b] * dy).flatten(2))
    routed = routed.view_as(dx)
    mult = torch.where(dx.abs() > _SMALL, routed / torch.where(dx == 0, 1.0, dx), 0.0)
    return torch.cat([mult, mult])


@register
class DeepLift(Explainer):
    """DeepLIFT rescale against a constant reference pixel value (0 = black) in pixel space.
    Signed; channels summed. 2F (x and reference in one batch) + 1B.

    extras["delta"]: sum(attr) - (S(x) - S(ref)) per image (summation-to-delta gap). Exact up to
    float error on nets of conv/linear/BN/pool/elementwise activations/additions; not on
    attention or LayerNorm (ViTs), which are not rescaled. score="prob" explains the softmax with
    its plain gradient at the end, so the gap is not zero there.
    """

    requires = frozenset({"gradients", "layer_types"})

    name = "deeplift"
    signed = True
    input_gradient = True

    def __init__(self, model, *, reference: PixelValue = 0.0, score: Score | None = None):
        super().__init__(model, score=score)
        self.reference = reference
        size = model.input_size
        example = torch.zeros(1, 3, size, size, device=model.device)
        self.module = private_copy(model.module)
        # BatchNorm folded into its conv: the same function, and its backward need not run
        fused, _ = fuse_batchnorm(self.module, example)
        fused = [m for m in fused if identity_after_fusion(m)]
        with_act = {m for m in fused if any(isinstance(c, ACTIVATIONS) for c in m.children())}
        identity = set(fused) - with_act
        self.rules = {
            # identity + activation (timm's BatchNormAct2d) is elementwise: rescaled as a whole
            (lambda m: m in with_act): rescale_rule,
            (lambda m: m in identity): pass_through,
            ACTIVATIONS: rescale_rule,
            nn.MaxPool2d: maxpool_rescale_rule,
        }

    def attribute(self, x, targets):
        b = x.shape[0]
        ref = self.model.preprocess.pixel_value(self.reference, x.device).expand_as(x)
        both = torch.cat([x, ref]).requires_grad_(True)
        with backward_rules(self.module, self.rules), torch.enable_grad():
            self.model.forward_passes += 2 * b  # the copy runs outside model.forward
            out = self.module(both.contiguous(memory_format=torch.channels_last))
            s = self.scores(out, torch.cat([targets, targets]))
        with torch.enable_grad():
            (g,) = torch.autograd.grad(s[:b].sum(), both)
        attr = (x - ref) * g[:b]
        delta = attr.flatten(1).sum(1) - (s[:b] - s[b:])
        return Explanation(attr.sum(1), {"delta": delta, "score_delta": s[:b] - s[b:]})
