"""`salient audit`: the standard suite on a production model, as one (or two) Ray jobs.

Predictions and accuracy (when labels exist), explanations with the chosen methods,
faithfulness (deletion/insertion, average drop), localisation (when boxes exist), stability,
parameter-randomisation sanity verdicts per method, and with `against` the explanation drift
between two model versions on the same images (per-image rank correlation of the maps, a
per-class summary, the images that changed most). Everything lands in the first model's run
folder and MLflow run, with report.html.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from .engine.job import JobResult, run_job
from .engine.worker import load_job_model
from .report.html import ReportInputs, render_report
from .runstore import decode_heatmaps, read_table
from .spec import JobSpec, parse_spec
from .storage import Storage

FAITHFULNESS = ("deletion", "insertion", "average_drop")
LOCALISATION = ("pointing_game", "energy_pointing_game")


@dataclass
class AuditResult:
    run: JobResult
    against: JobResult | None
    accuracy: float | None
    sanity: dict
    drift: dict | None


def audit_spec(
    model: str,
    data: str,
    *,
    methods: list[str],
    out: str,
    annotations: str | None,
    tracking_uri: str,
    experiment: str,
    limit: int | None,
    steps: int,
    storage: Storage,
    trust_pickle: bool,
    size: int | None,
    random_init: bool = False,
    run_id: str | None = None,
) -> JobSpec:
    metrics = [{"name": m, "params": {"steps": steps}} for m in ("deletion", "insertion")]
    metrics += [{"name": "average_drop"}, {"name": "stability_index"}]
    if annotations:
        metrics += [{"name": m} for m in LOCALISATION]
    return parse_spec(
        {
            "source": {"uri": data, "annotations": annotations, "limit": limit},
            "model": {
                "uri": model,
                "trust_pickle": trust_pickle,
                "size": size,
                "random_init": random_init,
            },
            "targets": {"mode": "predicted"},
            "explainers": [{"name": m} for m in methods],
            "metrics": metrics,
            "output": {"uri": out},
            "tracking": {
                "uri": tracking_uri,
                "experiment": experiment,
                "tags": {"salient.job": "audit"},
            },
            "storage": asdict(storage),
            "run_id": run_id,
        },
        "audit",
    )


def accuracy(result: JobResult) -> float | None:
    """Top-1 over the distinct images that carry a label (None when none does), from the run's
    digest (counted per block, so no row is read)."""
    labelled, correct = result.digest.accuracy
    return correct / labelled if labelled else None


def _maps(root: str, storage: Storage) -> dict[tuple[str, str], tuple[np.ndarray, dict]]:
    t = read_table(
        root,
        "heatmaps",
        storage,
        columns=[
            "image_id",
            "explainer",
            "target_rank",
            "target",
            "target_name",
            "predicted",
            "heatmap",
            "map_min",
            "map_max",
        ],
    )
    if t.num_rows == 0:
        return {}
    maps = decode_heatmaps(t)
    meta = t.drop_columns(["heatmap"]).to_pylist()
    return {
        (m["image_id"], m["explainer"]): (maps[i].astype(np.float64), m)
        for i, m in enumerate(meta)
        if m["target_rank"] == 0
    }


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps (ties get average ranks); 1.0 for two constant maps."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a.ravel()), rankdata(b.ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 1.0


def drift(
    root_a: str, root_b: str, against: str, storage: Storage = Storage(), most: int = 10
) -> dict:
    """Per image and explainer: rank correlation of model A's and model B's top-1 maps."""
    a, b = _maps(root_a, storage), _maps(root_b, storage)
    rows = []
    for key in sorted(set(a) & set(b)):
        (ma, meta_a), (mb, meta_b) = a[key], b[key]
        rows.append(
            {
                "image_id": key[0],
                "explainer": key[1],
                "class": meta_a["target_name"],
                "rank_correlation": rank_correlation(ma, mb),
                "prediction_changed": meta_a["predicted"] != meta_b["predicted"],
            }
        )
    per_class: dict[str, list[float]] = {}
    for r in rows:
        per_class.setdefault(r["class"], []).append(r["rank_correlation"])
    return {
        "against": against,
        "summary": {
            "pairs": len(rows),
            "mean_rank_correlation": float(np.mean([r["rank_correlation"] for r in rows]))
            if rows
            else None,
            "predictions_changed": sum(r["prediction_changed"] for r in rows),
        },
        "per_class": sorted(
            (
                {"class": c, "n": len(v), "mean_rank_correlation": float(np.mean(v))}
                for c, v in per_class.items()
            ),
            key=lambda r: r["mean_rank_correlation"],
        ),
        "most_changed": sorted(rows, key=lambda r: r["rank_correlation"])[:most],
        "rows": rows,
    }


def sanity_verdicts(spec: JobSpec, methods: list[str], n_images: int) -> dict:
    """Parameter randomisation per method on the first n images (in this process), read with
    the spec's storage."""
    from .explainers import build_explainer
    from .metrics import ExplainedBatch, build_metric
    from .sources.inputs import make_blocks
    from .sources.listing import list_inputs
    from .sources.reader import read_block

    model = load_job_model(spec.model, spec.compute.device, spec.tracking.uri)
    storage = Storage.from_spec(spec.storage)
    items = list_inputs(spec.source.uri, spec.source.format, storage=storage)
    block = make_blocks(items[: max(n_images * 2, n_images)], 10**9)[0]
    decoded = read_block(
        block, model.preprocess, storage=storage, labels_from=spec.source.labels_from
    )
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(decoded["pixels"][:n_images]))
    x = model.preprocess.normalise(pixels.to(model.device))
    targets = model.predict(x)[1][:, 0]
    out = {}
    for method in methods:
        explainer = build_explainer(method, model)
        metric = build_metric("parameter_randomisation")
        metric.update(
            ExplainedBatch(
                explainer(x, targets), model=model, x=x, targets=targets, explainer=explainer
            )
        )
        report = metric.report()
        curve = [round(v, 3) for v in report["spearman_by_step"]]
        out[method] = {
            "verdict": report["verdict"],
            "detail": f"|Spearman| by cascade step {curve}; pass below {report['threshold']}",
        }
    return out


def _is_architecture(uri: str) -> bool:
    from .models.loaders import WEIGHTLESS_SCHEMES

    return uri.partition(":")[0] in WEIGHTLESS_SCHEMES


def run_audit(
    model: str,
    data: str,
    *,
    against: str | None = None,
    out: str = "runs/",
    methods: list[str] | None = None,
    annotations: str | None = None,
    tracking_uri: str = "sqlite:///mlflow.db",
    experiment: str = "salient-audit",
    limit: int | None = None,
    steps: int = 32,
    sanity_images: int = 4,
    storage: Storage = Storage(),
    trust_pickle: bool = False,
    size: int | None = None,
    address: str | None = None,
    random_init: bool = False,
) -> AuditResult:
    methods = methods or ["gradcam", "saliency"]
    common = dict(
        methods=methods,
        out=out,
        annotations=annotations,
        tracking_uri=tracking_uri,
        experiment=experiment,
        limit=limit,
        steps=steps,
        storage=storage,
        trust_pickle=trust_pickle,
        size=size,
    )
    # both specs before any work: a mistake in the second model must not cost the first job
    spec = audit_spec(model, data, **common, random_init=random_init and _is_architecture(model))
    other_spec = (
        audit_spec(against, data, **common, random_init=random_init and _is_architecture(against))
        if against
        else None
    )
    result = run_job(spec, address=address)
    acc = accuracy(result)
    sanity = sanity_verdicts(spec, methods, sanity_images) if sanity_images else {}
    other, drift_section = None, None
    if against:
        other = run_job(other_spec, address=address)
        drift_section = drift(result.root, other.root, against, storage)
    _record(spec, result, acc, sanity, drift_section, model, storage)
    return AuditResult(result, other, acc, sanity, drift_section)


def _record(spec, result: JobResult, acc, sanity, drift_section, model_uri, storage: Storage):
    """Audit results into the run folder (report.html, audit.json) and its MLflow run."""
    from .tracking import JobTracker

    model = load_job_model(spec.model, "cpu", spec.tracking.uri)
    report = render_report(
        ReportInputs(
            result.root,
            result.summary,
            result.digest,
            f"Salient audit of {model_uri}",
            model.preprocess,
            storage,
            sanity=sanity,
            drift=drift_section,
        )
    )
    payload = {
        "accuracy": acc,
        "sanity": sanity,
        "drift": {k: v for k, v in (drift_section or {}).items() if k != "rows"},
    }
    storage.write_bytes_atomic(f"{result.root}/report.html", report.encode())
    storage.write_bytes_atomic(f"{result.root}/audit.json", json.dumps(payload, indent=2).encode())
    tracker = JobTracker(spec.tracking.uri, spec.tracking.experiment, result.run_id)
    tracker.mlflow_run_id = result.mlflow_run_id
    metrics = {"accuracy": acc} if acc is not None else {}
    if drift_section and drift_section["summary"]["mean_rank_correlation"] is not None:
        metrics["drift.mean_rank_correlation"] = drift_section["summary"]["mean_rank_correlation"]
    tracker.log_metrics(metrics)
    tags = {f"salient.sanity.{k}": v["verdict"] for k, v in sanity.items()}
    if drift_section:
        tags["salient.against"] = drift_section["against"]
    tags.update(_model_version_tags(model_uri, spec.tracking.uri, result.mlflow_run_id))
    tracker.set_tags(tags)
    tracker.log_artifacts(
        {"report.html": report.encode(), "audit.json": json.dumps(payload, indent=2).encode()}
    )


def _model_version_tags(model_uri: str, tracking_uri: str, run_id: str) -> dict:
    """Link the audit run and a registered model version both ways."""
    if not model_uri.startswith("models:/"):
        return {}
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, _, version = model_uri.removeprefix("models:/").partition("/")
    if "@" in name:
        name, _, alias = name.partition("@")
        version = client.get_model_version_by_alias(name, alias).version
    client.set_model_version_tag(name, version, "salient.last_audit_run", run_id)
    return {"salient.registered_model": name, "salient.model_version": str(version)}
