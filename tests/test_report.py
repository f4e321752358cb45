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
