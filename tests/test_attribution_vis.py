"""Attribution visualization (seed 003): area constraint, localisation, determinism, pieces."""

from __future__ import annotations

import torch
from conftest import random_images, region_model

from pipeline.explainers import build_explainer
from pipeline.explainers.attribution_vis import fractal_pyramid, otsu_beta

REGION = (4, 12, 12, 28)  # y0, x0, y1, x1: an asymmetric 8 x 16 box


def test_otsu_beta_on_a_two_level_map():
    h = torch.zeros(1, 20, 20)
    h[0, :5] = 1.0  # 25% high
    h += 0.01 * torch.randn(1, 20, 20, generator=torch.Generator().manual_seed(0))
    assert abs(float(otsu_beta(h)[0]) - 0.25) < 1e-6
    assert float(otsu_beta(torch.ones(1, 4, 4))[0]) == 0.5  # constant map: guarded, no NaN


def test_fractal_pyramid_layers_get_weaker():
    pyr = fractal_pyramid((32, 32), 5, torch.Generator().manual_seed(0), "cpu")
    assert pyr.shape == (6, 3, 32, 32)
    std = pyr.flatten(1).std(1)
    assert std[0] > std[-1]
    assert abs(float(pyr.mean()) - 0.5) < 0.1


def test_mask_meets_the_area_constraint_and_covers_the_region():
    model = region_model(region=REGION)
    x = random_images(2, 32)
    e = build_explainer(
        "attribution_visualization", model, steps=2000, attr_steps=8
    )  # the default step count
    got = e.explain(x, torch.tensor([0, 1]))
    heat, mask, beta = got.maps, got.extras["mask"], got.extras["beta"]
    assert heat.shape == (2, 32, 32) and mask.shape == (2, 32, 32)
    assert got.extras["image"].shape == (2, 3, 32, 32)
    assert ((beta > 0.01) & (beta < 0.2)).all(), beta  # Otsu picks part of the 12.5% region
    assert (mask.mean((1, 2)) - beta).abs().max() < 0.02, (mask.mean((1, 2)), beta)
    y0, x0, y1, x1 = REGION
    inside = mask[:, y0:y1, x0:x1].mean((1, 2))
    outside = (mask.sum((1, 2)) - mask[:, y0:y1, x0:x1].sum((1, 2))) / (32 * 32 - 8 * 16)
    assert (inside > 3 * outside).all(), (inside, outside)
    # the heatmap (channel-summed neuron attributions) lives in the region (+1 px conv halo)
    ring = heat.abs().clone()
    ring[:, y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = 0
    assert ring.sum() <= 0.05 * heat.abs().sum()
    assert got.forward_passes == 2 * (2 + 8 + 2000)


def test_short_run_is_deterministic_and_batch_invariant():
    model = region_model(region=REGION)
    x = random_images(3, 32, seed=1)
    t = torch.tensor([0, 2, 3])
    e = build_explainer("attribution_visualization", model, steps=5, attr_steps=2, seed=7)
    a = e.explain(x, t).extras
    again = e.explain(x, t).extras
    assert all(torch.equal(a[k], again[k]) for k in ("image", "mask"))
    alone = e.explain(x[1:2], t[1:2]).extras
    assert torch.allclose(alone["mask"][0], a["mask"][1], rtol=1e-4, atol=1e-6)
    assert torch.allclose(alone["image"][0], a["image"][1], rtol=1e-4, atol=1e-6)
    other = build_explainer("attribution_visualization", model, steps=5, attr_steps=2, seed=8)
    assert not torch.allclose(other.explain(x, t).extras["image"], a["image"])
