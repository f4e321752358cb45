"""Ground truth that travels with the images: labels, boxes, masks, landmarks.

Readers: Salient's own JSON (a list of {file, label_index, boxes, width, height}, as the README
shows),
COCO JSON and Pascal-VOC XML; each gives `image id (path relative to the source) -> dict` with
boxes as inclusive pixel corners in the source image. `to_model_space` moves one image's
annotation through the same resize/crop as its pixels (a box cut by the crop is clipped, one
cropped away entirely is dropped).
"""

from __future__ import annotations

import json
import posixpath
import xml.etree.ElementTree as ET

import numpy as np

from ..models.preprocess import Geometry
from ..storage import Storage


def load_annotations(uri: str, storage: Storage = Storage()) -> dict[str, dict]:
    """Dispatch on the content: COCO (dict with images+annotations), imagenet list, VOC XML
    (a file or a folder of .xml)."""
    if uri.rstrip("/").endswith(".xml") or not uri.rstrip("/").endswith(".json"):
        fs, path = storage.filesystem(uri)
        if fs.isdir(path):
            out = {}
            for p in sorted(fs.find(path)):
                if p.endswith(".xml"):
                    with fs.open(p, "rb") as f:
                        out.update(read_voc(f.read()))
            return out
        if uri.endswith(".xml"):
            return read_voc(storage.read_bytes(uri))
    data = json.loads(storage.read_bytes(uri))
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return read_coco(data)
    if isinstance(data, list):
        return read_imagenet(data)
    raise ValueError(f"annotations {uri!r}: not the imagenet list, COCO or VOC format")


def read_imagenet(items: list[dict]) -> dict[str, dict]:
    out = {}
    for a in items:
        if not isinstance(a, dict) or "file" not in a:
            raise ValueError("annotations: each entry needs a 'file'")
        out[a["file"]] = {
            "label": a.get("label_index"),
            "boxes": [list(map(float, b)) for b in a.get("boxes", [])],
            "width": a.get("width"),
            "height": a.get("height"),
        }
    return out


def read_coco(data: dict, category_to_label: dict[int, int] | None = None) -> dict[str, dict]:
    """COCO boxes are [x, y, w, h] (continuous); -> inclusive pixel corners. Polygon
    segmentations become a mask (union per image)."""
    images = {im["id"]: im for im in data["images"]}
    out: dict[str, dict] = {
        im["file_name"]: {"boxes": [], "width": im.get("width"), "height": im.get("height")}
        for im in images.values()
    }
    polygons: dict[str, list] = {}
    for a in data["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        entry = out[im["file_name"]]
        entry["boxes"].append([x, y, x + w - 1, y + h - 1])
        cat = a.get("category_id")
        label = category_to_label.get(cat) if category_to_label else cat
        entry.setdefault("label", label)
        if isinstance(a.get("segmentation"), list) and a["segmentation"]:
            polygons.setdefault(im["file_name"], []).extend(a["segmentation"])
    for name, polys in polygons.items():
        e = out[name]
        if e.get("width") and e.get("height"):
            from PIL import Image, ImageDraw

            canvas = Image.new("1", (e["width"], e["height"]), 0)
            draw = ImageDraw.Draw(canvas)
            for poly in polys:
                draw.polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly), 2)], fill=1)
            e["mask"] = np.asarray(canvas, dtype=bool)
    return out


def read_voc(xml: bytes) -> dict[str, dict]:
    """Pascal-VOC: boxes are 1-based inclusive pixel corners -> 0-based inclusive."""
    root = ET.fromstring(xml)
    name = root.findtext("filename") or ""
    folder = root.findtext("folder")
    size = root.find("size")
    boxes, labels = [], []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        boxes.append([float(bb.findtext(k)) - 1 for k in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(obj.findtext("name"))
    key = posixpath.join(folder, name) if folder and folder not in ("", "VOC2012") else name
    return {
        key: {
            "boxes": boxes,
            "label": labels[0] if labels else None,
            "width": int(size.findtext("width")) if size is not None else None,
            "height": int(size.findtext("height")) if size is not None else None,
        }
    }


def to_model_space(ann: dict, geometry: Geometry) -> dict:
    """One image's annotation in model-input pixels (JSON-friendly: masks as nested lists)."""
    out: dict = {}
    if ann.get("label") is not None:
        out["label"] = ann["label"]
    if ann.get("boxes") is not None:
        out["boxes"] = [b for b in (geometry.box(b) for b in ann["boxes"]) if b is not None]
    if ann.get("landmarks") is not None:
        out["landmarks"] = [p for p in (geometry.point(p) for p in ann["landmarks"]) if p]
    if ann.get("mask") is not None:
        out["mask"] = _mask(np.asarray(ann["mask"], dtype=bool), geometry).tolist()
    return out


def _mask(mask: np.ndarray, g: Geometry) -> np.ndarray:
    """Nearest-neighbour resize and crop, exactly as the pixels."""
    from PIL import Image

    rw, rh = round(mask.shape[1] * g.sx), round(mask.shape[0] * g.sy)
    resized = np.asarray(Image.fromarray(mask).resize((rw, rh), Image.Resampling.NEAREST))
    ox, oy = int(g.ox), int(g.oy)
    return resized[oy : oy + g.out_h, ox : ox + g.out_w]
