"""COCO evaluation of a detector with pycocotools: box AP and mask AP, as JSON-ready numbers.

:func:`coco_evaluate` runs pycocotools' ``COCOeval`` on the ground truth (an
instances JSON file, crowd regions included) and a list of results in COCO's
result format (``image_id``, ``category_id``, ``bbox`` as ``[x, y, w, h]``,
``score`` and, for masks, ``segmentation`` as RLE). It returns flat keys,
``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, ``bbox_APs``, ``bbox_APm``,
``bbox_APl`` and the same for ``segm``, as fractions (COCO's tables print
them x100); None where COCO leaves a number undefined (e.g. ``APs`` with no
small objects). No result at all scores 0.0 (pycocotools itself cannot load
an empty result list).

:func:`predict` runs a torchvision detector over batches and turns its
outputs into such results (:func:`detections_to_results`).

Example:
    >>> results = predict(detector, loader, category_ids=data.category_ids)
    >>> coco_evaluate("shapes/annotations/instances_val.json", results)["bbox_AP"]
    0.412
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocohub.errors import ConfigError

from .coco import read_coco_json, require_pycocotools

__all__ = ["METRIC_NAMES", "coco_evaluate", "detections_to_results", "predict"]

#: COCOeval.stats[0:6], in order, by the names the metrics carry.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_IOU_TYPES = ("bbox", "segm")


def _ground_truth(source: str | os.PathLike[str] | dict[str, Any] | Any) -> Any:
    """A pycocotools ``COCO`` of ``source`` (a path, a loaded dict, or a ``COCO``), quietly."""
    require_pycocotools()
    from pycocotools.coco import COCO

    if isinstance(source, COCO):
        return source
    content = copy.deepcopy(source) if isinstance(source, dict) else read_coco_json(Path(source))
    for ann in content.get("annotations", []):  # optional in files, needed by COCOeval
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    coco = COCO()
    coco.dataset = content
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _results(ground_truth: Any, results: Sequence[dict[str, Any]]) -> Any:
    """The results as a ``COCO`` object; an empty one where there are none."""
    from pycocotools.coco import COCO

    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return ground_truth.loadRes(list(results))
    empty = COCO()
    empty.dataset = {
        "images": list(ground_truth.dataset["images"]),
        "categories": copy.deepcopy(ground_truth.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def coco_evaluate(
    ground_truth: str | os.PathLike[str] | dict[str, Any] | Any,
    results: Sequence[dict[str, Any]],
    iou_types: Iterable[str] = _IOU_TYPES,
) -> dict[str, float | None]:
    """COCO AP of ``results`` against ``ground_truth``, per IoU type (``bbox``, ``segm``).

    Args:
        ground_truth: an instances JSON file, its loaded dict, or a pycocotools ``COCO``.
        results: COCO result dicts; ``segm`` needs a ``segmentation`` in each.
        iou_types: which evaluations to run.

    Returns:
        ``{"bbox_AP": ..., "bbox_AP50": ..., ..., "segm_APl": ...}`` (see the module).

    Example:
        >>> coco_evaluate("val.json", [], iou_types=["bbox"])["bbox_AP"]
        0.0
    """
    require_pycocotools()
    from pycocotools.cocoeval import COCOeval

    types = list(iou_types)
    unknown = [t for t in types if t not in _IOU_TYPES]
    if unknown:
        raise ConfigError(f"Unknown COCO IoU type {unknown[0]!r}; use 'bbox' or 'segm'.")
    if "segm" in types and any("segmentation" not in r for r in results):
        raise ConfigError("Mask AP ('segm') needs a segmentation in every result; drop 'segm'.")
    gt = _ground_truth(ground_truth)
    dt = _results(gt, results)
    metrics: dict[str, float | None] = {}
    for iou_type in types:
        evaluation = COCOeval(gt, dt, iouType=iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        for name, value in zip(METRIC_NAMES, evaluation.stats[:6], strict=True):
            metrics[f"{iou_type}_{name}"] = None if value < 0 else float(value)
    return metrics


def detections_to_results(
    output: dict[str, torch.Tensor],
    image_id: int,
    category_ids: Sequence[int],
    *,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """One image's detector output (torchvision's, eval mode) as COCO result dicts.

    Boxes go from ``[x1, y1, x2, y2]`` to ``[x, y, w, h]``, labels ``1..C`` to
    ``category_ids``, and soft masks (``N x 1 x H x W``) to RLE at
    ``mask_threshold``.

    Example:
        >>> detections_to_results(detector([image])[0], 42, [1, 2, 3])[0]["category_id"]
        2
    """
    boxes = output["boxes"].detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    rles: list[Any] = [None] * len(labels)
    if "masks" in output:
        mask_utils = require_pycocotools()
        binary = (output["masks"].detach().float().cpu()[:, 0] > mask_threshold).numpy()
        rles = [mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))) for mask in binary]
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-able
    results = []
    for box, score, label, rle in zip(xywh, scores, labels, rles, strict=True):
        result = {
            "image_id": int(image_id),
            "category_id": int(category_ids[int(label) - 1]),
            "bbox": [round(v, 3) for v in box],
            "score": float(score),
        }
        if rle is not None:
            result["segmentation"] = rle
        results.append(result)
    return results


@torch.no_grad()
def predict(
    detector: torch.nn.Module,
    batches: Iterable[tuple[Sequence[torch.Tensor], Sequence[dict[str, Any]]]],
    category_ids: Sequence[int],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """COCO results of ``detector`` (eval mode) on ``(images, targets)`` batches.

    Each target needs its ``image_id``; ``dtype`` runs the forward pass under
    ``torch.autocast`` (None: float32). The detector is left in eval mode.

    Example:
        >>> loader = DataLoader(val_data, batch_size=4, collate_fn=collate_detection)
        >>> results = predict(detector, loader, val_data.category_ids)
    """
    device = torch.device(device)
    detector.eval()
    results: list[dict[str, Any]] = []
    for images, targets in batches:
        inputs = [image.as_subclass(torch.Tensor).to(device) for image in images]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = detector(inputs)
        for output, target in zip(outputs, targets, strict=True):
            results += detections_to_results(output, int(target["image_id"]), category_ids)
    return results
