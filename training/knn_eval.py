"""k-NN evaluation of a pre-trained backbone (``mocohub knn``).

Embeds a labelled training set (the neighbours) and a labelled validation set
(the queries) with the frozen backbone, its pooled features L2-normalised and
its own preprocessing (images already at its crop size are only normalised;
others are resized to ``size * 256 / 224`` and centre-cropped), then classifies
each query by a weighted vote of its ``k`` most similar neighbours
(:func:`mocohub.knn.knn_accuracy`; InstDisc style, k=200 and t=0.1 as the MoCo
reference demo). ``k`` is capped at the number of neighbours; the result records
the ``k`` used and the ``k_requested``. The model is anything :func:`mocohub.load`
accepts. Under torchrun/srun each rank embeds a share.

Example:
    >>> result = knn_evaluate("moco_r18_fashion_mnist", "fashion-mnist")
    >>> result["top1"], result["k"]
    (0.8839, 200)
"""

from __future__ import annotations

import time
from typing import Any

from mocohub.artifact import get_config
from mocohub.errors import InputError
from mocohub.knn import knn_accuracy

from .data import resolve_dataset
from .datasets import align_classes
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
    model_record,
    place_backbone,
    same_images,
)

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
        model: anything :func:`mocohub.load` accepts (a registry name, an
            artifact folder or ``.safetensors`` file, ``hf-hub:org/name``, a
            mocohub run folder or checkpoint, a reference MoCo ``.pth.tar``),
            or a model it returned.
        train: labelled data (its train split) whose features vote.
        val: labelled data (its val split) to classify; default: ``train``'s
            val split (with no such split, the training images themselves,
            each classified by the others, leave-one-out; ``val_is_train`` in
            the result flags it).
        k, t: neighbours (capped at the number of ``train`` images) and vote
            temperature.
        batch_size, workers: embedding batches; DataLoader workers for image folders.
        precision: ``fp32`` or ``bf16`` (autocast) for the backbone.

    Returns:
        ``top1`` and ``top5`` (fractions), ``k`` (the number of neighbours
        that voted), ``k_requested``, ``t``, the sample counts and what was
        evaluated (``model``, ``arch``, ``feature_dim``, ``model_config``).

    Example:
        >>> knn_evaluate("runs/fmnist", "fashion-mnist", k=20)["top1"]
        0.861
    """
    started = time.perf_counter()
    env = init_from_env()
    dtype = autocast_dtype(precision)
    backbone = load_backbone(model)
    config = get_config(backbone)
    train_set, train_info = resolve_dataset(train, "train")
    val_set, val_info = resolve_dataset(train if val is None else val, "val")
    for data_info in (train_info, val_info):
        if data_info.num_classes == 0:
            raise InputError(f"{data_info.source} has no labels; k-NN needs labelled images.")
    val_set, val_info = align_classes(train_info, val_set, val_info, task="k-NN")
    backbone = freeze_backbone(place_backbone(backbone, env.device))
    workers = default_workers() if workers is None else workers
    # No held-out split: each training image is classified by the others (leave-one-out),
    # never by itself, which would make k=1 score 100%.
    val_is_train = same_images(train_set, train_info, val_set, val_info)  # also a --val of them
    features = []
    sets = [(train_set, train_info)] + ([] if val_is_train else [(val_set, val_info)])
    for dataset, data_info in sets:
        batches = EvalBatches(
            dataset,
            data_info,
            config.preprocessing,
            "auto",
            env,
            batch_size=batch_size,
            workers=workers,
        )
        features.append(extract_features(backbone, batches, env, dtype=dtype))
    (train_x, train_y), (val_x, val_y) = features[0], features[-1]
    num_classes = train_info.num_classes
    used = min(k, len(train_x) - int(val_is_train))  # knn_accuracy caps k the same way
    accuracy = knn_accuracy(
        train_x,
        train_y,
        val_x,
        val_y,
        k=used,
        t=t,
        num_classes=num_classes,
        leave_one_out=val_is_train,
    )
    return {
        **accuracy,
        "k": used,
        "k_requested": k,
        "t": t,
        "model": describe_model(model),
        "arch": config.arch,
        "feature_dim": config.feature_dim,
        "model_config": model_record(config),
        "train": str(train_info),
        "val": str(val_info),
        "val_is_train": val_is_train,
        "train_samples": train_info.num_samples,
        "val_samples": val_info.num_samples,
        "seconds": time.perf_counter() - started,
    }
