"""Known answers written out from the definitions (METHODS.md, the papers) on models small enough
to compute by hand: what a correlation with a peer cannot tell apart (a left from a right Riemann
sum, softmax weights from raw ones, one LRP rule from another), and every default METHODS.md
names."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.explainers import build_explainer
from pipeline.metrics import ExplainedBatch, build_metric
from pipeline.models import Preprocess, wrap_module

PRE = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), policy="squash")


def _wrap(module: nn.Module, size: int, **kwargs):
    return wrap_module(module, Preprocess(size=size, **PRE), id="test:hand", device="cpu", **kwargs)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Quadratic(nn.Module):
    """S_0 = sum a * x^2 (gradient 2 a x: where it is taken shows in the answer); S_1 = sum x."""

    def __init__(self, size: int):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.register_buffer("a", torch.rand(3, size, size, generator=g) + 0.5)

    def forward(self, x):
        return torch.stack([(self.a * x * x).sum((1, 2, 3)), x.sum((1, 2, 3))], 1)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_integrated_gradients_is_the_right_riemann_sum(steps):
    model = _wrap(Quadratic(4), 4)
    x = _images(2, 4)
    base = model.preprocess.pixel_value(0.0, "cpu")  # black, in model space
    d = x - base
    # right Riemann sum: gradients at x' + k/m (x - x'), k = 1..m (not 0..m-1, not midpoints)
    mean_point = base + d * sum(k / steps for k in range(1, steps + 1)) / steps
    want = (d * 2 * model.module.a * mean_point).sum(1)
    e = build_explainer("integrated_gradients", model, steps=steps)
    got = e.explain(x, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(got.maps, want, rtol=1e-5, atol=1e-5)
    assert got.forward_passes >= steps


def test_smoothgrad_noise_scale_and_mean():
    """sigma = 0.15 (x_max - x_min) per image, zero-mean Gaussian, n copies averaged."""
    size, n = 8, 64
    module = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 2))
    model = _wrap(module, size)
    seen: list[torch.Tensor] = []
    model.module.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    x = _images(2, size) * torch.tensor([1.0, 3.0])[:, None, None, None]  # different ranges
    e = build_explainer("smoothgrad", model, n=n, max_batch=n)
    maps = e(x, torch.tensor([1, 0]))
    noisy = torch.cat(seen)
    assert noisy.shape[0] == 2 * n
    # each copy belongs to the image it is nearest to (the two images' ranges differ 3x)
    owner = torch.cdist(noisy.flatten(1), x.flatten(1)).argmin(1)
    assert owner.tolist().count(0) == owner.tolist().count(1) == n
    for i in range(2):
        noise = noisy[owner == i] - x[i]
        want = 0.15 * float(x[i].max() - x[i].min())
        assert float(noise.std()) == pytest.approx(want, rel=0.03)
        assert abs(float(noise.mean())) < 0.02 * want
    # the base (saliency) of a linear model ignores the noise: the mean of n copies is exactly
    # max_c |w_target|, not n times it
    w = module[1].weight.reshape(2, 3, size, size)
    want = torch.stack([w[1].abs().amax(0), w[0].abs().amax(0)])
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-6)


class ChannelNet(nn.Module):
    """A = ReLU(x) channel by channel (an identity 1x1 conv), GAP, FC: Score-CAM by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None])
            self.fc.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 1.5, 2.0]]))
            self.fc.bias.copy_(torch.tensor([0.2, -0.1]))

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("score", ["logit", "prob"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_scorecam_by_hand(score, top_k):
    net = ChannelNet()
    model = _wrap(net, 6, cam_layer="relu")
    x = _images(2, 6, seed=5)
    targets = torch.tensor([0, 1])
    got = build_explainer("scorecam", model, score=score, top_k=top_k)(x, targets)
    for i, c in enumerate(targets.tolist()):
        a = torch.relu(x[i])  # [K,h,w]
        channels = list(range(3))
        if top_k:
            channels = a.flatten(1).var(1).topk(top_k).indices.tolist()
        s = []
        for k in channels:
            h = (a[k] - a[k].min()) / (a[k].max() - a[k].min())
            logits = net(x[i : i + 1] * h)[0]
            s.append(float(logits[c] if score == "logit" else logits.softmax(0)[c]))
        w = torch.tensor(s).softmax(0)  # softmax of the scores, not the raw scores
        want = torch.relu(sum(w[j] * a[k] for j, k in enumerate(channels)))
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(3, 12, generator=g))
            self.fc.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))

    def forward(self, x):
        return self.fc(x.flatten(1))


def _lrp_by_hand(rule: str, x: torch.Tensor, w: torch.Tensor, b: float, eps: float, gamma: float):
    """Input relevance of one linear layer for R_out = z (the target's logit), per the rule."""
    z = float(x @ w + b)
    sign = 1.0 if z >= 0 else -1.0
    contrib = x * w
    if rule == "epsilon":
        return contrib * z / (z + eps * sign)
    if rule == "gamma":
        wg, bg = w + gamma * w.clamp(min=0), b + gamma * max(b, 0.0)
        zg = float(x @ wg + bg)
        return x * wg * z / (zg + eps * (1.0 if zg >= 0 else -1.0))
    pos, neg = contrib.clamp(min=0), contrib.clamp(max=0)
    if rule == "zplus":
        return pos / (pos.sum() + eps) * z
    if rule == "alpha_beta":  # alpha = 2, beta = 1
        return 2 * pos / (pos.sum() + eps) * z - neg / (neg.sum() - eps) * z
    if rule == "flat":  # every input 1, every weight 1: z_flat = #inputs, stabilised
        return torch.full_like(x, z / (len(x) + eps))
    raise AssertionError(rule)


@pytest.mark.parametrize("rule", ["epsilon", "gamma", "zplus", "alpha_beta", "flat"])
def test_each_lrp_rule_on_one_layer(rule):
    net = OneLinear()
    model = _wrap(net, 2)
    x = _images(1, 2, seed=11)
    eps, gamma = 0.5, 0.25  # a large epsilon: its stabiliser must show in the answer
    params = {"rule": rule, "epsilon": eps, "gamma": gamma}
    if rule == "alpha_beta":
        params["beta"] = 1.0
    got = build_explainer("lrp", model, **params)(x, torch.tensor([1]))
    flat = x[0].flatten()
    want = _lrp_by_hand(rule, flat, net.fc.weight[1], float(net.fc.bias[1]), eps, gamma)
    torch.testing.assert_close(got[0], want.reshape(3, 2, 2).sum(0), rtol=1e-4, atol=1e-5)


class FixedMap:
    """An explainer whose map ignores the image: a left-to-right ramp."""

    def __init__(self, size: int):
        self.ramp = torch.linspace(0, 1, size).expand(size, size)

    def __call__(self, x, targets):
        return self.ramp.expand(x.shape[0], -1, -1).clone()


def test_stability_index_of_two_known_maps():
    """Psi(M1, M2) = 1 - ||M1 - M2||_F / sqrt(#elements). Under hflip a ramp comes back as its
    mirror image: Psi = 1 - sqrt(mean((r - flip(r))^2))."""
    size = 8
    model = _wrap(OneLinearPad(size), size)
    explainer = FixedMap(size)
    metric = build_metric("stability_index", transforms=["hflip"])
    x = _images(2, size)
    maps = explainer(x, None)
    batch = ExplainedBatch(
        maps, model=model, x=x, targets=torch.zeros(2, dtype=torch.long), explainer=explainer
    )
    values = metric.update(batch)
    r = explainer.ramp
    want = 1 - math.sqrt(float(((r - r.flip(-1)) ** 2).mean()))
    assert values == pytest.approx([want, want], abs=1e-6)
    assert metric.by_transform() == {"hflip": pytest.approx(want, abs=1e-6)}
    # identical maps: Psi = 1
    same = build_metric("stability_index", transforms=["identity"])
    assert same.update(batch) == pytest.approx([1.0, 1.0])


class OneLinearPad(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.fc = nn.Linear(3 * size * size, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(
    "peak, hit",
    [
        ((2, 3), True),  # the top-left corner of the box (x0, y0) = (3, 2): inclusive
        ((6, 7), True),  # the bottom-right corner (x1, y1) = (7, 6): inclusive
        ((1, 3), False),  # one row above
        ((2, 2), False),  # one column left
        ((7, 7), False),  # one row below
        ((6, 8), False),  # one column right
    ],
)
def test_pointing_game_on_the_box_edges(peak, hit):
    maps = torch.zeros(1, 12, 12)
    maps[0, peak[0], peak[1]] = 1.0
    ann = [{"boxes": [[3, 2, 7, 6]]}]  # x_min, y_min, x_max, y_max (inclusive pixels)
    assert build_metric("pointing_game").update(ExplainedBatch(maps, ann)) == [float(hit)]
    # with a tolerance of 1 px every near miss above is a hit
    near = build_metric("pointing_game", tolerance=1.0).update(ExplainedBatch(maps, ann))
    assert near == [1.0]


def test_every_default_methods_md_names():
    model = _wrap(OneLinearPad(224), 224)
    white = ["saliency", "gradient_x_input", "integrated_gradients", "gradcam", "lrp", "deeplift"]
    black = ["glas", "rglas", "rise", "occlusion", "lime", "scorecam"]
    got = {}
    for name in white + black + ["smoothgrad", "fem", "evet"]:
        try:
            got[name] = build_explainer(name, model)
        except ValueError:  # CAM methods need a spatial layer: checked on a CNN below
            continue
    for name in ("saliency", "gradient_x_input", "integrated_gradients", "lrp", "deeplift"):
        assert got[name].score == "logit", name  # white-box: the pre-softmax logit
    for name in ("glas", "rglas", "rise", "occlusion", "lime"):
        assert got[name].score == "prob", name  # black-box: P(y|I)
    ig = got["integrated_gradients"]
    assert (ig.steps, ig.baseline) == (50, 0.0)  # m = 50, black baseline
    sg = got["smoothgrad"]
    assert (sg.n, sg.sigma, sg.base.name) == (50, 0.15, "saliency")
    assert got["lrp"].composite == "epsilon_plus_flat" and got["lrp"].rule is None
    assert got["deeplift"].reference == 0.0
    g = got["glas"]
    assert (g.mode, g.k, g.sigma_light, g.sigma_shadow, g.sigma_spatial, g.gamma) == (
        "fusion",
        15,
        5.0,
        3.0,
        6.0,
        1e-5,
    )
    assert g.sigma_unit == "cells"
    r = got["rglas"]
    assert (r.t1, r.t2, r.max_iter) == (0.8, 5.0, 5)
    rise = got["rise"]
    assert (rise.n_masks, rise.grid, rise.p) == (4000, 7, 0.5)
    assert got["lime"].n_samples == 1000
    occlusion = got["occlusion"]
    ran = occlusion.explain(torch.zeros(1, 3, 224, 224), torch.tensor([0]))
    assert ran.forward_passes == 1 + 13 * 13  # w = 32, s = 16 at 224 px
    evet = build_explainer("evet", _cnn(), base="saliency")
    assert (evet.gamma, evet.alpha) == (0.99, 1.0)
    assert evet.transform_names == [
        "hflip",
        "scale",
        "rotate",
        "shear",
        "hflip_scale",
        "hflip_rotate",
        "hflip_shear",
    ]
    cnn = _cnn()
    assert build_explainer("scorecam", cnn).top_k is None  # all K channels
    assert build_explainer("scorecam", cnn).score == "prob"
    assert build_explainer("fem", cnn).k == 1.0
    assert build_explainer("gradcam", cnn).score == "logit"
    # metrics
    deletion, insertion = build_metric("deletion"), build_metric("insertion")
    assert (deletion.steps, deletion.substrate) == (224, "black")  # step = HW/224 pixels
    assert (insertion.steps, insertion.substrate) == (224, "blur")  # blurred: kernel 11, sigma 5
    loc = build_metric("localisation_error")
    assert (loc.energy, loc.iou) == (0.95, 0.5)
    assert build_metric("pointing_game_small").max_area == 0.25  # boxes under 1/4 of the image
    assert list(build_metric("stability_index").transforms) == evet.transform_names
    # insertion's blurred start: Gaussian, kernel 11, sigma 5, reflected at the border
    x = _images(1, 16, seed=2)
    t = torch.arange(11.0) - 5
    k1 = torch.exp(-0.5 * (t / 5.0) ** 2)
    k1 = k1 / k1.sum()
    kernel = (k1[:, None] * k1[None, :]).expand(3, 1, 11, 11)
    padded = nn.functional.pad(x, (5, 5, 5, 5), mode="reflect")
    want = nn.functional.conv2d(padded, kernel, groups=3)
    torch.testing.assert_close(insertion._substrate(None, x), want, rtol=1e-5, atol=1e-5)


def _cnn():
    from conftest import tiny_model

    return tiny_model(size=32)


def test_box_iou_by_hand_on_the_half_way_line():
    """Inclusive pixel boxes: a 4x4 box inside a 4x8 one has IoU 16/32 = 0.5 exactly, which is
    not > 0.5: a localisation error of 1 (a correct box would give 0)."""
    from pipeline.metrics.localisation import box_iou

    assert box_iou([0, 0, 3, 3], [0, 0, 3, 7]) == 0.5
    assert box_iou([0, 0, 3, 3], [0, 0, 3, 3]) == 1.0
    assert box_iou([0, 0, 3, 3], [4, 0, 7, 3]) == 0.0  # touching, not overlapping
    assert box_iou([0, 0, 1, 0], [1, 0, 2, 0]) == pytest.approx(1 / 3)  # one shared pixel
    maps = torch.zeros(1, 12, 12)
    maps[0, 0:4, 0:4] = 1.0  # all of its energy in a 4x4 box
    error = build_metric("localisation_error")
    assert error.update(ExplainedBatch(maps, [{"boxes": [[0, 0, 3, 7]]}])) == [1.0]
    assert error.update(ExplainedBatch(maps, [{"boxes": [[0, 0, 3, 4]]}])) == [0.0]  # 16/20


def test_blob_pointing_picks_the_biggest_of_three_blobs():
    """Labels go in raster order: the biggest blob is the second of three here."""
    from pipeline.metrics.localisation import blob_centroid

    m = torch.zeros(20, 20)
    m[0, 0] = 1.0  # blob 1: one pixel, top left
    m[8:12, 8:12] = 1.0  # blob 2: 16 pixels, centre (9.5, 9.5)
    m[18, 18:20] = 1.0  # blob 3: two pixels
    assert blob_centroid(m) == (10, 10)  # round(9.5) = 10 (banker's: 10)
    ann = [{"boxes": [[8, 8, 11, 11]]}]
    assert build_metric("pointing_game", variant="blob").update(ExplainedBatch(m[None], ann)) == [
        1.0
    ]


def test_curve_metrics_take_steps_plus_one_points():
    """steps removals give steps + 1 points on the curve (0 removed ... all removed)."""
    for steps in (3, 4):
        assert len(build_metric("deletion", steps=steps).curve) == steps + 1
        assert len(build_metric("insertion", steps=steps).curve) == steps + 1


class _SumOfPixels(nn.Module):
    """Logit 0 = the sum of every input value, logit 1 = 0: p(0) = sigmoid(sum)."""

    def forward(self, x):
        s = x.sum((1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_deletion_auc_by_hand_with_an_odd_number_of_steps():
    # 2x2 image, 3 steps: round(k * 4 / 3) = 0, 1, 3, 4 pixels turn black (-2 after PRE's
    # normalisation), most salient first; the AUC is the trapezoid over the 4 points / 3
    model = _wrap(_SumOfPixels(), 2)
    x = torch.tensor([[[0.5, -1.0], [1.5, 0.25]]]).expand(3, 2, 2)[None].clone()
    x[0, 1] += 0.1
    maps = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])  # order: (0,0), (0,1), (1,0), (1,1)
    flat = x[0].reshape(3, 4)
    scores = []
    for k in (0, 1, 3, 4):
        img = flat.clone()
        img[:, :k] = -2.0
        scores.append(torch.sigmoid(img.sum()).item())
    auc = sum((a + b) / 2 for a, b in zip(scores, scores[1:], strict=False)) / 3
    got = build_metric("deletion", steps=3).update(
        ExplainedBatch(maps, [{}], model=model, x=x, targets=torch.tensor([0]))
    )
    assert got == pytest.approx([auc], abs=1e-6)


def test_pointing_tolerance_is_the_euclidean_distance_to_the_mask():
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[5, 5] = True
    maps = torch.zeros(1, 12, 12)
    maps[0, 2, 1] = 1.0  # 3 rows and 4 columns away from the mask: 5 px
    ann = [{"mask": mask.numpy()}]
    for tolerance, hit in ((5.0, 1.0), (4.9, 0.0), (0.0, 0.0)):
        metric = build_metric("pointing_game", tolerance=tolerance)
        assert metric.update(ExplainedBatch(maps, ann)) == [hit]


def test_sanity_reinit_draws_each_kind_of_parameter_by_its_rule():
    from pipeline.metrics.sanity import _reinit

    conv, bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)
    bn.running_mean.fill_(0.7)
    _reinit(conv, torch.Generator().manual_seed(0))
    _reinit(bn, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    # a weight matrix: N(0, 1/fan_in), fan_in = 2 * 3 * 3; a bias: N(0, 0.1^2)
    assert torch.equal(conv.weight, torch.randn(3, 2, 3, 3, generator=g) / 18**0.5)
    assert torch.equal(conv.bias, 0.1 * torch.randn(3, generator=g))
    g = torch.Generator().manual_seed(1)
    # a one-dimensional weight (a norm's scale) stays near 1
    assert torch.equal(bn.weight, 1 + 0.1 * torch.randn(3, generator=g))
    assert torch.equal(bn.bias, 0.1 * torch.randn(3, generator=g))
    assert bn.running_mean.tolist() == [0.0] * 3 and bn.running_var.tolist() == [1.0] * 3
