"""Metrics: known answers computed here, streaming merges, nulls, and a real-data table."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from conftest import random_images
from torch import nn

from pipeline.metrics import METRICS, ExplainedBatch, build_metric
from pipeline.metrics.stability import psi
from pipeline.models import Preprocess, wrap_module

H = W = 32


def box_map(y, x, value=1.0):
    m = torch.zeros(1, H, W)
    m[0, y, x] = value
    return m


def pg(maps, anns, **params):
    return build_metric("pointing_game", **params).update(ExplainedBatch(maps, anns))


def test_pointing_game_peak_tolerance_and_null():
    ann = [{"boxes": [[2, 2, 8, 8]]}]
    assert pg(box_map(5, 5), ann) == [1.0]
    assert pg(box_map(5, 9), ann) == [0.0]  # one pixel right of the inclusive corner x1=8
    assert pg(box_map(5, 9), ann, tolerance=15) == [1.0]
    assert pg(box_map(5, 30), ann, tolerance=15) == [0.0]  # 22 px away
    m = build_metric("pointing_game")
    assert m.update(
        ExplainedBatch(torch.cat([box_map(5, 5), box_map(5, 5)]), [{"boxes": [[2, 2, 8, 8]]}, {}])
    ) == [1.0, None]
    assert m.compute() == 1.0 and m.n == 1  # the image without boxes is not a miss


def test_pointing_game_blob_variant_seed_000():
    """A one-pixel spike outside the box fools the plain maximum, not the biggest blob."""
    m = torch.zeros(1, H, W)
    m[0, 3:9, 3:9] = 0.97  # big plateau inside the box, >= 0.95 of the max
    m[0, 20, 25] = 1.0  # single spike outside
    ann = [{"boxes": [[2, 2, 8, 8]]}]
    assert pg(m, ann) == [0.0]
    assert pg(m, ann, variant="blob") == [1.0]


def test_pointing_game_small_only_small_boxes():
    small = build_metric("pointing_game_small")
    anns = [{"boxes": [[2, 2, 8, 8]]}, {"boxes": [[0, 0, 20, 20]]}]  # 49/1024 and 441/1024
    assert small.update(ExplainedBatch(torch.cat([box_map(5, 5)] * 2), anns)) == [1.0, None]


def test_energy_pointing_game_by_hand():
    m = torch.zeros(1, H, W)
    m[0, 2:9, 2:9] = 1.0  # 49 px inside the box
    m[0, 20:27, 20:27] = 1.0  # 49 px outside
    m[0, 0, 31] = -5.0  # negative evidence does not count
    e = build_metric("energy_pointing_game")
    assert e.update(ExplainedBatch(m, [{"boxes": [[2, 2, 8, 8]]}])) == [pytest.approx(0.5)]
    mask = np.zeros((H, W), dtype=bool)
    mask[2:9, 2:9] = True
    assert e.update(ExplainedBatch(m[:, :, :], [{"mask": mask}])) == [pytest.approx(0.5)]


def test_iou_curve_of_the_box_itself():
    m = torch.zeros(1, H, W)
    m[0, 2:9, 2:9] = 1.0
    metric = build_metric("iou_curve", thresholds=10)
    (value,) = metric.update(ExplainedBatch(m, [{"boxes": [[2, 2, 8, 8]]}]))
    # t = 0 keeps every pixel: IoU = 49/1024; t = 0.1 .. 0.9 keep exactly the box: IoU = 1
    assert value == pytest.approx((49 / 1024 + 9) / 10)


def test_localisation_error_95_percent_energy_box():
    m = torch.zeros(1, H, W)
    m[0, 4:13, 4:13] = 1.0  # the energy box is [4,4,12,12]
    le = build_metric("localisation_error")
    assert le.update(ExplainedBatch(m, [{"boxes": [[4, 4, 13, 13]]}])) == [0.0]  # IoU .81
    assert le.update(ExplainedBatch(m, [{"boxes": [[20, 20, 30, 30]]}])) == [1.0]
    assert le.update(ExplainedBatch(m, [{}])) == [None]


def test_landmark_distance():
    lm = build_metric("landmark_distance")
    assert lm.update(ExplainedBatch(box_map(10, 10), [{"landmarks": [[13, 14], [30, 0]]}])) == [
        pytest.approx(5.0)
    ]


class MeanOfChannel0(nn.Module):
    """logit_0 = alpha * mean of channel 0, logit_1 = 0: P(class 0) = sigmoid(alpha * mean)."""

    def __init__(self, alpha=6.0):
        super().__init__()
        self.alpha = alpha
        self.dummy = nn.Parameter(torch.zeros(1))  # a device to live on

    def forward(self, x):
        m = x[:, 0].flatten(1).mean(1) * self.alpha
        return torch.stack([m, torch.zeros_like(m)], 1)


def mean_model():
    pre = Preprocess(size=H, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), policy="squash")
    return wrap_module(MeanOfChannel0(), pre, id="test:mean", device="cpu", labels=["a", "b"])


def _sigmoid(v):
    return 1 / (1 + math.exp(-v))


@pytest.mark.parametrize("kind", ["deletion", "insertion"])
def test_deletion_insertion_auc_against_hand_computation(kind):
    model = mean_model()
    n = H * W
    values = torch.randperm(n, generator=torch.Generator().manual_seed(0)).float() / n
    x = values.view(1, 1, H, W).expand(1, 3, H, W).contiguous()
    saliency = x[:, 0] + 0.3 * torch.rand(1, H, W, generator=torch.Generator().manual_seed(1))
    steps = 16
    metric = build_metric(kind, steps=steps, substrate=0.0)  # black: 0 in this model space
    before = model.forward_passes
    (auc,) = metric.update(
        ExplainedBatch(saliency, [{}], model=model, x=x, targets=torch.tensor([0]))
    )
    order = np.argsort(-saliency.flatten().numpy(), kind="stable")
    v = values.numpy()
    scores = []
    for k in range(steps + 1):
        c = int(round(k * n / steps))
        touched = order[:c]
        visible = v.copy()
        if kind == "deletion":
            visible[touched] = 0.0
        else:
            visible = np.zeros_like(v)
            visible[touched] = v[touched]
        scores.append(_sigmoid(6.0 * visible.mean()))
    by_hand = sum((scores[i] + scores[i + 1]) / 2 for i in range(steps)) / steps
    assert auc == pytest.approx(by_hand, abs=1e-5)
    assert model.forward_passes - before == steps + 1
    assert metric.mean_curve() == pytest.approx(scores, abs=1e-5)


def test_average_drop_and_increase_in_confidence_eq_10_11(tiny):
    x = random_images(4, 32, seed=3)
    t = tiny.predict(x)[1][:, 0]
    maps = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = tiny.module(x).softmax(-1)[torch.arange(4), t]
        lo = maps.flatten(1).min(1).values[:, None, None]
        hi = maps.flatten(1).max(1).values[:, None, None]
        m = ((maps - lo) / (hi - lo))[:, None]
        black = tiny.preprocess.pixel_value(0.0)
        o = tiny.module(x * m + black * (1 - m)).softmax(-1)[torch.arange(4), t]
    drop = build_metric("average_drop")
    got = drop.update(ExplainedBatch(maps, [{}] * 4, model=tiny, x=x, targets=t))
    assert got == pytest.approx(((y - o).clamp_min(0) / y * 100).tolist(), rel=1e-4)
    inc = build_metric("increase_in_confidence")
    assert inc.update(ExplainedBatch(maps, [{}] * 4, model=tiny, x=x, targets=t)) == [
        100.0 if b else 0.0 for b in (o > y)
    ]
    assert drop.compute() == pytest.approx(float(((y - o).clamp_min(0) / y * 100).mean()), rel=1e-4)


def test_win_compares_two_explainers_image_by_image():
    tiny = mean_model()  # P(class 0) grows with the visible brightness of channel 0
    x = torch.ones(3, 3, H, W)
    t = torch.zeros(3, dtype=torch.long)
    good = torch.ones(3, 32, 32)  # keeps all but one pixel (a constant map would keep none)
    good[:, 31, 31] = 0.0
    bad = torch.zeros(3, 32, 32)
    bad[:, 0, 0] = 1.0  # keeps one pixel
    win = build_metric("win", against="other")
    assert (
        win.update(
            ExplainedBatch(
                good, [{}] * 3, model=tiny, x=x, targets=t, maps_by_explainer={"other": bad}
            )
        )
        == [100.0] * 3
    )
    assert (
        win.update(
            ExplainedBatch(
                good, [{}] * 3, model=tiny, x=x, targets=t, maps_by_explainer={"other": good}
            )
        )
        == [50.0] * 3
    )
    assert (
        win.update(
            ExplainedBatch(
                bad, [{}] * 3, model=tiny, x=x, targets=t, maps_by_explainer={"other": good}
            )
        )
        == [0.0] * 3
    )


def test_stability_psi_bounds_and_index(tiny):
    m = torch.rand(2, 32, 32)
    assert psi(m, m).tolist() == pytest.approx([1.0, 1.0])
    assert psi(torch.zeros(1, 8, 8), torch.ones(1, 8, 8)).tolist() == pytest.approx([0.0])
    from pipeline.explainers import build_explainer

    e = build_explainer("gradcam", tiny)
    x = random_images(2, 32, seed=5)
    t = tiny.predict(x)[1][:, 0]
    si = build_metric("stability_index", transforms=["hflip", "rotate"])
    values = si.update(ExplainedBatch(e(x, t), [{}] * 2, model=tiny, x=x, targets=t, explainer=e))
    assert all(0 <= v <= 1 for v in values)
    assert set(si.by_transform()) == {"hflip", "rotate"}


def _weights_hash(module):
    h = hashlib.sha256()
    for v in module.state_dict().values():
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_parameter_randomisation_gradcam_similarity_falls_and_original_untouched(tiny):
    from pipeline.explainers import build_explainer

    x = random_images(3, 32, seed=6)
    t = tiny.predict(x)[1][:, 0]
    before = _weights_hash(tiny.module)
    e = build_explainer("gradcam", tiny)
    pr = build_metric("parameter_randomisation", steps=4)
    pr.update(ExplainedBatch(e(x, t), [{}] * 3, model=tiny, x=x, targets=t, explainer=e))
    report = pr.report()
    curve = report["spearman_by_step"]
    assert max(curve) < 0.5 and report["mean_spearman"] < 0.5, curve  # 1.0 before any step
    assert report["verdict"] == "pass"
    assert _weights_hash(tiny.module) == before  # worked on a copy


@pytest.mark.parametrize(
    "name, params",
    [
        ("pointing_game", {}),
        ("deletion", {"steps": 8}),
        ("average_drop", {}),
        ("iou_curve", {}),
        ("parameter_randomisation", {"explainer": "gradcam", "steps": 2}),
    ],
)
def test_streaming_merge_of_halves_equals_whole(name, params, tiny):
    x = random_images(6, 32, seed=7)
    t = tiny.predict(x)[1][:, 0]
    maps = torch.rand(6, 32, 32, generator=torch.Generator().manual_seed(8))
    anns = [{"boxes": [[0, 0, 15, 15]]}, {}, {"boxes": [[10, 10, 30, 30]]}] * 2
    whole = build_metric(name, **params)
    whole.update(ExplainedBatch(maps, anns, model=tiny, x=x, targets=t))
    a, b = build_metric(name, **params), build_metric(name, **params)
    a.update(ExplainedBatch(maps[:3], anns[:3], model=tiny, x=x[:3], targets=t[:3]))
    b.update(ExplainedBatch(maps[3:], anns[3:], model=tiny, x=x[3:], targets=t[3:]))
    merged = type(whole).from_states([a.state(), b.state()], **params)
    assert merged.compute() == pytest.approx(whole.compute())
    assert merged.state().keys() == whole.state().keys()
    for key in ("curve", "spearman", "ssim"):  # curves merge too, not only means
        if key in whole.state():
            assert merged.state()[key] == pytest.approx(whole.state()[key])


def test_ssim_of_a_map_with_itself_and_its_negative():
    from pipeline.metrics.sanity import ssim

    a = torch.rand(2, 24, 24, generator=torch.Generator().manual_seed(1))
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert (ssim(a, 1 - a) < 0).all()  # anti-correlated structure
    assert (ssim(a, a.roll(1, -1)) < 0.9).all()


def test_every_metric_declares_direction_needs_and_cost():
    for name, cls in METRICS.items():
        assert isinstance(cls.higher_is_better, bool), name
        assert cls.needs in ("none", "boxes", "boxes|mask", "landmarks"), name


def test_unknown_metric_and_parameter():
    with pytest.raises(ValueError, match="did you mean deletion"):
        build_metric("deletio")
    with pytest.raises(ValueError, match="no parameter 'stepz'"):
        build_metric("deletion", stepz=3)


# The ranges and choices the constructors once checked by hand (and the new ones: each value
# here would have failed or meant nothing when the metric ran), now stated by their annotations.
REFUSED = [
    ("deletion", "steps", 0, "an integer >= 1"),
    ("insertion", "steps", -3, "an integer >= 1"),
    ("deletion", "substrate", "grey", "one of 'black', 'blur' or a number in [0, 1] or null"),
    ("insertion", "substrate", 1.5, "one of 'black', 'blur' or a number in [0, 1] or null"),
    ("deletion", "max_batch", 0, "an integer >= 1 or null"),
    ("pointing_game", "variant", "centroid", "one of 'max', 'blob'"),
    ("pointing_game", "tolerance", -1, "a number >= 0"),
    ("pointing_game_small", "max_area", 1.5, "a number in [0, 1]"),
    ("stability_index", "transforms", ["spin"], "a list, each item one of 'identity'"),
    ("iou_curve", "thresholds", 0, "an integer >= 1"),
    ("localisation_error", "energy", 1.2, "a number in [0, 1]"),
    ("localisation_error", "iou", -0.5, "a number in [0, 1]"),
    ("parameter_randomisation", "steps", 0, "an integer >= 1"),
    ("parameter_randomisation", "threshold", 2.0, "a number in [0, 1]"),
    ("average_drop", "max_batch", -1, "an integer >= 1 or null"),
    ("win", "max_batch", 0, "an integer >= 1 or null"),
]


@pytest.mark.parametrize(("name", "param", "value", "expected"), REFUSED)
def test_values_out_of_range_are_refused_by_spec_and_constructor(name, param, value, expected):
    import re

    from pipeline.metrics import metric_class
    from pipeline.spec import SpecError, parse_spec

    message = f"metric {name!r}: {param} must be {expected}"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        metric_class(name)(**{param: value})
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        build_metric(name, **{param: value})
    spec = {
        "source": {"uri": "x"},
        "explainers": [{"name": "gradcam"}],
        "metrics": [{"name": name, "params": {param: value}}],
    }
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert f"spec: metrics.0.params.{param}: {message}" in str(err.value)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("deletion", {"steps": 1, "substrate": "blur", "max_batch": 1}),
        ("insertion", {"substrate": 0.5}),
        ("insertion", {"substrate": 1}),
        ("pointing_game", {"tolerance": 0, "variant": "blob"}),
        ("pointing_game_small", {"max_area": 1.0, "tolerance": 15}),
        ("localisation_error", {"energy": 1, "iou": 0.0}),
        ("stability_index", {"transforms": ["identity", "hflip_rotate"]}),
        ("iou_curve", {"thresholds": 1}),
    ],
)
def test_values_at_the_edges_are_accepted(name, params):
    assert build_metric(name, **params).name == name


def test_win_still_needs_a_rival():
    """Not a range: the rival is required (and must be one of the job's explainers)."""
    with pytest.raises(ValueError, match="name the explainer to compare with"):
        build_metric("win")


def test_sanity_verdicts_of_seed_002_table_3_on_the_builtin(builtin, demo_images):
    """Gradients and Grad-CAM pass (their maps change with the weights), guided backprop fails
    (its maps survive randomising the top layers), as in seed 002 Table 3."""
    from pipeline.explainers import build_explainer

    x = builtin.preprocess(demo_images[:2])
    t = builtin.predict(x)[1][:, 0]
    verdicts = {}
    for name in ("saliency", "gradcam", "guided_backprop"):
        e = build_explainer(name, builtin)
        pr = build_metric("parameter_randomisation", steps=4)
        pr.update(ExplainedBatch(e(x, t), [{}] * 2, model=builtin, x=x, targets=t, explainer=e))
        verdicts[name] = pr.report()
    assert verdicts["saliency"]["verdict"] == "pass", verdicts["saliency"]
    assert verdicts["gradcam"]["verdict"] == "pass", verdicts["gradcam"]
    assert verdicts["guided_backprop"]["verdict"] == "fail", verdicts["guided_backprop"]
    # and the first step (classifier and top blocks) already separates them
    assert verdicts["guided_backprop"]["spearman_by_step"][0] > 0.8
    assert verdicts["gradcam"]["spearman_by_step"][0] < 0.6


@pytest.mark.realdata
@pytest.mark.slow
def test_real_imagenet_table_with_sanity_bounds(builtin, imagenet300):
    """Grad-CAM, saliency and GLAS with the builtin model on real ImageNet images with their
    official boxes. Subsets keep it inside CI time: 60 images for the localisation metrics
    (20 for GLAS at k=6, 73 forwards each) and 8 for deletion/insertion at 16 steps."""

    from conftest import imagenet_batch

    from pipeline.explainers import EXPLAINERS, build_explainer

    x, anns, t = imagenet_batch(imagenet300[:60], builtin.preprocess)
    # the random baseline: a uniformly random point hits the boxes with P = box area / image
    from pipeline.metrics.localisation import ground_truth

    random_pg = float(np.mean([float(ground_truth(a, 224, 224).float().mean()) for a in anns]))
    methods = {"gradcam": {}, "saliency": {}}
    if "glas" in EXPLAINERS:
        methods["glas"] = {"k": 6}
    table = {}
    for name, params in methods.items():
        e = build_explainer(name, builtin, **params)
        n = 20 if name == "glas" else 60
        maps = torch.cat([e(x[s : s + 10], t[s : s + 10]) for s in range(0, n, 10)])
        row = {}
        for metric in ("pointing_game", "energy_pointing_game"):
            m = build_metric(metric)
            m.update(ExplainedBatch(maps, anns[:n], model=builtin, x=x[:n], targets=t[:n]))
            row[metric] = m.compute()
        for metric in ("deletion", "insertion"):
            m = build_metric(metric, steps=16)
            m.update(ExplainedBatch(maps[:8], anns[:8], model=builtin, x=x[:8], targets=t[:8]))
            row[metric] = m.compute()
        table[name] = row
    print(f"\nrandom pointing baseline (mean box area fraction): {random_pg:.3f}")
    print(f"{'method':10s} {'PG':>6s} {'energyPG':>9s} {'deletion':>9s} {'insertion':>9s}")
    for name, r in table.items():
        print(
            f"{name:10s} {r['pointing_game']:6.3f} {r['energy_pointing_game']:9.3f} "
            f"{r['deletion']:9.3f} {r['insertion']:9.3f}"
        )
    g = table["gradcam"]
    assert g["pointing_game"] > random_pg + 0.15  # well above chance
    assert g["energy_pointing_game"] > random_pg
    assert g["insertion"] > g["deletion"]
    assert table["saliency"]["pointing_game"] > random_pg


def test_every_metric_states_the_direction_its_definition_gives():
    """Written out from the definitions (METHODS.md), not read from the classes: the report,
    the console and the regression gate all rank and gate by these."""
    from pipeline.metrics import METRICS

    higher_is_better = {
        "average_drop": False,  # a drop in confidence
        "increase_in_confidence": True,  # a share of images
        "win": True,  # 100 where this explainer keeps more confidence than its rival
        "deletion": False,  # the score falls fast when the important pixels go first
        "insertion": True,
        "pointing_game": True,
        "pointing_game_small": True,
        "energy_pointing_game": True,
        "iou_curve": True,
        "localisation_error": False,
        "landmark_distance": False,
        "parameter_randomisation": False,  # similarity to the randomised model's maps
        "stability_index": True,
        "road": True,  # the LeRF - MoRF gap: a faithful map loses the score first under MoRF
        "random_logit": False,  # similarity of the maps for two classes
        "infidelity": False,  # squared error between the map's and the model's predicted drop
        "max_sensitivity": False,  # how much the map moves under a small input change
        "relevance_rank_accuracy": True,  # share of the top-K pixels inside the object
    }
    assert {name: cls.higher_is_better for name, cls in METRICS.items()} == higher_is_better


def test_spearman_ranks_ties_by_their_mean_like_scipy_and_a_flat_map_scores_zero():
    """Rectified maps (Grad-CAM) are full of tied zeros: ranking them by position would make
    the zero region correlate with whatever sits at the same pixels of the other map."""
    from scipy.stats import spearmanr

    from pipeline.metrics.sanity import spearman

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (5, 64), generator=g).float()
    b = torch.randint(0, 4, (5, 64), generator=g).float()
    want = [spearmanr(x, y).statistic for x, y in zip(a.numpy(), b.numpy(), strict=True)]
    assert spearman(a, b).tolist() == pytest.approx(want, abs=1e-6)
    flat = torch.zeros(2, 64)
    structured = torch.arange(128.0).view(2, 64)
    assert spearman(flat, structured).tolist() == [0.0, 0.0]  # scipy: nan
