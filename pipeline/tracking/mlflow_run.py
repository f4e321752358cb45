"""One MLflow run per job. A resumed job continues the run that carries its `salient.run_id`.

Only run-level values go to MLflow (the flattened spec, aggregates, throughput); per-image values
live in Parquet. Secrets never reach it: keys that name secrets are redacted, and so is any value
of a secret-looking environment variable wherever it would appear.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from ..chunks import chunks
from ..secrets import redact as redact_tree


def redact(values: dict[str, str]) -> dict[str, str]:
    """Flat name -> text (params, tags) with secrets hidden (see pipeline/secrets.py)."""
    return {k: str(v) for k, v in redact_tree({k: str(v) for k, v in values.items()}).items()}


def code_version() -> str:
    from .. import __version__

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


class JobTracker:
    def __init__(self, tracking_uri: str, experiment: str, run_id: str, enabled: bool = True):
        self.enabled = enabled
        self.run_id = run_id
        self.mlflow_run_id: str | None = None
        if not enabled:
            return
        import mlflow

        self.mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    def start(self, params: dict[str, str], tags: dict[str, str]) -> str | None:
        if not self.enabled:
            return None
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`salient.run_id` = '{self.run_id}'",
            max_results=1,
        )
        if found:
            self.mlflow_run_id = found[0].info.run_id
            self.client.update_run(self.mlflow_run_id, status="RUNNING")
            self.set_tags({**tags, "salient.resumed": "true"})
            if "salient.error" in found[0].data.tags:  # the failure this attempt resumes from
                self.client.delete_tag(self.mlflow_run_id, "salient.error")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.run_id,
                tags=redact({"salient.run_id": self.run_id, **tags}),
            )
            self.mlflow_run_id = run.info.run_id
            items = list(redact(params).items())
            for part in chunks(len(items), 100):
                self.client.log_batch(
                    self.mlflow_run_id,
                    params=[self.mlflow.entities.Param(k[:250], v[:6000]) for k, v in items[part]],
                )
        return self.mlflow_run_id

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if not self.enabled:
            return
        import time

        now = int(time.time() * 1000)
        entities = [
            self.mlflow.entities.Metric(_metric_key(k), float(v), now, step)
            for k, v in metrics.items()
            if v is not None and v == v
        ]
        for part in chunks(len(entities), 200):
            self.client.log_batch(self.mlflow_run_id, metrics=entities[part])

    def log_artifacts(self, files: dict[str, bytes]) -> None:
        """name -> content; written to a temp folder and logged (works for any artifact store)."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                path = Path(tmp, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            self.client.log_artifacts(self.mlflow_run_id, tmp)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for k, v in redact(tags).items():
                self.client.set_tag(self.mlflow_run_id, k, v)

    def finish(self) -> None:
        if self.enabled and self.mlflow_run_id:
            self.client.set_terminated(self.mlflow_run_id, status="FINISHED")

    def regression_gate(self, compare, storage) -> dict:
        """Compare this (finished) run with its baseline; tag it pass/fail and log the table
        (`storage` reads both runs' metrics tables for the paired test)."""
        import json

        from .compare import (
            as_dicts,
            compare_metrics,
            directions_from_tags,
            find_baseline,
            gate,
            paired_for,
            resolve_run,
        )

        if not self.enabled:
            raise ValueError("compare_to needs tracking.enabled: the baseline lives in MLflow")
        current = self.client.get_run(self.mlflow_run_id)
        if compare.baseline == "last_success":
            base = find_baseline(self.client, self.experiment_id, current, compare.match_tags)
        else:
            base = resolve_run(self.client, compare.baseline, [self.experiment_id])
        if base is None:
            verdict = {
                "gate": "pass",
                "baseline": None,
                "changes": [],
                "note": "no earlier successful run to compare with: this run is the first",
            }
        else:
            paired, pairing = paired_for(current, base, storage)
            try:
                changes = compare_metrics(
                    current.data.metrics,
                    base.data.metrics,
                    compare.tolerances,
                    compare.fail_on_missing,
                    directions_from_tags(current.data.tags),
                    alpha=compare.alpha,
                    paired=paired,
                )
                verdict = {"gate": gate(changes), "changes": as_dicts(changes)}
            except ValueError as e:  # a gate that compared nothing must not pass
                verdict = {"gate": "fail", "changes": [], "note": str(e)}
            verdict |= {"alpha": compare.alpha, "pairing": pairing}
            verdict["baseline"] = base.info.run_id
        self.set_tags(
            {"salient.gate": verdict["gate"], "salient.baseline_run": verdict["baseline"] or ""}
        )
        self.log_artifacts({"comparison.json": json.dumps(verdict, indent=2).encode()})
        return verdict

    def fail(self, error: BaseException) -> None:
        if self.enabled and self.mlflow_run_id:
            message = redact({"m": f"{type(error).__name__}: {error}"})["m"]
            self.client.set_tag(self.mlflow_run_id, "salient.error", message[:5000])
            self.client.set_terminated(self.mlflow_run_id, status="FAILED")


def _metric_key(name: str) -> str:
    """MLflow keys allow alphanumerics, _ - . space / only."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)[:250]
