"""Every backward rule against its paper definition, written out the slow way, and the hook
mechanism (pipeline/explainers/hooks.py) itself.

The rules run through `backward_rules` on small random layers; the references build the dense
matrix of contributions z_ij = a_i w_ij with explicit loops over the kernel (no convolution
call), or loop over elements and pooling windows, and apply the definitions to it.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pipeline.explainers.deeplift import maxpool_rescale_rule, rescale_rule
from pipeline.explainers.gradients import deconvnet_relu_rule, guided_relu_rule
from pipeline.explainers.hooks import (
    TensorAdd,
    backward_rules,
    forward_hooks,
    forward_order,
    fuse_batchnorm,
    match_rule,
    pass_through,
    private_copy,
    trace,
)
from pipeline.explainers.lrp import _LayerRule, sum_rule

# -- the layers: (name, constructor, input shape without the batch) ----------------------------
LAYERS = {
    "linear": (lambda bias: nn.Linear(7, 5, bias=bias), (7,)),
    "conv3x3": (lambda bias: nn.Conv2d(3, 4, 3, padding=1, bias=bias), (3, 5, 5)),
    "conv_stride2": (lambda bias: nn.Conv2d(4, 6, 3, stride=2, bias=bias), (4, 7, 7)),
    "depthwise": (lambda bias: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=bias), (4, 4, 4)),
    "conv1x1": (lambda bias: nn.Conv2d(5, 3, 1, bias=bias), (5, 3, 3)),
}


def _layer(kind: str, bias: bool, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The layer with random weights (and bias), a batch of 2 inputs and 2 output relevances."""
    make, shape = LAYERS[kind]
    torch.manual_seed(seed)
    layer = make(bias).double()
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_(std=0.5)
    a = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        r = torch.randn_like(layer(a))
    return layer, a, r


def _connections(layer: nn.Module, in_shape, weight=None) -> torch.Tensor:
    """Dense weight matrix W[i, j] (input i, output j), built by looping over the kernel."""
    weight = (layer.weight if weight is None else weight).detach()
    if isinstance(layer, nn.Linear):
        return weight.t().clone()
    c_in, h, w = in_shape
    c_out, c_per_group, kh, kw = layer.weight.shape
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out_per_group = c_out // layer.groups
    dense = torch.zeros(c_in * h * w, c_out * oh * ow, dtype=torch.float64)
    for o, y, x in itertools.product(range(c_out), range(oh), range(ow)):
        j = (o * oh + y) * ow + x
        g = o // out_per_group
        for cl, ky, kx in itertools.product(range(c_per_group), range(kh), range(kw)):
            iy, ix = y * sh - ph + ky * dh, x * sw - pw + kx * dw
            if 0 <= iy < h and 0 <= ix < w:
                c = g * c_per_group + cl
                dense[(c * h + iy) * w + ix, j] += float(weight[o, cl, ky, kx])
    return dense


def _stab(z, eps):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _lrp_reference(rule, layer, a, r, eps, gamma, beta):
    """R_in per the paper definitions over the dense contributions z_ij = a_i w_ij."""
    W = _connections(layer, a.shape[1:])
    bias = layer.bias.detach() if layer.bias is not None else None
    n_out = W.shape[1]
    if bias is not None:  # one bias per output channel (or unit)
        b = bias.repeat_interleave(n_out // bias.numel())
    else:
        b = torch.zeros(n_out, dtype=W.dtype)
    out = []
    for ai, ri in zip(a.flatten(1), r.flatten(1), strict=True):
        z = ai[:, None] * W  # z_ij
        if rule == "epsilon":
            share = z / _stab(z.sum(0) + b, eps)
        elif rule == "gamma":
            zg = ai[:, None] * (W + gamma * W.clamp(min=0))
            share = zg / _stab(zg.sum(0) + b + gamma * b.clamp(min=0), eps)
        elif rule == "zplus":
            zp = z.clamp(min=0)
            share = zp / (zp.sum(0) + eps)
        elif rule == "alpha_beta":
            zp, zn = z.clamp(min=0), z.clamp(max=0)
            share = (beta + 1) * zp / (zp.sum(0) + eps) - beta * zn / (zn.sum(0) - eps)
        elif rule == "flat":
            # every weight and input 1: shares of the receptive field (padding excluded)
            ones = _connections(layer, a.shape[1:], torch.ones_like(layer.weight))
            share = ones / (ones.sum(0) + eps)
        else:
            raise AssertionError(rule)
        out.append(share @ ri)  # R_i = sum_j share_ij R_j
    return torch.stack(out).view_as(a)


def _through_rules(layer, a, r, table):
    leaf = a.clone().requires_grad_(True)
    with backward_rules(layer, table), torch.enable_grad():
        out = layer(leaf)
    (got,) = torch.autograd.grad(out, leaf, r)
    return got


LRP_RULES = ["epsilon", "gamma", "zplus", "alpha_beta", "flat"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("signs", ["mixed", "nonnegative"])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("rule", LRP_RULES)
def test_lrp_layer_rule_matches_its_definition(rule, kind, signs, bias, seed):
    layer, a, r = _layer(kind, bias, seed)
    if signs == "nonnegative":  # after a ReLU: the z+ / alpha-beta rules take a shorter path
        a = a.clamp(min=0)
    eps, gamma, beta = 0.05, 0.25, 1.0  # eps large enough that the stabiliser shows
    table = {(nn.Linear, nn.Conv2d): _LayerRule(layer, rule, eps, gamma, beta)}
    got = _through_rules(layer, a, r, table)
    want = _lrp_reference(rule, layer, a, r, eps, gamma, beta)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_zplus_conserves_where_some_input_contributes_positively(seed):
    """With z+ > 0 at every output, z+ hands on exactly the relevance it got."""
    layer, a, r = _layer("conv3x3", False, seed)
    a, r = a.abs(), r.abs()
    with torch.no_grad():
        layer.weight.abs_()
    got = _through_rules(layer, a, r, {nn.Conv2d: _LayerRule(layer, "zplus", 1e-12, 0, 0)})
    torch.testing.assert_close(got.flatten(1).sum(1), r.flatten(1).sum(1))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.SiLU(), nn.Hardswish(), nn.Tanh()])
def test_pass_through_hands_relevance_on_unchanged(act):
    torch.manual_seed(3)
    a = torch.randn(2, 3, 4, 4) * 4
    r = torch.randn_like(a)
    got = _through_rules(act, a, r, {type(act): pass_through})
    for i in range(a.numel()):
        assert got.flatten()[i] == r.flatten()[i]


def _sum_reference(a, b, r, eps):
    out_a, out_b = torch.empty_like(a), torch.empty_like(b)
    for i in range(a.numel()):
        ai, bi, ri = float(a.flatten()[i]), float(b.flatten()[i]), float(r.flatten()[i])
        z = ai + bi
        z = z + (eps if z >= 0 else -eps)
        out_a.view(-1)[i], out_b.view(-1)[i] = ai / z * ri, bi / z * ri
    return out_a, out_b


class _Residual(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, pair):
        a, b = pair
        if self.how == "operator":
            return a + b
        if self.how == "torch.add":
            return torch.add(a, b)
        if self.how == "method":
            return a.add(b)
        out = a * 1.0  # in place: rerouted out of place, the summand survives
        out += b
        return out


@pytest.mark.parametrize("how", ["operator", "torch.add", "method", "in place"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_residual_sum_rule_splits_in_proportion(how, seed):
    torch.manual_seed(seed)
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    eps = 0.01
    model = _Residual(how)
    with backward_rules(model, {TensorAdd: sum_rule(eps)}), torch.enable_grad():
        out = model((a, b))
    ga, gb = torch.autograd.grad(out, (a, b), r)
    wa, wb = _sum_reference(a.detach(), b.detach(), r, eps)
    torch.testing.assert_close(ga, wa)
    torch.testing.assert_close(gb, wb)
    torch.testing.assert_close((ga + gb).sum(), (r * out / _stab(out, eps)).detach().sum())


# -- DeepLIFT -----------------------------------------------------------------------------------
def _rescale_reference(f, x, ref, grad):
    """Per element: m = (f(x) - f(ref)) / (x - ref), or f'(x) where |x - ref| < 1e-6."""
    mult = torch.empty_like(x)
    for i in range(x.numel()):
        xi, ri = x.flatten()[i : i + 1], ref.flatten()[i : i + 1]
        if abs(float(xi - ri)) < 1e-6:
            leaf = xi.clone().requires_grad_(True)
            (d,) = torch.autograd.grad(f(leaf).sum(), leaf)
            mult.view(-1)[i] = d
        else:
            mult.view(-1)[i] = (f(xi) - f(ri)) / (xi - ri)
    return torch.cat([grad[: len(x)] * mult, grad[len(x) :] * mult])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.SiLU(), nn.Sigmoid(), nn.ELU()])
def test_deeplift_rescale_matches_its_definition(act, seed):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 4
    ref = torch.randn_like(x)
    ref[0, 0, 0, :2] = x[0, 0, 0, :2]  # where x = ref: the local gradient
    grad = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    got = _through_rules(act, torch.cat([x, ref]), grad, {type(act): rescale_rule})
    torch.testing.assert_close(got, _rescale_reference(act, x, ref, grad))


def _maxpool_reference(pool: nn.MaxPool2d, x, ref, grad):
    """Per window: the delta max(x) - max(ref) times the incoming gradient goes to x's argmax
    (or, where x did not move there, to the window's largest |x - ref|); multiplier = routed
    delta / (x - ref) where x moved, else 0."""
    k, s = pool.kernel_size, pool.stride
    dx = x - ref
    routed = torch.zeros_like(x)
    n, c, h, w = x.shape
    for b, ch in itertools.product(range(n), range(c)):
        for oy, ox in itertools.product(range((h - k) // s + 1), range((w - k) // s + 1)):
            cells = [(oy * s + i, ox * s + j) for i in range(k) for j in range(k)]
            arg = max(cells, key=lambda p: float(x[b, ch, p[0], p[1]]))
            if abs(float(dx[b, ch, arg[0], arg[1]])) <= 1e-6:
                arg = max(cells, key=lambda p: abs(float(dx[b, ch, p[0], p[1]])))
            delta = max(float(x[b, ch, p[0], p[1]]) for p in cells) - max(
                float(ref[b, ch, p[0], p[1]]) for p in cells
            )
            routed[b, ch, arg[0], arg[1]] += delta * float(grad[b, ch, oy, ox])
    moved = dx.abs() > 1e-6
    mult = torch.where(moved, routed / torch.where(moved, dx, 1.0), 0.0)
    return torch.cat([mult, mult])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2)])
def test_deeplift_maxpool_rescale_matches_its_definition(pool, seed):
    torch.manual_seed(seed)
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    ref = torch.randn_like(x)
    ref[0, 0, :3, :3] = x[0, 0, :3, :3]  # an argmax that did not move: the fallback routing
    with torch.no_grad():
        out_shape = pool(x).shape
    grad = torch.randn(4, *out_shape[1:], dtype=torch.float64)
    got = _through_rules(pool, torch.cat([x, ref]), grad, {nn.MaxPool2d: maxpool_rescale_rule})
    torch.testing.assert_close(got, _maxpool_reference(pool, x, ref, grad))


# -- guided backprop and deconvnet --------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.ReLU(inplace=True)])
@pytest.mark.parametrize("which", ["guided", "deconvnet"])
def test_rectifier_rules_match_their_definitions(which, act, seed):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 4, 4) * 5  # some inputs above ReLU6's clip
    grad = torch.randn_like(x)
    rule = guided_relu_rule if which == "guided" else deconvnet_relu_rule
    inplace = act.inplace
    got = _through_rules(act, x, grad, {(nn.ReLU, nn.ReLU6): rule})
    assert act.inplace == inplace  # run out of place under the rule, restored after
    top = 6.0 if isinstance(act, nn.ReLU6) else float("inf")
    want = torch.empty_like(x)
    for i in range(x.numel()):
        g, xi = float(grad.flatten()[i]), float(x.flatten()[i])
        g = max(g, 0.0)  # both: only positive signals go back
        if which == "guided" and not 0 < xi < top:  # guided: and only where the unit passed
            g = 0.0
        want.view(-1)[i] = g
    torch.testing.assert_close(got, want)


# -- the mechanism ----------------------------------------------------------------------------
def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4).eval(),
        nn.ReLU(inplace=True),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def test_forward_hooks_are_removed_after_the_block_and_after_an_error():
    net = _net()
    seen = []
    hooks = [(m, lambda m, i, o: seen.append(m)) for m in net]
    pre = [(net[0], lambda m, i: None)]
    with forward_hooks(hooks, pre):
        assert _hooks(net) == len(net) + 1
        net(torch.randn(1, 3, 5, 5))
    assert len(seen) == len(net) and _hooks(net) == 0
    with pytest.raises(RuntimeError), forward_hooks(hooks, pre):
        net(torch.randn(1, 5, 5, 5))  # wrong channel count: raises mid-forward
    assert _hooks(net) == 0


def test_trace_records_finish_order_shapes_and_producers():
    net = _net()
    calls = trace(net, torch.randn(1, 3, 6, 6))
    by_module = {id(c.module): c for c in calls}
    assert calls[-1].module is net and calls[-1].name == ""
    assert forward_order(calls, nn.Conv2d) == [net[0], net[3][0]]
    assert by_module[id(net[1])].source is net[0]  # BN reads the conv's output
    # the in-place ReLU hands on the BN's own tensor: the first producer keeps it
    assert by_module[id(net[3][0])].source is net[1]
    # a Sequential ending in the ReLU does not claim the ReLU's output: the innermost module does
    assert by_module[id(net[4])].source is net[3][1]
    assert by_module[id(net[4])].shape == torch.Size([1, 4, 1, 1])
    assert _hooks(net) == 0


def test_rule_table_first_match_wins_types_tuples_and_predicates():
    conv, relu = nn.Conv2d(1, 1, 1), nn.ReLU()
    table = {(lambda m: m is conv): "first", nn.Conv2d: "second", (nn.ReLU, nn.Tanh): "third"}
    assert match_rule(table, conv) == "first"
    assert match_rule(table, nn.Conv2d(1, 1, 1)) == "second"
    assert match_rule(table, relu) == "third"
    assert match_rule(table, nn.Linear(1, 1)) is None


def _plain_grads(net, x):
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xg).sum(), xg)
    return g


def test_rule_tables_leave_the_normal_backward_alone_outside_the_block():
    net = _net()
    x = torch.randn(2, 3, 5, 5)
    before = _plain_grads(net, x)

    def zero(_m, inputs, _out, _g):
        return torch.zeros_like(inputs[0])

    table = {nn.ReLU: zero, TensorAdd: lambda m, i, o, g: (g, g)}
    with backward_rules(net, table) as n:
        assert n == 2 and _hooks(net) == 2
        assert not net[2].inplace  # in-place modules run out of place under a rule
        assert (_plain_grads(net, x) == 0).all()  # the rule is live inside
    assert net[2].inplace and _hooks(net) == 0
    torch.testing.assert_close(_plain_grads(net, x), before, rtol=0, atol=0)
    # an add after the block is a plain add again (no interception left behind)
    a = torch.randn(2, 3, requires_grad=True)
    assert (a + a).grad_fn.name() == "AddBackward0"


def test_rule_tables_are_removed_after_an_error():
    net = _net()
    x = torch.randn(2, 3, 5, 5)
    before = _plain_grads(net, x)
    with pytest.raises(RuntimeError), backward_rules(net, {nn.ReLU: pass_through}):
        net(torch.randn(1, 5, 5, 5))
    assert net[2].inplace and _hooks(net) == 0
    torch.testing.assert_close(_plain_grads(net, x), before, rtol=0, atol=0)
    a = torch.randn(2, 3, requires_grad=True)
    assert (a + a).grad_fn.name() == "AddBackward0"


def test_fused_batchnorm_computes_the_same_function_without_the_norm():
    net = _net()
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    x = torch.randn(2, 3, 5, 5)
    clone = private_copy(net)
    fused, unfused = fuse_batchnorm(clone, x[:1])
    assert fused == [clone[1]] and unfused == []
    assert not clone[2].inplace and net[2].inplace  # the copy runs out of place, the user's not
    torch.testing.assert_close(clone(x), net(x), rtol=1e-5, atol=1e-6)
    probe = torch.randn(2, 4, 5, 5)
    assert clone[1](probe) is probe  # an exact identity now: the norm is not run at all
