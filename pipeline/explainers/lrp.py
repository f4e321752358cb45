"""Layer-wise relevance propagation (seed 001, section 5.1).

Written here rather than with zennit: zennit (0.5.1, EpsilonPlusFlat) conserves relevance on
torchvision ResNet-18 through its ResNetCanonizer (biases zeroed, 64 px: input relevance 3.0444
for a logit of 3.0444), but it has no canonizer for timm's EfficientNet blocks, whose residual
additions are functional (`x = drop_path(x) + shortcut`) and whose BatchNorm is timm's
BatchNormAct2d: gradient backward hands the full relevance to both summands, so on the builtin
model (tf_efficientnet_lite0, biases zeroed, SequentialMergeBatchNorm, 64 px) the input relevance
summed to 533.6 for a logit of 1.04 (measured). Instead of a canonizer per architecture, the
rule table routes every tensor + tensor addition through the sum rule while the forward runs
(`hooks.TensorAdd`), so every residual addition splits relevance in proportion to its summands,
whatever module wrote it.

How it runs: the model is deep-copied once at construction; on the copy BatchNorm is fused into
the conv that feeds it (`hooks.fuse_batchnorm`: pairs are found by tensor identity in one traced
forward, `hooks.trace`, so it works for Sequential, ResNet blocks and timm's BatchNormAct2d; the
fused norm, an exact identity, is then skipped) and in-place activations are made out-of-place.
The user's module is never touched. Each layer's modified weights (w+, w-, the gamma weights, the
flat rule's ones) are computed once, at construction. Per call, a rule table
over `hooks.backward_rules` replaces the backward of each layer by a rule that maps the relevance
of its output to the relevance of its input (the forward is the layer's own, hooks and the add
interception are gone after the call), so `autograd.grad(logits, x, one_hot * logit)` returns
input relevance:

- Conv2d / Linear: the layer's rule (epsilon, gamma, alpha-beta, z+, flat), written as one
  modified forward (only where the rule's denominator is not the layer's own output, which is
  saved) and one transposed convolution / matrix product per weight sign.
- average pools and BatchNorm that follows no conv: linear maps, epsilon rule (a -> a/z share).
- elementwise activations (ReLU, ReLU6, SiLU, ...) and fused BatchNorms (exact identities, or
  timm's BatchNormAct2d around an activation): pass-through (R_in = R_out), so ReLU6's clip
  loses nothing.
- tensor + tensor: R_a = a/(a+b) R, R_b = b/(a+b) R (stabilised).
- max pool, flatten, dropout, identity: the plain gradient (winner-take-all for max pool).
- anything else (LayerNorm, attention, multiplications): the plain gradient, which does not
  conserve: on vision transformers LRP runs but is only a gradient-like map there (transformer
  rules such as AttnLRP are not implemented).

Bias terms (including the ones BatchNorm fusion creates) and the epsilon stabiliser absorb
relevance. Every rule records what it absorbed, so `extras["absorbed"]` [B] is the relevance that
left through biases/epsilon and `extras["score"]` the explained score: sum(R_input) + absorbed =
score is the conservation identity (exact up to float error when nothing leaks); with biases
zeroed and a tiny epsilon, sum(R_input) = score itself. The z+ / alpha-beta rules also drop the
relevance of a neuron none of whose inputs contributes positively (z+ = 0); behind a residual
split (which can hand relevance to a negative summand) that happens, and it is counted as absorbed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..params import NonNegativeFloat, Score
from .base import Explainer, Explanation, register
from .hooks import (
    ACTIVATIONS,
    Call,
    TensorAdd,
    backward_rules,
    forward_order,
    fuse_batchnorm,
    identity_after_fusion,
    pass_through,
    private_copy,
    trace,
)

_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)

Rule = Literal["epsilon", "gamma", "alpha_beta", "zplus", "flat"]
Composite = Literal[
    "epsilon_plus_flat", "epsilon_plus", "epsilon_gamma_flat", "epsilon_alpha2_beta1_flat"
]
RULES = get_args(Rule)
COMPOSITES: dict[Composite, tuple[Rule, Rule, Rule]] = {
    # first conv/linear layer, other convolutions, dense layers (zennit's naming)
    "epsilon_plus_flat": ("flat", "zplus", "epsilon"),
    "epsilon_plus": ("zplus", "zplus", "epsilon"),
    "epsilon_gamma_flat": ("flat", "gamma", "epsilon"),
    "epsilon_alpha2_beta1_flat": ("flat", "alpha_beta", "epsilon"),
}


def _stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    # summing over dims, not flatten(1): no copy of channels-last tensors
    return t.sum(dim=tuple(range(1, t.ndim)))


class _Tracker:
    """Collects per-image relevance absorbed by biases and stabilisers during one backward.

    Layers inside windowed attention (Swin) see a batch of images x windows: their rows are
    summed per image, windows being image-major there (timm's window partition)."""

    def __init__(self, images: int):
        self.images = images
        self.absorbed: torch.Tensor | None = None

    def add(self, r_out: torch.Tensor, r_in_total: torch.Tensor):
        self.absorb(_per_sample(r_out) - r_in_total)

    def absorb(self, lost: torch.Tensor):
        lost = lost.detach()
        if lost.shape[0] != self.images and lost.shape[0] % self.images == 0:
            lost = lost.view(self.images, -1).sum(1)
        self.absorbed = lost if self.absorbed is None else self.absorbed + lost


# -- a conv/linear layer as a function of its weights -----------------------------------------
_PLAIN_FORWARDS = (nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def _plain(module: nn.Module) -> bool:
    """torch's own conv/linear forward with zero or no padding: its input backward is one
    transposed convolution. Subclasses that pad in their forward (timm's Conv2dSame) are not."""
    if type(module).forward not in _PLAIN_FORWARDS:
        return False
    return getattr(module, "padding_mode", "zeros") == "zeros" and not isinstance(
        getattr(module, "padding", 0), str
    )


def _forward(module: nn.Module, a: torch.Tensor, weight, bias=None) -> torch.Tensor:
    """The layer's forward with other weights."""
    if not _plain(module):
        params = {"weight": weight}
        if getattr(module, "bias", None) is not None:
            params["bias"] = bias if bias is not None else torch.zeros_like(module.bias)
        return functional_call(module, params, (a,))
    if isinstance(module, nn.Linear):
        return F.linear(a, weight, bias)
    return module._conv_forward(a, weight, bias)


def _transposed(module: nn.Module, a: torch.Tensor, weight, s: torch.Tensor) -> torch.Tensor:
    """sum_j w_ij s_j: the input gradient of x -> forward(x, weight) at s. Linear maps, so no
    forward is needed: a matrix product, or the convolution's input backward."""
    if not _plain(module):  # let autograd transpose the forward
        with torch.enable_grad():
            leaf = a.detach().requires_grad_(True)
            (c,) = torch.autograd.grad(_forward(module, leaf, weight), leaf, s)
        return c
    if isinstance(module, nn.Linear):
        return s @ weight
    n = weight.ndim - 2
    return torch.ops.aten.convolution_backward(
        s,
        a,
        weight,
        None,
        module.stride,
        module.padding,
        module.dilation,
        False,
        [0] * n,
        module.groups,
        [True, False, False],
    )[0]


def _forward_eps(module: nn.Module, a: torch.Tensor, weight, eps: float) -> torch.Tensor:
    """forward(a, weight) + eps, biases ignored; eps rides in the bias (no extra pass)."""
    if not _plain(module):
        return _forward(module, a, weight) + eps
    return _forward(module, a, weight, weight.new_full((weight.shape[0],), eps))


class _LayerRule:
    """One conv/linear layer's LRP rule, with its modified weights computed once.

    nonnegative: the layer only ever reads a ReLU's output (known from the traced forward), so
    the z+ / alpha-beta rules need not look for negative inputs."""

    def __init__(self, module, rule: str, eps: float, gamma: float, beta: float, nonnegative=False):
        self.rule, self.eps, self.beta, self.nonnegative = rule, eps, beta, nonnegative
        w, b = module.weight.detach(), getattr(module, "bias", None)
        b = b.detach() if b is not None else None
        if rule == "gamma":
            self.w = w + gamma * w.clamp(min=0)
            self.b = b + gamma * b.clamp(min=0) if b is not None else None
        elif rule in ("zplus", "alpha_beta"):
            self.pos, self.neg = w.clamp(min=0), w.clamp(max=0)
            # signed inputs: [a+, a-] against [w+, w-] stacked along the input channels is one
            # convolution (groups 1) instead of two and an add over the (large) output
            self.stacked = _plain(module) and getattr(module, "groups", 1) == 1
            if self.stacked:
                self.pos_neg = torch.cat([self.pos, self.neg], 1)
                self.neg_pos = torch.cat([self.neg, self.pos], 1)
        elif rule == "flat":
            self.ones = torch.ones_like(w)

    def __call__(self, module, inputs, z, r, tracker: _Tracker | None = None):
        (a,) = inputs
        eps = self.eps
        if self.rule == "epsilon":  # z is the layer's saved output: no forward again
            out = a * _transposed(module, a, module.weight, r / _stabilise(z, eps))
        elif self.rule == "gamma":
            zg = _forward(module, a, self.w, self.b)
            out = a * _transposed(module, a, self.w, r / _stabilise(zg, eps))
        elif self.rule == "flat":  # every input and weight 1: relevance spread uniformly
            ones = torch.ones_like(a)
            out = _transposed(module, a, self.ones, r / _forward_eps(module, ones, self.ones, eps))
        else:
            mixed = not self.nonnegative and bool(a.amin() < 0)
            stacked = self.pos_neg if mixed and self.stacked else None
            out, s = self._signed(module, a, r, self.pos, self.neg, eps, mixed, stacked)  # z+
            if self.rule == "zplus":
                if tracker is not None:
                    # R_j - sum_i R_ij = s_j (z+_j + eps) - s_j z+_j: what eps took, one sum
                    tracker.absorb(eps * _per_sample(s))
                return out
            out = (self.beta + 1.0) * out
            if self.beta:
                stacked = self.neg_pos if mixed and self.stacked else None
                neg, _ = self._signed(module, a, r, self.neg, self.pos, -eps, mixed, stacked)
                out = out - self.beta * neg
        if tracker is not None:
            tracker.add(r, _per_sample(out))
        return out

    @staticmethod
    def _signed(module, a, r, wa, wb, eps, mixed, stacked=None):
        """R_i = sum_j (a_i w_ij)^s / (sum_q (a_q w_qj)^s + eps) R_j for one sign s: the
        positive parts of a meet weights `wa`, the negative parts `wb` (biases ignored;
        `stacked`: [wa, wb] along the input channels). Returns R and s = R_out / (z^s + eps)."""
        if not mixed:  # no negative inputs: one forward and one transpose suffice
            s = r / _forward_eps(module, a, wa, eps)
            return a * _transposed(module, a, wa, s), s
        ap, an = a.clamp(min=0), a.clamp(max=0)
        if stacked is not None:
            dim = -1 if isinstance(module, nn.Linear) else 1
            both = torch.cat([ap, an], dim)
            s = r / _forward_eps(module, both, stacked, eps)
            cp, cn = _transposed(module, both, stacked, s).chunk(2, dim)
            return ap * cp + an * cn, s
        s = r / (_forward_eps(module, ap, wa, eps) + _forward(module, an, wb))
        return ap * _transposed(module, a, wa, s) + an * _transposed(module, a, wb, s), s


def _reads_relu(calls: list[Call], module: nn.Module) -> bool:
    """Every call of `module` reads a tensor that a ReLU (or ReLU6) wrote: no negative input."""
    sources = [c.source for c in calls if c.module is module]
    return bool(sources) and all(
        isinstance(s, nn.ReLU) or (isinstance(s, nn.Hardtanh) and s.min_val >= 0) for s in sources
    )


def _epsilon_any(eps: float) -> Callable:
    """The epsilon rule for any linear map (average pools, unfused BatchNorm): its vjp by
    autograd at the saved input, with the saved output as z."""

    def rule(module, inputs, z, r):
        with torch.enable_grad():
            a = inputs[0].detach().requires_grad_(True)
            (c,) = torch.autograd.grad(module.forward(a), a, r / _stabilise(z, eps))
        return a.detach() * c

    return rule


def sum_rule(eps: float) -> Callable:
    """a + b: R_a = a/(a+b) R, R_b = b/(a+b) R, stabilised."""

    def rule(_m, inputs, out, r):
        a, b = inputs
        s = r / _stabilise(out, eps)
        return a * s, b * s

    return rule


def tracked(rule: Callable, tracker: _Tracker | None) -> Callable:
    """The rule, recording what it absorbed (relevance in minus relevance out) in `tracker`."""
    if tracker is None:
        return rule

    def run(module, inputs, out, r):
        got = rule(module, inputs, out, r)
        parts = got if isinstance(got, tuple) else (got,)
        tracker.add(r, sum(_per_sample(p) for p in parts))
        return got

    return run


@register
class LRP(Explainer):
    """Layer-wise relevance propagation; input relevance summed over channels. Signed. 1F+1B.

    composite: "epsilon_plus_flat" (default: flat for the first conv/linear layer, z+ (= alpha1
    beta0 on ReLU nets) for the other convolutions, epsilon for dense layers), "epsilon_plus",
    "epsilon_gamma_flat", "epsilon_alpha2_beta1_flat". rule: one of epsilon, gamma, alpha_beta,
    zplus, flat for every conv/linear layer (overrides the composite). alpha = beta + 1.
    Relevance starts at the target's score (the logit by default) at the output.
    """

    requires = frozenset({"gradients", "layer_types"})

    name = "lrp"
    signed = True
    input_gradient = True

    def __init__(
        self,
        model,
        *,
        composite: Composite = "epsilon_plus_flat",
        rule: Rule | None = None,
        epsilon: NonNegativeFloat = 1e-6,
        gamma: NonNegativeFloat = 0.25,
        beta: NonNegativeFloat = 0.0,
        score: Score | None = None,
    ):
        super().__init__(model, score=score)
        self.composite, self.rule = composite, rule
        self.epsilon, self.gamma, self.beta = epsilon, gamma, beta
        size = model.input_size
        example = torch.zeros(1, 3, size, size, device=model.device)
        self.module = private_copy(model.module)
        self.fused_bn, self.unfused_bn = fuse_batchnorm(self.module, example)
        calls = trace(self.module, example)
        self.layers = self._assign_rules(calls)
        small = max(epsilon, 1e-12)
        self._layer_rules = {
            m: _LayerRule(
                m,
                rule,
                epsilon if rule in ("epsilon", "gamma") else small,
                gamma,
                beta,
                nonnegative=_reads_relu(calls, m),
            )
            for m, rule in self.layers
        }

    def _assign_rules(self, calls: list[Call]) -> list[tuple[nn.Module, str]]:
        """(module, rule) for every conv/linear layer in forward order."""
        order = forward_order(calls, _LINEAR)
        first, conv, dense = COMPOSITES[self.composite]
        out = []
        for i, m in enumerate(order):
            if self.rule is not None:
                rule = self.rule
            elif i == 0:
                rule = first
            else:
                rule = dense if isinstance(m, nn.Linear) else conv
            out.append((m, rule))
        return out

    def rule_table(self, tracker: _Tracker | None = None) -> dict:
        """The rule table of one call (the first matching key wins)."""
        small = max(self.epsilon, 1e-12)
        layers = self._layer_rules
        fused = {m for m in self.fused_bn if identity_after_fusion(m)}
        unfused = set(self.unfused_bn)
        epsilon = tracked(_epsilon_any(small), tracker)

        def layer_rule(module, inputs, z, r):  # each layer rule records what it absorbed
            return layers[module](module, inputs, z, r, tracker)

        return {
            (lambda m: m in layers): layer_rule,
            (lambda m: m in fused): pass_through,  # exact identity: no BN backward to run
            ACTIVATIONS: pass_through,
            _AVGPOOL: epsilon,
            (lambda m: m in unfused): epsilon,
            TensorAdd: tracked(sum_rule(small), tracker),
        }

    def relevance(self, x, targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Input relevance [B,3,H,W] and the extras: the explained `score` and the relevance
        `absorbed` by biases and stabilisers."""
        tracker = _Tracker(x.shape[0])
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(backward_rules(self.module, self.rule_table(tracker)))
            xg = x.clone().requires_grad_(True)
            self.model.forward_passes += x.shape[0]  # the copy runs outside model.forward
            out = self.module(xg.contiguous(memory_format=torch.channels_last))
        s = self.scores(out.detach(), targets)
        start = torch.zeros_like(out).scatter(1, targets[:, None], s[:, None].to(out.dtype))
        (r,) = torch.autograd.grad(out, xg, start)
        absorbed = tracker.absorbed if tracker.absorbed is not None else torch.zeros_like(s)
        return r.detach(), {"score": s.detach(), "absorbed": absorbed}

    def attribute(self, x, targets):
        r, extras = self.relevance(x, targets)
        return Explanation(r.sum(1), extras)
