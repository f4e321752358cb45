"""The job spec: the one place a job's knobs are defined (pydantic, read from YAML).

Every mistake (unknown key, wrong type, unknown explainer or metric, bad parameter) is rejected
before anything runs, with the field's path in the message. Secrets never live here: storage
credentials come from the environment or a profile.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# letters, digits, . _ - and the placeholders {date} / {time} (expanded when the job starts)
_RUN_ID = re.compile(r"^[A-Za-z0-9{][A-Za-z0-9._{}-]{0,127}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    uri: str = Field(
        description="A folder/prefix of images, a .tar shard prefix, a Parquet URI, or the "
        "manifest file (.parquet or .csv) of format 'manifest'"
    )
    format: Literal["images", "webdataset", "parquet", "manifest"] = Field(
        "images",
        description="images: image files under uri. webdataset: .tar shards, one block per "
        "shard. parquet: one image per row (image_column, label_column). manifest: a .parquet "
        "or .csv file listing the images, one per row: column uri (required; relative to the "
        "manifest), optional image_id, label, boxes ([[x0, y0, x1, y1], ...] as JSON) and "
        "version or etag (without one, an edited manifest recomputes every block)",
    )
    annotations: str | None = Field(
        None, description="Ground truth: Salient JSON (see README), COCO JSON or Pascal-VOC XML"
    )
    labels_from: Literal["annotations", "folder", "none"] = Field(
        "annotations",
        description="Where an image's class comes from. annotations: the source's own label "
        "(a manifest, Parquet or WebDataset label), else the annotations file's, else the "
        "folder the image sits in. folder: only the folder (format 'images'). none: no labels "
        "(targets.mode 'label' then has none; boxes still count)",
    )
    image_column: str = "image"
    label_column: str | None = "label"
    limit: int | None = Field(
        None,
        ge=1,
        description="Take only the first N inputs of the sorted listing (for webdataset, the "
        "first N shards)",
    )

    @model_validator(mode="after")
    def _folders_exist(self):
        if self.labels_from == "folder" and self.format != "images":
            raise ValueError(
                f"labels_from 'folder' needs format 'images' (a {self.format} source has no "
                "image folders)"
            )
        return self


class ModelSpec(_Strict):
    uri: str = "builtin:efficientnet-lite0"
    weights: str | None = None
    resize: Literal["resize_crop", "squash"] | None = None
    size: int | None = Field(None, ge=8, le=2048, description="Input side in pixels")
    num_classes: int | None = Field(None, ge=1)
    trust_pickle: bool = False
    random_init: bool = Field(
        False, description="Run a torchvision:/timm: architecture without weights, on purpose"
    )
    score: Literal["softmax", "sigmoid", "logit"] = Field(
        "softmax",
        description="How a class is scored from the logits: softmax (one class of many), "
        "sigmoid (multi-label: each class on its own), logit. Targets, 'prob' explainer "
        "scores and the probability metrics all use it",
    )

    @model_validator(mode="after")
    def _weights_chosen(self):
        from .models.loaders import check_weights

        check_weights(self.uri, self.weights, self.random_init)
        return self


class TargetsSpec(_Strict):
    mode: Literal["predicted", "label", "classes", "topk", "threshold"] = Field(
        "predicted",
        description="predicted: the top class. label: the image's label. classes: each of "
        "`classes`. topk: the k top classes. threshold: every class whose score (model.score) "
        "passes t, at most k of them, highest first (multi-label models)",
    )
    classes: list[int] = Field(default_factory=list)
    k: int = Field(1, ge=1, le=100, description="topk: how many; threshold: at most how many")
    t: float = Field(0.5, allow_inf_nan=False, description="threshold: the class score to pass")

    @model_validator(mode="after")
    def _classes_needed(self):
        if self.mode == "classes" and not self.classes:
            raise ValueError("mode 'classes' needs a non-empty 'classes' list")
        return self


class MethodSpec(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = Field(None, description="Name in outputs; defaults to `name`")

    @property
    def key(self) -> str:
        return self.label or self.name


class OutputSpec(_Strict):
    uri: str = "runs/"
    heatmap_size: int = Field(56, ge=4, le=1024)
    heatmap_dtype: Literal["uint8", "float16"] = "uint8"
    overwrite: Literal["resume", "error", "replace"] = "resume"
    compact: bool = Field(
        True,
        description="After the run, fold the per-block parts into a few large Parquet files per "
        "table (sorted by image id, heatmaps and metrics partitioned by explainer)",
    )


class ComputeSpec(_Strict):
    actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0, ge=0)
    cpus_per_actor: float = Field(0.5, gt=0)
    threads_per_actor: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads per actor; default: cpus_per_actor when >= 1, else the "
        "node's cores shared among the actors",
    )
    decode_tasks: int | None = Field(
        None,
        ge=1,
        description="Concurrent read+decode tasks; default: the cluster's CPUs left beside the "
        "actors, at most 4 per actor, at least 2",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Images per forward for predictions and per-image methods; default 16 on "
        "the CPU, 64 on CUDA",
    )
    block_size: int = Field(
        256,
        ge=1,
        description="Images per block: the unit of work, of resume and of the per-block files "
        "(compaction gathers them after the run)",
    )
    max_batch: int | None = Field(None, ge=1, description="Perturbed copies per forward")
    device: str | None = None
    autocast: bool = Field(True, description="bf16 autocast for perturbation forwards on CUDA")
    autocast_cpu: bool = Field(
        False,
        description="bf16 autocast for perturbation forwards on CPU (pays where the CPU has bf16 "
        "units: AVX512-BF16, AMX)",
    )
    compile: bool = Field(
        False, description="torch.compile the model for perturbation forwards (compiles per actor)"
    )

    def batch_for(self, device) -> int:
        """`batch_size`, or the default for the device the model runs on."""
        if self.batch_size:
            return self.batch_size
        return 64 if str(device).startswith("cuda") else 16


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # beside the working directory: local runs


def _tracking_uri_default() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class TrackingSpec(_Strict):
    uri: str = Field(
        default_factory=_tracking_uri_default,
        description="MLflow tracking URI; when left out, $MLFLOW_TRACKING_URI of the process that "
        "reads the spec (on a cluster: the driver's), else sqlite:///mlflow.db",
    )
    experiment: str = "salient"
    tags: dict[str, str] = Field(default_factory=dict)
    enabled: bool = True


class StorageSpec(_Strict):
    endpoint_url: str | None = None
    region: str | None = None
    retries: int = Field(6, ge=1, le=20, description="Attempts per read/write on outages")
    retry_delay_s: float = Field(0.5, gt=0, description="First backoff delay; doubles")
    block_retries: int = Field(
        3,
        ge=0,
        le=50,
        description="Times Ray runs a block again when it still hits a storage outage after "
        "the in-process retries (a persistent outage then fails the job)",
    )
    block_retry_delay_s: float = Field(
        10.0, gt=0, description="Pause before a block is run again (jittered 0.5-1.5x)"
    )


class CompareSpec(_Strict):
    """Regression gate for scheduled runs (see pipeline/tracking/compare.py)."""

    baseline: str = Field("last_success", description="last_success, or a pinned run id")
    match_tags: list[str] = Field(default_factory=lambda: ["salient.job"])
    tolerances: dict[str, float | str] = Field(default_factory=dict)
    fail_on_missing: bool = True
    # a change beyond tolerance fails only when significant at this level (paired t-test on
    # per-image values when both runs scored the same images, else Welch's t-test)
    alpha: float = Field(0.05, gt=0, lt=1)

    @field_validator("tolerances")
    @classmethod
    def _tolerance_values(cls, v: dict):
        from .tracking.compare import parse_tolerance

        for key, tol in v.items():
            try:
                parse_tolerance(tol)
            except ValueError as e:
                raise ValueError(f"@{key}: {e}") from None
        return v


class JobSpec(_Strict):
    source: SourceSpec
    model: ModelSpec = ModelSpec()
    targets: TargetsSpec = TargetsSpec()
    explainers: list[MethodSpec] = Field(min_length=1)
    metrics: list[MethodSpec] = Field(default_factory=list)
    output: OutputSpec = OutputSpec()
    compute: ComputeSpec = ComputeSpec()
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)  # reads the env when parsed
    storage: StorageSpec = StorageSpec()
    compare_to: CompareSpec | None = None
    seed: int = 0
    run_id: str | None = Field(None, description="Fixed run id (resume); default: derived")
    max_error_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="The run fails when more than this share of inputs are error rows (it "
        "always fails when no image is explained)",
    )

    @model_validator(mode="after")
    def _win_needs_its_rival(self):
        keys = {e.key for e in self.explainers}
        for i, m in enumerate(self.metrics):
            if m.name == "win" and m.params.get("against") not in keys:
                raise ValueError(
                    f"@metrics.{i}.params.against: 'win' compares with another explainer of "
                    f"this job; got {m.params.get('against')!r}, have {sorted(keys)}"
                )
        return self

    @model_validator(mode="after")
    def _tolerances_name_metrics_of_this_job(self):
        """A tolerance that matches none of the job's metrics would gate nothing."""
        import fnmatch

        from .tracking.compare import RUN_METRICS

        if not self.compare_to:
            return self
        if not self.compare_to.tolerances and not self.metrics:
            raise ValueError(
                "@compare_to.tolerances: with no tolerances the gate compares the job's "
                "metrics, and this job has none; add metrics or name tolerances"
            )
        keys = set(RUN_METRICS)
        for e in self.explainers:
            keys |= {f"{e.key}.images_per_s", *(f"{e.key}.{m.key}" for m in self.metrics)}
        for pattern in self.compare_to.tolerances:
            if not any(fnmatch.fnmatchcase(k, pattern) for k in keys):
                raise ValueError(
                    f"@compare_to.tolerances.{pattern}: matches no metric of this job "
                    f"(it has: {', '.join(sorted(keys))})"
                )
        return self

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, v):
        if v is not None and (
            not _RUN_ID.match(v) or set(re.findall(r"{(\w*)}", v)) - {"date", "time"} or ".." in v
        ):
            raise ValueError(
                "run_id may hold only letters, digits, '.', '_', '-' and {date} / {time}"
            )
        return v

    @field_validator("explainers")
    @classmethod
    def _known_explainers(cls, methods: list[MethodSpec]):
        from .explainers.base import EXPLAINERS

        _check_methods(methods, EXPLAINERS, "explainer")
        return methods

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, methods: list[MethodSpec]):
        if not methods:
            return methods
        from .metrics import METRICS

        _check_methods(methods, METRICS, "metric")
        return methods


def _check_methods(methods: list[MethodSpec], registry, kind: str) -> None:
    """Names, parameter names and parameter values (against the constructors' annotations:
    types, ranges, choices), all without building anything. Every problem is raised at once,
    one "@path: message" line each."""
    seen, problems = set(), []
    for i, m in enumerate(methods):
        try:
            accepted = registry.params(m.name)
        except ValueError as e:
            problems.append(f"@{i}.name: {e}")
            continue
        takes_any = any(p.kind == p.VAR_KEYWORD for p in accepted.values())
        for key in m.params:
            if key not in accepted and not takes_any:
                problems.append(
                    f"@{i}.params.{key}: {kind} {m.name!r} has no parameter {key!r} "
                    f"(accepts: {', '.join(k for k in accepted if k != 'kwargs') or 'none'})"
                )
                continue
            try:
                registry.check_values(m.name, {key: m.params[key]})
            except ValueError as e:
                problems.append(f"@{i}.params.{key}: {e}")
        if m.key in seen:
            problems.append(f"@{i}: two {kind}s named {m.key!r}; give one a distinct 'label'")
        seen.add(m.key)
    if problems:
        raise ValueError("\n".join(problems))


class SpecError(ValueError):
    """A job spec that cannot run; the message is one line per problem, each with its path."""


def parse_spec(data: dict, source: str = "spec") -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job spec is a mapping, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            for line in msg.split("\n"):  # a validator may report several problems
                where = path
                if line.startswith("@"):  # a validator that knows the path below its field
                    sub, _, line = line[1:].partition(": ")
                    where = f"{path}.{sub}".strip(".")
                lines.append(f"{source}: {where or '(top)'}: {line}")
        raise SpecError("\n".join(lines)) from None


def load_spec(path: str | Path, *, resolve_paths: bool = True) -> JobSpec:
    """A spec from a YAML file. Local relative paths in it (source, annotations, weights,
    output, an sqlite tracking store) resolve against the spec's folder, not the working
    directory, unless `resolve_paths` is False (a spec that will run elsewhere). A spec that
    holds the value of a secret environment variable is refused."""
    from .secrets import find_secret
    from .storage import Storage

    try:
        text = Storage().read_bytes(str(path)).decode()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a folder, not a job spec (YAML)") from None
    if key := find_secret(text):
        raise SpecError(
            f"{path}: contains the value of ${key}; credentials come from the environment or a "
            "profile, never from a spec"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if resolve_paths and isinstance(data, dict) and "://" not in str(path):
        data = _resolve_paths(data, Path(path).resolve().parent)
    return parse_spec(data, str(path))


def _resolve_paths(data: dict, folder: Path) -> dict:
    """Relative local paths written in the spec -> absolute, against `folder` (defaults such
    as `runs/` stay relative to the working directory)."""

    def local(value):
        if not isinstance(value, str) or not value or "://" in value or value.startswith("/"):
            return value
        if ":" in value.split("/")[0]:  # a scheme such as skimage: or builtin:
            return value
        resolved = str((folder / value).resolve())
        return resolved + "/" if value.endswith("/") else resolved

    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for section, key in (("source", "uri"), ("source", "annotations"), ("model", "weights")):
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section][key] = local(out[section][key])
    if isinstance(out.get("output"), dict) and "uri" in out["output"]:
        out["output"]["uri"] = local(out["output"]["uri"])
    tracking = out.get("tracking")
    uri = tracking.get("uri") if isinstance(tracking, dict) else None
    if isinstance(uri, str) and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        tracking["uri"] = "sqlite:///" + local(uri[len("sqlite:///") :])
    return out


def cluster_problems(spec: JobSpec) -> list[str]:
    """What a spec bound for a cluster must not hold, one line per field: a loopback storage
    endpoint (on a pod it is the pod itself) and a relative sqlite tracking store (it resolves
    inside the job's temporary working dir, deleted with it). Read the spec with
    `resolve_paths=False`; only what the spec writes counts (a left-out tracking.uri is the
    cluster's MLFLOW_TRACKING_URI)."""
    out = []
    endpoint = spec.storage.endpoint_url
    if endpoint and is_loopback(endpoint):
        out.append(
            f"storage.endpoint_url: {endpoint!r} is a loopback address: on a cluster node it is "
            "the node itself; use the storage service's cluster address"
        )
    uri = spec.tracking.uri
    if "uri" in spec.tracking.model_fields_set and _relative_sqlite(uri):
        out.append(
            f"tracking.uri: {uri!r} is a relative sqlite store: on a cluster it lands in the "
            "job's temporary working dir and is lost; use the cluster's MLflow server (http://...)"
        )
    return out


def is_loopback(address: str) -> bool:
    """Whether a URL or host[:port] names this machine (localhost, 127.0.0.0/8, ::1, and
    0.0.0.0, which a client reaches as this machine)."""
    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1
    return ip.is_loopback or ip.is_unspecified


def _relative_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")


def flatten(spec: JobSpec) -> dict[str, str]:
    """The spec as flat `a.b.c -> value` strings (MLflow params). Holds no secrets by design."""
    out: dict[str, str] = {}

    def walk(prefix: str, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}.{v.get('label') or v.get('name') or i}", v)
        else:
            out[prefix] = str(value)

    walk("", spec.model_dump(mode="json"))
    return out
