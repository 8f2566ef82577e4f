"""COCO evaluation (mocohub.detection.evaluate): pycocotools' AP of known results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pycocotools.mask as mask_utils
import pytest
import torch
from det_helpers import SIZE, coco_folder

from mocohub.detection.coco import CocoDetection, coco_split
from mocohub.detection.evaluate import coco_evaluate, detections_to_results
from mocohub.errors import ConfigError


def _ground_truth_results(annotation_file: Path) -> list[dict[str, Any]]:
    """Every non-crowd ground-truth object as a result: its box, its mask as RLE, score 1."""
    content = json.loads(annotation_file.read_text())
    sizes = {image["id"]: (image["height"], image["width"]) for image in content["images"]}
    results = []
    for ann in content["annotations"]:
        if ann["iscrowd"]:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], *sizes[ann["image_id"]]))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "score": 1.0,
                "segmentation": rle,
            }
        )
    return results


@pytest.fixture
def val_file(tmp_path: Path) -> Path:
    """A val split of 3 images, each with 2 objects and a crowd region."""
    return coco_split(coco_folder(tmp_path / "data", train=1, val=3, crowd=True), "val")[0]


def test_ground_truth_as_predictions_scores_1(val_file: Path) -> None:
    metrics = coco_evaluate(val_file, _ground_truth_results(val_file))
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["bbox_APl"] is None  # no large objects: COCO leaves it undefined


def test_empty_predictions_score_0(val_file: Path) -> None:
    metrics = coco_evaluate(val_file, [])
    assert metrics["bbox_AP"] == 0.0 and metrics["segm_AP"] == 0.0
    assert metrics["bbox_AP50"] == 0.0


def test_shifted_boxes_pass_iou_50_not_75(val_file: Path) -> None:
    """Boxes moved by 3 of their 18-26 pixels keep IoU between 0.5 and 0.75 for the squares
    (AP50 counts them, AP75 not): the numbers follow the overlap, not a constant."""
    results = _ground_truth_results(val_file)
    for result in results:
        x, y, w, h = result["bbox"]
        result["bbox"] = [x + 3, y + 3, w, h] if result["category_id"] == 3 else [x, y, w, h]
    metrics = coco_evaluate(val_file, results, iou_types=["bbox"])
    assert metrics["bbox_AP50"] == pytest.approx(1.0)
    assert metrics["bbox_AP75"] == pytest.approx(0.5, abs=0.02)  # one of two categories
    assert 0.0 < metrics["bbox_AP"] < 1.0
    assert "segm_AP" not in metrics


def test_detector_outputs_round_trip_to_ap_1(val_file: Path) -> None:
    """torchvision-style outputs (xyxy boxes, labels 1..C, soft N x 1 x H x W masks) made
    from the dataset's own targets convert to results that score AP 1.0: boxes, category
    ids and RLE masks all come out right."""
    data = CocoDetection(val_file, val_file.parent.parent / "val", train=True)
    results = []
    for index in range(len(data)):
        _, target = data[index]
        output = {
            "boxes": target["boxes"].as_subclass(torch.Tensor),
            "labels": target["labels"],
            "scores": torch.linspace(0.9, 0.8, len(target["labels"])),
            "masks": target["masks"].as_subclass(torch.Tensor)[:, None].float() * 0.9,
        }
        results += detections_to_results(output, target["image_id"], data.category_ids)
    assert {r["category_id"] for r in results} == {3, 7}
    assert results[0]["bbox"] == [4.0, 6.0, 18.0, 18.0]
    json.dumps(results)  # JSON-able, as eval files need
    metrics = coco_evaluate(val_file, results)
    assert metrics["bbox_AP"] == pytest.approx(1.0) and metrics["segm_AP"] == pytest.approx(1.0)


def test_mask_threshold(val_file: Path) -> None:
    """Soft mask values at or under the threshold are background."""
    soft = torch.zeros(1, 1, SIZE, SIZE)
    soft[0, 0, :10, :10] = 0.7
    soft[0, 0, 10:20, :10] = 0.5
    output = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 20.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.5]),
        "masks": soft,
    }
    (result,) = detections_to_results(output, 7, [3, 7])
    assert result["category_id"] == 7 and result["bbox"] == [0.0, 0.0, 10.0, 20.0]
    assert int(mask_utils.area(result["segmentation"])) == 100


def test_mask_ap_needs_masks(val_file: Path) -> None:
    results = [
        {k: v for k, v in r.items() if k != "segmentation"} for r in _ground_truth_results(val_file)
    ]
    with pytest.raises(ConfigError, match="needs a segmentation"):
        coco_evaluate(val_file, results)
    assert coco_evaluate(val_file, results, iou_types=["bbox"])["bbox_AP"] == pytest.approx(1.0)
