"""ROAD's noisy linear imputation against known answers and scipy's direct solve of the
reference system; ROAD on a model that reads one patch; the random logit test on explainers that
ignore the class and ones that do not. Tiny models, 16-32 px."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_images, tiny_model
from torch import nn

from pipeline.compute.impute import linear_impute
from pipeline.metrics import ExplainedBatch, build_metric
from pipeline.metrics.sanity import random_other_classes
from pipeline.models import Preprocess, wrap_module

# the reference code's neighbours and weights (Rong et al. 2022, road/imputations.py)
REFERENCE_WEIGHTS = [
    ((dy, dx), 1 / 6 if dy == 0 or dx == 0 else 1 / 12)
    for dy in (-1, 0, 1)
    for dx in (-1, 0, 1)
    if (dy, dx) != (0, 0)
]


def scipy_impute(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The reference system (weighted mean of the in-image neighbours for every removed pixel,
    all removed pixels jointly) built entry by entry and solved by scipy's direct `spsolve`."""
    from scipy.sparse import lil_matrix
    from scipy.sparse.linalg import spsolve

    c, h, w = img.shape
    unknown = {p: i for i, p in enumerate(zip(*np.nonzero(removed), strict=True))}
    a = lil_matrix((len(unknown), len(unknown)))
    b = np.zeros((len(unknown), c))
    for (y, x), i in unknown.items():
        for (dy, dx), wt in REFERENCE_WEIGHTS:
            yy, xx = y + dy, x + dx
            if not (0 <= yy < h and 0 <= xx < w):
                continue
            a[i, i] += wt
            if (yy, xx) in unknown:
                a[i, unknown[yy, xx]] -= wt
            else:
                b[i] += wt * img[:, yy, xx]
    sol = spsolve(a.tocsc(), b)
    out = img.copy()
    for (y, x), i in unknown.items():
        out[:, y, x] = sol[i]
    return out


def test_a_linear_ramp_is_filled_exactly():
    """A ramp equals the mean of its symmetric neighbours, so a hole away from the border is
    filled with the ramp itself (up to the solver's tolerance)."""
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(20.0), indexing="ij")
    ramp = torch.stack([0.3 * yy - 0.2 * xx, 0.05 * xx + 1, -0.1 * yy])[None]
    removed = torch.zeros(1, 24, 20, dtype=torch.bool)
    removed[0, 4:19, 3:15] = True
    removed[0, 2, 17] = True
    out = linear_impute(ramp, removed, tol=1e-7)
    assert (out - ramp).abs().max() < 1e-4


def test_a_constant_image_stays_constant_and_kept_pixels_are_untouched():
    g = torch.Generator().manual_seed(0)
    const = torch.full((2, 3, 16, 16), 0.7)
    removed = torch.rand(2, 16, 16, generator=g) < 0.9  # scattered, touching the border
    removed[1, :, :12] = True  # one large hole
    assert (linear_impute(const, removed, tol=1e-7) - 0.7).abs().max() < 1e-5
    x = torch.randn(2, 3, 16, 16, generator=g)
    out = linear_impute(x, removed)
    kept = ~removed[:, None].expand_as(x)
    assert torch.equal(out[kept], x[kept])
    assert not torch.allclose(out[~kept], x[~kept])


@pytest.mark.parametrize("hole", ["scattered", "blob"])
def test_the_batched_solve_agrees_with_scipy_spsolve(hole):
    """Max abs difference below 1e-4 at tol=1e-6 on noise images in [0, 1] (measured: ~1e-6);
    at the default tol=1e-4, below 5e-3 (measured ~1e-3), under ROAD's noise of 0.01."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 24, 20, generator=g)
    if hole == "scattered":
        removed = torch.rand(1, 24, 20, generator=g) < 0.6
    else:
        yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(20.0), indexing="ij")
        removed = ((yy - 10) ** 2 + (xx - 9) ** 2 < 70)[None] | (yy < 2)[None]
    ref = torch.from_numpy(scipy_impute(x[0].double().numpy(), removed[0].numpy())).float()
    assert (linear_impute(x, removed, tol=1e-6)[0] - ref).abs().max() < 1e-4
    assert (linear_impute(x, removed)[0] - ref).abs().max() < 5e-3


# -- ROAD on a model that reads one patch -----------------------------------------------------
S, PATCH = 16, (slice(5, 9), slice(6, 10))


class PatchModel(nn.Module):
    """Class 0's logit is 4 x the patch's mean (channel 0), class 1's is 0: nothing outside the
    patch reaches the scores."""

    def forward(self, x):
        return torch.stack([4 * x[:, 0, PATCH[0], PATCH[1]].mean((1, 2)), 0 * x[:, 0, 0, 0]], 1)


def patch_case(n=3):
    pre = Preprocess(size=S, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), policy="squash")
    model = wrap_module(PatchModel(), pre, id="test:patch", device="cpu")
    g = torch.Generator().manual_seed(2)
    x = 0.2 * torch.randn(n, 3, S, S, generator=g)  # a dim, textured background
    x[:, :, PATCH[0], PATCH[1]] += 1.0  # the bright patch class 0 reads
    return model, x, torch.zeros(n, dtype=torch.long)


def test_road_morf_falls_faster_than_lerf_on_the_right_map():
    model, x, t = patch_case()
    right = torch.zeros(3, S, S)
    right[:, PATCH[0], PATCH[1]] = 1.0
    right += 0.01 * torch.rand(3, S, S, generator=torch.Generator().manual_seed(3))
    random_map = torch.rand(3, S, S, generator=torch.Generator().manual_seed(4))
    good = build_metric("road")
    v_good = good.update(ExplainedBatch(right, model=model, x=x, targets=t))
    rep = good.report()
    assert len(rep["morf"]) == len(rep["lerf"]) == 9 and rep["percentages"][0] == 0.1
    # MoRF removes the whole patch at 10%: the score falls to ~sigmoid(0); LeRF never reaches it
    assert max(rep["morf"]) < 0.65 and min(rep["lerf"]) > 0.95
    assert min(v_good) > 0.3
    v_rand = build_metric("road").update(ExplainedBatch(random_map, model=model, x=x, targets=t))
    assert max(abs(v) for v in v_rand) < 0.15 < min(v_good)
    # the reversed map puts the patch last: LeRF falls first, the value is negative
    v_rev = build_metric("road").update(ExplainedBatch(-right, model=model, x=x, targets=t))
    assert max(v_rev) < -0.3


def test_road_is_seeded_and_merges():
    model, x, t = patch_case(2)
    m = torch.rand(2, S, S, generator=torch.Generator().manual_seed(5))
    a, b = build_metric("road", seed=1), build_metric("road", seed=1)
    va = a.update(ExplainedBatch(m, model=model, x=x, targets=t))
    assert va == b.update(ExplainedBatch(m, model=model, x=x, targets=t))
    other = build_metric("road", seed=2).update(ExplainedBatch(m, model=model, x=x, targets=t))
    assert other != va
    merged = build_metric("road", seed=1).merge(a.state()).merge(b.state())
    assert merged.compute() == pytest.approx(a.compute())
    assert merged.report()["morf"] == pytest.approx(a.report()["morf"])


# -- random logit -----------------------------------------------------------------------------
class SumOfLogitsGradient:
    """|d sum_c logit_c / dx| summed over channels: the same map whatever the class."""

    name = "sum_gradient"

    def __init__(self, model):
        self.model = model

    def __call__(self, x, targets):
        x = x.detach().clone().requires_grad_(True)
        self.model.forward(x).sum().backward()
        return x.grad.abs().sum(1)


def test_random_logit_is_one_for_a_class_independent_explainer():
    model = tiny_model(size=S)
    x = random_images(3, S, seed=1)
    t = model.predict(x)[1][:, 0]
    e = SumOfLogitsGradient(model)
    v = build_metric("random_logit").update(
        ExplainedBatch(e(x, t), model=model, x=x, targets=t, explainer=e)
    )
    assert v == pytest.approx([1.0] * 3, abs=1e-6)


def test_random_logit_is_below_one_for_gradcam_and_seeded():
    from pipeline.explainers import build_explainer

    model = tiny_model(size=S)
    x = random_images(3, S, seed=1)
    t = model.predict(x)[1][:, 0]
    e = build_explainer("gradcam", model)
    batch = ExplainedBatch(e(x, t), model=model, x=x, targets=t, explainer=e)
    v = build_metric("random_logit").update(batch)
    assert max(v) < 0.99
    assert v == build_metric("random_logit").update(batch)


def test_the_random_class_is_uniform_over_the_others():
    x = random_images(300, 4, seed=2)
    t = torch.arange(300) % 3
    drawn = random_other_classes(x, t, 3, seed=0)
    assert not (drawn == t).any()
    for c in range(3):  # each target's two other classes both drawn, about evenly
        counts = torch.bincount(drawn[t == c], minlength=3)
        assert counts[c] == 0 and counts.min() < counts.max() and min(counts[counts > 0]) > 30
    assert torch.equal(drawn, random_other_classes(x, t, 3, seed=0))
    assert not torch.equal(drawn, random_other_classes(x, t, 3, seed=1))


class RecordingPatchModel(PatchModel):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return super().forward(x)


def test_road_removes_the_stated_share_and_adds_noise_only_there():
    """The copies ROAD scores: at p the removed pixels number round(p H W); kept pixels are the
    image's own; the noise (noise=0.01 of the range: 0.04 in this model's space) is on removed
    pixels only."""
    _, x, t = patch_case(2)
    pre = Preprocess(size=S, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), policy="squash")
    m = torch.rand(2, S, S, generator=torch.Generator().manual_seed(6))
    seen = {}
    for noise in (0.0, 0.01):
        module = RecordingPatchModel()
        model = wrap_module(module, pre, id="test:patch-rec", device="cpu")
        build_metric("road", noise=noise).update(ExplainedBatch(m, model=model, x=x, targets=t))
        seen[noise] = torch.cat(module.seen)[-36:].view(2, 18, 3, S, S)  # the last forward
    clean, noisy = seen[0.0], seen[0.01]
    removed = (clean != x[:, None]).any(2)  # [2, 18, S, S]
    shares = [round(p / 10 * S * S) for p in range(1, 10)] * 2
    assert removed.flatten(2).sum(2).tolist() == [shares, shares]
    diff = noisy - clean
    assert torch.equal(diff * ~removed[:, :, None], torch.zeros_like(diff))
    assert float(diff[removed[:, :, None].expand_as(diff)].std()) == pytest.approx(0.04, rel=0.1)


def test_road_orders_ties_by_a_seeded_permutation_not_by_position():
    road = build_metric("road")
    flat = torch.ones(1, S, S)
    rank = road.ranks(flat, [7])
    assert sorted(rank[0].tolist()) == list(range(S * S))
    assert rank[0, : S * S // 2].float().mean() < 0.6 * S * S  # not raster order (mean ~128)
    assert rank[0, : S * S // 2].float().mean() > 0.4 * S * S
    assert not torch.equal(rank, road.ranks(flat, [8]))
    two = torch.zeros(1, S, S)
    two[0, :4] = 1.0  # the top rows first, in some order
    assert set(road.ranks(two, [7])[0, : 4 * S].tolist()) == set(range(4 * S))
