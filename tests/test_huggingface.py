"""Hugging Face image classifiers (`hf:`) from save_pretrained folders, built here with random
weights (no hub access), and safetensors weights for torchvision: models."""

from __future__ import annotations

import pytest
import torch
from conftest import random_images

from pipeline.explainers import build_explainer
from pipeline.models import load_model

LABELS = {0: "cat", 1: "dog", 2: "cup"}


def _save(kind: str, folder) -> torch.nn.Module:
    """A tiny random model of one family and its image processor, saved with save_pretrained."""
    import transformers as tf

    torch.manual_seed(0)
    common = {"num_labels": 3, "id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    vit = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    vit |= {"intermediate_size": 64, "image_size": 32, "patch_size": 8}
    square = tf.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3)
    if kind == "vit":
        model, processor = tf.ViTForImageClassification(tf.ViTConfig(**vit, **common)), square
    elif kind == "deit":
        model, processor = tf.DeiTForImageClassification(tf.DeiTConfig(**vit, **common)), square
    elif kind == "swin":
        config = tf.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2]
        )
        config.update({"window_size": 4, **common})
        model, processor = tf.SwinForImageClassification(config), square
    elif kind == "convnext":
        config = tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **common)
        model = tf.ConvNextForImageClassification(config)
        processor = tf.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)
    else:  # resnet
        config = tf.ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8, **common)
        model = tf.ResNetForImageClassification(config)
        processor = tf.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


LAYER = {
    "vit": "model.vit.layers.1.layernorm_before",
    "deit": "model.deit.layers.1.layernorm_before",
    "swin": "model.swin.layernorm",
    "convnext": "",  # CNNs: the default search for the last spatial map
    "resnet": "",
}


@pytest.mark.parametrize("kind", list(LAYER))
def test_a_save_pretrained_folder_loads_with_labels_preprocessing_and_cam_layer(kind, tmp_path):
    model = _save(kind, tmp_path / kind)
    loaded = load_model(f"hf:{tmp_path / kind}", device="cpu")
    assert loaded.labels == ["cat", "dog", "cup"] and loaded.cam_layer == LAYER[kind]
    pre = loaded.preprocess
    if kind in ("vit", "deit", "swin"):
        assert (pre.size, pre.policy, pre.mean) == (32, "squash", (0.5, 0.5, 0.5))
    else:  # short side to 32 / 0.875, centre 32 x 32 crop
        assert (pre.size, pre.policy, pre.crop_pct) == (32, "resize_crop", 0.875)
    x = random_images(2, 32, seed=1)
    with torch.inference_mode():
        want = model(pixel_values=x).logits
    torch.testing.assert_close(loaded.logits(x), want, rtol=1e-4, atol=1e-5)
    maps = build_explainer("gradcam", loaded)(x, torch.tensor([0, 2]))
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all() and maps.abs().sum() > 0


def test_every_cam_method_and_gradients_run_on_a_small_swin(tmp_path):
    _save("swin", tmp_path / "swin")
    swin = load_model(f"hf:{tmp_path / 'swin'}", device="cpu")
    x, t = random_images(2, 32, seed=2), torch.tensor([0, 1])
    for name in ("gradcam", "gradcam_pp", "scorecam", "fem", "saliency", "integrated_gradients"):
        maps = build_explainer(name, swin)(x, t)
        assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all(), name
        assert maps.abs().sum() > 0, name


def test_an_hf_folder_on_the_s3_endpoint_loads(tmp_path, s3, s3_endpoint):
    _save("vit", tmp_path / "vit")
    s3.create_bucket(Bucket="hf-models")
    for f in (tmp_path / "vit").iterdir():
        s3.upload_file(str(f), "hf-models", f"vit/{f.name}")
    remote = load_model("hf:s3://hf-models/vit", device="cpu")
    local = load_model(f"hf:{tmp_path / 'vit'}", device="cpu")
    assert remote.weights_hash == local.weights_hash and remote.labels == local.labels


def test_pickled_or_incomplete_folders_are_refused_with_what_is_missing(tmp_path):
    _save("vit", tmp_path / "vit")
    (tmp_path / "vit" / "model.safetensors").rename(tmp_path / "vit" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors \(it has pytorch_model.bin"):
        load_model(f"hf:{tmp_path / 'vit'}", device="cpu")
    (tmp_path / "vit" / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        load_model(f"hf:{tmp_path / 'vit'}", device="cpu")
    with pytest.raises(ValueError, match="no such folder"):
        load_model(f"hf:{tmp_path / 'nothing'}", device="cpu")


def test_safetensors_weights_load_for_torchvision_models(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(3)
    net = torchvision.models.resnet18(num_classes=4).eval()
    save_file(net.state_dict(), tmp_path / "r18.safetensors")
    loaded = load_model(
        "torchvision:resnet18", weights=str(tmp_path / "r18.safetensors"), num_classes=4,
        device="cpu", size=32,
    )  # fmt: skip
    x = random_images(2, 32, seed=4)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.logits(x), net(x), rtol=1e-4, atol=1e-5)
    (tmp_path / "bad.safetensors").write_bytes(b"not tensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_model(
            "torchvision:resnet18", weights=str(tmp_path / "bad.safetensors"), num_classes=4,
            device="cpu",
        )  # fmt: skip
