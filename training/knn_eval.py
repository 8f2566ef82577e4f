"""k-NN evaluation of a pre-trained backbone (``mocohub knn``).

Embeds a labelled training set (the neighbours) and a labelled validation set
(the queries) with the frozen backbone, its pooled features L2-normalised and
its own preprocessing (images already at its crop size are only normalised;
others are resized to ``size * 256 / 224`` and centre-cropped), then classifies
each query by a weighted vote of its ``k`` most similar neighbours
(:func:`mocohub.knn.knn_accuracy`; InstDisc style, k=200 and t=0.1 as the MoCo
reference demo). Under torchrun/srun each rank embeds a share.

Example:
    >>> result = knn_evaluate("runs/fmnist", "fashion-mnist")
    >>> result["top1"], result["top5"]
    (0.853, 0.992)
"""

from __future__ import annotations

import time
from typing import Any

from mocohub.errors import InputError
from mocohub.knn import knn_accuracy

from .data import resolve_dataset
from .distributed import init_from_env
from .eval_data import (
    EvalBatches,
    ModelSource,
    autocast_dtype,
    default_workers,
    describe_model,
    extract_features,
    freeze_backbone,
    load_backbone,
    place_backbone,
    same_images,
)
from .eval_transforms import preprocessing_from_info

__all__ = ["knn_evaluate"]


def knn_evaluate(
    model: ModelSource,
    train: Any,
    val: Any = None,
    *,
    k: int = 200,
    t: float = 0.1,
    batch_size: int = 256,
    workers: int | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Weighted k-NN top-1/top-5 of a backbone's features, ``train`` as neighbours.

    Args:
        model: a mocohub run folder or checkpoint, a reference MoCo ``.pth.tar``,
            or a ``(backbone, info)`` pair from
            :func:`mocohub.convert.backbone_from_checkpoint`.
        train: labelled data (its train split) whose features vote.
        val: labelled data (its val split) to classify; default: ``train``'s
            val split (with no such split, the training images themselves,
            which ``val_is_train`` in the result flags).
        k, t: neighbours and vote temperature.
        batch_size, workers: embedding batches; DataLoader workers for image folders.
        precision: ``fp32`` or ``bf16`` (autocast) for the backbone.

    Returns:
        ``top1`` and ``top5`` (fractions), ``k``, ``t``, the sample counts and
        what was evaluated.

    Example:
        >>> knn_evaluate("runs/fmnist", "fashion-mnist", k=20)["top1"]
        0.861
    """
    started = time.perf_counter()
    env = init_from_env()
    dtype = autocast_dtype(precision)
    backbone, info = load_backbone(model)
    prep = preprocessing_from_info(info)
    train_set, train_info = resolve_dataset(train, "train")
    val_set, val_info = resolve_dataset(train if val is None else val, "val")
    for data_info in (train_info, val_info):
        if data_info.num_classes == 0:
            raise InputError(f"{data_info.source} has no labels; k-NN needs labelled images.")
    backbone = freeze_backbone(place_backbone(backbone, env.device))
    workers = default_workers() if workers is None else workers
    features = []
    for dataset, data_info in ((train_set, train_info), (val_set, val_info)):
        batches = EvalBatches(
            dataset, data_info, prep, "auto", env, batch_size=batch_size, workers=workers
        )
        features.append(extract_features(backbone, batches, env, dtype=dtype))
    (train_x, train_y), (val_x, val_y) = features
    num_classes = max(train_info.num_classes, val_info.num_classes)
    accuracy = knn_accuracy(train_x, train_y, val_x, val_y, k=k, t=t, num_classes=num_classes)
    return {
        **accuracy,
        "k": k,
        "t": t,
        "model": describe_model(model, info),
        "arch": info["arch"],
        "feature_dim": int(info["feature_dim"]),
        "train": str(train_info),
        "val": str(val_info),
        "val_is_train": val is None and same_images(train_set, train_info, val_set, val_info),
        "train_samples": train_info.num_samples,
        "val_samples": val_info.num_samples,
        "seconds": time.perf_counter() - started,
    }
