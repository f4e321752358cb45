"""Annotations: the imagenet-val-300 format, COCO and Pascal-VOC, moved into model pixels."""

from __future__ import annotations

import json

import numpy as np

from pipeline.models import Preprocess
from pipeline.sources.annotations import load_annotations, to_model_space


def test_imagenet_format_and_resize_crop(tmp_path):
    ann = [
        {
            "file": "images/a.JPEG",
            "label_index": 7,
            "boxes": [[0, 0, 99, 49], [450, 0, 499, 9]],
            "width": 500,
            "height": 250,
        }
    ]
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(ann))
    loaded = load_annotations(str(path))
    assert loaded["images/a.JPEG"]["label"] == 7
    # 500x250 -> short side 256: scale 1.024, 512x256, centre crop 224 at x offset 144, y 16
    g = Preprocess(size=224).geometry(500, 250)
    out = to_model_space(loaded["images/a.JPEG"], g)
    assert out["label"] == 7
    assert out["boxes"] == []  # both boxes are cropped away entirely
    (box,) = to_model_space({"boxes": [[200, 100, 299, 199]]}, g)["boxes"]
    # inclusive corners: pixel x covers [x, x+1), so x1 maps to (x1 + 1) * s - offset - 1
    expected = [200 * 1.024 - 144, 100 * 1.024 - 16, 300 * 1.024 - 145, 200 * 1.024 - 17]
    assert np.allclose(box, expected)
    (clipped,) = to_model_space({"boxes": [[100, 0, 299, 199]]}, g)["boxes"]
    assert clipped[0] == 0.0 and clipped[1] == 0.0  # cut by the crop: clipped


def test_coco_boxes_and_polygon_masks(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "x.jpg", "width": 40, "height": 20}],
        "annotations": [
            {
                "image_id": 1,
                "bbox": [10, 5, 10, 5],
                "category_id": 3,
                "segmentation": [[10, 5, 19, 5, 19, 9, 10, 9]],
            }
        ],
        "categories": [{"id": 3, "name": "cat"}],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))
    a = load_annotations(str(path))["x.jpg"]
    assert a["boxes"] == [[10, 5, 19, 9]] and a["label"] == 3
    assert a["mask"].shape == (20, 40) and a["mask"][7, 15] and not a["mask"][0, 0]
    out = to_model_space(a, Preprocess(size=20, policy="squash").geometry(40, 20))
    mask = np.array(out["mask"])
    assert mask.shape == (20, 20) and mask[7, 7] and not mask[0, 0]


def test_pascal_voc_xml_is_one_based(tmp_path):
    xml = """<annotation><folder>VOC2012</folder><filename>2007_000027.jpg</filename>
      <size><width>486</width><height>500</height><depth>3</depth></size>
      <object><name>person</name><bndbox><xmin>174</xmin><ymin>101</ymin><xmax>349</xmax>
      <ymax>351</ymax></bndbox></object></annotation>"""
    (tmp_path / "a.xml").write_text(xml)
    a = load_annotations(str(tmp_path))["2007_000027.jpg"]
    assert a["boxes"] == [[173.0, 100.0, 348.0, 350.0]] and a["label"] == "person"
