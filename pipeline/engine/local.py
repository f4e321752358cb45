"""The single-machine path: explain a handful of images in this process and write files."""

from __future__ import annotations

import contextlib
import difflib
import itertools
import posixpath
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..explainers import build_explainer
from ..models import load_model
from ..report.overlay import overlay
from ..runstore import safe_name
from ..sources.decode import BadImage, decode_image
from ..sources.listing import IMAGE_EXTENSIONS, _unstrip, list_inputs
from ..storage import Storage, describe_error

BATCH_SIZE = 16


@dataclass(frozen=True)
class ImageInput:
    """`uri` is what is read; `name` is what the user sees and what the output files are
    named after (the path relative to the folder or glob given, or the file's name)."""

    uri: str
    name: str


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _glob_root(path: str) -> str:
    """The folder a pattern's matches are named relative to: its leading parts without magic."""
    parts = path.split("/")
    fixed = list(itertools.takewhile(lambda p: not _is_glob(p), parts))
    return "/".join(fixed)


def expand_inputs(args: list[str], exclude: Path | None = None) -> list[ImageInput]:
    """Files, folders (every image file under them) and globs (their image matches), at any
    fsspec URI -> one input per distinct file, with names that give distinct output files.
    Folders and globs leave out local files under `exclude` (the output folder: explaining
    `.` twice must not explain the first run's overlays)."""
    found: dict[str, tuple[str, str]] = {}  # uri -> (name, full path), first argument wins
    skip = exclude.resolve() if exclude is not None else None

    def excluded(fs, path: str) -> bool:
        local = "file" in ([fs.protocol] if isinstance(fs.protocol, str) else fs.protocol)
        return skip is not None and local and Path(path).resolve().is_relative_to(skip)

    for arg in args:
        try:
            _expand_one(arg, found, excluded, exclude)
        except (ValueError, FileNotFoundError, PermissionError):
            raise
        except Exception as e:  # offline URL, no credentials, endpoint away: say which
            raise ConnectionError(f"{arg}: cannot be reached ({describe_error(e)})") from None
    uris = list(found)
    names = _distinct_names([found[u][0] for u in uris], [found[u][1] for u in uris])
    return [ImageInput(u, n) for u, n in zip(uris, names, strict=True)]


def _expand_one(arg: str, found: dict, excluded, exclude) -> None:
    """One argument -> its inputs, added to `found` (uri -> (name, full path))."""
    fs, path = Storage().filesystem(arg)
    if _is_glob(path) and not fs.exists(path):
        matches = fs.glob(path, detail=True)
        files = sorted(
            p
            for p, info in matches.items()
            if info.get("type") == "file" and p.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise ValueError(f"{arg}: no image files match ({', '.join(IMAGE_EXTENSIONS)})")
        files = [p for p in files if not excluded(fs, p)]
        if not files:
            raise ValueError(f"{arg}: matches only files in the output folder {exclude}")
        root = _glob_root(path)
        for p in files:
            name = posixpath.relpath(p, root) if root else p
            found.setdefault(_unstrip(arg, fs, p), (name, p))
    elif fs.isdir(path):
        items = [(it, fs._strip_protocol(it.uri)) for it in list_inputs(arg, "images")]
        items = [(it, p) for it, p in items if not excluded(fs, p)]
        if not items:
            raise ValueError(f"{arg}: folder has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        for it, p in items:
            found.setdefault(it.uri, (it.image_id, p))
    elif fs.exists(path):
        # a file named by itself is read whatever its extension: the decoder judges it
        found.setdefault(arg, (posixpath.basename(path.rstrip("/")), path))
    else:
        _raise_missing(fs, path, arg)


def _raise_missing(fs, path: str, arg: str) -> None:
    """`exists` answers False for a store it cannot reach too: ask again, so that an absent
    image and an unreachable one are told apart (the latter raises from `info`)."""
    with contextlib.suppress(FileNotFoundError):
        fs.info(path)
    raise FileNotFoundError(f"image not found: {arg}")


def _distinct_names(names: list[str], paths: list[str]) -> list[str]:
    """Names whose output files differ: clashing names (`a/cat.jpg`, `b/cat.jpg` given as files)
    take parent folders from their paths until they differ; what still clashes gets `-2`, `-3`."""
    names = list(names)
    parts = [posixpath.normpath(p).strip("/").split("/") for p in paths]
    while True:
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(safe_name(n), []).append(i)
        longer = False
        for clash in (ix for ix in groups.values() if len(ix) > 1):
            for i in clash:
                depth = names[i].count("/") + 2
                if depth <= len(parts[i]):
                    names[i] = "/".join(parts[i][-depth:])
                    longer = True
        if not longer:
            break
    taken: set[str] = set()
    for i, n in enumerate(names):
        candidate, k = n, 1
        while safe_name(candidate) in taken:
            k += 1
            candidate = f"{n}-{k}"
        names[i] = candidate
        taken.add(safe_name(candidate))
    return names


def read_images(
    inputs: Iterable[ImageInput], on_skip: Callable[[str], None]
) -> Iterator[tuple[str, object]]:
    """(name, image) per readable input, read lazily; a bad input is reported and left out."""
    for it in inputs:
        try:
            yield it.name, decode_image(Storage().read_bytes(it.uri), it.name)
        except BadImage as e:
            on_skip(str(e))  # the message starts with the name
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            on_skip(f"{it.name}: cannot read ({e.strerror or type(e).__name__})")


def resolve_target(target: str | None, labels: list[str]) -> int | None:
    """A class index or a class name (any case) -> index; None means 'the predicted class'."""
    if target is None:
        return None
    text = target.strip()
    if text.lstrip("-").isdigit():
        idx = int(text)
        if not 0 <= idx < len(labels):
            raise ValueError(f"target {idx} out of range for a model with {len(labels)} classes")
        return idx
    if text in labels:
        return labels.index(text)
    folded = [label.casefold() for label in labels]
    hits = sorted({i for i, label in enumerate(folded) if label == text.casefold()})
    if len(hits) == 1:
        return hits[0]
    if hits:
        which = ", ".join(f"{i} ({labels[i]!r})" for i in hits)
        raise ValueError(f"target {target!r} matches several classes: {which}; give the index")
    close = difflib.get_close_matches(text.casefold(), folded, n=3, cutoff=0.6)
    if close:
        hint = ", ".join(repr(labels[folded.index(c)]) for c in close)
        raise ValueError(f"target {target!r} is not a class of the model; did you mean {hint}?")
    raise ValueError(
        f"target {target!r} is not a class of the model: give a class index (0-"
        f"{len(labels) - 1}) or a class name"
    )


def explain_images(images: list, names: list[str], methods: list[str], out: Path, **options):
    """Images already in memory (arrays or PIL images), named by `names`; see explain_stream."""
    return explain_stream(zip(names, images, strict=True), methods, out, **options)


def explain_files(
    inputs: list[ImageInput],
    methods: list[str],
    out: Path,
    *,
    on_skip: Callable[[str], None],
    **options,
) -> list[dict]:
    """Inputs from expand_inputs, decoded batch by batch; bad ones are passed to `on_skip` and
    left out. Refuses (ValueError) when not one of them is a readable image."""
    rows = explain_stream(read_images(inputs, on_skip), methods, out, **options)
    if not rows:
        raise ValueError(f"no image to explain: none of the {len(inputs)} inputs could be read")
    return rows


def explain_stream(
    named_images: Iterable[tuple[str, object]],
    methods: list[str],
    out: Path,
    *,
    model_uri: str = "builtin:efficientnet-lite0",
    weights: str | None = None,
    target: str | None = None,
    params: dict[str, dict] | None = None,
    device: str | None = None,
    trust_pickle: bool = False,
    random_init: bool = False,
    batch_size: int = BATCH_SIZE,
) -> list[dict]:
    """Predict, explain with each method, write `<name>.<method>.t<target>.png` (overlay) and
    `.npy` (map) under `out`, where <name> is `safe_name` of the image's name (as the job names
    its overlays). Batches of `batch_size`, so a large folder is never held in memory at once."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    stream = iter(named_images)
    batches = iter(lambda: list(itertools.islice(stream, batch_size)), [])
    first = next(batches, None)
    if first is None:  # nothing readable: no reason to load the model
        return []
    model = load_model(
        model_uri,
        weights=weights,
        device=device,
        trust_pickle=trust_pickle,
        random_init=random_init,
    )
    params = params or {}
    explainers = {m: build_explainer(m, model, **params.get(m, {})) for m in methods}
    fixed = resolve_target(target, model.labels)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    seconds = dict.fromkeys(explainers, 0.0)
    count = 0
    for batch in itertools.chain([first], batches):
        names = [name for name, _ in batch]
        images = [image for _, image in batch]
        shown = [model.preprocess.resize(im) for im in images]
        x = model.preprocess(images).to(model.device)
        probs, classes = model.predict(x)
        targets = classes[:, 0] if fixed is None else torch.full_like(classes[:, 0], fixed)
        for method, explainer in explainers.items():
            t0 = time.perf_counter()
            explained = explainer.explain(x, targets)
            maps = explained.maps.cpu()
            seconds[method] += time.perf_counter() - t0
            for i, name in enumerate(names):
                t = int(targets[i])
                stem = f"{safe_name(name)}.{method}.t{t}"
                png, npy = out / f"{stem}.png", out / f"{stem}.npy"
                np.save(npy, maps[i].numpy())
                overlay(shown[i], maps[i], signed=explainer.signed).save(png)
                rows.append(
                    {
                        "image": name,
                        "predicted": int(classes[i, 0]),
                        "predicted_name": model.labels[int(classes[i, 0])],
                        "probability": float(probs[i, 0]),
                        "target": t,
                        "target_name": model.labels[t],
                        "method": method,
                        "forward_passes": explained.forward_passes // len(batch),
                        "seconds": 0.0,  # set below: the mean over every batch
                        "overlay": str(png),
                        "map": str(npy),
                    }
                )
        count += len(batch)
    for row in rows:
        row["seconds"] = seconds[row["method"]] / count
    return rows
