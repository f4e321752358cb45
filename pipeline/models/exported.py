"""torch.export programs as modules the explainers can read.

`torch.export.unflatten` restores a program's module hierarchy, but every module in it is an
`InterpreterModule` running graph ops: a `Conv2d` is an `aten.conv2d` call, a `ReLU` an
`aten.relu_`. Methods whose rules key on layer types (LRP, DeepLIFT, guided backprop,
deconvnet, CAM) then see no layers. The program records each node's original module type
(`nn_module_stack`), so `restore_layer_types` rebuilds each leaf that was a known `torch.nn`
layer from its one op's arguments, sharing the program's tensors, and puts it back in the
hierarchy. A module that runs one weighted op among others (timm's Conv2dSame pads, then
convolves; BatchNormAct2d normalises, then activates) becomes a subclass of that op's layer
whose forward is its own graph. Anything else (parameter-free custom modules, functional ops
between layers) stays as the program wrote it, as it would in the eager model. Residual
additions are `aten.add` calls, which the backward-rule mechanism routes like eager ones.
The loader checks the result against the program's logits.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn

aten = torch.ops.aten


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach(), requires_grad=False)


def _arg(args: tuple, i: int, default):
    return args[i] if len(args) > i else default


def _conv(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    def build(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        m = cls(
            w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=b is not None, device="meta",
        )  # fmt: skip
        m.weight, m.bias = _param(w), _param(b)
        return m

    return build


def _linear(x, w, b=None):
    m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    m.weight, m.bias = _param(w), _param(b)
    return m


def _batchnorm(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    def build(x, w, b, mean, var, training, momentum, eps, _cudnn=True):
        if training:
            raise _NotRestored("a batch norm exported in training mode")
        m = cls(mean.shape[0], eps=eps, momentum=momentum, affine=w is not None)
        if w is not None:
            m.weight, m.bias = _param(w), _param(b)
        m.running_mean, m.running_var = mean, var
        return m.eval()

    return build


def _layernorm(x, shape, w=None, b=None, eps=1e-5, _cudnn=True):
    m = nn.LayerNorm(shape, eps=eps, elementwise_affine=w is not None, bias=b is not None)
    if w is not None:
        m.weight = _param(w)
    if b is not None:
        m.bias = _param(b)
    return m


def _hardtanh(recorded: type[nn.Module]) -> Callable[..., nn.Module]:
    def build(x, lo=-1.0, hi=1.0, inplace=False):
        if recorded is nn.ReLU6 and (lo, hi) == (0.0, 6.0):
            return nn.ReLU6(inplace=inplace)
        return nn.Hardtanh(lo, hi, inplace=inplace)

    return build


class _NotRestored(Exception):
    pass


# op -> recorded type -> builder(*op args). The recorded type must match: a custom module that
# happens to run one conv stays what the program says it is.
def _builders() -> dict:
    relu = {nn.ReLU: lambda x: nn.ReLU()}
    relu_ = {nn.ReLU: lambda x: nn.ReLU(inplace=True)}
    return {
        aten.conv1d.default: {nn.Conv1d: _conv(nn.Conv1d)},
        aten.conv2d.default: {nn.Conv2d: _conv(nn.Conv2d)},
        aten.conv3d.default: {nn.Conv3d: _conv(nn.Conv3d)},
        aten.linear.default: {nn.Linear: _linear},
        aten.batch_norm.default: {
            c: _batchnorm(c) for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        },
        aten.layer_norm.default: {nn.LayerNorm: _layernorm},
        aten.relu.default: relu,
        aten.relu_.default: relu_,
        aten.hardtanh.default: {c: _hardtanh(c) for c in (nn.ReLU6, nn.Hardtanh)},
        aten.hardtanh_.default: {
            c: lambda x, lo=-1.0, hi=1.0, _c=c: _hardtanh(_c)(x, lo, hi, inplace=True)
            for c in (nn.ReLU6, nn.Hardtanh)
        },
        aten.gelu.default: {nn.GELU: lambda x, approximate="none": nn.GELU(approximate)},
        aten.silu.default: {nn.SiLU: lambda x: nn.SiLU()},
        aten.silu_.default: {nn.SiLU: lambda x: nn.SiLU(inplace=True)},
        aten.sigmoid.default: {nn.Sigmoid: lambda x: nn.Sigmoid()},
        aten.tanh.default: {nn.Tanh: lambda x: nn.Tanh()},
        aten.max_pool2d.default: {
            nn.MaxPool2d: lambda x, k, stride=(), padding=0, dilation=1, ceil_mode=False: (
                nn.MaxPool2d(k, stride or k, padding, dilation, ceil_mode=ceil_mode)
            )
        },
        aten.avg_pool2d.default: {
            nn.AvgPool2d: lambda x, k, stride=(), padding=0, ceil=False, count_pad=True, div=None: (
                nn.AvgPool2d(k, stride or k, padding, ceil, count_pad, div)
            )
        },
        aten.adaptive_avg_pool2d.default: {
            nn.AdaptiveAvgPool2d: lambda x, size: nn.AdaptiveAvgPool2d(tuple(size))
        },  # fmt: skip
    }


# torch.nn leaves that compute nothing in eval, or only reshape: the rules pass them by
_NO_OPS = ("torch.nn.modules.dropout.", "torch.nn.modules.linear.Identity",
           "torch.nn.modules.flatten.Flatten")  # fmt: skip


def recorded_types(program: torch.export.ExportedProgram) -> dict[str, str]:
    """Module path -> the qualified name of its type when the program was exported."""
    types: dict[str, str] = {}
    for node in program.graph_module.graph.nodes:
        for path, type_name in (node.meta.get("nn_module_stack") or {}).values():
            types.setdefault(path, type_name)
    return types


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _value(a, module: nn.Module):
    """An op argument as the layer's constructor wants it: a constant, or a tensor the module
    holds; the layer's input is None."""
    if isinstance(a, torch.fx.Node):
        if a.op == "placeholder":
            return None
        if a.op == "get_attr":
            return functools.reduce(getattr, a.target.split("."), module)
        raise _NotRestored(f"argument {a} is computed")
    return a


def _rebuild(leaf: nn.Module, type_name: str, builders: dict) -> nn.Module | None:
    """The torch.nn layer a leaf was, rebuilt from its graph; None where it is not one op of a
    known layer."""
    graph = getattr(leaf, "graph", None)
    if graph is None or any(True for _ in leaf.children()):
        return None
    calls = [n for n in graph.nodes if n.op == "call_function"]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(calls) != 1 or len(placeholders) != 1:
        return None
    (call,) = calls
    if output.args[0] is not call and output.args[0] != (call,):
        return None
    by_type = builders.get(call.target, {})
    cls = next((c for c in by_type if _qualified(c) == type_name), None)
    if cls is None or call.kwargs or call.args[0] is not placeholders[0]:
        return None
    try:
        return by_type[cls](*(_value(a, leaf) for a in call.args))
    except (_NotRestored, TypeError):
        return None


# The ops that hold a layer's weights, the torch.nn type a module running one of them among
# other ops stands for (timm's Conv2dSame pads first; BatchNormAct2d activates after), and
# the layer attribute each get_attr argument becomes.
_WEIGHTED = {
    aten.conv1d.default: (nn.Conv1d, {1: "weight", 2: "bias"}),
    aten.conv2d.default: (nn.Conv2d, {1: "weight", 2: "bias"}),
    aten.conv3d.default: (nn.Conv3d, {1: "weight", 2: "bias"}),
    aten.linear.default: (nn.Linear, {1: "weight", 2: "bias"}),
    aten.batch_norm.default: (
        nn.BatchNorm2d,
        {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"},
    ),
    aten.layer_norm.default: (nn.LayerNorm, {2: "weight", 3: "bias"}),
}


def _weighted_calls(module: nn.Module) -> list[torch.fx.Node]:
    graph = getattr(module, "graph", None)
    if graph is None:
        return []
    return [n for n in graph.nodes if n.op == "call_function" and n.target in _WEIGHTED]


def _with_own_forward(module: nn.Module, type_name: str, builders: dict) -> nn.Module | None:
    """A module that runs one weighted op among others, as a subclass of that op's torch.nn
    layer (named as recorded) whose forward is the module's own graph: isinstance-keyed rules
    match it as they match the eager subclass, and its weights are the layer's attributes, so
    LRP's functional calls and BatchNorm folding reach them."""
    if len(_weighted_calls(module)) != 1:
        return None
    graph = copy.deepcopy(module.graph)  # edited below; the module's own stays as it was
    (call,) = (n for n in graph.nodes if n.op == "call_function" and n.target in _WEIGHTED)
    cls, attrs = _WEIGHTED[call.target]
    if cls is nn.BatchNorm2d and ("1d" in type_name or "3d" in type_name):
        cls = nn.BatchNorm1d if "1d" in type_name else nn.BatchNorm3d
    get_attrs = [n for n in graph.nodes if n.op == "get_attr"]
    weights = {i: a for i, a in enumerate(call.args) if isinstance(a, torch.fx.Node)}
    if any(n not in weights.values() or n.users.keys() != {call} for n in get_attrs):
        return None  # tensors used elsewhere in the graph: not a layer's own weights
    try:
        args = [None] + [_value(a, module) for a in call.args[1:]]
        layer = builders[call.target][cls](*args)
    except (_NotRestored, TypeError, KeyError):
        return None
    if any(n.op == "get_attr" and i not in attrs for i, n in weights.items()):
        return None
    for i, node in weights.items():
        if node.op == "get_attr":
            node.target = attrs[i]
    if (
        cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
        and _value(call.args[2] if len(call.args) > 2 else None, module) is None
    ):  # read self.bias, so a BatchNorm folded into this layer adds its shift
        with graph.inserting_before(call), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # graph.get_attr checks an owner this graph lacks
            bias = graph.get_attr("bias")
        call.args = (call.args[0], call.args[1], bias, *call.args[3:])
    for name, child in module.named_children():
        layer.add_module(name, child)
    short = type_name.rpartition(".")[2] or cls.__name__
    code = torch.fx.GraphModule(layer, graph, class_name=short)
    layer.__class__ = type(short, (cls,), {"forward": type(code).forward, "__module__": __name__})
    return layer


_TRACING_META = ("val", "example_value", "tensor_meta", "unbacked_bindings")


def restore_layer_types(module: nn.Module, program: torch.export.ExportedProgram) -> list[str]:
    """Replace, in place, each module of the unflattened `module` that was a torch.nn layer (or
    a subclass running one weighted op: a padded conv, a norm with its activation) by that
    layer, sharing the program's tensors. Returns the qualified types of what stays graph ops
    that a rule could have needed: torch.nn leaves, and modules holding weights.

    The graphs' tracing metadata (fake tensors, unused when the module runs) is dropped too:
    it cannot be deep-copied, and LRP and DeepLIFT rewrite a private copy of the model."""
    for m in module.modules():
        graph = getattr(m, "graph", None)
        for node in graph.nodes if graph is not None else ():
            for key in _TRACING_META:
                node.meta.pop(key, None)
    builders = _builders()
    types = recorded_types(program)
    missing: set[str] = set()
    for path, m in reversed(list(module.named_modules())):  # children first, then their parent
        if not path:
            continue
        leaf = not any(True for _ in m.children())
        type_name = types.get(path) or types.get(path.split("@")[0], "")
        if type(m) is nn.Module and leaf:
            # a placeholder for a module the program never calls (Identity, eval Dropout);
            # wrappers that run their children (BatchNorm folding's act/drop) need a real one
            rebuilt: nn.Module | None = nn.Identity()
        elif type_name.startswith(_NO_OPS):
            continue
        else:
            rebuilt = _rebuild(m, type_name, builders) or _with_own_forward(m, type_name, builders)
        if rebuilt is None:
            holds = any(True for _ in m.parameters(recurse=False))
            if (leaf and type_name.startswith("torch.nn.")) or holds or _weighted_calls(m):
                missing.add(type_name)
            continue
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        setattr(parent, name, rebuilt)
    return sorted(missing)
