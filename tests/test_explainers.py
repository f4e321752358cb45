"""White-box and CAM explainers: known answers, invariants, and agreement with peer libraries."""

from __future__ import annotations

import copy
import gc
import re

import pytest
import torch
from conftest import pearson, random_images, region_model, tiny_model

from pipeline.explainers import EXPLAINERS, build_explainer

FOUNDATION = [
    "saliency",
    "gradient_x_input",
    "integrated_gradients",
    "guided_backprop",
    "deconvnet",
    "smoothgrad",
    "cam",
    "gradcam",
    "gradcam_pp",
    "guided_gradcam",
    "scorecam",
    "fem",
]
FAST = {"integrated_gradients": {"steps": 16}, "smoothgrad": {"n": 6}}


def test_foundation_methods_registered():
    assert set(FOUNDATION) <= set(EXPLAINERS)


@pytest.mark.parametrize("name", FOUNDATION)
def test_mass_inside_known_region(name):
    """The class score depends only on a rectangle (rows 4-11, cols 12-27): every method must put
    most of its mass there. The rectangle is not square, so a transposed map fails."""
    y0, x0, y1, x1 = 4, 12, 12, 28
    m = region_model(region=(y0, x0, y1, x1))
    x = random_images(3, 32, seed=1)
    maps = build_explainer(name, m, **FAST.get(name, {}))(x, torch.tensor([0, 1, 3]))
    assert maps.shape == (3, 32, 32)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = True  # the 3x3 conv sees 1 px beyond the gate
    mass = maps.abs()
    frac = mass[:, inside].sum(1) / mass.flatten(1).sum(1)
    assert (frac > 0.9).all(), frac


@pytest.mark.parametrize("name", FOUNDATION)
def test_batch_invariance_and_determinism(name, tiny):
    """An image's map is the same alone and inside a batch of 8 (seeded methods included)."""
    x = random_images(8, 32, seed=2)
    t = torch.arange(8) % 10
    e = build_explainer(name, tiny, **FAST.get(name, {}))
    batch = e(x, t)
    alone = e(x[5:6], t[5:6])
    scale = batch[5].abs().max().clamp_min(1e-12)
    assert float((batch[5] - alone[0]).abs().max() / scale) < 1e-4
    assert torch.equal(e(x[5:6], t[5:6]), alone)  # same seed, same image -> same map
    if not e.signed:
        assert (batch >= 0).all()


def test_integrated_gradients_completeness(tiny):
    """sum of attributions = S_c(x) - S_c(black) within 1%."""
    x = random_images(4, 32, seed=3)
    t = torch.tensor([1, 2, 3, 4])
    ig = build_explainer("integrated_gradients", tiny, steps=300)
    got = ig.explain(x, t)
    attr = got.maps
    black = tiny.preprocess.pixel_value(0.0).expand_as(x)
    logits_x, logits_b = tiny.logits(x), tiny.logits(black)
    gap = logits_x.gather(1, t[:, None])[:, 0] - logits_b.gather(1, t[:, None])[:, 0]
    assert torch.allclose(attr.flatten(1).sum(1), gap, rtol=0.01, atol=1e-3 * gap.abs().max())
    assert got.forward_passes == 4 * 300 + 8  # m per image + Captum's delta check


@pytest.mark.parametrize("name", ["saliency", "guided_backprop", "integrated_gradients"])
def test_agreement_with_captum(name, tiny):
    from captum.attr import GuidedBackprop, IntegratedGradients, Saliency

    x = random_images(3, 32, seed=4)
    t = torch.tensor([0, 5, 9])
    net = tiny.module
    if name == "saliency":
        ref = Saliency(net).attribute(x.clone(), target=t, abs=True).amax(1)
        ours = build_explainer("saliency", tiny)(x, t)
    elif name == "guided_backprop":
        ref = GuidedBackprop(net).attribute(x.clone(), target=t).abs().amax(1)
        ours = build_explainer("guided_backprop", tiny)(x, t)
    else:
        base = tiny.preprocess.pixel_value(0.0).expand_as(x).contiguous()
        ref = (
            IntegratedGradients(net)
            .attribute(x.clone(), baselines=base, target=t, n_steps=32, method="riemann_right")
            .sum(1)
        )
        ours = build_explainer("integrated_gradients", tiny, steps=32)(x, t)
    for i in range(3):
        assert pearson(ours[i], ref[i].detach()) >= 0.99


def test_guided_backprop_differs_from_saliency_and_handles_reused_relus():
    """torchvision ResNet reuses one in-place ReLU per block: every call must be rectified."""
    import torchvision

    from pipeline.models import Preprocess, wrap_module

    torch.manual_seed(0)
    m = wrap_module(torchvision.models.resnet18(num_classes=4), Preprocess(size=64), id="rn18")
    x = random_images(2, 64, seed=5)
    t = torch.tensor([0, 1])
    guided = build_explainer("guided_backprop", m)(x, t)
    deconv = build_explainer("deconvnet", m)(x, t)
    sal = build_explainer("saliency", m)(x, t)
    assert pearson(guided[0], sal[0]) < 0.95 and pearson(guided[0], deconv[0]) < 0.95
    assert all(r.inplace for r in m.module.modules() if isinstance(r, torch.nn.ReLU))


def _pgc_target(score: str, t: int):
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputSoftmaxTarget,
        ClassifierOutputTarget,
    )

    return ClassifierOutputSoftmaxTarget(t) if score == "prob" else ClassifierOutputTarget(t)


@pytest.mark.parametrize("name", ["gradcam", "gradcam_pp", "scorecam"])
def test_agreement_with_pytorch_grad_cam(name, builtin, demo_images):
    """Same inputs, same layer: Pearson >= 0.99 with the `grad-cam` package. Score-CAM runs on a
    small CNN (the builtin's 1280 channels cost 1281 forwards per image in both libraries)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM

    cls = {"gradcam": GradCAM, "gradcam_pp": GradCAMPlusPlus, "scorecam": ScoreCAM}[name]
    if name == "scorecam":
        model = tiny_model(size=64)
        x = random_images(2, 64, seed=6)
        layer = "features"
    else:
        model = builtin
        x = builtin.preprocess(demo_images[:2])
        layer = "bn2"
    t = model.predict(x)[1][:, 0]
    ours = build_explainer(name, model)(x, t)
    # the peer backpropagates from the loss, so it needs weights that require grad
    peer_net = copy.deepcopy(model.module).requires_grad_(True)
    layer = dict(peer_net.named_modules())[layer]
    with cls(model=peer_net, target_layers=[layer]) as peer:
        if name == "scorecam":
            peer.batch_size = 64
        ref = peer(x, targets=[_pgc_target(ours_score(name), int(c)) for c in t])
    for i in range(2):
        assert pearson(ours[i], torch.from_numpy(ref[i])) >= 0.99


def ours_score(name: str) -> str:
    return EXPLAINERS[name].default_score


def test_scorecam_top_k_and_chunking(tiny):
    x = random_images(3, 32, seed=7)
    t = torch.tensor([1, 2, 3])
    full = build_explainer("scorecam", tiny, max_batch=7)
    got = full.explain(x, t)
    assert torch.allclose(got.maps, build_explainer("scorecam", tiny, max_batch=1000)(x, t))
    assert got.forward_passes == 3 * (32 + 1)
    topk = build_explainer("scorecam", tiny, top_k=4)
    assert topk.explain(x, t).forward_passes == 3 * (4 + 1)


def test_fem_is_class_agnostic_and_cam_matches_definition(tiny):
    x = random_images(2, 32, seed=8)
    fem = build_explainer("fem", tiny)
    assert torch.equal(fem(x, torch.tensor([0, 0])), fem(x, torch.tensor([3, 7])))
    # CAM by hand: FC weights of the target applied to the last conv features, upsampled
    with torch.no_grad():
        a = tiny.module.features(x)
        w = tiny.module.fc.weight[torch.tensor([2, 6])]
        by_hand = torch.einsum("bk,bkhw->bhw", w, a)
        up = torch.nn.functional.interpolate(by_hand[:, None], size=(32, 32), mode="bilinear")
    cam = build_explainer("cam", tiny)(x, torch.tensor([2, 6]))
    assert torch.allclose(cam, up[:, 0], atol=1e-5)


def _hook_count(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


@pytest.mark.parametrize("name", FOUNDATION)
def test_no_hooks_left_after_success_or_error(name):
    m = region_model()
    e = build_explainer(name, m, **FAST.get(name, {}))
    before = _hook_count(m.module)
    e(random_images(1, 32), torch.tensor([0]))
    assert _hook_count(m.module) == before
    with pytest.raises(RuntimeError):  # 48 px does not fit the 32 px gate: fails mid-forward
        e(random_images(1, 48), torch.tensor([0]))
    assert _hook_count(m.module) == before


def test_memory_does_not_grow_over_repeated_calls(tiny):
    x = random_images(2, 32)
    t = torch.tensor([1, 2])
    explainers = [build_explainer(n, tiny) for n in ("gradcam", "guided_backprop", "scorecam")]
    for e in explainers:
        e(x, t)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    start = live_tensors()
    for _ in range(100):
        for e in explainers:
            e(x, t)
    assert live_tensors() - start <= 5


@pytest.mark.parametrize(
    "x, t, match",
    [
        (torch.zeros(3, 32, 32), [0], r"\[B,3,H,W\]"),
        (torch.zeros(1, 1, 32, 32), [0], r"\[B,3,H,W\]"),
        (torch.full((1, 3, 32, 32), float("nan")), [0], "NaN"),
        (torch.zeros(1, 3, 32, 32), [10], "target 10 out of range"),
        (torch.zeros(1, 3, 32, 32), [-1], "target -1 out of range"),
        (torch.zeros(2, 3, 32, 32), [[0, 1], [1, 2]], "exactly one class per image"),
        (torch.zeros(1, 3, 32, 32), [0.5], "integer"),
    ],
)
def test_bad_input_names_the_problem(x, t, match, tiny):
    with pytest.raises(ValueError, match=match):
        build_explainer("gradcam", tiny)(x, torch.tensor(t))


def test_bad_explainer_names_and_params(tiny):
    with pytest.raises(ValueError, match="did you mean gradcam"):
        build_explainer("gradcamm", tiny)
    with pytest.raises(ValueError, match="no parameter 'stepz'"):
        build_explainer("integrated_gradients", tiny, stepz=3)
    with pytest.raises(ValueError, match="no layer 'featurez'"):
        build_explainer("gradcam", tiny, layer="featurez")


# Every range and choice the constructors once checked by hand, now stated by their annotations
# (pipeline/params.py): each value here is refused, with the same message from a spec and from
# Python, before the model is touched.
REFUSED = [
    ("glas", "mode", "both", "one of 'fusion', 'light', 'shadow'"),
    ("glas", "k", 0, "an integer >= 1"),
    ("glas", "k", 2.0, "an integer >= 1"),
    ("glas", "sigma_light", 0, "a finite number > 0"),
    ("glas", "sigma_shadow", float("inf"), "a finite number > 0"),
    ("glas", "sigma_spatial", float("nan"), "a finite number > 0"),
    ("glas", "sigma_unit", "px", "one of 'cells', 'pixels'"),
    ("glas", "distance", "manhattan", "one of 'squared', 'euclidean'"),
    ("glas", "gamma", -1e-9, "a number >= 0"),
    ("glas", "fill", 1.5, "a number in [0, 1]"),
    ("glas", "max_batch", 0, "an integer >= 1 or null"),
    ("rglas", "t1", 1.0, "a number in [0, 1)"),
    ("rglas", "t2", 0, "a number > 0"),
    ("rglas", "max_iter", 0, "an integer >= 1"),
    ("rglas", "k", 0, "an integer >= 1"),
    ("rise", "n_masks", -5, "an integer >= 1"),
    ("rise", "grid", 0, "an integer >= 1"),
    ("rise", "p", 0.0, "a number in (0, 1]"),
    ("rise", "fill", -0.1, "a number in [0, 1]"),
    ("rise", "max_batch", 0, "an integer >= 1 or null"),
    ("occlusion", "window", 0, "an integer >= 1 or null"),
    ("occlusion", "stride", 0, "an integer >= 1 or null"),
    ("occlusion", "fill", 1.5, "a number in [0, 1]"),
    ("occlusion", "max_batch", 0, "an integer >= 1 or null"),
    ("lime", "n_samples", 1, "an integer >= 2"),
    ("lime", "n_segments", 0, "an integer >= 1"),
    ("lime", "keep_prob", 1.0, "a number in (0, 1)"),
    ("lime", "keep_prob", 0.0, "a number in (0, 1)"),
    ("lime", "kernel_width", 0, "a number > 0"),
    ("lime", "compactness", -1.0, "a number > 0"),
    ("lime", "ridge", -1.0, "a number >= 0"),
    ("lime", "fill", 2, "a number in [0, 1]"),
    ("evet", "transforms", ["hflip", "spin"], "a list, each item one of 'identity', 'hflip'"),
    ("evet", "alpha", float("inf"), "a finite number >= 0"),
    ("evet", "alpha", -1.0, "a finite number >= 0"),
    ("evet", "gamma", 1.5, "a number in [0, 1]"),
    ("evet", "base_batch", 0, "an integer >= 1 or null"),
    ("evet", "max_batch", 0, "an integer >= 1 or null"),
    ("lrp", "composite", "epsilon", "one of 'epsilon_plus_flat', 'epsilon_plus'"),
    ("lrp", "rule", "alpha1_beta0", "one of 'epsilon', 'gamma', 'alpha_beta', 'zplus', 'flat'"),
    ("lrp", "epsilon", -1e-6, "a number >= 0"),
    ("lrp", "gamma", -0.25, "a number >= 0"),
    ("lrp", "beta", -1.0, "a number >= 0"),
    ("integrated_gradients", "steps", 0, "an integer >= 1"),
    ("smoothgrad", "n", 0, "an integer >= 1"),
    ("scorecam", "top_k", 0, "an integer >= 1 or null"),
    ("attribution_visualization", "steps", -1, "an integer >= 0"),
    ("attribution_visualization", "attr_steps", 0, "an integer >= 1"),
    ("attribution_visualization", "depth", 0, "an integer >= 1"),
    ("attribution_visualization", "beta", 1.0, "a number in (0, 1) or null"),
    ("gradcam", "score", "logits", "one of 'logit', 'prob' or null"),
    ("saliency", "score", "softmax", "one of 'logit', 'prob' or null"),
]


@pytest.mark.parametrize(("name", "param", "value", "expected"), REFUSED)
def test_values_out_of_range_are_refused_before_the_model_is_touched(name, param, value, expected):
    from pipeline.explainers import explainer_class
    from pipeline.spec import SpecError, parse_spec

    message = f"explainer {name!r}: {param} must be {expected}"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        explainer_class(name)(None, **{param: value})  # None: no model is needed to refuse
    spec = {"source": {"uri": "x"}, "explainers": [{"name": name, "params": {param: value}}]}
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert f"spec: explainers.0.params.{param}: {message}" in str(err.value)


# the edges of those ranges, and an int where a number belongs, are accepted as before
ACCEPTED = [
    ("glas", {"gamma": 0, "fill": 1, "sigma_light": 5, "k": 1, "mode": "shadow"}),
    ("glas", {"sigma_unit": "pixels", "distance": "euclidean", "max_batch": 1}),
    ("rglas", {"t1": 0.0, "t2": float("inf"), "max_iter": 1}),
    ("rise", {"p": 1.0, "fill": 0.0, "n_masks": 1, "grid": 1}),
    ("occlusion", {"window": 1, "stride": 1, "fill": 1.0}),
    ("lime", {"n_samples": 2, "ridge": 0, "kernel_width": float("inf"), "keep_prob": 0.01}),
    ("evet", {"gamma": 0, "alpha": 0, "transforms": ("identity", "hflip_shear")}),
    ("lrp", {"rule": "alpha_beta", "beta": 1, "epsilon": 0, "gamma": 0}),
    ("attribution_visualization", {"steps": 0, "beta": 0.5}),
    ("gradcam", {"score": "prob"}),
]


@pytest.mark.parametrize(("name", "params"), ACCEPTED)
def test_values_at_the_edges_are_accepted(name, params, tiny):
    assert build_explainer(name, tiny, **params).name == name


def test_transform_names_are_the_transforms():
    from typing import get_args

    from pipeline.compute.transforms import TRANSFORMS, TransformName

    assert set(get_args(TransformName)) == set(TRANSFORMS)


class _MemoryLimited(torch.nn.Module):
    """Behaves like a model on a full GPU: a forward of more than `limit` images runs out of
    memory (torch.OutOfMemoryError, as CUDA raises it)."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.failures = inner, limit, 0

    def forward(self, x):
        if x.shape[0] > self.limit:
            self.failures += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (batch {x.shape[0]})")
        return self.inner(x)


def test_out_of_memory_splits_the_chunk_and_the_cap_sticks(tiny):
    from pipeline.models import wrap_module

    limited = wrap_module(_MemoryLimited(tiny.module, 10), tiny.preprocess, id="limited")
    x = random_images(3, 32, seed=9)
    t = torch.tensor([1, 2, 3])
    expected = build_explainer("scorecam", tiny, max_batch=96)(x, t)
    got = build_explainer("scorecam", limited, max_batch=96)(x, t)
    assert torch.allclose(got, expected, atol=1e-6)
    assert limited.max_batch_cap is not None and limited.max_batch_cap <= 10
    failures = limited.module.failures
    rise = build_explainer("rise", limited, n_masks=64, max_batch=256)
    assert rise(x, t).shape == (3, 32, 32)
    assert limited.module.failures == failures  # started at the remembered cap
