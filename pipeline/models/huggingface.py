"""Hugging Face image classifiers from a `save_pretrained` folder on any fsspec URI (`hf:`).

The folder holds config.json, the weights in safetensors and preprocessor_config.json. Nothing
is fetched from the hub: the folder is copied to a local temporary directory and loaded with
`local_files_only`. Weights in pickle form (pytorch_model.bin) are refused: safetensors cannot
run code when loaded. Labels come from the config's id2label, preprocessing from the image
processor's config, and the CAM layer by family (the ViT/DeiT Grad-CAM layer, Swin's last norm;
convolutional families use the default search for the last spatial map).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import posixpath
import tempfile

import torch
from torch import nn

from ..storage import Storage
from .preprocess import Preprocess

NEEDED = ("config.json", "preprocessor_config.json")


class HFClassifier(nn.Module):
    """A transformers image classifier as a module that maps images to logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def load_hf(uri: str, storage: Storage) -> tuple[nn.Module, Preprocess, str, list[str], str]:
    """(module, preprocess, weights hash, labels, cam layer) of the folder at `uri`."""
    from transformers import AutoModelForImageClassification

    uri = uri.rstrip("/")
    fs, root = storage.filesystem(uri)
    try:
        names = {
            posixpath.basename(p)
            for p in storage.retry(lambda: fs.ls(root, detail=False), what=f"listing {uri}")
        }
    except FileNotFoundError:
        raise ValueError(f"hf:{uri}: no such folder") from None
    missing = [n for n in NEEDED if n not in names]
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    if missing or not weights:
        pickled = " (it has pytorch_model.bin: pickled weights are refused)" * (
            "pytorch_model.bin" in names
        )
        want = missing + ([] if weights else ["*.safetensors"])
        raise ValueError(f"hf:{uri} is not a save_pretrained folder: no {', '.join(want)}{pickled}")
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as local:
        for name in [*NEEDED, *weights, *(n for n in names if n.endswith(".index.json"))]:
            data = storage.read_bytes(f"{uri}/{name}")
            if name.endswith(".safetensors"):
                digest.update(data)
            with open(os.path.join(local, name), "wb") as f:
                f.write(data)
        config = json.loads(pathlib.Path(local, "config.json").read_text())
        processor = json.loads(pathlib.Path(local, "preprocessor_config.json").read_text())
        try:
            model = AutoModelForImageClassification.from_pretrained(
                local, local_files_only=True, use_safetensors=True
            )
        except Exception as e:
            raise ValueError(f"hf:{uri}: transformers cannot load it: {e}") from None
    module = HFClassifier(model.eval())
    id2label = config.get("id2label") or {}
    labels = [str(id2label.get(str(i), f"class_{i}")) for i in range(model.config.num_labels)]
    return module, preprocess_of(processor, uri), digest.hexdigest(), labels, cam_layer(module)


def preprocess_of(processor: dict, uri: str) -> Preprocess:
    """The image processor's resize and normalisation as a Preprocess.

    size {height, width}: a plain resize to that size (ViT, DeiT, Swin: squash).
    size {shortest_edge: s} with crop_pct (ConvNeXt, ResNet): below 384 px the short side goes
    to s / crop_pct and the centre s x s is cropped (resize_crop); from 384 px up, a plain resize.
    size {shortest_edge} with crop_size {height}: short side to shortest_edge, centre crop.
    """
    size = processor.get("size") or {}
    mean = tuple(float(v) for v in processor.get("image_mean", Preprocess.mean))
    std = tuple(float(v) for v in processor.get("image_std", Preprocess.std))
    crop = processor.get("crop_size") or {}
    if "height" in size and "width" in size:
        if size["height"] != size["width"]:
            raise ValueError(f"hf:{uri}: non-square input {size} is not supported")
        return Preprocess(size=int(size["height"]), mean=mean, std=std, policy="squash")
    if "shortest_edge" in size and processor.get("do_center_crop") and crop.get("height"):
        side = int(crop["height"])
        pct = side / int(size["shortest_edge"])
        return Preprocess(size=side, mean=mean, std=std, policy="resize_crop", crop_pct=pct)
    if "shortest_edge" in size:
        side = int(size["shortest_edge"])
        if side >= 384 or "crop_pct" not in processor:
            return Preprocess(size=side, mean=mean, std=std, policy="squash")
        pct = float(processor["crop_pct"])
        return Preprocess(size=side, mean=mean, std=std, policy="resize_crop", crop_pct=pct)
    raise ValueError(f"hf:{uri}: preprocessor_config.json has no size this loader understands")


def cam_layer(module: HFClassifier) -> str:
    """The family's usual CAM layer; "" leaves it to the default search (CNNs)."""
    names = [n for n, _ in module.named_modules()]
    if "model.swin.layernorm" in names:  # Swin: the last stage's tokens, normalised
        return "model.swin.layernorm"
    before = [n for n in names if n.endswith("layernorm_before")]  # ViT, DeiT blocks
    return before[-1] if before else ""
