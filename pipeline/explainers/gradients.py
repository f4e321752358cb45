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

import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from torch import nn

from ..chunks import chunks
from ..compute.perturbed_forward import default_max_batch
from ..compute.seeds import generator, image_seeds
from ..params import FiniteNonNegativeFloat, PixelValue, PositiveInt, Score
from .base import Explainer, Explanation, build_explainer, register
from .hooks import backward_rules

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


_RECTIFIERS = (nn.ReLU, nn.ReLU6)


def guided_relu_rule(_m, inputs, out, grad):
    """Guided backprop: max(grad, 0) times the clamp's own derivative mask (1 where the output
    moved with the input: ReLU, ReLU6)."""
    (inp,) = inputs
    return grad.clamp(min=0) * ((out == inp) & (inp > 0)).to(grad.dtype)


def deconvnet_relu_rule(_m, _inputs, _out, grad):
    """Deconvnet: max(grad, 0), the forward mask ignored."""
    return grad.clamp(min=0)


class _ModifiedGradient(Explainer):
    requires = frozenset({"gradients", "layer_types"})
    relu_rule = staticmethod(guided_relu_rule)
    input_gradient = True

    def input_gradients(self, x, targets) -> torch.Tensor:
        # a per-call rule table (works for reused modules; in-place ReLUs run out of place)
        rules = backward_rules(self.model.module, {_RECTIFIERS: self.relu_rule})
        with rules as n, torch.enable_grad():
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
    relu_rule = staticmethod(deconvnet_relu_rule)


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
