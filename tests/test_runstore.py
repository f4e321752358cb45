"""The run store's digest: what a report is drawn from, merged across blocks without rows."""

from __future__ import annotations

import random

import pytest

from pipeline.runstore import Digest
from pipeline.runstore.digest import EXTREMES, SAMPLE, histogram_stats, sample_key


def _rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    heat, metrics, errors = [], [], []
    for i in range(n):
        image = f"img{i:04d}"
        heat.append(
            {
                "image_id": image,
                "explainer": "gradcam",
                "target": i % 3,
                "target_name": ["cat", "dog", "cup"][i % 3],
                "score": rng.random(),
                "source_uri": f"/d/{image}.png",
                "source_member": None,
                "predicted": i % 3,
                "label": None if i % 5 == 0 else (i % 3 if i % 4 else (i + 1) % 3),
            }
        )
        value = None if i % 7 == 0 else rng.uniform(-0.2, 1.2)
        metrics.append(
            {
                "image_id": image,
                "explainer": "gradcam",
                "target": i % 3,
                "metric": "d",
                "value": value,
            }
        )
        if i % 11 == 0:
            errors.append(
                {
                    "image_id": image,
                    "stage": "metric:d",
                    "error_type": "E",
                    "message": "m" * 400,
                    "fatal": i % 2 == 0,
                }
            )
    return heat, metrics, errors


def test_merged_block_digests_equal_the_digest_of_all_rows():
    heat, metrics, errors = _rows(300)
    whole = Digest.of_block("b", heat, metrics, errors)
    merged = Digest()
    # uneven blocks, merged in a shuffled order
    chunks = [(s, min(s + 37, 300)) for s in range(0, 300, 37)]
    random.Random(1).shuffle(chunks)
    for a, b in chunks:
        merged.merge(Digest.of_block("b", heat[a:b], metrics[a:b], errors[a:b]))
    assert merged.extremes == whole.extremes
    assert merged.sample == whole.sample
    assert merged.accuracy == whole.accuracy
    assert merged.error_counts == whole.error_counts and merged.first_errors == whole.first_errors
    for name, h in whole.classes["gradcam"]["d"].items():
        assert merged.classes["gradcam"]["d"][name] == pytest.approx(h)


def test_digest_known_answers():
    heat, metrics, errors = _rows(300)
    d = Digest.of_block("blk", heat, metrics, errors)
    values = {m["image_id"]: m["value"] for m in metrics if m["value"] is not None}
    by_value = sorted(values, key=lambda i: (values[i], i))
    ends = d.extremes["gradcam"]["d"]
    assert [r["image_id"] for r in ends["bottom"]] == by_value[:EXTREMES]
    assert [r["image_id"] for r in ends["top"]] == sorted(values, key=lambda i: (-values[i], i))[
        :EXTREMES
    ]
    assert ends["top"][0]["block_id"] == "blk" and ends["top"][0]["value"] == max(values.values())
    scores = {r["image_id"]: r["score"] for r in heat}
    assert d.extremes["gradcam"]["score"]["top"][0]["image_id"] == max(scores, key=scores.get)
    keys = sorted((sample_key(r["image_id"], r["target"]), r["image_id"]) for r in heat)
    assert [r["image_id"] for r in d.sample["gradcam"]] == [i for _, i in keys[:SAMPLE]]
    # per-class statistics against numbers computed here
    cats = [
        values[r["image_id"]] for r in heat if r["target_name"] == "cat" and r["image_id"] in values
    ]
    stats = histogram_stats(d.classes["gradcam"]["d"]["cat"])
    mean = sum(cats) / len(cats)
    assert stats["n"] == len(cats) and stats["mean"] == pytest.approx(mean)
    assert stats["std"] == pytest.approx((sum((v - mean) ** 2 for v in cats) / len(cats)) ** 0.5)
    assert stats["below"] == sum(v < 0 for v in cats) and stats["above"] == sum(v > 1 for v in cats)
    assert stats["bins"][0] == sum(0 <= v < 0.1 for v in cats)
    assert stats["bins"][9] == sum(0.9 <= v <= 1 for v in cats)
    assert sum(stats["bins"]) + stats["below"] + stats["above"] == len(cats)
    labelled = [r for r in heat if r["label"] is not None]
    assert d.accuracy == [len(labelled), sum(r["label"] == r["predicted"] for r in labelled)]
    assert d.error_counts == {"metric:d\tE": len(errors)}
    assert [e["fatal"] for e in d.first_errors] == sorted(
        (e["fatal"] for e in errors), reverse=True
    )  # fatal first
    assert {len(e["message"]) for e in d.first_errors} == {300}


def test_digest_round_trips_through_json():
    import json

    d = Digest.of_block("b", *_rows(40))
    assert Digest.from_json(json.loads(json.dumps(d.to_json()))) == d
    assert Digest.from_json(None) == Digest()
