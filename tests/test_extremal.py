"""Extremal perturbation: a known answer on a model that reads one patch, the smoothing operator
against a slow loop, the rank loss's tie rule, the summed map, and batching invariance."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_images, tiny_model
from torch import nn

from pipeline.explainers import EXPLAINERS, build_explainer
from pipeline.explainers.extremal import SmoothMask, rank_targets, smooth_kernel, smooth_max
from pipeline.models import Preprocess, wrap_module

PATCH = (4, 10, 16, 22)  # rows 4-15, cols 10-21: centred left-right (the jitter flips), not up-down
GAIN = 50.0  # logit = GAIN x patch mean: a logit range like a real classifier's


class PatchMean(nn.Module):
    """Class 0 scores GAIN x the mean of the input over PATCH, class 1 the opposite."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([GAIN, -GAIN]))

    def forward(self, x):
        y0, x0, y1, x1 = PATCH
        return x[:, :, y0:y1, x0:x1].mean((1, 2, 3))[:, None] * self.w[None]


def patch_case(n: int = 2):
    pre = Preprocess(size=32, mean=(0.5,) * 3, std=(0.25,) * 3, policy="squash")
    model = wrap_module(PatchMean(), pre, id="test:patch", device="cpu")
    x = 0.3 * random_images(n, 32, seed=3) - 1.0
    y0, x0, y1, x1 = PATCH
    x[:, :, y0:y1, x0:x1] += 3.0  # a bright patch on a dark ground: preserving it pays
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    return model, x, torch.zeros(n, dtype=torch.long), inside


# few iterations: a larger step and the paper's lambda schedule compressed into them
FAST = {"iterations": 50, "lr": 0.1, "rank_growth": 1.0035 ** (800 / 50), "blur_sigma": 5.0}


def test_registered_with_paper_defaults_and_needs_gradients():
    cls = EXPLAINERS["extremal_perturbation"]
    assert cls.requires == {"gradients"} and not cls.signed
    params = EXPLAINERS.params("extremal_perturbation")
    defaults = {k: p.default for k, p in params.items()}
    assert defaults["areas"] == (0.05, 0.1, 0.2)
    assert defaults["iterations"] == 800 and defaults["lr"] == 0.01
    assert defaults["rank_weight"] == 300.0 and defaults["rank_growth"] == 1.0035
    assert defaults["variant"] == "preserve" and defaults["coldness"] == 20.0
    e = build_explainer("extremal_perturbation", tiny_model())
    assert e.geometry(224, 224) == (7, 21.0, 10.0)  # step, sigma, blur sigma at 224 px
    assert e.geometry(32, 32) == pytest.approx((1, 3.0, 10 * 32 / 224))
    pre = Preprocess(size=32, policy="squash")
    forward_only = wrap_module(PatchMean(), pre, id="t", device="cpu", capabilities=frozenset())
    with pytest.raises(ValueError, match="gradients"):
        build_explainer("extremal_perturbation", forward_only)
    with pytest.raises(ValueError, match="areas"):
        build_explainer("extremal_perturbation", tiny_model(), areas=[1.5])


@pytest.mark.parametrize("variant", ["preserve", "delete"])
def test_masks_find_the_patch_with_the_asked_area(variant):
    """Preserving the bright patch keeps the score up and deleting it brings it down, so either
    game's mask of area 0.05 or 0.1 (both below the patch's 0.14) sits on the patch."""
    model, x, t, inside = patch_case(2 if variant == "preserve" else 1)
    e = build_explainer("extremal_perturbation", model, areas=[0.05, 0.1], variant=variant, **FAST)
    got = e.explain(x, t)
    masks = got.extras["masks"]
    assert masks.shape == (len(x), 2, 32, 32)
    assert got.forward_passes == FAST["iterations"] * len(x) * 2
    torch.testing.assert_close(got.maps, masks.sum(1))  # the map is the sum over areas
    assert ((masks >= 0) & (masks <= 1)).all()
    for b in range(len(x)):
        for i, a in enumerate((0.05, 0.1)):
            m = masks[b, i]
            share = float(m[inside].sum() / m.sum())
            assert share > 0.8, (variant, b, a, share)
            assert abs(float(m.mean()) - a) < 0.4 * a, (variant, b, a, float(m.mean()))
    # the larger area's mask holds more
    assert (masks[:, 1].flatten(1).sum(1) > masks[:, 0].flatten(1).sum(1)).all()


def slow_smooth_mask(params, size, step, sigma, coldness):
    """The smoothing written as loops over pixels and grid cells, from the definition."""
    h, w = size
    gh, gw = math.ceil(h / step), math.ceil(w / step)
    r = 1 + math.ceil(sigma / step)
    out = torch.zeros(params.shape[0], h, w, dtype=torch.float64)
    for n in range(params.shape[0]):
        for py in range(h):
            for px in range(w):
                cy, cx = int((py + 0.5) * gh / h), int((px + 0.5) * gw / w)
                zs = []
                for i in range(cy - r, cy + r + 1):
                    for j in range(cx - r, cx + r + 1):
                        inside = 0 <= i < gh and 0 <= j < gw
                        v = float(params[n, i, j]) if inside else 0.0
                        d = math.hypot(py + 0.5 - (i + 0.5) * h / gh, px + 0.5 - (j + 0.5) * w / gw)
                        zs.append(math.exp(-2 * max(d / sigma - 0.5, 0) ** 2) * v)
                top = max(zs)
                num = sum(z * math.exp(coldness * (z - top)) for z in zs)
                den = sum(math.exp(coldness * (z - top)) for z in zs)
                out[n, py, px] = min(max(num / den, 0.0), 1.0)
    return out


@pytest.mark.parametrize(
    ("size", "step", "sigma"), [((9, 11), 3, 2.5), ((8, 8), 2, 6.0), ((7, 5), 1, 1.0)]
)
def test_smoothing_matches_a_slow_loop(size, step, sigma):
    smooth = SmoothMask(size, step, sigma, 20.0, "cpu")
    g = torch.Generator().manual_seed(0)
    params = torch.rand(2, *smooth.grid, generator=g)
    params[0, 0, 0] = 1.0  # a full-strength cell at the corner
    got = smooth(params)
    want = slow_smooth_mask(params, size, step, sigma, 20.0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_smooth_max_gradient_and_limits():
    z = torch.rand(2, 3, 4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: smooth_max(v, 20.0), (z,))
    v = torch.tensor([[0.2, 0.9, 0.5]])
    assert abs(float(smooth_max(v, 1e4)) - 0.9) < 1e-6  # cold: the max
    assert abs(float(smooth_max(v, 1e-6)) - float(v.mean())) < 1e-5  # hot: the mean
    assert float(smooth_kernel(torch.tensor(0.5))) == 1.0  # flat to sigma / 2
    assert abs(float(smooth_kernel(torch.tensor(1.5))) - math.exp(-2)) < 1e-7


def test_rank_targets_average_over_ties():
    ref = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    ranked = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.2, 0.3, 0.5, 0.9]])
    want = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 1.0], [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(rank_targets(ranked, ref), want)


def test_map_does_not_depend_on_the_batch_or_the_chunking():
    """One image alone, then in the middle of three with chunks of 2 rows (so its three area
    masks are split across forwards), gives the same map and masks; a rerun is identical."""
    model = tiny_model()
    x = random_images(3, 32, seed=5)
    t = torch.tensor([3, 1, 7])
    params = {"iterations": 6, "lr": 0.1}
    alone = build_explainer("extremal_perturbation", model, **params).explain(x[1:2], t[1:2])
    e = build_explainer("extremal_perturbation", model, max_batch=2, **params)
    batch = e.explain(x, t)
    torch.testing.assert_close(batch.maps[1:2], alone.maps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        batch.extras["masks"][1:2], alone.extras["masks"], atol=1e-4, rtol=1e-4
    )
    assert not torch.allclose(batch.maps[0], batch.maps[1])  # the images' maps differ
    again = build_explainer("extremal_perturbation", model, **params).explain(x[1:2], t[1:2])
    assert torch.equal(again.maps, alone.maps)
