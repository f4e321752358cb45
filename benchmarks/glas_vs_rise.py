"""GLAS (k=15, the paper's ImageNet setting) against RISE (N=4000) on real ImageNet images:
pointing game (seed 000's 0.95-of-max blob centroid) and forward passes per image.

    python benchmarks/glas_vs_rise.py --data ../shared/data/imagenet-val-300 --images 16

Prints one line per method; the target is GLAS's pointing game >= RISE's with at most 1/8 of its
forward passes. On a 2-core CPU, RISE costs ~80 s per image: use a small --images there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from pipeline.explainers import build_explainer
from pipeline.metrics import ExplainedBatch, build_metric
from pipeline.models import load_model
from pipeline.sources.annotations import read_imagenet, to_model_space


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/imagenet-val-300")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--model", default="builtin:efficientnet-lite0")
    ap.add_argument("--device", default=None)
    ap.add_argument("--rise-masks", type=int, default=4000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(args.data)
    items = json.loads((root / "annotations.json").read_text())
    model = load_model(args.model, device=args.device)
    pre = model.preprocess
    chosen = []
    for it in items:  # correctly classified images, in file order
        im = Image.open(root / it["file"])
        x = pre([im]).to(model.device)
        if int(model.predict(x)[1][0, 0]) == it["label_index"]:
            ann = to_model_space(read_imagenet([it])[it["file"]], pre.geometry(*im.size))
            chosen.append((x, it["label_index"], ann))
        if len(chosen) == args.images:
            break
    x = torch.cat([c[0] for c in chosen])
    t = torch.tensor([c[1] for c in chosen], device=model.device)
    anns = [c[2] for c in chosen]
    rows = []
    for name, params in (
        ("glas", {"k": 15}),
        ("rise", {"n_masks": args.rise_masks}),
        ("gradcam", {}),
    ):
        e = build_explainer(name, model, **params)
        t0 = time.perf_counter()
        explained = [e.explain(x[i : i + 1], t[i : i + 1]) for i in range(len(x))]
        seconds = (time.perf_counter() - t0) / len(x)
        maps = torch.cat([r.maps for r in explained])
        passes = sum(r.forward_passes for r in explained) / len(x)
        pg = build_metric("pointing_game", variant="blob")
        pg.update(ExplainedBatch(maps, anns, model=model, x=x, targets=t))
        rows.append(
            {
                "method": name,
                "params": params,
                "images": len(x),
                "pointing_game": pg.compute(),
                "passes_per_image": passes,
                "seconds_per_image": seconds,
                "device": str(model.device),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
