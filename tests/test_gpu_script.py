"""benchmarks/gpu.sh: the GPU benchmark's one command, run here at its tiny CPU size (no GPU on
the CI machine), and its one-line refusal when CUDA is asked for but absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
BENCH_METHODS = ("gradcam", "gradcam_pp", "saliency", "scorecam", "rise", "glas", "occlusion")
JOB_EXPLAINERS = ("gradcam", "gradcam_pp", "saliency", "scorecam")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    env["RAY_AUTH_MODE"] = "disabled"
    env["SALIENT_PY"] = sys.executable  # the interpreter running these tests
    return env


def _table(stdout: str) -> dict[str, list[str]]:
    """The final table's rows by their first cell (the header row under "method")."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("=== Salient GPU benchmark"))
    header = lines[start + 1].split()
    assert header[0] == "method", lines[start + 1]
    rows = {}
    for ln in lines[start + 2 :]:
        if ln.startswith("job:"):
            break
        cells = ln.rsplit(None, 6)  # "job overall" has a space in its first cell
        rows[cells[0]] = cells[1:]
    return rows


def _positive(cell: str) -> bool:
    return float(cell) > 0


def _has_peers() -> bool:
    try:
        import captum  # noqa: F401
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_cpu_run_prints_the_table_and_the_job_explains_every_image(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(
        ["bash", str(SCRIPT), "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = _table(r.stdout)
    for method in BENCH_METHODS:
        images_s, bound, efficiency, peer, ratio, job = rows[method]
        assert _positive(images_s) and _positive(bound) and _positive(efficiency), rows[method]
        if peer != "-":
            assert _positive(ratio), rows[method]
        if method in JOB_EXPLAINERS:
            assert _positive(job), rows[method]
    if _has_peers():  # Grad-CAM's peer is pytorch-grad-cam, saliency's Captum
        assert rows["gradcam"][3] == "pytorch-grad-cam" and _positive(rows["gradcam"][4])
        assert rows["saliency"][3] == "captum" and _positive(rows["saliency"][4])
    assert _positive(rows["job overall"][-1])
    bench = json.loads((out / "bench.json").read_text())
    assert [b["method"] for b in bench] == list(BENCH_METHODS)
    # the job explained every generated image, lost none
    generated = sorted((out / "images").glob("synth-*.jpg"))
    assert len(generated) == 6
    (summary_path,) = (out / "runs").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["inputs"] == summary["images_ok"] == len(generated)
    assert summary["lost"] == 0 and summary["errors"] == 0
    assert set(summary["explainers"]) == set(JOB_EXPLAINERS)
    assert str(out) in r.stdout  # where the outputs are is printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the refusal cannot happen")
def test_cuda_without_a_gpu_fails_at_once_with_one_line(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(
        ["bash", str(SCRIPT), "--device", "cuda", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        cwd=ROOT,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "torch.cuda.is_available() is False" in lines[0]
    assert "--device cpu" in lines[0]
    assert not out.exists()  # refused before anything was generated


def test_script_is_executable_and_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
    assert SCRIPT.stat().st_mode & 0o111
