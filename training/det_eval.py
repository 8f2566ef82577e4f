"""Evaluating a detection run: COCO AP on every rank's share of the images, and ``eval-det``.

:func:`evaluate_detector` is what ``mocohub finetune-det`` runs every
``--eval-every`` epochs; :func:`evaluate_run` is ``mocohub eval-det``: the
newest intact checkpoint of a run folder, rebuilt from its ``config.json``.
The numbers are :func:`mocohub.detection.evaluate.coco_evaluate`'s.

Example:
    >>> evaluate_run("runs/det", "shapes")["bbox_AP"]
    0.51
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mocohub.detection.coco import CocoDetection, coco_split, collate_detection
from mocohub.errors import ConfigError, InputError
from mocohub.sysinfo import loader_workers

from .det_config import DetConfig
from .distributed import DistributedEnv, broadcast_buffers_from_rank0, init_from_env

__all__ = [
    "EVAL_NAME",
    "build_run_detector",
    "detector_channels",
    "evaluate_detector",
    "evaluate_run",
    "write_eval",
]

#: The evaluation a run writes at its end (and ``mocohub eval-det`` by default).
EVAL_NAME = "eval.json"


def build_run_detector(config: DetConfig, num_classes: int) -> Any:
    """The detector ``config`` describes, for ``num_classes`` (background included).

    Example:
        >>> build_run_detector(DetConfig(model="moco_r18_fashion_mnist"), num_classes=11)
    """
    from mocohub.detection import build_detector

    options: dict[str, Any] = {}
    for name in ("norm", "fpn_norm"):
        value = getattr(config, name)
        if value != "default":
            options[name] = None if value == "none" else value
    for name in ("trainable_layers", "min_size", "max_size", "fpn_channels"):
        if getattr(config, name) is not None:
            options[name] = getattr(config, name)
    if config.rois_per_image is not None:
        options["box_batch_size_per_image"] = config.rois_per_image
    if config.rpn_proposals is not None:
        options["rpn_post_nms_top_n_train"] = config.rpn_proposals
        options["rpn_pre_nms_top_n_train"] = 2 * config.rpn_proposals
    return build_detector(
        config.model, config.kind, num_classes=num_classes, pretrained=config.pretrained, **options
    )


def detector_channels(detector: Any) -> int:
    """The image channels ``detector`` takes (1: gray, 3: RGB)."""
    return len(detector.transform.image_mean)


def evaluate_detector(
    detector: torch.nn.Module,
    data: CocoDetection,
    env: DistributedEnv,
    *,
    batch_size: int = 2,
    workers: int = 0,
    dtype: torch.dtype | None = None,
) -> dict[str, float | None]:
    """COCO AP of ``detector`` on ``data``; every rank must call it, rank 0 gets the numbers.

    Each rank predicts every ``world``-th image with rank 0's BatchNorm
    statistics; rank 0 gathers the results and runs pycocotools (box AP, and
    mask AP for a Mask R-CNN). The detector is put back in training mode.

    Example:
        >>> evaluate_detector(detector, val_data, init_from_env())["bbox_AP50"]
        0.83
    """
    from mocohub.detection.evaluate import coco_evaluate, predict

    model = (
        detector.module
        if isinstance(detector, torch.nn.parallel.DistributedDataParallel)
        else detector
    )
    broadcast_buffers_from_rank0(model)
    mine = list(range(env.rank, len(data), env.world_size))
    loader = DataLoader(
        torch.utils.data.Subset(data, mine),
        batch_size=batch_size,
        collate_fn=collate_detection,
        num_workers=loader_workers(workers),
        generator=torch.Generator(),
    )
    results = predict(model, loader, data.category_ids, device=env.device, dtype=dtype)
    model.train()
    if env.world_size > 1:
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    if not env.is_main:
        return {}
    iou_types = ["bbox", "segm"] if data.masks else ["bbox"]
    return coco_evaluate(data.annotation_file, results, iou_types)


def write_eval(path: Path, metrics: dict[str, Any]) -> Path:
    """Write an evaluation as JSON, atomically; return ``path``."""
    from mocohub.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    return path


def evaluate_run(
    run_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    val_ann: str | None = None,
    batch_size: int = 2,
    workers: int = 0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """COCO AP of a ``finetune-det`` run's newest intact checkpoint on DATA's val split.

    Every rank of a torchrun/srun launch must call it; rank 0 gets the result
    (the others ``{}``): the checkpoint, its ``(epoch, step)``, the annotation
    file and the AP numbers.

    Example:
        >>> evaluate_run("runs/det", "shapes")["segm_AP"]
        0.47
    """
    from mocohub.precision import autocast_dtype

    from . import checkpoint as ckpt

    run_dir = Path(run_dir)
    try:
        config = DetConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError) as e:
        raise InputError(
            f"{run_dir} is not a finetune-det run folder (its config.json: {e}); pass one."
        ) from None
    path, _ = ckpt.find_resumable_checkpoint(run_dir)
    if path is None:
        raise InputError(f"{run_dir} holds no intact checkpoint to evaluate; train it first.")
    checkpoint = ckpt.load_checkpoint(path)
    env = init_from_env()
    masks = config.kind == "mask_rcnn"
    val_data = CocoDetection(*coco_split(data, "val", val_ann), train=False, masks=masks)
    if checkpoint.get("categories") != val_data.category_ids:
        raise InputError(
            f"{val_data.annotation_file} has other categories than the run was trained on "
            f"({len(val_data.category_ids)} against {len(checkpoint.get('categories', []))}); "
            "evaluate on data with the training data's categories."
        )
    torch.manual_seed(config.seed)
    detector = build_run_detector(config, val_data.num_classes).to(env.device)
    val_data.channels = detector_channels(detector)
    try:
        detector.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise ConfigError(
            f"The checkpoint {path} does not fit the detector its config.json describes "
            f"({str(e).splitlines()[0][:160]}); was {config.model} changed since?"
        ) from None
    dtype = autocast_dtype(precision, env.device)
    metrics = evaluate_detector(
        detector, val_data, env, batch_size=batch_size, workers=workers, dtype=dtype
    )
    if not env.is_main:
        return {}
    where = {"checkpoint": path.name, "epoch": checkpoint["epoch"], "step": checkpoint["step"]}
    return {**where, "annotations": str(val_data.annotation_file), **metrics}
