"""report.html: self-contained, renders in a real headless Chromium with no console errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def load_in_chromium(path, tmp_path) -> tuple[str, list[str]]:
    """(DOM after load, console error lines) of a local page in headless Chromium."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    proc = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln]
    errors = [ln for ln in console if re.search(r"ERROR|Uncaught|console\.error", ln)]
    return proc.stdout, errors


def test_console_error_detection_works(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text(
        "<html><body><script>console.error('boom'); undefinedFn();</script></body></html>"
    )
    _, errors = load_in_chromium(page, tmp_path)
    assert errors, "a page with console errors must be caught"


@pytest.mark.slow
def test_run_report_renders_offline_with_expected_sections(ray_local, demo_images, tmp_path):
    from test_job import _local_images

    from pipeline.engine.job import run_job
    from pipeline.spec import parse_spec

    _local_images(tmp_path / "data", demo_images, 4)
    (tmp_path / "data" / "images" / "broken.jpg").write_bytes(b"not an image")
    result = run_job(
        parse_spec(
            {
                "source": {"uri": str(tmp_path / "data" / "images")},
                "explainers": [{"name": "gradcam"}, {"name": "saliency"}],
                "output": {"uri": str(tmp_path / "runs")},
                "compute": {"device": "cpu"},
                "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            }
        )
    )
    report = tmp_path / "runs" / result.run_id / "report.html"
    text = report.read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched: opens offline
    assert text.count("data:image/jpeg;base64,") >= 2 * 4 * 2  # thumbnails inlined
    dom, errors = load_in_chromium(report, tmp_path)
    assert not errors, errors
    for section in ("summary", "thumbnails", "distributions", "errors"):
        assert f'id="{section}"' in dom
    assert "broken.jpg" in dom and "gradcam" in dom and "saliency" in dom


# --- ranking and metric directions, on a hand-built run folder (no model, a second or two) ---

IMAGES = ["a", "b", "c", "d", "e"]
SCORE = {"a": 0.6, "b": 0.9, "c": 0.4, "d": 0.8, "e": 0.2}
# three orderings that differ from each other and from deletion sorted descending (what ranking
# by the alphabetically first metric, always descending, would show)
DELETION = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4, "e": 0.5}  # lower is better
ENERGY = {"a": 0.7, "b": 0.3, "c": 0.9, "d": 0.1, "e": 0.5}  # energy_pointing_game: higher


def _tiny_run(tmp_path, metric_values: dict[str, dict[str, float]]):
    """(run folder, merged digest): one explainer, the five images (small PNGs) and the given
    metric rows (metric key -> image -> value), written as the job writes two blocks (a, b, c
    and d, e), so the report sees a digest merged as the job merges it."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from pipeline.runstore import (
        ERROR_SCHEMA,
        METRIC_SCHEMA,
        BlockMarker,
        Digest,
        heatmap_schema,
        heatmap_table,
        write_block,
    )

    root = tmp_path / "run"
    images = tmp_path / "images"
    images.mkdir(parents=True)
    size = 8
    schema = heatmap_schema(size, "uint8")
    rows = []
    for i, image_id in enumerate(IMAGES):
        Image.new("RGB", (16, 16), (40 * i, 90, 200 - 40 * i)).save(images / f"{image_id}.png")
        rows.append(
            {
                "run_id": "r",
                "image_id": image_id,
                "source_uri": str(images / f"{image_id}.png"),
                "source_member": None,
                "model_id": "m",
                "explainer": "gradcam",
                "method": "gradcam",
                "target": 1,
                "target_name": "cat",
                "target_rank": 0,
                "score": SCORE[image_id],
                "predicted": 1,
                "predicted_name": "cat",
                "label": None,
                "h": 16,
                "w": 16,
                "map_min": 0.0,
                "map_max": 1.0,
                "forward_passes": 1,
            }
        )
    for i, r in enumerate(rows):
        r["heatmap"] = (np.arange(size * size) + 7 * i).astype(np.uint8).reshape(size, size)
    metrics = [
        {"run_id": "r", "image_id": i, "explainer": "gradcam", "target": 1, "metric": k, "value": v}
        for k, per_image in metric_values.items()
        for i, v in per_image.items()
    ]
    digest = Digest()
    for bid, ids in (("b0", {"a", "b", "c"}), ("b1", {"d", "e"})):
        heat = [r for r in rows if r["image_id"] in ids]
        mine = [m for m in metrics if m["image_id"] in ids]
        block_digest = Digest.of_block(bid, heat, mine, [])
        tables = {
            "heatmaps": heatmap_table(heat, schema),
            "metrics": pa.Table.from_pylist(mine, schema=METRIC_SCHEMA),
            "errors": ERROR_SCHEMA.empty_table(),
        }
        write_block(str(root), BlockMarker(bid, digest=block_digest), tables)
        digest.merge(block_digest)
    return str(root), digest


def _summary(metric_values: dict, directions: list[dict] | None) -> dict:
    """A run summary; `directions` is the "metrics" list (None: a summary from an older run)."""
    summary = {
        "run_id": "r",
        "inputs": 5,
        "images_ok": 5,
        "errors": 0,
        "lost": 0,
        "explainers": {
            "gradcam": {
                "method": "gradcam",
                "images": 5,
                "images_per_s": 10.0,
                "forward_passes_per_image": 1.0,
                "metrics": {k: sum(v.values()) / len(v) for k, v in sorted(metric_values.items())},
                "metric_details": {},
            }
        },
    }
    if directions is not None:
        summary["metrics"] = directions
    return summary


# the spec's order: energy_pointing_game first, so it is the default rank metric
SPEC_METRICS = [
    {"key": "energy_pointing_game", "name": "energy_pointing_game", "higher_is_better": True},
    {"key": "deletion", "name": "deletion", "higher_is_better": False},
]


def _render(tmp_path, metric_values, directions, rank_metric=None) -> str:
    from pipeline.models.preprocess import Preprocess
    from pipeline.report.html import ReportInputs, render_report

    root, digest = _tiny_run(tmp_path, metric_values)
    return render_report(
        ReportInputs(
            root,
            _summary(metric_values, directions),
            digest,
            preprocess=Preprocess(size=16),
            rank_metric=rank_metric,
            n_thumbs=2,
        )
    )


def _groups(page: str) -> dict[str, list[str]]:
    """Image ids shown under "best" and "worst" (one explainer: one line per group)."""
    out = {}
    for line in page.splitlines():
        if m := re.match(r"<p>(best|worst)</p>", line):
            out[m[1]] = re.findall(r"<img alt='([^']*)'", line)
    return out


def _section(page: str, name: str) -> str:
    start = page.index(f"<h2 id={name}>")
    end = page.find("<h2 ", start + 1)
    return page[start : end if end >= 0 else None]


@pytest.mark.parametrize(
    "rank_metric, best, worst, note",
    [
        # lower is better: the lowest deletion values are the best images
        ("deletion", ["a", "b"], ["e", "d"], "ranked by deletion (lower is better)"),
        # higher is better
        (
            "energy_pointing_game",
            ["c", "a"],
            ["d", "b"],
            "ranked by energy_pointing_game (higher is better)",
        ),
        # default: the spec's first metric, not the alphabetically first
        (None, ["c", "a"], ["d", "b"], "ranked by energy_pointing_game (higher is better)"),
    ],
)
def test_thumbnails_rank_best_and_worst_in_the_metrics_direction(
    tmp_path, rank_metric, best, worst, note
):
    values = {"deletion": DELETION, "energy_pointing_game": ENERGY}
    page = _render(tmp_path, values, SPEC_METRICS, rank_metric)
    assert _groups(page) == {"best": best, "worst": worst}
    assert note in _section(page, "thumbnails")


def test_every_metric_header_states_its_direction(tmp_path):
    values = {"deletion": DELETION, "energy_pointing_game": ENERGY}
    page = _render(tmp_path, values, SPEC_METRICS)
    summary = _section(page, "summary")
    assert "↑ higher is better, ↓ lower is better" in summary
    assert "<th><span title='lower is better'>deletion ↓</span></th>" in summary
    assert "<th><span title='higher is better'>energy_pointing_game ↑</span></th>" in summary
    # columns in the spec's order
    assert summary.index("energy_pointing_game ↑") < summary.index("deletion ↓")
    dist = _section(page, "distributions")
    assert "<h3>gradcam &middot; <span title='lower is better'>deletion ↓</span></h3>" in dist
    assert (
        "<h3>gradcam &middot; <span title='higher is better'>energy_pointing_game ↑</span></h3>"
        in dist
    )


def test_unknown_rank_metric_is_refused_naming_the_metrics_that_exist(tmp_path):
    values = {"deletion": DELETION, "energy_pointing_game": ENERGY}
    with pytest.raises(ValueError, match="'insertion'.*energy_pointing_game, deletion"):
        _render(tmp_path, values, SPEC_METRICS, "insertion")


def test_older_summary_falls_back_to_the_metric_class_and_refuses_unknown_directions(tmp_path):
    # no "metrics" list: registered names get their class's direction; a label has none
    values = {"deletion": DELETION, "my_score": ENERGY}
    page = _render(tmp_path, values, None)
    assert _groups(page) == {"best": ["a", "b"], "worst": ["e", "d"]}  # default: deletion
    summary = _section(page, "summary")
    assert "deletion ↓" in summary
    assert "<span title='direction unknown'>my_score</span>" in summary  # no arrow
    with pytest.raises(ValueError, match="'my_score'.*direction.*unknown"):
        _render(tmp_path / "again", values, None, "my_score")


def test_without_metrics_thumbnails_rank_by_target_score(tmp_path):
    page = _render(tmp_path, {}, [])
    assert _groups(page) == {"best": ["b", "d"], "worst": ["e", "c"]}
    assert "ranked by target score (higher is better) (the run has no metrics)" in page
