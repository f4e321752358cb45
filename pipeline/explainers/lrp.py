"""Layer-wise relevance propagation (seed 001, section 5.1) and the rule machinery DeepLIFT reuses.

Written here rather than with zennit: zennit (0.5.1, EpsilonPlusFlat) conserves relevance on
torchvision ResNet-18 through its ResNetCanonizer (biases zeroed, 64 px: input relevance 3.0444
for a logit of 3.0444), but it has no canonizer for timm's EfficientNet blocks, whose residual
additions are functional (`x = drop_path(x) + shortcut`) and whose BatchNorm is timm's
BatchNormAct2d: gradient backward hands the full relevance to both summands, so on the builtin
model (tf_efficientnet_lite0, biases zeroed, SequentialMergeBatchNorm, 64 px) the input relevance
summed to 533.6 for a logit of 1.04 (measured). Instead of a canonizer
per architecture, this module intercepts tensor + tensor additions while the forward runs (a
`TorchFunctionMode`), so every residual addition splits relevance in proportion to its summands,
whatever module wrote it.

How it runs: the model is deep-copied once at construction; on the copy BatchNorm is fused into
the conv that feeds it (pairs are found by tensor identity in a traced forward, so it works for
Sequential, ResNet blocks and timm's BatchNormAct2d) and in-place activations are made
out-of-place. The user's module is never touched. Per call, forward hooks (always removed) put a
custom autograd function behind each layer whose backward maps the relevance of its output to the
relevance of its input, so `autograd.grad(logits, x, one_hot * logit)` returns input relevance:

- Conv2d / Linear: the layer's rule (epsilon, gamma, alpha-beta, z+, flat).
- average pools and BatchNorm that follows no conv: linear maps, epsilon rule (a -> a/z share).
- elementwise activations (ReLU, ReLU6, SiLU, ...): pass-through (R_in = R_out), so ReLU6's clip
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

import copy
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from typing import Literal, get_args

import torch
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from ..params import NonNegativeFloat, Score
from .base import Explainer, Explanation, register

ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Mish,
)
_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

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
    return t.flatten(1).sum(1)


class _Tracker:
    """Collects per-sample relevance absorbed by biases and stabilisers during one backward."""

    def __init__(self):
        self.absorbed: torch.Tensor | None = None

    def add(self, r_out: torch.Tensor, r_in_total: torch.Tensor):
        lost = (_per_sample(r_out) - r_in_total).detach()
        self.absorbed = lost if self.absorbed is None else self.absorbed + lost


class _Relevance(torch.autograd.Function):
    """Forward: the layer's output unchanged. Backward: `rule(a, R_out) -> R_in` (relevance)."""

    @staticmethod
    def forward(ctx, a, out, rule, tracker):
        ctx.save_for_backward(a)
        ctx.rule, ctx.tracker = rule, tracker
        return out.clone()

    @staticmethod
    def backward(ctx, r_out):
        (a,) = ctx.saved_tensors
        with torch.enable_grad():
            r_in = ctx.rule(a.detach(), r_out)
        if ctx.tracker is not None:
            ctx.tracker.add(r_out, _per_sample(r_in))
        return r_in, None, None, None


class _PassThrough(torch.autograd.Function):
    """Forward: the activation's output. Backward: R_in = R_out (LRP pass rule)."""

    @staticmethod
    def forward(ctx, a, out):
        return out.clone()

    @staticmethod
    def backward(ctx, r_out):
        return r_out, None


class _SumRule(torch.autograd.Function):
    """a + b forward; backward splits relevance in proportion to the summands."""

    @staticmethod
    def forward(ctx, a, b, eps, tracker):
        ctx.save_for_backward(a, b)
        ctx.eps, ctx.tracker = eps, tracker
        return a + b

    @staticmethod
    def backward(ctx, r_out):
        a, b = ctx.saved_tensors
        s = r_out / _stabilise(a + b, ctx.eps)
        ra, rb = a * s, b * s
        if ctx.tracker is not None:
            ctx.tracker.add(r_out, _per_sample(ra) + _per_sample(rb))
        return ra, rb, None, None


_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_IADDS = {torch.Tensor.add_, torch.Tensor.__iadd__}


class _ResidualAdds(TorchFunctionMode):
    """Routes tensor + tensor of equal shape (residual additions) through `_SumRule`."""

    def __init__(self, eps: float, tracker):
        super().__init__()
        self.eps, self.tracker = eps, tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in _ADDS or func in _IADDS) and len(args) == 2 and not kwargs:
            a, b = args
            if (
                isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and a.shape == b.shape
                and a.ndim >= 2
                and a.is_floating_point()
                and (a.requires_grad or b.requires_grad)
            ):
                # in-place adds become out-of-place: `out += identity` rebinds `out`
                return _SumRule.apply(a, b, self.eps, self.tracker)
        return func(*args, **kwargs)


# -- rules for conv/linear layers: (module, a, R_out) -> R_in ---------------------------------
def _weights(module: nn.Module, fn: Callable, bias: bool = True) -> dict:
    params = {"weight": fn(module.weight)}
    if getattr(module, "bias", None) is not None:
        params["bias"] = fn(module.bias) if bias else torch.zeros_like(module.bias)
    return params


def _modified(module, params, a):
    return functional_call(module, params, (a,))


def epsilon_rule(module, a, r, eps):
    a = a.requires_grad_(True)
    z = module(a)
    (c,) = torch.autograd.grad(z, a, r / _stabilise(z, eps))
    return a * c


def gamma_rule(module, a, r, gamma, eps):
    a = a.requires_grad_(True)
    z = _modified(module, _weights(module, lambda w: w + gamma * w.clamp(min=0)), a)
    (c,) = torch.autograd.grad(z, a, r / _stabilise(z, eps))
    return a * c


def _split(module, a, positive: bool):
    """Sum of the positive (or negative) contributions a_i w_ij, biases excluded, as a function
    of two leaves holding a's positive and negative parts."""
    ap = a.clamp(min=0).requires_grad_(True)
    an = a.clamp(max=0).requires_grad_(True)
    wp = _weights(module, lambda w: w.clamp(min=0), bias=False)
    wn = _weights(module, lambda w: w.clamp(max=0), bias=False)
    if positive:
        z = _modified(module, wp, ap) + _modified(module, wn, an)
    else:
        z = _modified(module, wn, ap) + _modified(module, wp, an)
    return ap, an, z


def zplus_rule(module, a, r, eps):
    """z+ (Montavon et al.): R_i = sum_j (a_i w_ij)^+ / sum_q (a_q w_qj)^+ R_j, biases ignored."""
    ap, an, z = _split(module, a, positive=True)
    cp, cn = torch.autograd.grad(z, (ap, an), r / (z + eps))
    return ap * cp + an * cn


def alpha_beta_rule(module, a, r, alpha, beta, eps):
    """alpha (a w)^+/z^+ - beta (a w)^-/z^-, biases ignored (alpha - beta = 1 conserves)."""
    ap, an, zp = _split(module, a, positive=True)
    cp, cn = torch.autograd.grad(zp, (ap, an), r / (zp + eps))
    out = alpha * (ap * cp + an * cn)
    if beta:
        ap, an, zn = _split(module, a, positive=False)
        cp, cn = torch.autograd.grad(zn, (ap, an), r / (zn - eps))
        out = out - beta * (ap * cp + an * cn)
    return out


def flat_rule(module, a, r, eps):
    """Relevance spread uniformly over each output's receptive field (weights and inputs = 1)."""
    ones = torch.ones_like(a).requires_grad_(True)
    z = _modified(module, _weights(module, torch.ones_like, bias=False), ones)
    (c,) = torch.autograd.grad(z, ones, r / (z + eps))
    return c


# -- preparing the copy -----------------------------------------------------------------------
def fuse_batchnorm(module: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Fuse every BatchNorm that reads a conv's output into that conv (in place: call it on a copy).

    The BN becomes an exact identity (mean 0, var 1, eps 0, affine 1/0), so wrappers like timm's
    BatchNormAct2d keep applying their activation. Returns the BatchNorms left unfused.
    """
    produced: dict[int, nn.Module] = {}
    keep: list[torch.Tensor] = []  # hold outputs so their ids stay unique during the trace
    pairs: list[tuple[nn.Module, nn.Module]] = []

    def conv_hook(m, _inp, out):
        produced[id(out)] = m
        keep.append(out)

    def bn_hook(m, inp):
        conv = produced.get(id(inp[0]))
        if conv is not None and all(bn is not m for _, bn in pairs):
            pairs.append((conv, m))

    convs = [m for m in module.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)]
    bns = [m for m in module.modules() if isinstance(m, _BATCHNORM)]
    handles = [m.register_forward_hook(conv_hook) for m in convs]
    handles += [m.register_forward_pre_hook(bn_hook) for m in bns]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    fused = set()
    with torch.no_grad():
        for conv, bn in pairs:
            if id(conv) in fused or not bn.track_running_stats or bn.running_var is None:
                continue
            scale = (bn.running_var + bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
            w = conv.weight
            conv.weight.copy_(w * scale.view(-1, *([1] * (w.ndim - 1))))
            old = conv.bias if conv.bias is not None else torch.zeros_like(shift)
            conv.bias = nn.Parameter(old * scale + shift, requires_grad=False)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.eps = 0.0
            if bn.weight is not None:
                bn.weight.fill_(1.0)
            if bn.bias is not None:
                bn.bias.zero_()
            fused.add(id(conv))
            fused.add(id(bn))
    return [bn for bn in bns if id(bn) not in fused]


def prepared_copy(module: nn.Module, example: torch.Tensor, fuse: bool = True):
    """A deep copy with out-of-place activations (and BN fused): the user's module stays as is."""
    clone = copy.deepcopy(module)
    for m in clone.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    unfused = fuse_batchnorm(clone, example) if fuse else []
    return clone, unfused


@contextmanager
def hooked(handles_from: list[tuple[nn.Module, Callable]]):
    """Register forward hooks; remove them all on exit, also when the forward raised."""
    handles = []
    try:
        for m, fn in handles_from:
            handles.append(m.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


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
        self.module, self.unfused_bn = prepared_copy(model.module, example)
        self.layers = self._assign_rules(example)

    def _assign_rules(self, example) -> list[tuple[nn.Module, str]]:
        """(module, rule) for every conv/linear layer in forward order."""
        order: list[nn.Module] = []

        def note(m, _i, _o):
            if all(m is not o for o in order):
                order.append(m)

        mods = [m for m in self.module.modules() if isinstance(m, _LINEAR)]
        with hooked([(m, note) for m in mods]), torch.no_grad():
            self.module(example)
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

    def _rule_fn(self, module, rule):
        eps, g, b = self.epsilon, self.gamma, self.beta
        if rule == "epsilon":
            return lambda a, r: epsilon_rule(module, a, r, eps)
        if rule == "gamma":
            return lambda a, r: gamma_rule(module, a, r, g, eps)
        if rule == "zplus":
            return lambda a, r: zplus_rule(module, a, r, max(eps, 1e-12))
        if rule == "alpha_beta":
            return lambda a, r: alpha_beta_rule(module, a, r, b + 1.0, b, max(eps, 1e-12))
        return lambda a, r: flat_rule(module, a, r, max(eps, 1e-12))

    def _hooks(self, tracker):
        def relevance_hook(fn):
            def hook(_m, inputs, output):
                return _Relevance.apply(inputs[0], output.detach(), fn, tracker)

            return hook

        def pass_hook(_m, inputs, output):
            return _PassThrough.apply(inputs[0], output.detach())

        small = max(self.epsilon, 1e-12)
        hooks = [(m, relevance_hook(self._rule_fn(m, rule))) for m, rule in self.layers]
        for m in self.module.modules():
            if isinstance(m, _AVGPOOL):
                hooks.append((m, relevance_hook(lambda a, r, m=m: epsilon_rule(m, a, r, small))))
            elif isinstance(m, ACTIVATIONS):
                hooks.append((m, pass_hook))
        for m in self.unfused_bn:
            hooks.append((m, relevance_hook(lambda a, r, m=m: epsilon_rule(m, a, r, small))))
        return hooks

    def relevance(self, x, targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Input relevance [B,3,H,W] and the extras: the explained `score` and the relevance
        `absorbed` by biases and stabilisers."""
        tracker = _Tracker()
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(hooked(self._hooks(tracker)))
            stack.enter_context(_ResidualAdds(max(self.epsilon, 1e-12), tracker))
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
