"""Salient's metrics against Quantus 0.6.0 (a test-only peer) on the same maps and masks.

Localisation, on 8 real ImageNet validation images with their official boxes, the builtin
EfficientNet-Lite0 and three explainers (Grad-CAM and saliency, both non-negative, and
gradient x input, signed). Quantus is given our maps as `a_batch` and, as `s_batch`, the same
binary mask Salient scores against (`localisation.ground_truth`: the union of the boxes), with
`abs=False, normalise=False` so that it sees the raw map:

- pointing_game == quantus.PointingGame: identical per image wherever the maximum is one pixel.
  Quantus counts a hit when ANY pixel tied at the maximum lies in the mask, Salient looks at the
  first maximum in raster order, so on a tied maximum (Grad-CAM's upsampled plateaus: 2 of the 8
  images) Quantus can only score higher, and that is all that is checked there.
- energy_pointing_game == quantus.RelevanceMassAccuracy on the positive part of the map:
  Salient counts only positive evidence, Quantus sums the raw map (for a signed map its "share"
  can exceed 1 or go negative). Identical for the non-negative maps as they are; for the signed
  map Quantus agrees once it is given max(map, 0), and disagrees on the raw map.
- relevance_rank_accuracy == quantus.RelevanceRankAccuracy: identical wherever the K-th highest
  value is not tied. At a tie Quantus takes whatever order numpy's (unstable) argsort gives,
  Salient the expected share under a random order of the ties; there the test checks Salient's
  value is the mean of the lowest and highest share any order could give and Quantus's lies
  between them.

Parameter randomisation (parameter_randomisation vs quantus.MPRT) runs on the 4-layer TinyNet of
conftest (real images squashed to 32 px), not the builtin: Quantus randomises one layer per step,
so on the builtin it would recompute the maps once per parameterised module (99 of them), far
beyond this file's time. On TinyNet Salient's `steps=4` cascade and Quantus's `top_down` order are
the same four cumulative steps (fc, conv3, conv2, conv1). The differences that remain:

- weights: Quantus calls each module's `reset_parameters()` (PyTorch's default init, global seed
  reset before each layer), Salient draws its own (`sanity._reinit`, one seeded generator). The
  exact test hands Quantus a copy of the model whose `reset_parameters` are Salient's draws from
  the same generator, so both randomise to identical weights; a second test uses Quantus's own
  init and compares only the trend.
- similarity: Quantus's default is the signed Spearman rho of scipy (tied values get their mean
  rank), Salient takes |rho| with ties broken by position, on [0,1]-normalised maps (a monotone
  map, so the same ranks). The per-image value is the mean |rho| over the steps. Identical for
  saliency maps, which have no ties; Grad-CAM maps (ReLU zeros, and all-zero maps once the
  classifier is random, where scipy's rho is NaN) do not compare and are not tested here.
- Quantus's `return_average_correlation` averages the "original" entry (the maps against
  themselves, 1.0) in with the layers (it skips a key named "orig"), so the per-layer scores are
  compared instead.
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch

from pipeline.metrics import ExplainedBatch, build_metric
from pipeline.metrics.localisation import ground_truth

quantus = pytest.importorskip("quantus")

N_IMAGES = 8
EXPLAINERS = ("gradcam", "saliency", "gradient_x_input")
# float32 sums in a different order (torch on the masked pixels, numpy over the product)
ENERGY_REL = 1e-5


@pytest.fixture(scope="module")
def real(builtin, imagenet300):
    """x, targets, annotations, the Quantus mask and every explainer's maps, computed once."""

    from conftest import imagenet_batch

    from pipeline.explainers import build_explainer

    x, anns, t = imagenet_batch(imagenet300[:N_IMAGES], builtin.preprocess)
    maps = {name: build_explainer(name, builtin)(x, t).detach() for name in EXPLAINERS}
    h, w = x.shape[-2:]
    s = np.stack([ground_truth(a, h, w).numpy() for a in anns])[:, None]  # [B,1,H,W]
    return {"x": x, "t": t, "anns": anns, "s": s, "maps": maps}


def ours(metric: str, maps: torch.Tensor, anns: list[dict]) -> np.ndarray:
    return np.asarray(build_metric(metric).update(ExplainedBatch(maps, anns)), dtype=float)


def theirs(cls, real, a_batch) -> np.ndarray:
    metric = cls(abs=False, normalise=False, disable_warnings=True)
    out = metric(
        model=None,
        x_batch=real["x"].numpy(),
        y_batch=real["t"].numpy(),
        a_batch=np.asarray(a_batch),
        s_batch=real["s"],
    )
    return np.asarray(out, dtype=float)


@pytest.mark.realdata
@pytest.mark.slow  # the builtin's maps of 3 explainers, shared by the 9 tests
@pytest.mark.parametrize("explainer", EXPLAINERS)
def test_pointing_game_is_quantus_pointing_game(real, explainer):
    maps = real["maps"][explainer]
    mine = ours("pointing_game", maps, real["anns"])
    ref = theirs(quantus.PointingGame, real, maps.numpy())
    flat = maps.flatten(1)
    untied = (flat == flat.max(1, keepdim=True).values).sum(1) == 1
    assert int(untied.sum()) >= N_IMAGES // 2, "too many tied maxima to compare"
    assert mine[untied.numpy()].tolist() == ref[untied.numpy()].tolist()
    assert (ref >= mine).all()  # tied: any maximum inside (Quantus) vs the first one (Salient)
    assert set(mine.tolist()) <= {0.0, 1.0}


@pytest.mark.realdata
@pytest.mark.slow  # the builtin's maps of 3 explainers, shared by the 9 tests
@pytest.mark.parametrize("explainer", EXPLAINERS)
def test_energy_pointing_game_is_relevance_mass_accuracy_of_the_positive_part(real, explainer):
    maps = real["maps"][explainer]
    mine = ours("energy_pointing_game", maps, real["anns"])
    ref = theirs(quantus.RelevanceMassAccuracy, real, maps.clamp_min(0).numpy())
    assert mine == pytest.approx(ref, rel=ENERGY_REL)
    raw = theirs(quantus.RelevanceMassAccuracy, real, maps.numpy())
    if bool((maps < 0).any()):  # a signed map: Quantus's share of the raw sum is another number
        assert not np.allclose(mine, raw, rtol=1e-2)
        assert ((raw > 1) | (raw < 0)).any()  # not a share at all
    else:  # non-negative: the positive part is the map itself
        assert mine == pytest.approx(raw, rel=ENERGY_REL)


@pytest.mark.realdata
@pytest.mark.slow  # the builtin's maps of 3 explainers, shared by the 9 tests
@pytest.mark.parametrize("explainer", EXPLAINERS)
def test_relevance_rank_accuracy_is_quantus_relevance_rank_accuracy(real, explainer):
    maps = real["maps"][explainer]
    mine = ours("relevance_rank_accuracy", maps, real["anns"])
    ref = theirs(quantus.RelevanceRankAccuracy, real, maps.numpy())
    untied = 0
    for i, (m, gt) in enumerate(zip(maps.flatten(1).double(), real["s"], strict=True)):
        inside = torch.as_tensor(gt.flatten())
        k = int(inside.sum())
        kth = torch.topk(m, k).values[-1]
        above, tied = m > kth, m == kth
        if int(tied.sum()) == 1:
            untied += 1
            assert mine[i] == ref[i], (i, mine[i], ref[i])  # hits / K, both exact
            continue
        # a tie at the K-th value: every order of the ties gives a share in [lo, hi]
        places, tied_in = k - int(above.sum()), int((tied & inside).sum())
        tied_out = int(tied.sum()) - tied_in
        base = int((above & inside).sum())
        lo = (base + max(0, places - tied_out)) / k
        hi = (base + min(places, tied_in)) / k
        assert lo - 1e-12 <= ref[i] <= hi + 1e-12
        assert lo - 1e-12 <= mine[i] <= hi + 1e-12
    assert untied >= N_IMAGES // 2, "too many ties at the K-th value to compare"


# -- parameter randomisation on TinyNet -------------------------------------------------------
S = 32


@pytest.fixture(scope="module")
def tiny_real(imagenet300):
    """TinyNet (seeded, 4 parameterised layers) and 8 real images squashed to 32 px."""
    from conftest import tiny_model
    from PIL import Image

    model = tiny_model(size=S)
    x = model.preprocess([Image.open(it["path"]) for it in imagenet300[:N_IMAGES]])
    t = model.predict(x)[1][:, 0]
    return model, x, t


def quantus_explain(name: str, preprocess):
    """Quantus's explain_func: wraps the (randomised) module it is handed as Salient would."""
    from pipeline.explainers import build_explainer
    from pipeline.models import wrap_module

    def explain(model, inputs, targets, **_):
        wrapped = wrap_module(model, preprocess, id="quantus:randomised", device="cpu")
        x, t = torch.as_tensor(inputs), torch.as_tensor(targets)
        return build_explainer(name, wrapped)(x, t).detach().numpy()

    return explain


def run_mprt(model, x, t, maps, module, name="saliency") -> dict[str, list[float]]:
    mprt = quantus.MPRT(layer_order="top_down", abs=False, normalise=False, disable_warnings=True)
    return mprt(
        model=module,
        x_batch=x.numpy(),
        y_batch=t.numpy(),
        a_batch=maps.numpy(),
        explain_func=quantus_explain(name, model.preprocess),
    )


def salient_pr(model, x, t, explainer):
    pr = build_metric("parameter_randomisation", steps=4, seed=0)
    values = pr.update(
        ExplainedBatch(explainer(x, t), model=model, x=x, targets=t, explainer=explainer)
    )
    return np.asarray(values), np.asarray(pr.report()["spearman_by_step"])


@pytest.mark.realdata
def test_parameter_randomisation_is_mprt_with_the_same_draws(tiny_real):
    from pipeline.explainers import build_explainer
    from pipeline.metrics.sanity import _reinit, cascade_groups

    model, x, t = tiny_real
    e = build_explainer("saliency", model)
    maps = e(x, t).detach()
    assert all(len(torch.unique(m)) == m.numel() for m in maps)  # no ties: the ranks agree
    mine, mine_by_step = salient_pr(model, x, t, e)

    # Quantus randomises, top-down, every module with reset_parameters: on TinyNet exactly
    # Salient's four parameterised layers, in the same order
    layers = [m for m in model.module.modules() if hasattr(m, "reset_parameters")][::-1]
    assert [g[-1] for g in cascade_groups(model.module, 4)] == layers

    gen = torch.Generator().manual_seed(0)  # Salient's generator, drawn in the same order

    def salient_draws(self):
        _reinit(self, gen)

    module = copy.deepcopy(model.module)
    for m in module.modules():
        if hasattr(m, "reset_parameters"):  # bound: deepcopy rebinds it to Quantus's copy
            m.reset_parameters = types.MethodType(salient_draws, m)
    scores = run_mprt(model, x, t, maps, module)
    assert list(scores) == ["original", "fc", "features.6", "features.3", "features.0"]
    assert scores["original"] == pytest.approx([1.0] * N_IMAGES)
    by_layer = np.abs(np.array([scores[k] for k in list(scores)[1:]]))  # [layer, image]
    assert mine == pytest.approx(by_layer.mean(0), abs=1e-5)
    assert mine_by_step == pytest.approx(by_layer.mean(1), abs=1e-5)


@pytest.mark.realdata
def test_parameter_randomisation_and_mprt_with_its_own_init_fall_alike(tiny_real):
    """Different random weights (PyTorch's default init vs Salient's): the same trend only.
    Both cascades end near zero similarity once every layer is random, well below the first
    step; the values themselves are not compared."""
    from pipeline.explainers import build_explainer

    model, x, t = tiny_real
    e = build_explainer("saliency", model)
    maps = e(x, t).detach()
    _, mine_by_step = salient_pr(model, x, t, e)
    scores = run_mprt(model, x, t, maps, copy.deepcopy(model.module))
    theirs_by_step = np.abs(np.array([scores[k] for k in list(scores)[1:]])).mean(1)
    for curve in (mine_by_step, theirs_by_step):
        assert curve[-1] < 0.15
        assert curve[0] > curve[-1] + 0.2
