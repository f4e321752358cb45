"""The CAM family, torch-native on the model's device: CAM, Grad-CAM, Grad-CAM++, Guided
Grad-CAM, Score-CAM (full and top-k by variance) and FEM. Definitions: METHODS.md.

All read one layer's activations A [B,K,h,w] through a hook that is removed on exit, and
upsample the [B,h,w] map bilinearly to the input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..compute.maps import normalise01, upsample
from ..compute.perturbed_forward import perturbed_scores
from ..params import PositiveInt, Score
from .base import Explainer, register
from .gradients import GuidedBackprop
from .layers import channels_last_output, record_activations, resolve_layer


class _LayerExplainer(Explainer):
    requires = frozenset({"activations"})

    def __init__(self, model, *, layer: str | None = None, score: Score | None = None):
        super().__init__(model, score=score)
        self.layer_name, self.layer = resolve_layer(model, layer)
        self.channels_last = channels_last_output(model, self.layer)

    def activations(self, x) -> torch.Tensor:
        read = record_activations(self.layer, channels_last=self.channels_last)
        with read as store, torch.inference_mode():
            self.model.forward(x)
        return store["A"].float()

    def activations_and_grads(self, x, targets) -> tuple[torch.Tensor, torch.Tensor]:
        read = record_activations(self.layer, with_grad=True, channels_last=self.channels_last)
        with read as store, torch.enable_grad():
            s = self.scores(self.model.forward(x), targets)
            a = store["A"]
            (g,) = torch.autograd.grad(s.sum(), a)
        return a.detach().float(), g.float()

    def finish(self, cam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return upsample(cam, x.shape[-2:])


@register
class GradCAM(_LayerExplainer):
    """alpha_k = mean_ij dS_c/dA^k_ij; ReLU(sum_k alpha_k A^k) (Selvaraju et al.). 1F+1B."""

    requires = frozenset({"activations", "gradients"})

    name = "gradcam"

    def attribute(self, x, targets):
        a, g = self.activations_and_grads(x, targets)
        weights = g.mean((2, 3), keepdim=True)
        return self.finish(F.relu((weights * a).sum(1)), x)


@register
class GradCAMPlusPlus(_LayerExplainer):
    """alpha_ij = g^2 / (2 g^2 + sum_ab A_ab g^3); w_k = sum_ij alpha_ij ReLU(g_ij)
    (Chattopadhay et al., with the exponential's derivatives simplified as usual). 1F+1B."""

    requires = frozenset({"activations", "gradients"})

    name = "gradcam_pp"

    def attribute(self, x, targets):
        a, g = self.activations_and_grads(x, targets)
        g2, g3 = g.pow(2), g.pow(3)
        denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g3
        alpha = torch.where(g != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), 0)
        weights = (alpha * F.relu(g)).sum((2, 3), keepdim=True)
        return self.finish(F.relu((weights * a).sum(1)), x)


@register
class CAM(_LayerExplainer):
    """sum_k w^c_k A^k with the weights of the GAP -> FC head (Zhou et al.). Signed. 1F."""

    requires = frozenset({"activations", "layer_types"})

    name = "cam"
    signed = True

    def __init__(self, model, *, layer: str | None = None, score: Score | None = None):
        super().__init__(model, layer=layer, score=score)
        linears = [m for m in model.module.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"cam: model {model.id!r} has no linear head (needs GAP -> FC)")
        self.fc = linears[-1]
        if self.fc.out_features != model.num_classes:
            raise ValueError(f"cam: the last linear layer of {model.id!r} is not the classifier")

    def attribute(self, x, targets):
        a = self.activations(x)
        if a.shape[1] != self.fc.in_features:
            raise ValueError(
                f"cam: layer {self.layer_name!r} has {a.shape[1]} channels but the classifier "
                f"takes {self.fc.in_features}; CAM needs GAP -> FC right after that layer"
            )
        w = self.fc.weight.float()[targets]  # [B,K]
        return self.finish(torch.einsum("bk,bkhw->bhw", w, a), x)


@register
class GuidedGradCAM(_LayerExplainer):
    """guided backprop x upsampled Grad-CAM (Selvaraju et al.). 1F+2B (two forwards here)."""

    requires = frozenset({"activations", "gradients", "layer_types"})

    name = "guided_gradcam"

    def __init__(self, model, *, layer: str | None = None, score: Score | None = None):
        super().__init__(model, layer=layer, score=score)
        self.gradcam = GradCAM(model, layer=self.layer_name, score=score)
        self.guided = GuidedBackprop(model, score=score)

    def attribute(self, x, targets):
        return self.guided.attribute(x, targets) * self.gradcam.attribute(x, targets)


@register
class ScoreCAM(_LayerExplainer):
    """H^k = normalise01(upsample(A^k)); s_k = P_c(x * H^k);
    ReLU(sum_k softmax(s)_k A^k) (Wang et al.).

    top_k: keep only the K' channels of largest spatial variance per image (the faster variant
    seed 004 used); None uses all K channels. Cost (K or K')+1 forwards, chunked by max_batch.
    """

    name = "scorecam"
    default_score = "prob"

    def __init__(
        self,
        model,
        *,
        layer: str | None = None,
        top_k: PositiveInt | None = None,
        max_batch: PositiveInt | None = None,
        score: Score | None = None,
    ):
        super().__init__(model, layer=layer, score=score)
        self.top_k, self.max_batch = top_k, max_batch

    def attribute(self, x, targets):
        a = self.activations(x)  # [B,K,h,w]
        b, k = a.shape[:2]
        if self.top_k is not None and self.top_k < k:
            channels = a.flatten(2).var(2).topk(self.top_k, dim=1).indices  # [B,K']
        else:
            channels = torch.arange(k, device=a.device).expand(b, k)
        size = x.shape[-2:]

        def make(img, j):
            act = a[img, channels[img, j]]  # [n,h,w]
            mask = normalise01(upsample(act, size))
            return x[img] * mask[:, None]

        s = perturbed_scores(
            self.model, targets, channels.shape[1], make, score=self.score, max_batch=self.max_batch
        )
        weights = s.softmax(1)  # [B,K']
        chosen = a.gather(1, channels[:, :, None, None].expand(-1, -1, *a.shape[2:]))
        return self.finish(F.relu(torch.einsum("bk,bkhw->bhw", weights, chosen)), x)


@register
class FEM(_LayerExplainer):
    """Feature Explanation Method (seed 001): B_k = A^k >= mu_k + K sigma_k, R = sum_k mu_k B_k,
    on the last conv layer's post-ReLU maps. Class-agnostic. 1F."""

    name = "fem"

    def __init__(
        self, model, *, layer: str | None = None, k: float = 1.0, score: Score | None = None
    ):
        super().__init__(model, layer=layer, score=score)
        self.k = k

    def attribute(self, x, targets):
        a = self.activations(x)
        mu = a.mean((2, 3), keepdim=True)
        sigma = a.std((2, 3), keepdim=True, correction=0)
        binary = (a >= mu + self.k * sigma).float()
        return self.finish((mu * binary).sum(1), x)
