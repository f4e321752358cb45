"""The gradient family (seed 001, seed 002): saliency, gradient x input, integrated gradients,
guided backprop, deconvnet, SmoothGrad.

Captum does saliency, gradient x input and integrated gradients right, so they wrap it. Guided
backprop and deconvnet are written here: Captum's versions only rewrite `nn.ReLU` modules, so
they silently fall back to plain gradients on the builtin model's ReLU6, and they need care with
in-place and reused ReLUs (torchvision ResNet). SmoothGrad is written here because Captum's
NoiseTunnel draws one noise tensor for the whole batch, so an image's map would depend on the
batch around it; ours seeds each image's noise from its content.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from torch import nn

from ..chunks import chunks
from ..compute.perturbed_forward import default_max_batch
from ..compute.seeds import generator, image_seeds
from ..params import FiniteNonNegativeFloat, PixelValue, PositiveInt, Score
from .base import Explainer, Explanation, build_explainer, register

# Captum warns on each call that it set requires_grad on our detached inputs: expected here.
warnings.filterwarnings("ignore", message="Input Tensor .* did not already require gradients")


class _CaptumExplainer(Explainer):
    requires = frozenset({"gradients"})
    input_gradient = True

    def captum_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.model.forward(inputs)
        return self.model.class_scores(out) if self.score == "prob" else out


@register
class SaliencyExplainer(_CaptumExplainer):
    """max over channels of |dS_c/dx| (Simonyan et al.). 1F+1B."""

    name = "saliency"

    def attribute(self, x, targets):
        attr = Saliency(self.captum_forward).attribute(x, target=targets, abs=True)
        return attr.amax(1)


@register
class GradientXInput(_CaptumExplainer):
    """sum over channels of x * dS_c/dx. Signed. 1F+1B."""

    name = "gradient_x_input"
    signed = True

    def attribute(self, x, targets):
        return InputXGradient(self.captum_forward).attribute(x, target=targets).sum(1)


@register
class IntegratedGradientsExplainer(_CaptumExplainer):
    """(x - x') * mean_k dS_c(x' + k/m (x - x'))/dx, k = 1..m (right Riemann sum), summed over
    channels. Baseline x' is a constant pixel value (0 = black) in pixel space. Signed. mF+mB.

    `extras["delta"]` holds the completeness gap sum(attr) - (S_c(x) - S_c(x')) per image.
    """

    name = "integrated_gradients"
    signed = True

    def __init__(
        self,
        model,
        *,
        steps: PositiveInt = 50,
        baseline: PixelValue = 0.0,
        max_batch: PositiveInt | None = None,
        score: Score | None = None,
    ):
        super().__init__(model, score=score)
        self.steps, self.baseline = steps, baseline
        self.max_batch = max_batch

    def attribute(self, x, targets):
        base = self.model.preprocess.pixel_value(self.baseline, x.device).expand_as(x).contiguous()
        if self.steps == 1:  # Captum's Riemann sums need two points; m = 1 is the gradient at x
            return self._one_step(x, base, targets)
        attr, delta = IntegratedGradients(self.captum_forward).attribute(
            x,
            baselines=base,
            target=targets,
            n_steps=self.steps,
            method="riemann_right",
            internal_batch_size=self.max_batch or default_max_batch(self.model),
            return_convergence_delta=True,
        )
        return Explanation(attr.sum(1), {"delta": delta})

    def _one_step(self, x, base, targets):
        inputs = torch.cat([x, base]).detach().requires_grad_(True)
        with torch.enable_grad():
            scores = self.captum_forward(inputs).gather(1, targets.repeat(2)[:, None])[:, 0]
            (grad,) = torch.autograd.grad(scores[: len(x)].sum(), inputs)
        attr = (x - base) * grad[: len(x)]
        gap = scores[: len(x)] - scores[len(x) :]
        return Explanation(attr.sum(1), {"delta": attr.flatten(1).sum(1) - gap})


class _RectifiedBackward(torch.autograd.Function):
    """Forward: the module's activation. Backward: max(grad, 0), times the activation's own
    derivative mask when `use_mask` (guided backprop) or not (deconvnet)."""

    @staticmethod
    def forward(ctx, inp, out, use_mask):
        ctx.use_mask = use_mask
        ctx.save_for_backward(inp, out)
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        inp, out = ctx.saved_tensors
        grad = grad.clamp(min=0)
        if ctx.use_mask:
            # derivative of ReLU/ReLU6/Hardtanh-style clamps: 1 where the output moved with input
            grad = grad * ((out == inp) & (inp > 0)).to(grad.dtype)
        return grad, None, None


_RECTIFIERS = (nn.ReLU, nn.ReLU6)


@contextmanager
def _rectified_relus(module: nn.Module, use_mask: bool):
    """Per-call rewrite of every ReLU's backward via forward hooks (works for reused modules);
    in-place ReLUs are made out-of-place while the hooks are on, so their input survives."""
    handles, inplace = [], []

    def hook(_m, inputs, output):
        return _RectifiedBackward.apply(inputs[0], output, use_mask)

    try:
        for m in module.modules():
            if isinstance(m, _RECTIFIERS):
                if getattr(m, "inplace", False):
                    inplace.append(m)
                    m.inplace = False
                handles.append(m.register_forward_hook(hook))
        yield len(handles)
    finally:
        for h in handles:
            h.remove()
        for m in inplace:
            m.inplace = True


class _ModifiedGradient(Explainer):
    requires = frozenset({"gradients", "layer_types"})
    use_mask = True
    input_gradient = True

    def input_gradients(self, x, targets) -> torch.Tensor:
        with _rectified_relus(self.model.module, self.use_mask) as n, torch.enable_grad():
            if n == 0:
                raise ValueError(f"{self.name}: model {self.model.id!r} has no nn.ReLU/ReLU6")
            xg = x.clone().requires_grad_(True)
            s = self.scores(self.model.forward(xg), targets)
            (grad,) = torch.autograd.grad(s.sum(), xg)
        return grad

    def attribute(self, x, targets):
        return self.input_gradients(x, targets).abs().amax(1)


@register
class GuidedBackprop(_ModifiedGradient):
    """ReLU backward 1[x>0] * max(grad, 0) (Springenberg et al.); map = max |.| over channels."""

    name = "guided_backprop"


@register
class Deconvnet(_ModifiedGradient):
    """ReLU backward max(grad, 0), forward mask ignored (Zeiler & Fergus)."""

    name = "deconvnet"
    use_mask = False


@register
class SmoothGrad(Explainer):
    """Mean of a base method's maps over n noisy copies, noise ~ N(0, (sigma (xmax - xmin))^2)
    per image, seeded per image (Smilkov et al.). Cost: n x base."""

    name = "smoothgrad"

    def __init__(
        self,
        model,
        *,
        base: str = "saliency",
        n: PositiveInt = 50,
        sigma: FiniteNonNegativeFloat = 0.15,
        seed: int = 0,
        max_batch: PositiveInt | None = None,
        score: Score | None = None,
        **base_params,
    ):
        super().__init__(model, score=score)
        if score is not None:
            base_params["score"] = score
        self.base = build_explainer(base, model, **base_params)
        self.signed = self.base.signed
        self.input_gradient = self.base.input_gradient
        self.n, self.sigma, self.seed = n, sigma, seed
        self.max_batch = max_batch or default_max_batch(model)

    def attribute(self, x, targets):
        b = x.shape[0]
        seeds = image_seeds(x, self.seed)
        span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(b, 1, 1, 1)
        maps = torch.zeros(b, *x.shape[2:], device=x.device)
        gens = [generator(x.device, s) for s in seeds]
        for part in chunks(b * self.n, self.max_batch):
            img = torch.arange(part.start, part.stop) // self.n
            # each image draws its noise in copy order from its own generator
            noise = torch.stack(
                [torch.randn(x.shape[1:], generator=gens[i], device=x.device) for i in img.tolist()]
            )
            img = img.to(x.device)
            noisy = x[img] + noise * self.sigma * span[img]
            maps.index_add_(0, img, self.base(noisy, targets[img]))
        return maps / self.n
