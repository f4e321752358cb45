"""Everything a job would trip on, found before Ray starts: `salient validate` and `run` call
the same checks, so a spec that validates does not fail on its first block.

Beyond the spec's schema (pipeline/spec.py, which already checked every parameter's value),
this loads the model on the CPU, builds every explainer and metric with its parameters (what
depends on the model: a layer it lacks, a head CAM cannot use), checks that the source and
annotations exist and that each metric and target mode has the ground truth it needs.
Problems are collected and raised together, one line each, as a SpecError.
"""

from __future__ import annotations

import pyarrow.compute as pc

from ..metrics import build_metric, metric_class
from ..models import LoadedModel
from ..secrets import find_secret
from ..sources.inputs import InputItem, Inputs, from_json_text
from ..sources.listing import list_inputs
from ..spec import JobSpec, SpecError
from ..storage import Storage, describe_error
from .worker import build_explainers, load_job_model, resolve_label


def preflight(
    spec: JobSpec,
    *,
    model: LoadedModel | None = None,
    items: list[InputItem] | None = None,
    where: str = "spec",
) -> LoadedModel | None:
    """Raise SpecError listing every problem; return the model it loaded (or was given)."""
    problems: list[str] = []
    if key := find_secret(spec.model_dump_json()):
        problems.append(
            f"(spec) holds the value of ${key}; credentials come from the environment or a "
            "profile, never from a spec (it would be written to the output and MLflow)"
        )
    storage = Storage.from_spec(spec.storage)
    source_ok = _exists(spec.source.uri, "source.uri", storage, problems)
    if spec.source.annotations:
        _exists(spec.source.annotations, "source.annotations", storage, problems)
    if model is None:
        try:
            model = load_job_model(spec.model, "cpu", spec.tracking.uri)
        except (ValueError, OSError, RuntimeError) as e:
            problems.append(f"model: {_line(e)}")
    if model is not None:
        for i, m in enumerate(spec.explainers):
            try:
                build_explainers(model, [m], spec.compute.max_batch, spec.seed)
            except (ValueError, TypeError, KeyError, RuntimeError) as e:
                problems.append(f"explainers.{i} ({m.key}): {_line(e)}")
        if spec.targets.mode == "classes":
            for c in spec.targets.classes:
                if not 0 <= c < model.num_classes:
                    problems.append(
                        f"targets.classes: {c} is not a class of the model "
                        f"(it has {model.num_classes})"
                    )
    for i, m in enumerate(spec.metrics):
        try:
            build_metric(m.name, **m.params)
        except (ValueError, TypeError) as e:
            problems.append(f"metrics.{i} ({m.key}): {_line(e)}")
            continue
        missing = metric_class(m.name).requires - (model.capabilities if model else set())
        if model is not None and missing:
            problems.append(
                f"metrics.{i} ({m.key}): needs {' and '.join(sorted(missing))} of the model, "
                f"which {model.id!r} does not offer"
            )
        needs = metric_class(m.name).needs
        # a manifest carries its ground truth in its own columns (checked when it is read)
        has_truth = spec.source.annotations or spec.source.format == "manifest"
        if needs != "none" and not has_truth:
            problems.append(
                f"metrics.{i} ({m.key}): needs {needs.replace('|', ' or ')} from "
                "source.annotations (or a manifest's boxes column), and the spec has none"
            )
    if spec.targets.mode == "label" and model is not None and source_ok:
        problems += _label_problems(spec, model, items)
    if problems:
        raise SpecError("\n".join(f"{where}: {p}" for p in problems))
    return model


def _exists(uri: str, field: str, storage: Storage, problems: list[str]) -> bool:
    if uri.startswith("skimage:"):
        return True
    try:
        fs, path = storage.filesystem(uri)
        if storage.retry(lambda: fs.exists(path), what=f"checking {uri}"):
            return True
        problems.append(f"{field}: {uri!r} does not exist")
    except Exception as e:  # no credentials, no such bucket, endpoint away: say which
        problems.append(f"{field}: {uri!r} cannot be read: {describe_error(e)}")
    return False


def _label_problems(spec: JobSpec, model: LoadedModel, items) -> list[str]:
    """`targets.mode: label` needs a label per image: from the annotations, the shards' label
    columns, or class-named folders. With none at all every image would become an error row."""
    if spec.source.annotations or spec.source.format != "images":
        return []
    if items is None:
        items = list_inputs(spec.source.uri, storage=Storage.from_spec(spec.storage))
    # one look per distinct folder, not per input (a listing has one meta text per folder)
    metas = pc.unique(Inputs.of(items).table.column("meta")).to_pylist()
    folders = {(from_json_text(m) or {}).get("folder") for m in metas}
    if any(resolve_label(folder, model.labels) is not None for folder in folders):
        return []
    return [
        "targets.mode: 'label' needs ground-truth labels and no image has one: give "
        "source.annotations, or put the images in folders named after their classes "
        f"(e.g. {model.labels[0]!r}/)"
    ]


def _line(e: BaseException) -> str:
    """The first line of an error, with its type when the message alone would be unclear."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, ValueError | SpecError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
