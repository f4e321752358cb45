"""The one mechanism behind every method that reads or rewrites a network's internals.

- `forward_hooks`: forward and forward-pre hooks that are removed on exit, also when the body
  raises (CAM layers, the tracer, backward rules).
- `trace`: one forward under no_grad that records the module calls in the order they finish,
  each with its output's shape and the module that produced its first input (`resolve_layer`
  picks the CAM layer from it, LRP pairs BatchNorms with the convs that feed them).
- `backward_rules`: for the duration of a block, replace the backward of every module that a
  rule table matches by `rule(module, inputs, output, grad_out) -> grad_in`. The forward is the
  module's own; a single autograd Function (`RuleBackward`) stands behind its output, saves the
  input and the output, and calls the rule in backward. The key `TensorAdd` in a table routes
  tensor + tensor additions of equal shape (residual additions, which are functional in most
  architectures) through the same Function. Guided backprop, deconvnet, LRP and DeepLIFT are
  rule tables over it.
- `private_copy` and `fuse_batchnorm`: the deep copy LRP and DeepLIFT rewrite (out-of-place
  activations; BatchNorm folded into the conv that feeds it, found with `trace`, and then
  skipped in the forward), so the user's module is never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

Hook = Callable[..., object]
Grads = torch.Tensor | tuple[torch.Tensor | None, ...]
# rule(module, inputs, output, grad_out) -> gradient (or relevance) of the input(s)
Rule = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor], Grads]
# a rule table's key: a module type, a tuple of types, or a predicate on the module
Match = type | tuple[type, ...] | Callable[[nn.Module], bool]

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


@contextmanager
def forward_hooks(
    forward: Iterable[tuple[nn.Module, Hook]] = (), pre: Iterable[tuple[nn.Module, Hook]] = ()
) -> Iterator[None]:
    """Register forward hooks `(module, hook(m, inputs, output))` and forward-pre hooks
    `(module, hook(m, inputs))`; all are removed on exit, also when the body raised."""
    handles = []
    try:
        for m, fn in pre:
            handles.append(m.register_forward_pre_hook(fn))
        for m, fn in forward:
            handles.append(m.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Call:
    """One module call in a traced forward."""

    module: nn.Module
    name: str
    shape: torch.Size | None  # the output's shape (None: not a tensor)
    source: nn.Module | None  # the innermost module whose output is this call's first input


def trace(module: nn.Module, *inputs: torch.Tensor) -> list[Call]:
    """Run `module(*inputs)` once under no_grad; the calls in the order they finish (a parent
    after its children), every module of the tree hooked."""
    names = {id(m): n for n, m in module.named_modules()}
    produced: dict[int, nn.Module] = {}
    keep: list[torch.Tensor] = []  # outputs stay alive so that their ids stay unique
    sources: list[nn.Module | None] = []  # a stack: calls nest
    calls: list[Call] = []

    def pre(m, args):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        sources.append(produced.get(id(first)) if first is not None else None)

    def post(m, _args, out):
        is_tensor = isinstance(out, torch.Tensor)
        if is_tensor:
            # children finish first: the innermost producer keeps the tensor (a Sequential
            # ending in a conv does not claim the conv's output)
            produced.setdefault(id(out), m)
            keep.append(out)
        calls.append(Call(m, names.get(id(m), ""), out.shape if is_tensor else None, sources.pop()))

    mods = list(module.modules())
    with forward_hooks([(m, post) for m in mods], [(m, pre) for m in mods]), torch.no_grad():
        module(*inputs)
    return calls


def forward_order(calls: list[Call], types: type | tuple[type, ...]) -> list[nn.Module]:
    """The modules of the given types in the order of their first call."""
    out: dict[int, nn.Module] = {}
    for c in calls:
        if isinstance(c.module, types):
            out.setdefault(id(c.module), c.module)
    return list(out.values())


def private_copy(module: nn.Module) -> nn.Module:
    """A deep copy with out-of-place activations (backward rules need the input the activation
    read): the user's module stays as it is."""
    clone = copy.deepcopy(module)
    for m in clone.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
    return clone


_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fuse_batchnorm(module: nn.Module, example: torch.Tensor) -> tuple[list, list]:
    """Fuse every BatchNorm that reads a conv's output into that conv (in place: call it on a copy).

    The BN becomes an exact identity (mean 0, var 1, eps 0, affine 1/0), so wrappers like timm's
    BatchNormAct2d keep applying their activation. Returns (the BatchNorms fused, those left
    unfused).
    """
    pairs: list[tuple[nn.Module, nn.Module]] = []
    for call in trace(module, example):
        m, conv = call.module, call.source
        is_conv = isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        if isinstance(m, _BATCHNORM) and is_conv and all(bn is not m for _, bn in pairs):
            pairs.append((conv, m))
    bns = [m for m in module.modules() if isinstance(m, _BATCHNORM)]
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
            _skip_identity(bn)
    return [bn for bn in bns if id(bn) in fused], [bn for bn in bns if id(bn) not in fused]


def _identity(x):
    return x


def _skip_identity(bn: nn.Module) -> None:
    """A fused BN computes x * 1 + 0: skip that pass (same numbers). timm's BatchNormAct2d then
    runs only what it applies after the norm (drop, then act); other subclasses stay as they are."""
    names = {n for n, _ in bn.named_children()}
    if type(bn) in _BATCHNORM and not names:
        bn.forward = _identity
    elif type(bn).__name__ == "BatchNormAct2d" and names <= {"drop", "act"}:
        after = [getattr(bn, n) for n in ("drop", "act") if n in names]
        bn.forward = nn.Sequential(*after).forward if after else _identity


def identity_after_fusion(bn: nn.Module) -> bool:
    """A fused BN is an exact identity; wrappers (timm's BatchNormAct2d) may add an activation
    or dropout inside, which LRP passes through as well."""
    keep = (*ACTIVATIONS, nn.Identity, nn.Dropout)
    return all(isinstance(c, keep) for c in bn.children())


class _Held:
    """Hands the module's output to `RuleBackward` as a plain argument, not as a tensor input:
    returned from forward it is then a fresh output (no copy), not a view of an input, so
    in-place edits downstream (`out += identity`) stay legal."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class RuleBackward(torch.autograd.Function):
    """Forward: the given output. Backward: `rule(module, inputs, output, grad_out)`.

    Input and output are saved for the rule (an in-place edit of either before the backward
    then fails loudly instead of feeding the rule wrong values), unless the rule says it reads
    neither (`rule.reads_tensors = False`, as `pass_through`)."""

    @staticmethod
    def forward(ctx, module, rule, held, *inputs):
        ctx.module, ctx.rule, ctx.n_inputs = module, rule, len(inputs)
        output = held.tensor
        ctx.reads = getattr(rule, "reads_tensors", True)
        if ctx.reads:
            ctx.save_for_backward(output, *inputs)
        return output

    @staticmethod
    def backward(ctx, grad_out):
        output, inputs = None, (None,) * ctx.n_inputs
        if ctx.reads:
            output, *rest = ctx.saved_tensors
            inputs = tuple(rest)
        grads = ctx.rule(ctx.module, inputs, output, grad_out)
        if isinstance(grads, torch.Tensor):
            grads = (grads,)
        return (None, None, None, *grads)


def apply_rule(module: nn.Module, rule: Rule, inputs: tuple[torch.Tensor, ...], output):
    """`output`, with `rule` as the backward from it to `inputs`."""
    return RuleBackward.apply(module, rule, _Held(output.detach()), *inputs)


def pass_through(_m, _inputs, _out, grad):
    """Hand the incoming gradient (or relevance) on unchanged: LRP's rule for elementwise
    activations, and the backward of an identity (a fused BatchNorm) without running it."""
    return grad


pass_through.reads_tensors = False  # nothing saved: in-place edits downstream do not matter


class TensorAdd(nn.Module):
    """Stands for `a + b` of two tensors of equal shape in a rule table (residual additions).
    The rule gets `(a, b)` as inputs and returns the pair of their gradients."""

    def forward(self, a, b):
        return a + b


_ADDS = frozenset(
    {
        torch.add,
        torch.Tensor.add,
        torch.Tensor.__add__,
        torch.Tensor.__radd__,
        torch.Tensor.add_,
        torch.Tensor.__iadd__,
        torch.ops.aten.add.Tensor,  # torch.export programs add with aten ops
        torch.ops.aten.add_.Tensor,
    }
)


class _RoutedAdds(TorchFunctionMode):
    """Routes tensor + tensor of equal shape through a rule; in-place adds become out-of-place
    (`out += identity` rebinds `out`), so the summands survive for the rule."""

    def __init__(self, rule: Rule):
        super().__init__()
        self.rule, self.module = rule, TensorAdd()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _ADDS and len(args) == 2 and not kwargs:  # the set lookup first: cheap
            a, b = args
            if (
                isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and a.shape == b.shape
                and a.ndim >= 2
                and a.is_floating_point()
                and (a.requires_grad or b.requires_grad)
            ):
                with torch.no_grad():
                    out = torch.add(a, b)
                return apply_rule(self.module, self.rule, (a, b), out)
        return func(*args, **(kwargs or {}))


def match_rule(table: Mapping[Match, Rule], module: nn.Module) -> Rule | None:
    """The first rule whose key matches: a type or tuple of types (isinstance) or a predicate."""
    for key, rule in table.items():
        if isinstance(key, type | tuple):
            if isinstance(module, key):
                return rule
        elif key(module):
            return rule
    return None


@contextmanager
def backward_rules(model: nn.Module, table: Mapping[Match, Rule]) -> Iterator[int]:
    """While the block runs, every module of `model` that `table` matches has its backward
    replaced by its rule (the first matching key wins; `TensorAdd` as a key routes residual
    additions). Matched modules with an in-place flag run out of place meanwhile, so their input
    survives for the rule. Yields the number of modules matched. On exit, also when the body
    raised, hooks, flags and the add interception are gone: the model's own backward is back."""
    matched: list[tuple[nn.Module, Rule]] = []
    for m in model.modules():
        rule = match_rule(table, m)
        if rule is not None:
            matched.append((m, rule))
    inplace = [m for m, _ in matched if getattr(m, "inplace", None) is True]

    def hook_for(rule: Rule) -> Hook:
        def hook(m, inputs, output):
            return apply_rule(m, rule, inputs[:1], output)

        return hook

    add_rule = table.get(TensorAdd)
    with ExitStack() as stack:
        stack.callback(lambda: [setattr(m, "inplace", True) for m in inplace])
        for m in inplace:
            m.inplace = False
        stack.enter_context(forward_hooks([(m, hook_for(rule)) for m, rule in matched]))
        if add_rule is not None:
            stack.enter_context(_RoutedAdds(add_rule))
        yield len(matched)
