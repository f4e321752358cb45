"""Salient's metrics against Quantus's on the same inputs: wall time, best of `--repeats`.

    python benchmarks/quantus_timing.py --data ../shared/data/imagenet-val-300 --images 32

Localisation (pointing game / RelevanceMassAccuracy / RelevanceRankAccuracy): the builtin model's
Grad-CAM maps of `--images` real images and the union-of-boxes mask, computed once and not timed;
each side scores the same maps. Parameter randomisation / MPRT: saliency on conftest's 4-layer
TinyNet at 32 px (the same four cumulative steps on both sides; Quantus with its own init), so
the time is the maps recomputed per step plus the similarity. Quantus is a test-only peer
(installed without its dependencies); tests/test_quantus.py checks the values agree.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pipeline.explainers import build_explainer  # noqa: E402
from pipeline.metrics import ExplainedBatch, build_metric  # noqa: E402
from pipeline.metrics.localisation import ground_truth  # noqa: E402
from pipeline.models import load_model, wrap_module  # noqa: E402
from pipeline.sources.annotations import read_imagenet, to_model_space  # noqa: E402


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    import quantus
    from conftest import tiny_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/imagenet-val-300")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(args.data)
    items = json.loads((root / "annotations.json").read_text())[: args.images]
    src = read_imagenet(items)
    model = load_model("builtin:efficientnet-lite0", device="cpu")
    pre = model.preprocess
    images = [Image.open(root / it["file"]) for it in items]
    x = pre(images)
    anns = [
        to_model_space(src[it["file"]], pre.geometry(*im.size))
        for it, im in zip(items, images, strict=True)
    ]
    t = torch.tensor([it["label_index"] for it in items])
    e = build_explainer("gradcam", model)
    maps = torch.cat([e(x[i : i + 8], t[i : i + 8]) for i in range(0, len(x), 8)]).detach()
    s = np.stack([ground_truth(a, *maps.shape[1:]).numpy() for a in anns])[:, None]
    xb, yb, ab = x.numpy(), t.numpy(), maps.numpy()

    rows = []
    for ours, theirs in (
        ("pointing_game", quantus.PointingGame),
        ("energy_pointing_game", quantus.RelevanceMassAccuracy),
        ("relevance_rank_accuracy", quantus.RelevanceRankAccuracy),
    ):
        t_ours, _ = best_of(
            lambda n=ours: build_metric(n).update(ExplainedBatch(maps, anns)), args.repeats
        )
        q = theirs(abs=False, normalise=False, disable_warnings=True)
        t_theirs, _ = best_of(
            lambda q=q: q(model=None, x_batch=xb, y_batch=yb, a_batch=ab, s_batch=s),
            args.repeats,
        )
        rows.append((ours, theirs.__name__, len(x), t_ours, t_theirs))

    tiny = tiny_model(size=32)
    tx = tiny.preprocess(images)
    tt = tiny.predict(tx)[1][:, 0]
    te = build_explainer("saliency", tiny)
    tmaps = te(tx, tt).detach()

    def explain(model, inputs, targets, **_):
        wrapped = wrap_module(model, tiny.preprocess, id="quantus:randomised", device="cpu")
        return build_explainer("saliency", wrapped)(
            torch.as_tensor(inputs), torch.as_tensor(targets)
        ).numpy()

    t_ours, _ = best_of(
        lambda: build_metric("parameter_randomisation", steps=4).update(
            ExplainedBatch(tmaps, model=tiny, x=tx, targets=tt, explainer=te)
        ),
        args.repeats,
    )
    mprt = quantus.MPRT(layer_order="top_down", abs=False, normalise=False, disable_warnings=True)
    t_theirs, _ = best_of(
        lambda: mprt(
            model=copy.deepcopy(tiny.module),
            x_batch=tx.numpy(),
            y_batch=tt.numpy(),
            a_batch=tmaps.numpy(),
            explain_func=explain,
        ),
        args.repeats,
    )
    rows.append(("parameter_randomisation", "MPRT", len(tx), t_ours, t_theirs))

    print(
        f"{'Salient metric':26s} {'Quantus':22s} {'images':>6s} {'Salient s':>10s} "
        f"{'Quantus s':>10s} {'Quantus/Salient':>16s}"
    )
    for ours, theirs, n, a, b in rows:
        print(f"{ours:26s} {theirs:22s} {n:6d} {a:10.4f} {b:10.4f} {b / a:16.1f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                [
                    {"salient": o, "quantus": q, "images": n, "salient_s": a, "quantus_s": b}
                    for o, q, n, a, b in rows
                ],
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
