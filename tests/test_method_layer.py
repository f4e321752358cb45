"""The method layer's contracts: explanations and metric batches are values, the registry
records how an object was built, what a metric needs is honoured before it runs, and the one
chunking helper covers every item once and retries a failing chunk item by item."""

from __future__ import annotations

import pytest
import torch
from conftest import random_images

from pipeline.chunks import chunks, run_in_chunks
from pipeline.explainers import build_explainer
from pipeline.metrics import ExplainedBatch, Metric, build_metric


# -- chunks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "size"), [(0, 3), (1, 3), (7, 3), (9, 3), (5, 100), (4, 0)])
def test_chunks_cover_every_item_once_in_order(n, size):
    parts = list(chunks(n, size))
    assert [i for p in parts for i in range(p.start, p.stop)] == list(range(n))
    assert all(0 < p.stop - p.start <= max(1, size) for p in parts)


def test_a_failing_chunk_is_retried_item_by_item():
    done, calls = [None] * 7, []

    def fn(part):
        calls.append((part.start, part.stop))
        if 4 in range(part.start, part.stop):
            raise ValueError(f"item 4 in {part}")
        for i in range(part.start, part.stop):
            done[i] = i

    failed = run_in_chunks(fn, 7, 3)
    assert list(failed) == [4] and isinstance(failed[4], ValueError)
    assert done == [0, 1, 2, 3, None, 5, 6]
    # the bad chunk [3, 6) ran once whole, then once per item; the others once
    assert calls == [(0, 3), (3, 6), (3, 4), (4, 5), (5, 6), (6, 7)]


# -- explanations ---------------------------------------------------------------------------------
def test_explain_returns_maps_extras_and_the_forwards_it_cost(tiny):
    x, t = random_images(2, 32, seed=1), torch.tensor([1, 2])
    e = build_explainer("evet", tiny, base="gradcam", transforms=["hflip"])
    before = tiny.forward_passes
    got = e.explain(x, t)
    assert got.forward_passes == tiny.forward_passes - before == 2 * (2 + 2)
    assert set(got.extras) == {"kept", "weights", "probs"} and got.extras["probs"].shape == (2, 2)
    assert torch.equal(e(x, t), got.maps)  # calling it is explain(...).maps
    # nothing about the call is left on the explainer: two calls, two independent values
    other = e.explain(x[:1], t[:1])
    assert other.extras["probs"].shape == (1, 2) and got.extras["probs"].shape == (2, 2)
    assert not hasattr(e, "extras") and not hasattr(e, "last_forward_passes")


def test_the_registry_records_how_an_explainer_was_built(tiny):
    e = build_explainer("smoothgrad", tiny, base="integrated_gradients", n=3, steps=4, seed=2)
    # its own parameters and the ones it passes on to its base through **kwargs
    assert e.params == {"base": "integrated_gradients", "n": 3, "seed": 2, "steps": 4}
    assert e.base.params == {"steps": 4}
    x, t = random_images(1, 32, seed=3), torch.tensor([5])
    again = build_explainer("smoothgrad", tiny, **e.params)
    torch.testing.assert_close(again(x, t), e(x, t))


# -- metric batches and what a metric needs -------------------------------------------------------
class _BoxesOnly(Metric):
    """Fails loudly if it is ever shown an image without boxes."""

    name = "boxes_only_probe"
    needs = "boxes"

    def values(self, batch):
        assert all(a.get("boxes") for a in batch.annotations), batch.annotations
        return [float(len(a["boxes"])) for a in batch.annotations]


def test_images_without_the_needed_ground_truth_are_nulled_before_the_metric_runs():
    anns = [{"boxes": [[0, 0, 1, 1]]}, {}, {"boxes": []}, {"boxes": [[0, 0, 1, 1]] * 2}]
    metric = _BoxesOnly()
    assert metric.update(ExplainedBatch(torch.rand(4, 4, 4), anns)) == [1.0, None, None, 2.0]
    assert (metric.n, metric.compute()) == (2, 1.5)
    # no image has boxes: the metric is not called at all
    assert metric.update(ExplainedBatch(torch.rand(2, 4, 4), [{}, {"mask": [[1]]}])) == [None] * 2
    # "boxes|mask" takes either
    pg = build_metric("pointing_game")
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    maps = torch.zeros(3, 4, 4)
    maps[:, 0, 0] = 1
    got = pg.update(ExplainedBatch(maps, [{"mask": mask.tolist()}, {}, {"boxes": [[0, 0, 0, 0]]}]))
    assert got == [1.0, None, 1.0]


def test_a_batch_keeps_its_rows_together(tiny):
    x, t, maps = random_images(3, 32), torch.tensor([1, 2, 3]), torch.rand(3, 32, 32)
    with pytest.raises(ValueError, match=r"one row per map \(3\); got 2 targets"):
        ExplainedBatch(maps, model=tiny, x=x, targets=t[:2])
    with pytest.raises(ValueError, match=r"2 maps_by_explainer\['other'\]"):
        ExplainedBatch(maps, maps_by_explainer={"other": maps[:2]})
    batch = ExplainedBatch(maps, model=tiny, x=x, targets=t, maps_by_explainer={"o": maps * 2})
    sub = batch.rows([0, 2])
    assert torch.equal(sub.targets, torch.tensor([1, 3])) and torch.equal(sub.x, x[[0, 2]])
    assert torch.equal(sub.maps_by_explainer["o"], maps[[0, 2]] * 2)


def test_a_metric_that_recomputes_maps_refuses_a_batch_without_its_explainer(tiny):
    x, t = random_images(2, 32), torch.tensor([1, 2])
    metric = build_metric("stability_index", transforms=["hflip"])
    with pytest.raises(ValueError, match="stability_index needs the explainer"):
        metric.update(ExplainedBatch(torch.rand(2, 32, 32), model=tiny, x=x, targets=t))
