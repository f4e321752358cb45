"""Pointing game of extremal perturbation against Grad-CAM and GLAS on real ImageNet images
(the shared 300-image set with its official boxes), with 95% Wilson intervals.

    python benchmarks/pointing_extremal.py --seconds 600 --iterations 40

Images are taken in file order, correctly classified ones only (the target is the label), until
the time budget is spent; all three methods explain the same images. The extremal run uses
fewer iterations than the paper's 800, so its step size and lambda schedule are compressed to
fit: lr = 0.01 x 800 / iterations and lambda growth 1.0035^(800 / iterations) per iteration
(the same lambda range as 800 iterations). Pointing: the map's maximum inside a box of the
target (`pointing_game`, variant max, no tolerance). Not a test: a measurement for the README.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from pipeline.explainers import build_explainer
from pipeline.metrics import ExplainedBatch, build_metric
from pipeline.models import load_model
from pipeline.sources.annotations import read_imagenet, to_model_space
from pipeline.stats import wilson_interval

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-val-300"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--model", default="builtin:efficientnet-lite0")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=600.0, help="time budget for all methods")
    ap.add_argument("--max-images", type=int, default=300)
    ap.add_argument("--glas-k", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(args.data)
    if not (root / "annotations.json").exists():
        sys.exit(f"pointing_extremal: no data at {root} (needs annotations.json and images/)")
    items = json.loads((root / "annotations.json").read_text())
    model = load_model(args.model, device="cpu")
    pre = model.preprocess
    t_iter = args.iterations
    methods = {
        "extremal_perturbation": {
            "iterations": t_iter,
            "lr": 0.01 * 800 / t_iter,
            "rank_growth": 1.0035 ** (800 / t_iter),
        },
        "gradcam": {},
        "glas": {"k": args.glas_k},
    }
    explainers = {n: build_explainer(n, model, **p) for n, p in methods.items()}
    hits = {n: [] for n in methods}
    passes = {n: 0 for n in methods}
    spent = {n: 0.0 for n in methods}
    start = time.perf_counter()
    for it in items[: args.max_images]:
        if time.perf_counter() - start > args.seconds:
            break
        im = Image.open(root / it["file"])
        x = pre([im])
        if int(model.predict(x)[1][0, 0]) != it["label_index"]:
            continue
        ann = to_model_space(read_imagenet([it])[it["file"]], pre.geometry(*im.size))
        t = torch.tensor([it["label_index"]])
        for name, e in explainers.items():
            t0 = time.perf_counter()
            got = e.explain(x, t)
            spent[name] += time.perf_counter() - t0
            passes[name] += got.forward_passes
            pg = build_metric("pointing_game")
            pg.update(ExplainedBatch(got.maps, [ann], model=model, x=x, targets=t))
            value = pg.compute()
            if value is not None:
                hits[name].append(float(value))
        print(f"{len(hits['gradcam'])} images, {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for name, h in hits.items():
        n = len(h)
        k = sum(h)
        lo, hi = wilson_interval(k, n) or (float("nan"), float("nan"))
        rows.append(
            {
                "method": name,
                "params": methods[name],
                "n": n,
                "hits": k,
                "pointing_game": k / n if n else float("nan"),
                "wilson95": [lo, hi],
                "forwards_per_image": passes[name] / max(n, 1),
                "seconds_per_image": spent[name] / max(n, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
