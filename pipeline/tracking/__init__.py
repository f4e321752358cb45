"""MLflow: one run per job (params, aggregate metrics, tags, artifacts)."""

from .mlflow_run import JobTracker, redact

__all__ = ["JobTracker", "redact"]
