"""`salient bench` runs on a tiny setting and reports what it promises (speed is not tested)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pipeline.cli import app


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
            "--json",
            str(out),
            "-p",
            "scorecam.top_k=null",
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
    assert rows["scorecam"]["passes_per_image"] == 1280 + 1  # the builtin's conv head
    assert rows["rise"]["passes_per_image"] == 32
    # m path points + the image and the baseline for the completeness gap
    assert rows["integrated_gradients"]["passes_per_image"] == 2 + 2
    # methods that back-propagate to the input are held to the forward+backward bound
    assert rows["integrated_gradients"]["bound"] == "forward+backward"
    assert {rows[m]["bound"] for m in ("gradcam", "scorecam", "occlusion", "rise")} == {"forward"}
    assert rows["gradcam"]["peer"] == "pytorch-grad-cam" and rows["gradcam"]["peer_ratio"] > 0
    assert rows["occlusion"]["peer"] == "captum"
    assert rows["rise"]["peer"] is None
