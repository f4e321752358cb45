"""Infidelity, max-sensitivity and relevance rank accuracy: against Captum on the same noise,
known answers computed here, and their invariants (seeded reruns, nulls). Tiny models, 32 px."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_images, tiny_model
from torch import nn

from pipeline.metrics import ExplainedBatch, build_metric
from pipeline.metrics.robustness import perturbations, pixel_span
from pipeline.models import Preprocess, wrap_module

S = 32
# Captum runs the same forwards (or explainer calls) on the same perturbed inputs in fp32; ours
# accumulate in fp64. Measured: relative differences below 4e-7 (infidelity) and 1e-7
# (max_sensitivity); the tolerance leaves room for other BLAS builds.
CAPTUM_REL = 1e-5


def explained(n=3, seed=1):
    from pipeline.explainers import build_explainer

    model = tiny_model(size=S)
    x = random_images(n, S, seed=seed)
    t = model.predict(x)[1][:, 0]
    e = build_explainer("saliency", model)
    return model, x, t, e, e(x, t)


@pytest.mark.parametrize("normalize", [True, False])
def test_infidelity_agrees_with_captum_on_the_same_noise(normalize):
    from captum.metrics import infidelity

    model, x, t, _, maps = explained()
    ours = build_metric("infidelity", normalize=normalize).update(
        ExplainedBatch(maps, model=model, x=x, targets=t)
    )
    noise = perturbations(model, x, 10, 0.003, "normal").flatten(0, 1)  # image-major, as Captum

    def same_noise(inputs):
        return noise, inputs - noise

    ref = infidelity(
        lambda z: model.class_scores(model.forward(z)),
        same_noise,
        x,
        maps[:, None].expand_as(x),  # the map broadcast over the channels
        target=t,
        n_perturb_samples=10,
        normalize=normalize,
    )
    assert ours == pytest.approx(ref.tolist(), rel=CAPTUM_REL)
    assert all(v > 0 for v in ours)


def test_max_sensitivity_agrees_with_captum_on_the_same_noise():
    from captum.metrics import sensitivity_max

    model, x, t, e, maps = explained()
    ours = build_metric("max_sensitivity").update(
        ExplainedBatch(maps, model=model, x=x, targets=t, explainer=e)
    )
    noise = perturbations(model, x, 10, 0.02, "uniform").flatten(0, 1)
    ref = sensitivity_max(
        lambda inputs, target: (e(inputs[0] if isinstance(inputs, tuple) else inputs, target),),
        x,
        perturb_func=lambda inputs: inputs + noise,
        target=t,
        n_perturb_samples=10,
    )
    assert ours == pytest.approx(ref.tolist(), rel=CAPTUM_REL)
    assert all(v > 0 for v in ours)


def test_the_noise_has_the_stated_scale_in_model_space():
    """Captum is fed our draws, so their scale is checked here: the pixel range [0, 1] is
    1/std wide per channel in model space."""
    std = (0.2, 0.25, 0.5)
    pre = Preprocess(size=S, mean=(0.4, 0.5, 0.6), std=std, policy="squash")
    model = wrap_module(tiny_model(size=S).module, pre, id="test:scaled", device="cpu")
    assert pixel_span(model).flatten().tolist() == pytest.approx([1 / s for s in std])
    x = random_images(2, S, seed=2)
    gauss = perturbations(model, x, 8, 0.003, "normal")  # [2, 8, 3, S, S]
    box = perturbations(model, x, 8, 0.02, "uniform")
    for c, s in enumerate(std):
        assert float(gauss[:, :, c].std()) == pytest.approx(0.003 / s, rel=0.05)
        assert float(box[:, :, c].abs().max()) <= 0.02 / s
        assert float(box[:, :, c].abs().max()) > 0.99 * 0.02 / s  # fills the L_inf ball
    assert not torch.equal(gauss[:, 0], gauss[:, 1])  # every copy draws afresh
    assert not torch.equal(gauss[0], gauss[1])


class LinearLogit(nn.Module):
    """logit_0 = sum_hw v_hw * sum_c x_chw, logit_1 = 0: linear, the same weight in each
    channel, so the map v (gradient x perturbation) explains it exactly."""

    def __init__(self, v):
        super().__init__()
        self.register_buffer("v", v)

    def forward(self, x):
        z = (x.sum(1) * self.v).flatten(1).sum(1)
        return torch.stack([z, torch.zeros_like(z)], 1)


def test_infidelity_of_the_exact_linear_explanation_is_zero():
    v = torch.randn(S, S, generator=torch.Generator().manual_seed(4))
    pre = Preprocess(size=S, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), policy="squash")
    model = wrap_module(LinearLogit(v), pre, id="test:linear", device="cpu", labels=["a", "b"])
    x = random_images(2, S, seed=5)
    t = torch.zeros(2, dtype=torch.long)

    def infid(maps, **params):
        metric = build_metric("infidelity", score="logit", n_perturb=6, **params)
        return metric.update(ExplainedBatch(maps, model=model, x=x, targets=t))

    # by hand: I^T v per draw, each draw's delta f equals it exactly
    dots = (perturbations(model, x, 6, 0.003, "normal").sum(2) * v).flatten(2).sum(2).double()
    scale = float((dots**2).mean())  # the error of a zero map
    exact = v.expand(2, S, S)
    assert infid(exact, normalize=False) == pytest.approx([0.0, 0.0], abs=1e-5 * scale)
    assert infid(exact) == pytest.approx([0.0, 0.0], abs=1e-5 * scale)
    # twice the map: the optimal scale takes the 2 out; without it the error is mean (I^T v)^2
    assert infid(2 * exact) == pytest.approx([0.0, 0.0], abs=1e-5 * scale)
    assert infid(2 * exact, normalize=False) == pytest.approx((dots**2).mean(1).tolist(), rel=1e-4)
    assert infid(torch.zeros(2, S, S), normalize=False) == pytest.approx(
        (dots**2).mean(1).tolist(), rel=1e-4
    )
    wrong = torch.randn(2, S, S, generator=torch.Generator().manual_seed(6))
    assert min(infid(wrong)) > 0.1 * scale
    # a map at a quarter of the resolution is upsampled: a constant map stays constant
    assert infid(torch.ones(2, S // 4, S // 4)) == pytest.approx(infid(torch.ones(2, S, S)))


def test_infidelity_seeded_reruns_forward_count_and_batch_independence():
    model, x, t, _, maps = explained(n=3, seed=7)

    def run(rows, **params):
        metric = build_metric("infidelity", n_perturb=5, **params)
        return metric.update(ExplainedBatch(maps[rows], model=model, x=x[rows], targets=t[rows]))

    before = model.forward_passes
    first = run([0, 1, 2])
    assert model.forward_passes - before == 3 * (5 + 1)  # n_perturb + 1 forwards per image
    assert run([0, 1, 2]) == first  # same seed, same numbers
    assert run([2]) == pytest.approx(first[2:], rel=1e-6)  # an image's noise is its own
    assert run([0, 1, 2], seed=1) != first
    assert run([0, 1, 2], max_batch=4) == pytest.approx(first, rel=1e-6)  # chunking is invisible


class ChannelSum:
    """A stand-in explainer whose map is the channel sum of its input (or a constant map)."""

    def __init__(self, constant=False):
        self.constant = constant

    def __call__(self, x, targets):
        return torch.full_like(x[:, 0], 0.5) if self.constant else x.sum(1)


def test_max_sensitivity_known_answers_and_nulls():
    model = tiny_model(size=S)
    x = random_images(3, S, seed=8)
    t = torch.zeros(3, dtype=torch.long)

    def sens(explainer, maps, **params):
        metric = build_metric("max_sensitivity", n_perturb=4, **params)
        return metric.update(ExplainedBatch(maps, model=model, x=x, targets=t, explainer=explainer))

    constant = ChannelSum(constant=True)
    assert sens(constant, constant(x, t)) == [0.0, 0.0, 0.0]  # ignores its input: 0
    # the channel sum moves by the channel sum of the noise: by hand, max over the 4 draws
    linear = ChannelSum()
    noise = perturbations(model, x, 4, 0.02, "uniform").sum(2).flatten(2).double()
    by_hand = noise.norm(dim=2).max(1).values / x.sum(1).flatten(1).double().norm(dim=1)
    first = sens(linear, linear(x, t))
    assert first == pytest.approx(by_hand.tolist(), rel=1e-5)
    assert sens(linear, linear(x, t)) == first  # seeded rerun
    assert sens(linear, linear(x, t), seed=3) != first
    assert sens(linear, linear(x, t), radius=0.04) == pytest.approx([2 * v for v in first])
    # a map that is zero everywhere has no relative change: null, not a number
    zero = torch.zeros(3, S, S)
    assert sens(constant, zero) == [None, None, None]


def rra(maps, anns):
    return build_metric("relevance_rank_accuracy").update(ExplainedBatch(maps, anns))


def test_relevance_rank_accuracy_by_hand():
    mask = np.zeros((S, S), dtype=bool)
    mask[4:8, 4:12] = True  # K = 32
    m = torch.rand(1, S, S, generator=torch.Generator().manual_seed(9)) * 0.5
    top = m.clone()
    top[0, 4:8, 4:12] += 1.0  # its 32 highest pixels are exactly the mask
    assert rra(top, [{"mask": mask}]) == [1.0]
    half = m.clone()
    half[0, 4:6, 4:12] += 1.0  # 16 of the mask's pixels ...
    half[0, 20:22, 4:12] += 1.0  # ... and 16 outside are the 32 highest
    assert rra(half, [{"mask": mask}]) == [0.5]
    assert rra(-top, [{"mask": mask}]) == [0.0]  # ranked by the raw, signed map
    # boxes (inclusive corners) give the same ground truth: [x0, y0, x1, y1]
    assert rra(top, [{"boxes": [[4, 4, 11, 7]]}]) == [1.0]
    # a constant map: every pixel ties, the expected share is chance, K / N
    assert rra(torch.ones(1, S, S), [{"mask": mask}]) == [pytest.approx(32 / (S * S))]
    # ties at the K-th value: 24 clear winners inside, then 16 tied pixels (8 in, 8 out) for
    # the last 8 places: 24 + 8 * 8/16 = 28 of 32
    tied = torch.zeros(1, S, S)
    tied[0, 4:7, 4:12] = 2.0
    tied[0, 7, 4:12] = 1.0
    tied[0, 20, 4:12] = 1.0
    assert rra(tied, [{"mask": mask}]) == [pytest.approx(28 / 32)]


def test_relevance_rank_accuracy_nulls_without_ground_truth():
    m = torch.rand(3, S, S, generator=torch.Generator().manual_seed(10))
    metric = build_metric("relevance_rank_accuracy")
    empty = np.zeros((S, S), dtype=bool)
    values = metric.update(ExplainedBatch(m, [{"boxes": [[0, 0, 15, 15]]}, {}, {"mask": empty}]))
    assert values[1] is None and values[2] is None and 0 <= values[0] <= 1
    assert metric.n == 1 and metric.compute() == values[0]


@pytest.mark.parametrize(
    ("name", "param", "value"),
    [
        ("infidelity", "n_perturb", 0),
        ("infidelity", "std", 0.0),
        ("infidelity", "score", "softmax"),
        ("max_sensitivity", "radius", -0.02),
        ("max_sensitivity", "n_perturb", 0),
    ],
)
def test_out_of_range_parameters_are_refused(name, param, value):
    with pytest.raises(ValueError, match=f"metric {name!r}: {param} must be"):
        build_metric(name, **{param: value})


def test_directions_needs_and_the_explainer():
    from pipeline.metrics import metric_class

    assert not metric_class("infidelity").higher_is_better
    assert not metric_class("max_sensitivity").higher_is_better
    assert metric_class("relevance_rank_accuracy").higher_is_better
    assert metric_class("relevance_rank_accuracy").needs == "boxes|mask"
    model, x, t, _, maps = explained(n=2)
    with pytest.raises(ValueError, match="max_sensitivity needs the explainer"):
        build_metric("max_sensitivity").update(ExplainedBatch(maps, model=model, x=x, targets=t))
