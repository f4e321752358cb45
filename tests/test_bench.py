"""`salient bench` runs on a tiny setting and reports what it promises (speed is not tested)."""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch
from conftest import random_images, tiny_model
from typer.testing import CliRunner

from pipeline import bench
from pipeline.cli import app
from pipeline.explainers import build_explainer
from pipeline.explainers.base import Explainer


def test_bench_tiny_setting_with_peers(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--methods",
            "gradcam,scorecam,occlusion,rise,integrated_gradients",
            "--images",
            "2",
            "--batch",
            "2",
            "--size",
            "64",
            "--device",
            "cpu",
            "--peers",
            "--rounds",
            "2",
            "--json",
            str(out),
            "-p",
            "scorecam.top_k=16",
            "-p",
            "rise.n_masks=32",
            "-p",
            "integrated_gradients.steps=2",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"gradcam", "scorecam", "occlusion", "rise", "integrated_gradients"}
    for r in rows.values():
        for key in ("images_per_s", "passes_per_image", "bound_images_per_s", "efficiency"):
            assert r[key] > 0
    # passes per image are the methods' definitions, not estimates
    assert rows["gradcam"]["passes_per_image"] == 1
    assert rows["scorecam"]["passes_per_image"] == 16 + 1  # top 16 of the head's channels
    assert rows["rise"]["passes_per_image"] == 32
    # m path points + the image and the baseline for the completeness gap
    assert rows["integrated_gradients"]["passes_per_image"] == 2 + 2
    # methods that back-propagate to the input are held to the forward+backward bound
    assert rows["integrated_gradients"]["bound"] == "forward+backward"
    assert {rows[m]["bound"] for m in ("gradcam", "scorecam", "occlusion", "rise")} == {"forward"}
    assert rows["gradcam"]["peer"] == "pytorch-grad-cam" and rows["gradcam"]["peer_ratio"] > 0
    assert rows["occlusion"]["peer"] == "captum"
    assert rows["rise"]["peer"] is None
    # the bound is probed at occlusion's own chunks (145 copies x 2 images in 64s), not at 2
    assert {f["rows"]: f["count"] for f in rows["occlusion"]["forwards"]} == {64: 4, 34: 1}
    g = rows["gradcam"]
    assert g["rounds"] == 2 and len(g["round_seconds"]) == len(g["peer_round_seconds"]) == 2
    assert g["peer_ratio_min"] <= g["peer_ratio"] <= g["peer_ratio_max"]


# -- the probe: bound at the method's own forwards, rounds interleaved, median ratio ----------
def _setting(n: int = 6, size: int = 32):
    model = tiny_model(size=size)
    x = random_images(n, size)
    return model, x, model.predict(x)[1][:, 0]


def test_bound_is_probed_at_the_forwards_the_method_ran(monkeypatch):
    probed = []
    real = bench.probe_step

    def spy(model, x, f):
        probed.append(f)
        return real(model, x, f)

    monkeypatch.setattr(bench, "probe_step", spy)
    model, x, t = _setting(6)
    # occlusion 16/8 at 32 px: 1 + 3 x 3 copies per image; 3 images per call -> 30 rows in
    # chunks of max_batch 7 -> 7, 7, 7, 7, 2 per call, and two calls per pass
    e = build_explainer("occlusion", model, window=16, stride=8, max_batch=7)
    row = bench.bench_method(model, x, t, "occlusion", e, batch=3, rounds=2)
    kinds = {(f["rows"], f["perturbed"], f["backward"]): f["count"] for f in row.forwards}
    assert kinds == {(7, True, False): 8, (2, True, False): 2}
    assert row.passes_per_image == 10 and row.bound == "forward"
    assert sorted({f.rows for f in probed}) == [2, 7]  # not the image batch, not a default 64

    # integrated gradients, 2 steps: one forward+backward of 2 x 3 path rows per call, plus the
    # completeness check's two plain forwards (image, baseline) of 3 rows
    probed.clear()
    e = build_explainer("integrated_gradients", model, steps=2)
    row = bench.bench_method(model, x, t, "integrated_gradients", e, batch=3, rounds=1)
    kinds = {(f["rows"], f["backward"]): f["count"] for f in row.forwards}
    assert kinds == {(6, True): 2, (3, False): 4}
    assert row.bound == "forward+backward"
    assert {(f.rows, f.backward) for f in probed} == {(6, True), (3, False)}

    # Grad-CAM: one forward at the image batch; its backward stops at the layer, so the bound is
    # the forward alone
    e = build_explainer("gradcam", model)
    row = bench.bench_method(model, x, t, "gradcam", e, batch=3, rounds=1)
    assert [(f["rows"], f["backward"], f["count"]) for f in row.forwards] == [(3, False, 2)]

    # DeepLIFT runs a rewritten copy of the module (outside model.forward): its counted rows
    # still reach the bound, as one forward+backward of image and reference together
    e = build_explainer("deeplift", model)
    row = bench.bench_method(model, x, t, "deeplift", e, batch=3, rounds=1)
    assert [(f["rows"], f["backward"], f["count"]) for f in row.forwards] == [(6, True, 2)]


class _Logged:
    """The explainer as the bench sees it, logging each call and its own duration."""

    input_gradient = False

    def __init__(self, explainer, log, durations):
        self.explainer, self.log, self.durations = explainer, log, durations

    def __call__(self, x, t):
        self.log.append("ours")
        t0 = time.perf_counter()
        time.sleep(0.02)  # a steady cost the per-round times can be checked against
        out = self.explainer(x, t)
        self.durations.append(time.perf_counter() - t0)
        return out


def test_rounds_interleave_and_peer_ratio_is_the_median_of_rounds():
    model, x, t = _setting(3)
    log, ours_s, peer_s = [], [], []
    peer_sleep = iter([0.02, 0.02, 0.09, 0.03, 0.05])  # warm-up, then 4 different rounds

    def peer(xb, tb):
        log.append("peer")
        t0 = time.perf_counter()
        time.sleep(next(peer_sleep))
        peer_s.append(time.perf_counter() - t0)

    e = _Logged(build_explainer("gradcam", model), log, ours_s)
    row = bench.bench_method(model, x, t, "gradcam", e, batch=3, rounds=4, peer=("fake", peer))
    assert log == ["ours", "peer"] * 5  # warm-up pair, then ours, peer, ours, peer, ...
    # per-round ratios from the sides' own clocks (the warm-up call is not a round)
    ratios = [p / o for o, p in zip(ours_s[1:], peer_s[1:], strict=True)]
    assert row.rounds == 4 and len(row.round_seconds) == len(row.peer_round_seconds) == 4
    assert row.peer_ratio == pytest.approx(statistics.median(ratios), rel=0.15)
    assert row.peer_ratio_min == pytest.approx(min(ratios), rel=0.15)
    assert row.peer_ratio_max == pytest.approx(max(ratios), rel=0.15)
    # the median, not the best-of-rounds ratio (about 1 here) nor the mean
    assert row.peer_ratio_min < row.peer_ratio < row.peer_ratio_max
    assert row.peer_images_per_s == pytest.approx(len(x) / min(row.peer_round_seconds))


class _ForwardsOnly(Explainer):
    """Costs exactly its forwards: chunks of the images through the model, nothing else."""

    name = "forwards_only"

    def attribute(self, x, targets):
        with torch.inference_mode():
            for _ in range(4):
                for s in range(0, len(x), 16):
                    self.model.forward_perturbed(x[s : s + 16].repeat(4, 1, 1, 1))
        return torch.zeros(x.shape[0], x.shape[2], x.shape[3])


def test_a_method_that_is_only_forwards_does_not_beat_its_bound():
    model, x, t = _setting(32, size=64)
    row = bench.bench_method(model, x, t, "forwards_only", _ForwardsOnly(model), batch=32)
    assert row.passes_per_image == 16
    assert [(f["rows"], f["count"]) for f in row.forwards] == [(64, 8)]
    assert row.efficiency <= bench.EFFICIENCY_LIMIT and row.warning is None


def test_efficiency_above_the_limit_is_flagged(monkeypatch, tmp_path):
    # a probe slower than the method itself: the bound is not a bound and the bench must say so
    monkeypatch.setattr(bench, "probe_step", lambda model, x, f: lambda: time.sleep(0.2))
    out = tmp_path / "bench.json"
    args = ["bench", "--methods", "gradcam", "--images", "2", "--batch", "2", "--size", "32"]
    args += ["--device", "cpu", "--rounds", "1", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())
    assert row["efficiency"] > bench.EFFICIENCY_LIMIT
    assert "bound probe is wrong" in row["warning"]
    assert "warning:" in result.output and "gradcam: efficiency" in result.output
