"""mocohub.detection: MoCo backbones in torchvision's Faster/Mask R-CNN.

Example:
    >>> from mocohub.detection import build_detector
    >>> detector = build_detector("moco_r18_fashion_mnist", "mask_rcnn", num_classes=11)

A small detection set to try it on: ``python -m mocohub.detection.synthetic --out DIR``
(:mod:`mocohub.detection.synthetic`).
"""

from __future__ import annotations

from mocohub.detection.build import build_detector
from mocohub.detection.coco import CocoDataError, CocoDetection, coco_split, collate_detection
from mocohub.detection.evaluate import coco_evaluate, detections_to_results, predict

__all__ = [
    "CocoDataError",
    "CocoDetection",
    "build_detector",
    "coco_evaluate",
    "coco_split",
    "collate_detection",
    "detections_to_results",
    "predict",
]
