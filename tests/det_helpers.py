"""Tiny COCO data sets and a tiny backbone for the detection tests (built here, no generator)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from hub_helpers import tiny_fmnist_model
from PIL import Image

from mocohub.artifact import save_pretrained

#: Image side of the fixtures: the detector resizes to it (--min-size), so nothing is scaled.
SIZE = 64
CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "bar"}]


def _rectangles(index: int) -> list[tuple[int, int, int, int, int]]:
    """(category id, x, y, w, h) of the objects drawn on image ``index``."""
    shift = (index * 7) % 20
    return [(3, 4 + shift, 6, 18, 18), (7, 30, 28 + shift // 2, 26, 10)]


def write_coco(root: Path, split: str, images: int, *, crowd: bool = False) -> Path:
    """``root/annotations/instances_{split}.json`` and ``root/{split}/*.png``: gray 64x64
    images with filled rectangles, polygon masks (and an RLE crowd region with ``crowd``)."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for index in range(images):
        pixels = np.full((SIZE, SIZE), 20, dtype=np.uint8)
        for category, x, y, w, h in _rectangles(index):
            pixels[y : y + h, x : x + w] = 200 if category == 3 else 120
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": 100 + index,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [polygon],
                }
            )
        if crowd:
            annotations.append(crowd_annotation(len(annotations) + 1, 100 + index))
        name = f"{split}_{index:03d}.png"
        Image.fromarray(pixels).save(folder / name)
        entries.append({"id": 100 + index, "file_name": name, "width": SIZE, "height": SIZE})
    content = {"images": entries, "annotations": annotations, "categories": CATEGORIES}
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def crowd_annotation(ann_id: int, image_id: int) -> dict[str, Any]:
    """A crowd region (uncompressed RLE, as COCO stores crowds) in the image's bottom-left."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[48:60, 2:12] = 1
    flat = mask.flatten(order="F")  # COCO's RLE runs down the columns
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 3,
        "bbox": [2, 48, 10, 12],
        "area": 120,
        "iscrowd": 1,
        "segmentation": {"size": [SIZE, SIZE], "counts": counts},
    }


def coco_folder(root: Path, train: int = 4, val: int = 2, **options: Any) -> Path:
    """A COCO data folder: train and val splits (see :func:`write_coco`)."""
    write_coco(root, "train", train, **options)
    write_coco(root, "val", val, **options)
    return root


def tiny_backbone(folder: Path) -> Path:
    """A gray ResNet-18, width 8, small stem, saved as a mocohub artifact folder."""
    save_pretrained(tiny_fmnist_model({"name": "tiny-det"}), folder)
    return folder


def edit_annotations(path: Path, change: Any) -> None:
    """Rewrite a COCO file through ``change(content)`` (which edits it in place)."""
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))
