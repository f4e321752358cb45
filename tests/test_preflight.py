"""`salient validate` (and `run`, before Ray starts) finds what a job would trip on: parameter
values, layers, the source, the ground truth metrics and targets need, weights, secrets."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
import yaml
from conftest import image_bytes
from typer.testing import CliRunner

from pipeline.cli import app


@pytest.fixture
def folder(tmp_path, demo_images):
    images = tmp_path / "images"
    images.mkdir()
    for i, img in enumerate(demo_images[:2]):
        (images / f"img{i}.png").write_bytes(image_bytes(img[::4, ::4], "PNG"))
    return images


def _validate(tmp_path, spec: dict):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["validate", str(path)])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    return result, lines, str(path)


def _no_model_no_ray(monkeypatch) -> list[str]:
    """Make loading a model or starting Ray fail loudly; returns what was attempted."""
    import ray

    import pipeline.engine.preflight as preflight_module

    tried: list[str] = []

    def refuse(what):
        def call(*args, **kwargs):
            tried.append(what)
            raise RuntimeError(f"{what} was attempted")

        return call

    monkeypatch.setattr(preflight_module, "load_job_model", refuse("model"))
    monkeypatch.setattr(ray, "init", refuse("ray"))
    return tried


def test_validate_builds_everything_and_reports_every_problem_on_its_line(
    tmp_path, folder, monkeypatch
):
    spec = {
        "source": {"uri": str(folder)},
        "targets": {"mode": "label"},
        "explainers": [
            {"name": "glas", "params": {"k": 0}},
            {"name": "rise", "params": {"n_masks": -5}},
            {"name": "gradcam", "params": {"layer": "bn9"}},
            {"name": "saliency"},
        ],
        "metrics": [
            {"name": "insertion", "params": {"steps": 0}},
            {"name": "pointing_game"},
            {"name": "deletion"},
        ],
    }
    # parameter values are the spec's own: all of them refused, each at its path, before the
    # model is loaded (a wrong layer needs the model, so it waits for the values to be mended)
    with monkeypatch.context() as m:
        tried = _no_model_no_ray(m)
        result, lines, path = _validate(tmp_path, spec)
    assert result.exit_code == 2, result.output
    expected = [
        "explainers.0.params.k: explainer 'glas': k must be an integer >= 1, got 0",
        "explainers.1.params.n_masks: explainer 'rise': n_masks must be an integer >= 1, got -5",
        "metrics.0.params.steps: metric 'insertion': steps must be an integer >= 1, got 0",
    ]
    assert len(lines) == len(expected), result.output
    for line, want in zip(lines, expected, strict=True):
        assert line.removeprefix("error: ") == f"{path}: {want}", (line, want)
    assert tried == [] and "Traceback" not in result.output

    # values mended: what needs the model, the source and the ground truth, one line each
    spec["explainers"][0]["params"] = {"k": 3}
    spec["explainers"][1]["params"] = {"n_masks": 8}
    spec["metrics"][0]["params"] = {"steps": 4}
    result, lines, path = _validate(tmp_path, spec)
    assert result.exit_code == 2, result.output
    expected = [
        "explainers.2 (gradcam): model 'builtin:efficientnet-lite0' has no layer 'bn9'",
        "metrics.1 (pointing_game): needs boxes or mask from source.annotations",
        "targets.mode: 'label' needs ground-truth labels and no image has one",
    ]
    assert len(lines) == len(expected), result.output
    for line, want in zip(lines, expected, strict=True):
        assert line.removeprefix("error: ").startswith(f"{path}: {want}"), (line, want)
    assert "Traceback" not in result.output

    # the same spec, mended, is ok
    fixed = {
        **spec,
        "targets": {"mode": "predicted"},
        "explainers": [{"name": "glas", "params": {"k": 3}}, {"name": "gradcam"}],
        "metrics": [{"name": "deletion", "params": {"steps": 4}}],
    }
    result, lines, _ = _validate(tmp_path, fixed)
    assert result.exit_code == 0
    assert "ok (2 explainers: glas, gradcam; 1 metrics)" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("method", "section", "params", "want"),
    [
        ("glas", "explainers", {"k": 0}, "explainer 'glas': k must be an integer >= 1, got 0"),
        (
            "rise",
            "explainers",
            {"n_masks": -5},
            "explainer 'rise': n_masks must be an integer >= 1, got -5",
        ),
        ("deletion", "metrics", {"steps": 0}, "metric 'deletion': steps must be an integer >= 1"),
        (
            "glas",
            "explainers",
            {"mode": "both"},
            "explainer 'glas': mode must be one of 'fusion', 'light', 'shadow', got 'both'",
        ),
        (
            "localisation_error",
            "metrics",
            {"iou": 1.5},
            "metric 'localisation_error': iou must be a number in [0, 1], got 1.5",
        ),
        ("evet", "explainers", {"gamma": -0.1}, "gamma must be a number in [0, 1], got -0.1"),
    ],
)
def test_validate_refuses_parameter_values_at_their_path_without_model_or_ray(
    tmp_path, folder, monkeypatch, method, section, params, want
):
    spec = {"source": {"uri": str(folder)}, "explainers": [{"name": "gradcam"}]}
    spec[section] = [*spec.get(section, []), {"name": method, "params": params}]
    index = len(spec[section]) - 1
    (key,) = params
    tried = _no_model_no_ray(monkeypatch)
    result, lines, path = _validate(tmp_path, spec)
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].removeprefix("error: ").startswith(f"{path}: {section}.{index}.params.{key}: ")
    assert want in lines[0]
    assert tried == [] and "Traceback" not in result.output


def _refused_values(annotation) -> list:
    """Values an annotation's own constraints refuse, one per bound or choice, read from its
    metadata: ge=1 -> 0, gt=0 -> 0, le=1 -> 1.5 (2 for an int), lt=1 -> 1, finite -> inf,
    a Literal -> a name it lacks; lists and unions of those."""
    import types
    import typing

    import annotated_types as at

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *meta = args
        step = 1 if base is int else 0.5
        out = []
        for c in (c for m in meta for c in getattr(m, "metadata", [m])):
            if isinstance(c, at.Ge):
                out.append(c.ge - step)
            elif isinstance(c, at.Gt):
                out.append(base(c.gt))
            elif isinstance(c, at.Le):
                out.append(c.le + step)
            elif isinstance(c, at.Lt):
                out.append(base(c.lt))
            elif getattr(c, "allow_inf_nan", True) is False:
                out.append(float("inf"))
        assert out, f"{annotation}: constrained, but no bound found in its metadata"
        return out
    if origin is typing.Literal:
        return ["no-such-choice"]
    if origin in (typing.Union, types.UnionType):
        return [v for a in args for v in _refused_values(a)]
    if origin is list:
        return [[v] for v in _refused_values(args[0])]
    if origin is tuple:
        return [(v,) for v in _refused_values(args[0])]
    return []  # unconstrained: int, float, str, bool, dict, None


def _constrained_cases():
    from pipeline.explainers import EXPLAINERS
    from pipeline.metrics import METRICS

    cases = []
    for registry, section in ((EXPLAINERS, "explainers"), (METRICS, "metrics")):
        for name in sorted(registry):
            for param, annotation in registry.annotations(name).items():
                for value in _refused_values(annotation):
                    cases.append(
                        pytest.param(
                            registry, section, name, param, value, id=f"{name}.{param}={value!r}"
                        )
                    )
    return cases


CONSTRAINED = _constrained_cases()


def test_the_constrained_parameters_are_many():
    """A guard for the test below: it derives its cases from the annotations."""
    assert len(CONSTRAINED) >= 100
    assert len({(c.values[2], c.values[3]) for c in CONSTRAINED}) >= 80


@pytest.mark.parametrize(("registry", "section", "name", "param", "value"), CONSTRAINED)
def test_each_constraint_refuses_a_value_outside_it_in_a_spec_and_in_python(
    registry, section, name, param, value
):
    """No hand-written check needed: every bound and choice in an annotation is enforced on
    the driver (the spec, with the field's path) and when the class is built from Python."""
    from pipeline.spec import SpecError, parse_spec

    message = f"{registry.kind} {name!r}: {param} must be "
    spec = {"source": {"uri": "x"}, "explainers": [{"name": "gradcam", "label": "rival"}]}
    spec[section] = [*spec.get(section, []), {"name": name, "params": {param: value}}]
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert f"spec: {section}.{len(spec[section]) - 1}.params.{param}: {message}" in str(err.value)
    args = (None,) if section == "explainers" else ()  # refused before the model is touched
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        registry[name](*args, **{param: value})


def test_every_parameter_is_annotated_and_every_default_is_legal():
    """Each registered class validates with empty params and with its defaults written out."""
    from pipeline.explainers import EXPLAINERS
    from pipeline.metrics import METRICS
    from pipeline.spec import parse_spec

    for registry, section in ((EXPLAINERS, "explainers"), (METRICS, "metrics")):
        for name in registry:
            params = registry.params(name)
            plain = {k: p for k, p in params.items() if p.kind != p.VAR_KEYWORD}
            assert set(plain) == set(registry.annotations(name)), f"{name}: unannotated"
            defaults = {k: p.default for k, p in plain.items() if p.default is not p.empty}
            assert defaults.keys() == plain.keys(), f"{name}: a parameter without a default"
            if name == "win":
                defaults["against"] = "rival"  # required: the explainer it compares with
            registry.check_values(name, defaults)
            for given in ({}, defaults):
                spec = {
                    "source": {"uri": "x"},
                    "explainers": [{"name": "gradcam", "label": "rival"}],
                }
                entry = {"name": name, "params": given}
                if name == "win" and not given:
                    entry["params"] = {"against": "rival"}
                spec[section] = [*spec.get(section, []), entry]
                parse_spec(spec)


def test_validate_types_source_weights_and_secrets(tmp_path, folder, monkeypatch):
    base = {"source": {"uri": str(folder)}, "explainers": [{"name": "gradcam"}]}
    cases = [
        (
            {**base, "explainers": [{"name": "scorecam", "params": {"top_k": "abc"}}]},
            "explainers.0.params.top_k: explainer 'scorecam': top_k must be an integer >= 1 "
            "or null, got 'abc'",
        ),
        ({**base, "source": {"uri": str(tmp_path / "absent")}}, "source.uri: "),
        (
            {**base, "model": {"uri": "torchvision:resnet18", "weights": str(tmp_path / "no.pt")}},
            "model: ",
        ),
        ({**base, "model": {"uri": "torchvision:resnet18"}}, "has no weights"),
        ({**base, "targets": {"mode": "classes", "classes": [5000]}}, "targets.classes: 5000"),
    ]
    for spec, want in cases:
        result, lines, _ = _validate(tmp_path, spec)
        assert result.exit_code == 2 and len(lines) == 1 and want in lines[0], (want, result.output)
    result, lines, _ = _validate(tmp_path, {**base, "source": {"uri": str(tmp_path / "absent")}})
    assert "does not exist" in lines[0]
    # a state dict of another architecture is a model problem, not a traceback
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "w.pt")
    spec = {**base, "model": {"uri": "torchvision:resnet34", "weights": str(tmp_path / "w.pt")}}
    result, lines, _ = _validate(tmp_path, spec)
    assert result.exit_code == 2 and len(lines) == 1 and "do not fit" in lines[0], result.output
    # a secret environment value anywhere in the spec is refused, as `submit` refuses it
    monkeypatch.setenv("DEPLOY_TOKEN", "tok-5f3a9c")
    spec = {**base, "tracking": {"tags": {"note": "tok-5f3a9c"}}}
    result, lines, _ = _validate(tmp_path, spec)
    assert result.exit_code == 2 and "contains the value of $DEPLOY_TOKEN" in lines[0]
    assert "tok-5f3a9c" not in result.output


def test_validate_a_folder_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder, not a job spec" in result.output


def test_relative_paths_resolve_against_the_specs_folder(tmp_path, folder, monkeypatch):
    from pipeline.spec import load_spec

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "job.yaml").write_text(
        yaml.safe_dump(
            {
                "source": {"uri": "../images"},
                "explainers": [{"name": "gradcam"}],
                "output": {"uri": "out/"},
                "tracking": {"uri": "sqlite:///../mlflow.db"},
            }
        )
    )
    monkeypatch.chdir(folder)  # anywhere but the spec's folder
    spec = load_spec("../jobs/job.yaml")
    assert spec.source.uri == str(folder)
    assert spec.output.uri == str(jobs / "out") + "/"
    assert spec.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    kept = load_spec("../jobs/job.yaml", resolve_paths=False)  # submit: resolved on the cluster
    assert kept.source.uri == "../images"


def test_validate_warns_about_what_fails_on_a_cluster_and_refuses_it_with_cluster(tmp_path, folder):
    spec = {
        "source": {"uri": str(folder)},
        "explainers": [{"name": "gradcam"}],
        "storage": {"endpoint_url": "http://localhost:9000"},
        "tracking": {"uri": "sqlite:///mlflow.db"},
    }
    result, lines, path = _validate(tmp_path, spec)
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    assert [w.split(": ")[2] for w in warnings] == ["storage.endpoint_url", "tracking.uri"]
    assert all(w.startswith(f"warning: {path}: ") for w in warnings)
    assert "ok (1 explainers: gradcam; 0 metrics)" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["validate", "--cluster", path])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 2, result.output
    assert lines[0].startswith(f"error: {path}: storage.endpoint_url: 'http://localhost:9000'")
    # with the other problems, one line each, all together
    spec["source"]["uri"] = str(tmp_path / "absent")
    path_spec = tmp_path / "job.yaml"
    path_spec.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["validate", "--cluster", path])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 3, result.output
    assert [ln.removeprefix("error: ").split(": ")[1] for ln in lines] == [
        "storage.endpoint_url",
        "tracking.uri",
        "source.uri",
    ]
    spec["source"]["uri"] = str(folder)
    # without them (the default tracking store left out), no warning at all
    del spec["storage"], spec["tracking"]
    result, lines, _ = _validate(tmp_path, spec)
    assert result.exit_code == 0 and len(lines) == 1, result.output


def test_tracking_uri_falls_back_to_mlflow_tracking_uri(monkeypatch):
    from pipeline.spec import parse_spec

    base = {"source": {"uri": "/data"}, "explainers": [{"name": "gradcam"}]}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert parse_spec(base).tracking.uri == "sqlite:///mlflow.db"  # the local default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert parse_spec(base).tracking.uri == "http://mlflow:5000"  # read when the spec is read
    assert parse_spec({**base, "tracking": {"experiment": "e"}}).tracking.uri == (
        "http://mlflow:5000"
    )
    written = {**base, "tracking": {"uri": "sqlite:////srv/m.db"}}
    assert parse_spec(written).tracking.uri == "sqlite:////srv/m.db"  # the spec's own wins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert parse_spec(base).tracking.uri == "sqlite:///mlflow.db"
