"""The decode stage: a block of inputs -> resized uint8 pixels + annotations in model pixels.

Runs in Ray CPU tasks before the model actors, so accelerators never wait on JPEG decoding.
Every input that cannot be read or decoded becomes an error record here; nothing is dropped.
"""

from __future__ import annotations

import io
import itertools
import json
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np

from ..models.preprocess import Preprocess
from ..storage import Storage, StorageUnavailable
from .decode import BadImage, decode_image
from .inputs import ALL_SAMPLES, Block, InputItem
from .objects import read_object
from .parquet import read_cells
from .webdataset import read_member, read_shard

AnnotationFn = Callable[[dict, object], dict]
# where an image's class comes from (spec `source.labels_from`)
LabelsFrom = Literal["annotations", "folder", "none"]


# concurrent fetches per block: object stores answer in tens of ms per GET, so one at a time
# would leave the accelerators waiting on latency, not on bandwidth
READ_THREADS = 16


def read_block(
    block: Block,
    preprocess: Preprocess,
    annotations: dict[str, dict] | None = None,
    to_model_space: AnnotationFn | None = None,
    storage: Storage = Storage(),
    threads: int = READ_THREADS,
    labels_from: LabelsFrom = "annotations",
) -> dict:
    """Decode every image of a block. Returns a dict of plain columns:

    block_id; inputs (JSON {image id: version} of the block's plan items, what a resume
    compares); n_inputs (the inputs really found: a WebDataset shard counts its samples, or 1
    when it cannot be read); image_ids, uris, members (JSON: tar member / Parquet row or null),
    labels (raw: int, class name or None), annotations (JSON, in model-input pixels), pixels
    uint8 [n_ok, S, S, 3] for the images that decoded, and errors (JSON list of
    {image_id, uri, stage, error_type, message}) for those that did not. Every input is in
    exactly one of image_ids and errors, so n_inputs = len(image_ids) + len(errors).

    Plain files are fetched with one GET each, `threads` at a time, and decoded here in block
    order while the next ones download. A storage outage (StorageUnavailable) fails the block.
    """
    ok_ids, uris, members, labels, anns, pixels, errors = [], [], [], [], [], [], []
    for item, data in _read_all(block.items, storage, errors, threads):
        try:
            image = decode_image(data, item.image_id)
            resized = preprocess.resize(image)
        except BadImage as e:
            errors.append(_error(item, "decode", e.kind, str(e)))
            continue
        except Exception as e:  # a decoder bug must still not lose the input
            errors.append(_error(item, "decode", type(e).__name__, f"{item.image_id}: {e}"))
            continue
        ann = (annotations or {}).get(item.image_id)
        label = _label(item, ann, labels_from)
        if ann is not None and to_model_space is not None:
            ann = to_model_space(ann, preprocess.geometry(image.width, image.height))
        ok_ids.append(item.image_id)
        uris.append(item.uri)
        members.append(item.member)
        labels.append(label)
        anns.append(json.dumps(ann or {}))
        pixels.append(np.asarray(resized, dtype=np.uint8))
    size = preprocess.size
    return {
        "block_id": block.block_id,
        "n_inputs": len(ok_ids) + len(errors),
        "inputs": json.dumps({it.image_id: it.version for it in block.items}),
        "image_ids": ok_ids,
        "uris": uris,
        "members": json.dumps(members),
        "labels": json.dumps(labels),
        "annotations": anns,
        "pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8),
        "errors": json.dumps(errors),
    }


def read_input_bytes(item: InputItem, storage: Storage = Storage()) -> bytes:
    """One input's bytes (file, tar member, Parquet cell or demo image), e.g. for a report."""
    errors: list[dict] = []
    for _, data in _read_all([item], storage, errors, threads=1):
        return data
    raise FileNotFoundError(errors[0]["message"] if errors else item.uri)


def _error(item: InputItem, stage: str, kind: str, message: str) -> dict:
    return {
        "image_id": item.image_id,
        "uri": item.uri,
        "stage": stage,
        "error_type": kind,
        "message": message[:2000],
    }


def _read_error(item: InputItem, e: Exception) -> dict:
    if isinstance(e, FileNotFoundError):
        return _error(item, "read", "not_found", f"{item.uri}: {e}")
    return _error(item, "read", type(e).__name__, f"{item.uri}: {e}")


def _label(item: InputItem, annotation: dict | None, labels_from: LabelsFrom):
    """The image's class as the source gives it (an index or a name), or None.

    annotations: the source's own label (a manifest, Parquet or WebDataset label), else the
    annotation's, else the folder the image sits in; folder: only the folder; none: no label
    (boxes and masks still count)."""
    folder = item.meta.get("folder")
    if labels_from == "none":
        return None
    if labels_from == "folder":
        return folder
    for label in (item.label, (annotation or {}).get("label"), folder):
        if label is not None:
            return label
    return None


def _read_all(items, storage: Storage, errors, threads):
    """Yield (item, bytes) for each readable input, in block order; unreadable ones become
    error rows. Each container (a shard, a Parquet file) is read once per run of its items."""
    units = _read_units(items)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="read") as pool:
        reads = _in_order(pool, lambda unit: _read_unit(unit, storage), units, 2 * threads)
        for results in reads:
            for item, data in results:
                if isinstance(data, Exception):
                    errors.append(_read_error(item, data))
                else:
                    yield item, data


def _read_units(items) -> list[list[InputItem]]:
    """A plain file or a whole shard alone; consecutive members of one container together."""

    def in_container(it: InputItem) -> bool:
        return it.member not in (None, ALL_SAMPLES) and not it.uri.startswith("skimage:")

    units: list[list[InputItem]] = []
    for item in items:
        last = units[-1][0] if units else None
        if last and in_container(item) and in_container(last) and last.uri == item.uri:
            units[-1].append(item)
        else:
            units.append([item])
    return units


def _read_unit(unit: list[InputItem], storage: Storage) -> list[tuple]:
    """(item, bytes or the exception that item gets) for each input of a unit; an error that
    hits the whole unit (a missing file) is every item's. StorageUnavailable propagates."""
    first = unit[0]
    try:
        if first.uri.startswith("skimage:"):
            return [(first, _skimage_png(first.uri.removeprefix("skimage:")))]
        if first.member is None:
            return [(first, read_object(first.uri, storage))]
        if first.member == ALL_SAMPLES:
            return read_shard(first, storage)
        if first.uri.endswith(".tar"):
            return read_member(unit, storage)
        return read_cells(unit, storage)
    except StorageUnavailable:
        raise  # an outage fails the block (and is resumed later), it is not a bad input
    except Exception as e:
        return [(it, e) for it in unit]


def _in_order(pool, fn, args, ahead: int):
    """fn over args on the pool, results in the order of args, at most `ahead` running or
    waiting to be consumed (so a block's raw bytes are not all in memory at once)."""
    pending: deque = deque()
    args = iter(args)
    try:
        for arg in itertools.islice(args, ahead):
            pending.append(pool.submit(fn, arg))
        while pending:
            result = pending.popleft().result()
            for arg in itertools.islice(args, 1):
                pending.append(pool.submit(fn, arg))
            yield result
    finally:
        for future in pending:
            future.cancel()


def _skimage_png(name: str) -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).save(buf, format="PNG")
    return buf.getvalue()
