"""LRP conservation and rules, DeepLIFT summation-to-delta (the sanity-check verdicts of seed 002
Table 3 are in test_metrics.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import random_images, tiny_model
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from pipeline.explainers import build_explainer
from pipeline.models import Preprocess, wrap_module


def _zero_biases(module: nn.Module) -> nn.Module:
    """Copy with every bias (conv, linear, BatchNorm shift and running mean) at zero: then no
    relevance can leave through biases, so LRP's input relevance must sum to the logit."""
    module = copy.deepcopy(module)
    with torch.no_grad():
        for m in module.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
    return module


def _randomise_batchnorm(module: nn.Module) -> nn.Module:
    """BN statistics and affine away from the identity, so that fusing them matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module


class ResNetish(nn.Module):
    """Stem + BasicBlock (with downsample) + Bottleneck (identity shortcut) + GAP/FC, BN stats
    randomised so that fusion matters."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.block1 = BasicBlock(16, 32, stride=2, downsample=down)
        self.block2 = Bottleneck(32, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 5)
        _randomise_batchnorm(self)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block2(self.block1(self.stem(x)))), 1))


def _wrap(module, size=32):
    torch.manual_seed(0)
    return wrap_module(module, Preprocess(size=size, policy="squash"), id="test:m", device="cpu")


def _conservation(model, x, targets, **params):
    e = build_explainer("lrp", model, **params)
    got = e.explain(x, targets)
    return got.maps.flatten(1).sum(1), got.extras["score"], got.extras["absorbed"]


def test_every_composite_and_rule_is_a_legal_choice():
    """The `composite` / `rule` choices the spec accepts are exactly the ones LRP can run."""
    from typing import get_args

    from pipeline.explainers.lrp import COMPOSITES, RULES, Composite, Rule

    assert set(get_args(Composite)) == set(COMPOSITES)
    assert set(get_args(Rule)) == set(RULES) == {r for rules in COMPOSITES.values() for r in rules}


@pytest.mark.parametrize(
    "params",
    [
        {"rule": "epsilon"},
        {},
        {"composite": "epsilon_gamma_flat"},
        {"rule": "alpha_beta", "beta": 1.0},
    ],
)
def test_lrp_conserves_on_a_relu_cnn(params):
    torch.manual_seed(0)
    model = _wrap(_zero_biases(tiny_model().module))
    x = random_images(3, 32)
    total, score, _ = _conservation(model, x, torch.tensor([0, 3, 7]), **params)
    assert torch.allclose(total, score, rtol=1e-3, atol=1e-5), (total, score)


def test_lrp_conserves_through_residual_blocks():
    torch.manual_seed(0)
    model = _wrap(_zero_biases(ResNetish()))
    x = random_images(2, 32, seed=1)
    total, score, _ = _conservation(model, x, torch.tensor([1, 4]), rule="epsilon")
    assert torch.allclose(total, score, rtol=1e-3, atol=1e-5), (total, score)
    # z+ (in the default composite) drops relevance at neurons whose inputs all contribute
    # negatively (a residual split can hand them relevance): recorded as absorbed, and small
    top = model.logits(x).argmax(1)
    total, score, absorbed = _conservation(model, x, top)
    assert torch.allclose(total + absorbed, score, rtol=1e-4, atol=1e-6), (total, absorbed, score)
    assert (absorbed.abs() < 0.25 * score.abs()).all(), (absorbed, score)
    # with biases (incl. those BN fusion creates) what the input does not get, biases absorbed
    biased = _wrap(ResNetish())
    total, score, absorbed = _conservation(biased, x, torch.tensor([1, 4]), rule="epsilon")
    assert not torch.allclose(total, score, rtol=1e-2)  # biases do take relevance
    assert torch.allclose(total + absorbed, score, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_lrp_conserves_on_torchvision_resnet_and_vgg(arch):
    """The real architectures: ResNet's reused ReLUs, in-place adds and max pool; VGG's max
    pools, BN after every conv and the adaptive pool feeding the dense head."""
    torch.manual_seed(0)
    module = _randomise_batchnorm(torchvision.models.get_model(arch, weights=None, num_classes=10))
    x = random_images(2, 64, seed=1)
    zeroed = _wrap(_zero_biases(module), size=64)
    targets = zeroed.logits(x).argmax(1)
    for params in ({"rule": "epsilon"}, {}):
        total, score, _ = _conservation(zeroed, x, targets, **params)
        assert torch.allclose(total, score, rtol=1e-3, atol=1e-5), (params, total, score)
    total, score, absorbed = _conservation(_wrap(module, size=64), x, targets)
    assert torch.allclose(total + absorbed, score, rtol=1e-4, atol=1e-5), (total, absorbed)


def test_lrp_conserves_on_the_builtin_model(builtin):
    x = random_images(2, 64, seed=2)
    targets = builtin.logits(x).argmax(1)
    zeroed = wrap_module(
        _zero_biases(builtin.module), builtin.preprocess, id="test:builtin-zero", device="cpu"
    )
    total, score, _ = _conservation(zeroed, x, targets, rule="epsilon")
    assert torch.allclose(total, score, rtol=1e-3, atol=1e-4), (total, score)
    for model in (zeroed, builtin):  # nothing leaks: input + absorbed (biases, z+ drops) = score
        total, score, absorbed = _conservation(model, x, targets)
        assert torch.allclose(total + absorbed, score, rtol=1e-4, atol=1e-4), (total, absorbed)


def test_alpha1_beta0_equals_zplus_on_relu_nets():
    model = tiny_model()
    x = random_images(2, 32, seed=3)
    t = torch.tensor([2, 5])
    zp = build_explainer("lrp", model, rule="zplus")(x, t)
    ab = build_explainer("lrp", model, rule="alpha_beta", beta=0.0)(x, t)
    ab21 = build_explainer("lrp", model, rule="alpha_beta", beta=1.0)(x, t)
    assert torch.allclose(zp, ab, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(zp, ab21, rtol=1e-2)


def test_lrp_leaves_the_users_model_alone_and_is_batch_invariant():
    module = ResNetish()
    model = _wrap(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    relus = [m.inplace for m in module.modules() if isinstance(m, nn.ReLU)]
    e = build_explainer("lrp", model)
    x = random_images(8, 32, seed=4)
    t = torch.arange(8) % 5
    got = e.explain(x, t)
    batch = got.maps
    assert got.forward_passes == 8
    alone = e(x[5:6], t[5:6])
    assert torch.allclose(alone[0], batch[5], rtol=1e-4, atol=1e-6 * batch[5].abs().max())
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert relus == [m.inplace for m in module.modules() if isinstance(m, nn.ReLU)]
    assert not any(m._forward_hooks for m in module.modules())


@pytest.mark.parametrize("which", ["tiny", "resnetish", "builtin"])
def test_deeplift_summation_to_delta(which, request):
    if which == "builtin":
        model, size = request.getfixturevalue("builtin"), 64
    else:
        model, size = (tiny_model() if which == "tiny" else _wrap(ResNetish())), 32
    x = random_images(2, size, seed=5)
    e = build_explainer("deeplift", model)
    explained = e.explain(x, torch.tensor([1, 2]))
    maps = explained.maps
    assert explained.forward_passes == 4  # x and the reference in one batch
    ref = model.preprocess.pixel_value(0.0).expand_as(x)
    with torch.inference_mode():
        want = model.module(x)[:, [1, 2]].diagonal() - model.module(ref)[:, [1, 2]].diagonal()
    got = maps.flatten(1).sum(1)
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-4 * want.abs().max()), (got, want)
    assert explained.extras["delta"].abs().max() <= 1e-2 * want.abs().max() + 1e-5
