"""Model loading, preprocessing and the builtin model's accuracy on real images."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline.explainers.layers import resolve_layer
from pipeline.models import Preprocess, load_model, to_rgb_image, wrap_module


def test_builtin_model_loads_with_imagenet_labels(builtin):
    assert builtin.num_classes == 1000
    assert builtin.labels[281] == "tabby"
    assert builtin.preprocess.mean == (0.5, 0.5, 0.5)
    assert len(builtin.weights_hash) == 64
    assert not any(p.requires_grad for p in builtin.module.parameters())


def test_builtin_predicts_demo_photos(builtin, demo_images):
    x = builtin.preprocess(demo_images[:2])  # chelsea the cat, a cup of coffee
    _, idx = builtin.predict(x, k=5)
    assert {"tabby", "tiger cat", "Egyptian cat"} & {builtin.labels[i] for i in idx[0].tolist()}
    assert builtin.labels[int(idx[1, 0])] in ("espresso", "cup", "coffee mug")


@pytest.mark.realdata
def test_builtin_top1_on_imagenet_val_300(builtin, imagenet300):
    """79.7% measured with squash at 224 px (the TF-SAME-padded architecture); with the
    PyTorch-padded one or ImageNet mean/std it drops several points, so 0.77 catches both."""
    pre = Preprocess(**{**builtin.preprocess.__dict__, "policy": "squash"})
    correct = 0
    for i in range(0, len(imagenet300), 50):
        chunk = imagenet300[i : i + 50]
        x = pre([Image.open(it["path"]) for it in chunk])
        _, idx = builtin.predict(x)
        correct += sum(int(idx[j, 0]) == it["label_index"] for j, it in enumerate(chunk))
    top1 = correct / len(imagenet300)
    print(f"builtin efficientnet-lite0 top-1 on {len(imagenet300)} images: {top1:.3f}")
    assert top1 >= 0.77


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGB", (40, 30), (200, 10, 10)),
        lambda: Image.new("L", (40, 30), 200),
        lambda: Image.new("RGBA", (40, 30), (200, 10, 10, 255)),
        lambda: Image.new("CMYK", (40, 30), (0, 255, 255, 55)),
        lambda: Image.fromarray(np.full((30, 40), 200 * 257, dtype=np.uint16)),
        lambda: Image.new("P", (40, 30), 3),
        lambda: np.full((30, 40, 3), 200, dtype=np.uint8),
        lambda: np.full((30, 40), 200 * 257, dtype=np.uint16),
        lambda: np.full((3, 30, 40), 200 / 255, dtype=np.float32),
    ],
    ids=["RGB", "L", "RGBA", "CMYK", "I16", "P", "u8-array", "u16-array", "float-chw"],
)
def test_preprocess_accepts_every_mode(make):
    pre = Preprocess(size=16, mean=(0.0,) * 3, std=(1.0,) * 3)
    x = pre([make()])
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


def test_preprocess_values_and_transparency():
    pre = Preprocess(size=8, mean=(0.5,) * 3, std=(0.5,) * 3, policy="squash")
    x = pre([np.full((8, 8, 3), 255, dtype=np.uint8)])
    assert torch.allclose(x, torch.ones_like(x))  # white -> +1 with mean=std=0.5
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(to_rgb_image(transparent)).min() == 255  # composited on white


def test_resize_crop_geometry_maps_boxes():
    pre = Preprocess(size=224, policy="resize_crop")  # short side 256, centre crop 224
    g = pre.geometry(512, 256)  # -> resized 512x256, crop offsets (144, 16)
    assert (g.sx, g.sy, g.ox, g.oy) == (1.0, 1.0, 144.0, 16.0)
    assert g.box([0, 0, 100, 100]) is None  # cropped away entirely
    assert g.box([100, 0, 200, 100]) == [0.0, 0.0, 56.0, 84.0]  # clipped at the crop edge
    squash = Preprocess(size=100, policy="squash").geometry(200, 50)
    assert squash.box([0, 0, 199, 49]) == [0.0, 0.0, 99.0, 99.0]


def test_resize_crop_centre_pixel_matches_image(tmp_path):
    """A marker drawn where geometry says it lands is where the preprocessed image has it."""
    img = np.zeros((300, 500, 3), dtype=np.uint8)
    img[140:160, 240:260] = 255  # the centre
    pre = Preprocess(size=64, mean=(0.0,) * 3, std=(1.0,) * 3)
    x = pre([img])[0, 0]
    ys, xs = torch.nonzero(x > 0.5, as_tuple=True)
    g = pre.geometry(500, 300)
    box = g.box([240, 140, 259, 159])
    assert abs(float(xs.float().mean()) - (box[0] + box[2]) / 2) < 1
    assert abs(float(ys.float().mean()) - (box[1] + box[3]) / 2) < 1


def test_torchvision_with_state_dict_and_torchscript(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=7)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    m = load_model("torchvision:resnet18", weights=str(tmp_path / "w.pt"), num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = net.eval()(x)
    assert torch.allclose(m.logits(x), expected, atol=1e-4)
    assert m.labels == [f"class_{i}" for i in range(7)]
    torch.jit.save(torch.jit.trace(net, x), tmp_path / "net.ts")
    ts = load_model(f"torchscript:{tmp_path / 'net.ts'}")
    assert torch.allclose(ts.logits(x), expected, atol=1e-4)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def test_pickled_model_refused_without_trust(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(PermissionError, match="trust_pickle"):
        load_model(f"pickle:{path}")
    # a state-dict loader refuses a pickle with code too
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_model("torchvision:resnet18", weights=str(path))
    buf = io.BytesIO()
    torch.save(torchvision.models.resnet18(num_classes=3), buf)
    path.write_bytes(buf.getvalue())
    assert load_model(f"pickle:{path}", trust_pickle=True).num_classes == 3


def test_bad_model_uris():
    with pytest.raises(ValueError, match="no known scheme"):
        load_model("resnet18")
    with pytest.raises(ValueError, match="unknown torchvision"):
        load_model("torchvision:resnet_does_not_exist", random_init=True)
    with pytest.raises(ValueError, match="unknown builtin"):
        load_model("builtin:nope")


@pytest.mark.parametrize(
    "arch, expected",
    [("resnet18", "layer4"), ("vgg11", "features"), ("mobilenet_v3_small", "features")],
)
def test_default_cam_layer_for_torchvision(arch, expected):
    m = load_model(f"torchvision:{arch}", num_classes=5, random_init=True)
    assert resolve_layer(m)[0] == expected


def test_default_cam_layer_builtin_and_close_matches(builtin):
    assert resolve_layer(builtin)[0] == "bn2"
    with pytest.raises(ValueError, match=r"no layer 'blocks\.6\.9'.*close matches: blocks\.6"):
        resolve_layer(builtin, "blocks.6.9")


def _register(client, name: str, files: dict[str, bytes], tmp_path) -> str:
    exp = client.create_experiment(f"models-{name}")
    run = client.create_run(exp)
    folder = tmp_path / name
    folder.mkdir()
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    return version.version


def test_mlflow_registry_models_by_version_and_alias(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    client = mlflow.MlflowClient(uri)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    card = b"uri: torchvision:resnet18\nweights: weights.pt\nnum_classes: 3\n"
    version = _register(
        client, "tiny", {"salient_model.yaml": card, "weights.pt": buf.getvalue()}, tmp_path
    )
    client.set_registered_model_alias("tiny", "champion", version)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net.eval()(x)
    for model_uri in (f"models:/tiny/{version}", "models:/tiny@champion"):
        m = load_model(model_uri, registry_uri=uri)
        assert torch.allclose(m.logits(x), expected, atol=1e-4)
        assert m.id == model_uri
    _register(client, "pickled", {"MLmodel": b"flavors: {pytorch: {}}\n"}, tmp_path)
    with pytest.raises(PermissionError, match="pickle that runs code"):
        load_model("models:/pickled/1", registry_uri=uri)
    with pytest.raises(ValueError, match="could not be fetched"):
        load_model("models:/absent/1", registry_uri=uri)


def test_random_init_without_weights_is_the_same_in_every_process():
    """A job loads its model on the driver and in each actor: without a weights file they must
    still agree (and so must the weights hash recorded in MLflow)."""
    a = load_model("torchvision:resnet18", num_classes=3, random_init=True)
    torch.manual_seed(1234)  # the caller's RNG state must not matter
    b = load_model("torchvision:resnet18", num_classes=3, random_init=True)
    assert a.weights_hash == b.weights_hash


def test_weights_are_never_silently_random_or_ignored(tmp_path):
    with pytest.raises(ValueError, match="'torchvision:resnet18' has no weights.*random-weights"):
        load_model("torchvision:resnet18")
    with pytest.raises(ValueError, match="'timm:resnet18' has no weights"):
        load_model("timm:resnet18")
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="carries its own weights.*would be ignored"):
        load_model("builtin:efficientnet-lite0", weights=str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="not both"):
        load_model("torchvision:resnet18", weights=str(tmp_path / "w.pt"), random_init=True)
    with pytest.raises(ValueError, match="random_init applies to"):
        load_model("builtin:efficientnet-lite0", random_init=True)
    # a state dict of another architecture: one line naming the file, no torch traceback
    with pytest.raises(ValueError, match=r"do not fit 'torchvision:resnet34'") as err:
        load_model("torchvision:resnet34", weights=str(tmp_path / "w.pt"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"do not fit 'torchvision:resnet18': .*size mismatch"):
        load_model("torchvision:resnet18", weights=str(tmp_path / "w.pt"), num_classes=5)
    # the spec refuses the same, so `salient validate` does too
    from pipeline.spec import SpecError, parse_spec

    spec = {"source": {"uri": "x"}, "explainers": [{"name": "gradcam"}]}
    with pytest.raises(SpecError, match="model: model 'torchvision:resnet18' has no weights"):
        parse_spec({**spec, "model": {"uri": "torchvision:resnet18"}})
    assert parse_spec({**spec, "model": {"uri": "torchvision:resnet18", "random_init": True}})


# -- how a class is scored -------------------------------------------------------------------------
def test_the_models_score_function_reaches_targets_explainers_and_perturbed_forwards():
    """A multi-label model (score: sigmoid) is scored by the sigmoid everywhere a class score is
    used: predictions, "prob" explainer scores and the perturbed-forward core."""
    from conftest import TinyNet, random_images

    from pipeline.compute.perturbed_forward import perturbed_scores
    from pipeline.explainers import build_explainer

    torch.manual_seed(0)
    pre = Preprocess(size=32, policy="squash")
    net = TinyNet(10)
    model = wrap_module(net, pre, id="test:multi", device="cpu", score="sigmoid")
    plain = wrap_module(net, pre, id="test:multi", device="cpu")  # same weights, softmax
    x, t = random_images(3, 32, seed=2), torch.tensor([1, 4, 7])
    logits = model.logits(x)
    torch.testing.assert_close(model.class_scores(logits), logits.sigmoid())
    torch.testing.assert_close(plain.class_scores(logits), logits.softmax(-1))
    torch.testing.assert_close(
        wrap_module(net, pre, id="m", score="logit").class_scores(logits), logits
    )
    values, classes = model.predict(x, k=2)
    torch.testing.assert_close(values, logits.sigmoid().topk(2).values)
    # the perturbed-forward core: copy k is x scaled by (k+1)/2
    got = perturbed_scores(model, t, 2, lambda img, k: x[img] * (k[:, None, None, None] + 1) / 2)
    want = torch.stack([model.logits(x * s).sigmoid()[range(3), t] for s in (0.5, 1.0)], 1)
    torch.testing.assert_close(got, want)
    # saliency of sigmoid(z_t) is sigmoid'(z_t) = s (1 - s) times the saliency of the logit
    by_logit = build_explainer("saliency", model, score="logit")(x, t)
    by_prob = build_explainer("saliency", model, score="prob")(x, t)
    s = logits.sigmoid()[range(3), t]
    torch.testing.assert_close(
        by_prob, by_logit * (s * (1 - s))[:, None, None], rtol=1e-4, atol=1e-7
    )


# -- torch.export programs -------------------------------------------------------------------------
FAST = {
    "attribution_visualization": {"steps": 5, "attr_steps": 2},
    "rise": {"n_masks": 32},
    "lime": {"n_samples": 32},
    "integrated_gradients": {"steps": 8},
    "smoothgrad": {"n": 3},
    "glas": {"k": 3},
    "rglas": {"k": 3, "max_iter": 2},
    "extremal_perturbation": {"iterations": 3},
}


def test_an_exported_program_runs_every_method_it_offers_with_the_eager_maps(tmp_path):
    import yaml
    from conftest import TinyNet, random_images

    from pipeline.explainers import EXPLAINERS, build_explainer
    from pipeline.explainers.base import methods_for

    torch.manual_seed(0)
    net = TinyNet(10).eval()
    x, t = random_images(2, 32, seed=1), torch.tensor([1, 3])
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(net, (x,), dynamic_shapes={"x": {0: batch}})
    path = tmp_path / "tiny.pt2"
    torch.export.save(program, path)
    names = [f"thing {i}" for i in range(10)]
    card = {"size": 32, "resize": "squash", "mean": [0.5] * 3, "std": [0.5] * 3, "labels": names}
    (tmp_path / "tiny.pt2.card.yaml").write_text(yaml.safe_dump(card))
    exported = load_model(f"export:{path}", device="cpu")
    assert exported.labels == names
    assert (exported.preprocess.size, exported.preprocess.policy) == (32, "squash")
    assert exported.preprocess.mean == (0.5, 0.5, 0.5)
    eager = wrap_module(net, exported.preprocess, id="eager", device="cpu")
    offered = methods_for(exported)
    refused = sorted(set(EXPLAINERS) - set(offered))
    assert refused == []
    for name in offered:
        want = build_explainer(name, eager, **FAST.get(name, {}))(x, t)
        got = build_explainer(name, exported, **FAST.get(name, {}))(x, t)
        scale = float(want.abs().max()) + 1e-12
        assert float((got - want).abs().max()) <= 1e-4 * scale, name
    for name in refused:  # refused when built (so `salient validate` says it), naming what runs
        with pytest.raises(
            ValueError, match=f"{name} needs .*layer_types.*methods that run on it: attri"
        ):
            build_explainer(name, exported)


def _export_to(path, net, size: int):
    batch = torch.export.Dim("batch", min=1, max=4096)
    x = torch.zeros(2, 3, size, size)
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: batch},)), path)
    path.with_name(path.name + ".card.yaml").write_text(f"size: {size}\nresize: squash\n")


def test_an_exported_resnet_gets_its_layers_back_for_the_rule_methods(tmp_path):
    """BatchNorm folding, residual additions (aten.add_ in the program), shared ReLUs and a
    max pool: the rule methods give the eager ResNet's maps on the program."""
    from conftest import random_images

    from pipeline.explainers import build_explainer

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    for m in net.modules():  # non-trivial BatchNorm statistics, so folding them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    _export_to(tmp_path / "resnet.pt2", net, 64)
    exported = load_model(f"export:{tmp_path / 'resnet.pt2'}", device="cpu")
    assert type(exported.module.layer1.get_submodule("0").bn1) is torch.nn.BatchNorm2d
    eager = wrap_module(net, exported.preprocess, id="eager", device="cpu")
    x, t = random_images(2, 64, seed=3), torch.tensor([2, 7])
    for name in ("lrp", "deeplift", "guided_backprop", "deconvnet", "guided_gradcam", "cam"):
        want = build_explainer(name, eager)(x, t)
        got = build_explainer(name, exported)(x, t)
        scale = float(want.abs().max()) + 1e-12
        assert float((got - want).abs().max()) <= 1e-4 * scale, name


def test_an_exported_timm_net_gets_its_padded_convs_and_norm_activations_back(tmp_path):
    """timm's Conv2dSame (pads, then convolves) and BatchNormAct2d (norm, then activation) run
    several ops each; they come back as Conv2d / BatchNorm2d subclasses running the program's
    own graph, so LRP folds the norms and applies its conv rules as on the eager net (the
    builtin EfficientNet is built from these)."""
    from conftest import random_images
    from timm.layers import BatchNormAct2d, Conv2dSame

    from pipeline.explainers import build_explainer

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2, bias=False), BatchNormAct2d(8, act_layer=torch.nn.ReLU6),
        Conv2dSame(8, 16, 3, stride=2, bias=True), BatchNormAct2d(16),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5),
    ).eval()  # fmt: skip
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    _export_to(tmp_path / "timm.pt2", net, 33)
    exported = load_model(f"export:{tmp_path / 'timm.pt2'}", device="cpu")
    layers = [exported.module.get_submodule(str(i)) for i in range(4)]
    assert [type(m).__name__ for m in layers] == ["Conv2dSame", "BatchNormAct2d"] * 2
    assert isinstance(layers[0], torch.nn.Conv2d) and isinstance(layers[1], torch.nn.BatchNorm2d)
    eager = wrap_module(net, exported.preprocess, id="eager", device="cpu")
    x, t = random_images(2, 33, seed=4), torch.tensor([0, 3])
    for name in ("lrp", "deeplift", "guided_backprop", "gradcam"):
        want = build_explainer(name, eager)(x, t)
        got = build_explainer(name, exported)(x, t)
        scale = float(want.abs().max()) + 1e-12
        assert float((got - want).abs().max()) <= 1e-4 * scale, name


def test_an_exported_program_with_a_layer_it_cannot_rebuild_refuses_only_the_rule_methods(
    tmp_path, caplog
):
    """A torch.nn leaf Salient does not rebuild (PReLU) stays a graph op; LRP would then miss
    it, so the rule methods are refused and the log names the layer."""
    from conftest import random_images

    from pipeline.explainers import build_explainer

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.PReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(4, 3),
    ).eval()  # fmt: skip
    _export_to(tmp_path / "prelu.pt2", net, 16)
    with caplog.at_level("WARNING", logger="pipeline.models.loaders"):
        exported = load_model(f"export:{tmp_path / 'prelu.pt2'}", device="cpu")
    assert "torch.nn.modules.activation.PReLU" in caplog.text
    assert "layer_types" not in exported.capabilities
    assert type(exported.module.get_submodule("0")) is torch.nn.Conv2d  # the rest is restored
    with pytest.raises(ValueError, match="lrp needs layer_types"):
        build_explainer("lrp", exported)
    x = random_images(1, 16, seed=0)
    eager = wrap_module(net, exported.preprocess, id="eager", device="cpu")
    want = build_explainer("saliency", eager)(x, torch.tensor([1]))
    assert torch.allclose(build_explainer("saliency", exported)(x, torch.tensor([1])), want)


def test_an_exported_program_with_a_fixed_batch_or_a_bad_card_is_a_clear_error(tmp_path):
    from conftest import TinyNet, random_images

    net = TinyNet(10).eval()
    fixed = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(net, (random_images(1, 32),)), fixed)
    (tmp_path / "fixed.pt2.card.yaml").write_text("size: 32\n")
    with pytest.raises(ValueError, match="export it with a dynamic batch dimension"):
        load_model(f"export:{fixed}", device="cpu")
    (tmp_path / "fixed.pt2.card.yaml").write_text("size: 32\ncolour: blue\n")
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        load_model(f"export:{fixed}", device="cpu")
    (tmp_path / "junk.pt2").write_bytes(b"not a program")
    with pytest.raises(ValueError, match="is not a torch.export program"):
        load_model(f"export:{tmp_path / 'junk.pt2'}", device="cpu")
