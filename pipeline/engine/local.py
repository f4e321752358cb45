"""The single-machine path: explain a handful of images in this process and write files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..explainers import build_explainer
from ..models import load_model
from ..report.overlay import overlay
from ..sources.decode import decode_image
from ..storage import read_bytes


def load_image_uris(uris: list[str]) -> list:
    images = []
    for uri in uris:
        try:
            data = read_bytes(uri)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"image not found: {uri}") from e
        images.append(decode_image(data, uri))
    return images


def resolve_target(target: str | None, labels: list[str]) -> int | None:
    """A class index or an exact class name -> index; None means 'the predicted class'."""
    if target is None:
        return None
    if target.lstrip("-").isdigit():
        idx = int(target)
        if not 0 <= idx < len(labels):
            raise ValueError(f"target {idx} out of range for a model with {len(labels)} classes")
        return idx
    if target in labels:
        return labels.index(target)
    raise ValueError(f"target {target!r} is neither a class index nor a class name of the model")


def explain_images(
    images: list,
    names: list[str],
    methods: list[str],
    out: Path,
    *,
    model_uri: str = "builtin:efficientnet-lite0",
    weights: str | None = None,
    target: str | None = None,
    params: dict[str, dict] | None = None,
    device: str | None = None,
    trust_pickle: bool = False,
) -> list[dict]:
    """Predict, explain with each method, write `<name>.<method>.png` and `.npy` under `out`."""
    model = load_model(model_uri, weights=weights, device=device, trust_pickle=trust_pickle)
    params = params or {}
    explainers = {m: build_explainer(m, model, **params.get(m, {})) for m in methods}
    out.mkdir(parents=True, exist_ok=True)
    shown = [model.preprocess.resize(im) for im in images]
    x = model.preprocess(images).to(model.device)
    probs, classes = model.predict(x)
    fixed = resolve_target(target, model.labels)
    targets = classes[:, 0] if fixed is None else torch.full_like(classes[:, 0], fixed)
    rows = []
    for method, explainer in explainers.items():
        t0 = time.perf_counter()
        maps = explainer(x, targets).cpu()
        seconds = (time.perf_counter() - t0) / len(images)
        for i, name in enumerate(names):
            png, npy = out / f"{name}.{method}.png", out / f"{name}.{method}.npy"
            np.save(npy, maps[i].numpy())
            overlay(shown[i], maps[i], signed=explainer.signed).save(png)
            rows.append(
                {
                    "image": name,
                    "predicted": int(classes[i, 0]),
                    "predicted_name": model.labels[int(classes[i, 0])],
                    "probability": float(probs[i, 0]),
                    "target": int(targets[i]),
                    "target_name": model.labels[int(targets[i])],
                    "method": method,
                    "forward_passes": explainer.last_forward_passes // len(images),
                    "seconds": seconds,
                    "overlay": str(png),
                    "map": str(npy),
                }
            )
    return rows
