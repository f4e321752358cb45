"""The decode stage: a block of inputs -> resized uint8 pixels + annotations in model pixels.

Runs in Ray CPU tasks before the model actors, so accelerators never wait on JPEG decoding.
Every input that cannot be read or decoded becomes an error record here; nothing is dropped.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable

import numpy as np

from ..models.preprocess import Preprocess
from ..storage import StorageUnavailable, filesystem, read_bytes, with_retries
from .decode import BadImage, decode_image
from .listing import Block, InputItem

AnnotationFn = Callable[[dict, object], dict]


def read_block(
    block: Block,
    preprocess: Preprocess,
    annotations: dict[str, dict] | None = None,
    to_model_space: AnnotationFn | None = None,
    endpoint_url: str | None = None,
) -> dict:
    """Decode every image of a block. Returns a dict of plain columns:

    image_ids, uris, members (JSON: tar member / Parquet row or null), labels (raw: int, class
    name or None), annotations (JSON, in model-input
    pixels), pixels uint8 [n_ok, S, S, 3] for the images that decoded, and errors (JSON list of
    {image_id, uri, stage, error_type, message}) for those that did not.
    """
    ok_ids, uris, members, labels, anns, pixels, errors = [], [], [], [], [], [], []
    for item, data in _read_all(block.items, endpoint_url, errors):
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
        label = item.label
        if ann is not None and label is None:
            label = ann.get("label")
        if ann is not None and to_model_space is not None:
            ann = to_model_space(ann, preprocess.geometry(image.width, image.height))
        ok_ids.append(item.image_id)
        uris.append(item.uri)
        members.append(item.member)
        labels.append(label if label is not None else item.meta.get("folder"))
        anns.append(json.dumps(ann or {}))
        pixels.append(np.asarray(resized, dtype=np.uint8))
    size = preprocess.size
    return {
        "block_id": block.block_id,
        "n_inputs": len(block.items),
        "inputs": json.dumps({it.image_id: it.version for it in block.items}),
        "image_ids": ok_ids,
        "uris": uris,
        "members": json.dumps(members),
        "labels": json.dumps(labels),
        "annotations": anns,
        "pixels": np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8),
        "errors": json.dumps(errors),
    }


def read_input_bytes(item: InputItem, endpoint_url: str | None = None) -> bytes:
    """One input's bytes (file, tar member, Parquet cell or demo image), e.g. for a report."""
    errors: list[dict] = []
    for _, data in _read_all([item], endpoint_url, errors):
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


def _read_all(items, endpoint_url, errors):
    """Yield (item, bytes) for each readable input; containers are opened once per block."""
    containers: dict[str, object] = {}
    for item in items:
        try:
            if item.uri.startswith("skimage:"):
                data = _skimage_png(item.uri.removeprefix("skimage:"))
            elif item.member is None:
                data = read_bytes(item.uri, endpoint_url)
            elif item.uri.endswith(".tar"):
                data = _tar_member(containers, item, endpoint_url)
            else:
                data = _parquet_cell(containers, item, endpoint_url)
        except FileNotFoundError as e:
            errors.append(_error(item, "read", "not_found", f"{item.uri}: {e}"))
            continue
        except StorageUnavailable:
            raise  # an outage fails the block (and is resumed later), it is not a bad input
        except Exception as e:
            errors.append(_error(item, "read", type(e).__name__, f"{item.uri}: {e}"))
            continue
        yield item, data


def _tar_member(containers: dict, item: InputItem, endpoint_url) -> bytes:
    if item.uri not in containers:
        raw = read_bytes(item.uri, endpoint_url)
        # in memory, nothing to close: the block's containers go away with the block
        containers[item.uri] = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")  # noqa: SIM115
    member = containers[item.uri].extractfile(item.member)
    if member is None:
        raise FileNotFoundError(f"no member {item.member!r}")
    return member.read()


def _parquet_cell(containers: dict, item: InputItem, endpoint_url) -> bytes:
    import pyarrow.parquet as pq

    if item.uri not in containers:
        fs, path = filesystem(item.uri, endpoint_url)

        def load():
            with fs.open(path, "rb") as f:
                return pq.read_table(io.BytesIO(f.read()))

        containers[item.uri] = with_retries(load, what=f"reading {item.uri}")
    table = containers[item.uri]
    column = item.meta.get("image_column", "image")
    value = table.column(column)[int(item.member)].as_py()
    if isinstance(value, dict):  # HF-style {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if value is None:
        raise BadImage("empty", f"{item.image_id}: no image bytes")
    return value


def _skimage_png(name: str) -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).save(buf, format="PNG")
    return buf.getvalue()
