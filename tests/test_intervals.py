"""Intervals and the significance-aware gate: the statistics against scipy and hand-worked
values, the metric state's exact merge, and the gate on real per-image values (RISE reseeded
passes, a scrambled layer fails, a real drop within tolerance passes) and on real tables."""

from __future__ import annotations

import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats as sps

from pipeline.metrics import build_metric
from pipeline.metrics.base import ExplainedBatch
from pipeline.stats import Moments, mean_interval, paired_test, welch_test, wilson_interval
from pipeline.tracking.compare import compare_metrics, gate


def test_moments_merge_exactly_in_any_split_and_order():
    rng = random.Random(0)
    values = [rng.gauss(3.0, 2.0) for _ in range(101)]
    whole = Moments.of(values)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, 100), 6))
        parts = [values[a:b] for a, b in zip([0, *cuts], [*cuts, 101], strict=True)]
        rng.shuffle(parts)
        merged = Moments()
        for p in parts:
            merged = merged.merge(Moments.of(p))
        assert merged.n == 101
        assert merged.mean == pytest.approx(whole.mean, rel=1e-12)
        assert merged.m2 == pytest.approx(whole.m2, rel=1e-10)
    assert whole.variance == pytest.approx(np.var(values, ddof=1), rel=1e-12)


def test_intervals_and_tests_agree_with_scipy_and_hand_worked_values():
    # Wilson, 8 of 10 at 95%: (0.4902, 0.9433) (Newcombe 1998, Table I style, by hand)
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] > 0  # not [0, 0]
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.5, 0.2, 40), rng.normal(0.45, 0.3, 55)
    m = Moments.of(a)
    lo, hi = mean_interval(m)
    half = sps.norm.ppf(0.975) * a.std(ddof=1) / math.sqrt(40)
    assert (lo, hi) == pytest.approx((a.mean() - half, a.mean() + half), rel=1e-12)
    w = welch_test(Moments.of(a), Moments.of(b))
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert w.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert w.interval == pytest.approx((ci.low, ci.high), rel=1e-9)
    after = a + rng.normal(-0.03, 0.05, 40)
    p = paired_test(Moments.of(after - a))
    ref = sps.ttest_rel(after, a)
    assert p.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert p.interval == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert p.effect == pytest.approx((after - a).mean() / (after - a).std(ddof=1), rel=1e-12)


def test_a_metric_state_merged_across_workers_gives_the_interval_of_all_its_values():
    maps = torch.rand(12, 8, 8)
    anns = [{"boxes": [[0, 0, 4, 4]]} for _ in range(12)]
    whole = build_metric("energy_pointing_game")
    values = whole.update(ExplainedBatch(maps, anns))
    workers = [build_metric("energy_pointing_game") for _ in range(3)]
    for i, w in enumerate(workers):
        w.update(ExplainedBatch(maps[i * 4 : (i + 1) * 4], anns[i * 4 : (i + 1) * 4]))
    merged = type(whole).from_states([w.state() for w in workers])
    assert merged.interval() == pytest.approx(whole.interval(), rel=1e-9)
    assert merged.interval() == pytest.approx(mean_interval(Moments.of(values)), rel=1e-9)
    # a state written before intervals (no M2): the mean stays right, the interval is unknown
    old = {k: v for k, v in workers[0].state().items() if k != "m2"}
    mixed = type(whole).from_states([old, workers[1].state()])
    assert mixed.compute() == pytest.approx(np.mean(values[:8]))
    assert mixed.interval() is None and mixed.sd() is None


def test_a_proportion_gets_a_wilson_interval_and_a_curve_a_band():
    pg = build_metric("pointing_game")
    maps = torch.zeros(10, 8, 8)
    for i in range(10):  # 7 of 10 peaks inside the box
        maps[i, (1 if i < 7 else 6), 1] = 1.0
    pg.update(ExplainedBatch(maps, [{"boxes": [[0, 0, 4, 4]]}] * 10))
    assert pg.compute() == pytest.approx(0.7)
    assert pg.interval() == pytest.approx(wilson_interval(7, 10))
    iou = build_metric("iou_curve", thresholds=4)
    iou.update(ExplainedBatch(torch.rand(6, 8, 8), [{"boxes": [[0, 0, 4, 4]]}] * 6))
    low, high = iou.curve_band()
    mean = iou.mean_curve()
    assert all(lo <= m <= hi for lo, m, hi in zip(low, mean, high, strict=True))


def test_the_gate_knows_noise_from_change_by_sample_size():
    """The same 0.02 drop with the same spread: noise on 50 images, a regression on 50,000."""

    def run(mean, n):
        return {"gradcam.pointing_game": mean, "gradcam.pointing_game.n": n,
                "gradcam.pointing_game.sd": 0.45}  # fmt: skip

    tol = {"gradcam.pointing_game": 0.01}
    small = compare_metrics(run(0.60, 50), run(0.62, 50), tol)
    assert [c.status for c in small] == ["noise"] and gate(small) == "pass"
    assert small[0].test == "welch t" and small[0].p_value > 0.05
    large = compare_metrics(run(0.60, 50_000), run(0.62, 50_000), tol)
    assert [c.status for c in large] == ["regressed"] and gate(large) == "fail"
    assert large[0].p_value < 1e-6 and large[0].interval[1] < 0
    # runs logged without .n/.sd (older runs): tolerance alone decides, as before
    bare = compare_metrics({"gradcam.pointing_game": 0.60}, {"gradcam.pointing_game": 0.62}, tol)
    assert [c.status for c in bare] == ["regressed"] and bare[0].p_value is None


@pytest.fixture(scope="module")
def deletion_values():
    """Per-image deletion scores of RISE on a tiny model: seed 0, seed 1, and seed 0 on the
    same model with its last conv's weights scrambled."""
    from conftest import random_images, tiny_model

    from pipeline.explainers import build_explainer

    model = tiny_model()
    x = random_images(24, 32, seed=5)
    with torch.no_grad():
        t = model.module(x).argmax(1)

    def scores(m, seed):
        maps = build_explainer("rise", m, n_masks=64, seed=seed)(x, t)
        metric = build_metric("deletion", steps=8)
        return metric.update(ExplainedBatch(maps, model=m, x=x, targets=t))

    base, reseeded = scores(model, 0), scores(model, 1)
    broken = tiny_model()
    conv = broken.module.features[6]
    with torch.no_grad():
        conv.weight.copy_(
            conv.weight.flatten()[torch.randperm(conv.weight.numel())].view_as(conv.weight)
        )
    return base, reseeded, scores(broken, 0)


def _logged(values):
    m = Moments.of(values)
    return {"rise.deletion": m.mean, "rise.deletion.n": m.n, "rise.deletion.sd": m.sd}


def test_the_paired_gate_passes_a_reseeded_rise_and_fails_a_scrambled_layer(deletion_values):
    base, reseeded, broken = deletion_values
    tol = {"rise.deletion": 0.0}  # any change beyond zero counts: significance decides

    def paired(current):
        return {"rise.deletion": Moments.of(np.subtract(current, base))}

    same = compare_metrics(_logged(reseeded), _logged(base), tol, paired=paired(reseeded))
    assert same[0].test == "paired t" and gate(same) == "pass", same
    worse = compare_metrics(_logged(broken), _logged(base), tol, paired=paired(broken))
    assert worse[0].status == "regressed" and worse[0].p_value < 0.05, worse
    # a real drop (every image 0.01 worse: p ~ 0) within a 0.02 tolerance passes
    real = [v + 0.01 for v in base]  # deletion: lower is better
    small = compare_metrics(_logged(real), _logged(base), {"rise.deletion": 0.02},
                            paired=paired(real))  # fmt: skip
    assert small[0].p_value < 1e-6 and small[0].status == "ok" and gate(small) == "pass"


def _write_metrics(root, rows):
    from pipeline.runstore import METRIC_SCHEMA
    from pipeline.runstore.layout import part_uri

    path = part_uri(str(root), "metrics", "b0")
    (root / "metrics").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=METRIC_SCHEMA), path)


def test_paired_differences_read_from_two_runs_tables(tmp_path):
    from pipeline.storage import Storage
    from pipeline.tracking.paired import paired_differences

    rng = random.Random(3)
    cur, base = [], []
    for i in range(30):
        v = rng.random()
        for table, value in ((base, v), (cur, v - 0.1 * (i % 3))):
            table.append({"run_id": "r", "image_id": f"img{i:03d}", "explainer": "rise",
                          "target": i % 5, "metric": "deletion", "value": value})  # fmt: skip
            table.append({"run_id": "r", "image_id": f"img{i:03d}", "explainer": "rise",
                          "target": i % 5, "metric": "insertion", "value": value})  # fmt: skip
    cur = [r for r in cur if not (r["metric"] == "insertion" and r["image_id"] == "img007")]
    _write_metrics(tmp_path / "cur", cur)
    _write_metrics(tmp_path / "base", base)
    got = paired_differences(
        str(tmp_path / "cur"), str(tmp_path / "base"),
        ["rise.deletion", "rise.insertion"], Storage(),
    )  # fmt: skip
    want = Moments.of([-0.1 * (i % 3) for i in range(30)])
    assert set(got) == {"rise.deletion"}  # insertion lost an image: not the same rows, unpaired
    assert got["rise.deletion"].n == 30
    assert got["rise.deletion"].mean == pytest.approx(want.mean, abs=1e-12)
    assert got["rise.deletion"].m2 == pytest.approx(want.m2, rel=1e-9)
