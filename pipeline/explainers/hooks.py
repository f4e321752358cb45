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


class RuleBackward(torch.autograd.Function):
    """Forward: the given output. Backward: `rule(module, inputs, output, grad_out)`."""

    @staticmethod
    def forward(ctx, module, rule, output, *inputs):
        ctx.module, ctx.rule = module, rule
        ctx.save_for_backward(output, *inputs)
        # a view, not a copy: the saved output's version counter still catches in-place edits
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_out):
        output, *inputs = ctx.saved_tensors
        grads = ctx.rule(ctx.module, tuple(inputs), output, grad_out)
        if isinstance(grads, torch.Tensor):
            grads = (grads,)
        return (None, None, None, *grads)


def apply_rule(module: nn.Module, rule: Rule, inputs: tuple[torch.Tensor, ...], output):
    """`output`, with `rule` as the backward from it to `inputs`."""
    return RuleBackward.apply(module, rule, output.detach(), *inputs)


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
