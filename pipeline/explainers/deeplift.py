"""DeepLIFT with the rescale rule (Shrikumar et al.; seed 001 section 5.2).

Written here, not wrapped from Captum: captum.attr.DeepLift (0.9.0) raises on torchvision
ResNet-18 ("A Module ReLU(inplace=True) ... used more than once") and on the builtin model
(tf_efficientnet_lite0) it treats ReLU6 as linear, so summation-to-delta fails there (measured at
64 px: attributions summed to -0.43 for S(x) - S(ref) = -2.00). Here the input and the reference
run as one batch [x; ref] through a deep copy (in-place activations made out-of-place; the
user's module is untouched). Hooks (always removed) replace the backward of every elementwise
activation by the multiplier dy/dx = (f(x) - f(ref)) / (x - ref) (the local gradient where
|x - ref| < 1e-6) and of max pooling by routing (max(x) - max(ref)) to x's argmax (or, where
that position did not move, to the window's largest |x - ref|, so the delta is never dropped).
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
from .lrp import ACTIVATIONS, hooked, prepared_copy


class _Rescale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, out, module):
        ctx.save_for_backward(a, out)
        ctx.module = module
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        a, out = ctx.saved_tensors
        b = a.shape[0] // 2
        dx, dy = a[:b] - a[b:], out[:b] - out[b:]
        with torch.enable_grad():
            leaf = a[:b].detach().requires_grad_(True)
            (local,) = torch.autograd.grad(ctx.module.forward(leaf).sum(), leaf)  # no hooks
        small = dx.abs() < 1e-6
        mult = torch.where(small, local, dy / torch.where(small, torch.ones_like(dx), dx))
        return grad * torch.cat([mult, mult]), None, None


class _MaxPoolRescale(_Rescale):  # same forward; backward routes the delta to the argmax
    @staticmethod
    def backward(ctx, grad):
        a, out = ctx.saved_tensors
        m: nn.MaxPool2d = ctx.module
        b = a.shape[0] // 2
        dx, dy = a[:b] - a[b:], out[:b] - out[b:]
        args = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
        _, idx = F.max_pool2d(a[:b], *args)  # x's argmax per window (DeepLIFT's routing)
        _, idx_dx = F.max_pool2d(dx.abs(), *args)  # fallback where x's argmax did not move
        dx_flat = dx.flatten(2)
        moved = dx_flat.gather(2, idx.flatten(2)).abs() > 1e-6
        idx = torch.where(moved, idx.flatten(2), idx_dx.flatten(2))
        # scatter_add, not max_unpool: overlapping windows (ResNet's 3x3/2) share argmaxes
        routed = torch.zeros_like(dx_flat).scatter_add_(2, idx, (grad[:b] * dy).flatten(2))
        routed = routed.view_as(dx)
        mult = torch.where(dx.abs() > 1e-6, routed / torch.where(dx == 0, 1.0, dx), 0.0)
        return torch.cat([mult, mult]), None, None


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
        self.module, _ = prepared_copy(model.module, example, fuse=False)

    def _hooks(self):
        def rescale(m, inputs, output):
            return _Rescale.apply(inputs[0], output.detach(), m)

        def maxpool(m, inputs, output):
            return _MaxPoolRescale.apply(inputs[0], output.detach(), m)

        hooks = []
        for m in self.module.modules():
            if isinstance(m, ACTIVATIONS):
                hooks.append((m, rescale))
            elif isinstance(m, nn.MaxPool2d):
                hooks.append((m, maxpool))
        return hooks

    def attribute(self, x, targets):
        b = x.shape[0]
        ref = self.model.preprocess.pixel_value(self.reference, x.device).expand_as(x)
        both = torch.cat([x, ref]).requires_grad_(True)
        with hooked(self._hooks()), torch.enable_grad():
            self.model.forward_passes += 2 * b  # the copy runs outside model.forward
            out = self.module(both.contiguous(memory_format=torch.channels_last))
            s = self.scores(out, torch.cat([targets, targets]))
        with torch.enable_grad():
            (g,) = torch.autograd.grad(s[:b].sum(), both)
        attr = (x - ref) * g[:b]
        delta = attr.flatten(1).sum(1) - (s[:b] - s[b:])
        return Explanation(attr.sum(1), {"delta": delta, "score_delta": s[:b] - s[b:]})
