"""Linear evaluation: a linear classifier on a frozen MoCo backbone (``mocohub lincls``).

The reference protocol (facebookresearch/moco ``main_lincls.py``): the
backbone is frozen and kept in eval mode (BatchNorm uses its pre-trained
running statistics); a new ``fc`` is initialised N(0, 0.01) with a zero bias
and trained alone with SGD (lr 30, momentum 0.9, weight decay 0, batch 256)
for 100 epochs, the lr x0.1 at epochs 60 and 80; training images get
RandomResizedCrop + horizontal flip, validation images Resize(size * 256 / 224)
+ CenterCrop(size), both normalised with the backbone's mean/std. After
training, the backbone's weights and buffers are compared with their values
before training, and any difference is an error (:class:`BackboneChangedError`).
Top-1/top-5 go to ``lincls.json``, one line per epoch to ``lincls_epochs.jsonl``.
The settings, the schedule and the resume state live in
:mod:`~mocohub.training.lincls_config`.

Also:

- ``preset="small"`` for 28-32 px images: RandomCrop(size, padding 4) + flip
  for training and no resize for validation (a centre crop only where the
  images are not ``size`` x ``size``); the optimisation is the reference's;
- ``cached_features=True``, a faster mode that is *not* the reference
  protocol: features of un-augmented images are extracted once and the
  classifier trains on them;
- under torchrun/srun, DDP as in pre-training: each rank takes its share of
  every batch (``DistributedSampler``), the classifier's gradients are
  averaged, and only rank 0 writes.

Example:
    >>> result = linear_eval("runs/fmnist", "fashion-mnist", "runs/fmnist/lincls",
    ...                      LinclsConfig(preset="small", cached_features=True, lr=1.0))
    >>> round(result["top1"], 3)
    0.895
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mocohub.artifact import get_config
from mocohub.errors import InputError, MocohubError
from mocohub.fileio import atomic_write_text

from .checkpoint import atomic_save
from .data import DatasetInfo, resolve_dataset
from .datasets import align_classes
from .distributed import DistributedEnv, all_gather_no_grad, init_from_env, is_distributed
from .eval_data import (
    AugmentedFeatures,
    CachedFeatures,
    EvalBatches,
    FeatureSource,
    ModelSource,
    TrainBatches,
    autocast_dtype,
    describe_model,
    freeze_backbone,
    load_backbone,
    model_record,
    place_backbone,
    same_images,
)
from .eval_transforms import EvalResize, preprocessing_at
from .lincls_config import (
    EPOCHS_NAME,
    HEAD_NAME,
    RESULT_NAME,
    STATE_NAME,
    LinclsConfig,
    epoch_line,
    lr_at,
    protocol_name,
    resumable_state,
)

__all__ = [
    "BackboneChangedError",
    "LinclsConfig",
    "LinearEvalDivergedError",
    "check_backbone_unchanged",
    "linear_eval",
    "lr_at",
    "protocol_name",
]


class BackboneChangedError(MocohubError, RuntimeError):
    """The frozen backbone's weights or buffers changed during linear evaluation."""


class LinearEvalDivergedError(MocohubError):
    """The linear classifier's loss became NaN or infinite."""


def check_backbone_unchanged(backbone: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Raise :class:`BackboneChangedError` unless ``backbone``'s state equals ``before``.

    Compares every parameter and buffer (BN running statistics included)
    exactly, like the reference's ``sanity_check``.

    Example:
        >>> before = {k: v.clone() for k, v in backbone.state_dict().items()}
        >>> check_backbone_unchanged(backbone, before)  # nothing changed: no error
    """
    after = backbone.state_dict()
    changed = sorted(
        key
        for key in before.keys() | after.keys()
        if key not in before or key not in after or not torch.equal(before[key], after[key].cpu())
    )
    if changed:
        raise BackboneChangedError(
            f"The frozen backbone changed during linear evaluation ({len(changed)} tensors, "
            f"e.g. {changed[0]}), so the accuracy is not that of the pre-trained weights; "
            "this is a bug in mocohub: please report it."
        )


def _snapshot(backbone: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in backbone.state_dict().items()}


def _weights_sha256(snapshot: dict[str, torch.Tensor]) -> str:
    """A digest of a backbone's weights and buffers (names, values and dtypes)."""
    digest = hashlib.sha256()
    for name in sorted(snapshot):
        tensor = snapshot[name].contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tensor.numel()};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _new_head(feature_dim: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(feature_dim, num_classes)
    nn.init.normal_(head.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def _largest_label(dataset: Any) -> int:
    """The largest label of a TensorImageDataset or ImageFolder (-1: unlabelled)."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        return int(labels.max())
    targets = getattr(dataset, "targets", None)
    return max(targets) if targets else -1


def _check_labels(train_info: DatasetInfo, val_info: DatasetInfo, val_labels_max: int) -> int:
    """The number of classes, after checking that both splits are labelled alike."""
    num_classes = train_info.num_classes
    if num_classes < 2:
        raise InputError(
            f"{train_info.source} has {num_classes} class(es); linear evaluation needs "
            "labelled training images of at least 2 classes."
        )
    if val_labels_max < 0:
        raise InputError(f"{val_info.source} has no labels; validation needs labelled images.")
    return num_classes


@torch.no_grad()
def _validate(head: nn.Module, features: FeatureSource) -> dict[str, float]:
    """Top-1/top-5 of ``head`` on the validation features (gathered from all ranks)."""
    head.eval()
    ranked, labels = [], []
    for batch, targets in features.val():
        logits = head(batch)
        ranked.append(logits.topk(min(5, logits.shape[1]), dim=1).indices)
        labels.append(targets)
    ranked_all, labels_all = torch.cat(ranked), torch.cat(labels)
    if features.sharded:
        ranked_all = all_gather_no_grad(ranked_all)[: features.val_size]
        labels_all = all_gather_no_grad(labels_all)[: features.val_size]
    hits = ranked_all == labels_all.view(-1, 1)
    return {"top1": float(hits[:, 0].double().mean()), "top5": float(hits.any(1).double().mean())}


def _train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    labels: torch.Tensor,
    totals: torch.Tensor,
) -> None:
    """One SGD step of the classifier; adds its loss sum, hits and samples to ``totals``.

    Nothing is read back to the host and nothing is copied to the device: the
    sums stay on the device until the epoch's end.
    """
    logits = net(batch)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = (logits.detach().argmax(1) == labels).sum()
    n = len(labels)  # a Python number: a tensor of it would be a copy to the device
    totals[:2] += torch.stack([loss.detach().double() * n, correct.double()])
    totals[2] += n


def _train_head(
    head: nn.Linear,
    features: FeatureSource,
    backbone: nn.Module,
    config: LinclsConfig,
    env: DistributedEnv,
    epoch_done: Callable[[dict[str, Any], dict[str, Any]], None],
    progress: bool,
    resumed: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """SGD on ``head`` for ``config.epochs`` epochs; one record per epoch.

    ``resumed`` (a saved state: ``epoch``, ``head``, ``optimizer``, ``records``)
    continues after its epoch. ``epoch_done(record, state)`` gets each epoch's
    record and the state to save.
    """
    net: nn.Module = head
    if features.sharded and is_distributed():
        net = DistributedDataParallel(
            head, device_ids=[env.device] if env.device.type == "cuda" else None
        )
    optimizer = torch.optim.SGD(
        head.parameters(),
        lr=lr_at(config, 0),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    records: list[dict[str, Any]] = []
    start = 0
    if resumed is not None:
        head.load_state_dict(resumed["head"])
        optimizer.load_state_dict(resumed["optimizer"])
        records, start = list(resumed["records"]), int(resumed["epoch"])
    for epoch in range(start, config.epochs):
        lr = lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        freeze_backbone(backbone)  # as the reference's model.eval() every epoch
        head.train()
        tick = time.perf_counter()
        totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, correct, seen
        bar = tqdm(
            features.train(epoch),
            total=len(features),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not (progress and env.is_main),
            leave=False,
        )
        for batch, labels in bar:
            _train_step(net, optimizer, batch, labels, totals)
        if features.sharded and is_distributed():
            dist.all_reduce(totals)
        loss_mean = float(totals[0] / totals[2])
        if not math.isfinite(loss_mean):
            raise LinearEvalDivergedError(
                f"The linear classifier's loss became {loss_mean} in epoch {epoch + 1}; "
                f"lower --lr (now {config.lr})."
            )
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            "loss": loss_mean,
            "train_top1": float(totals[1] / totals[2]),
        }
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            accuracy = _validate(head, features)
            record.update(val_top1=accuracy["top1"], val_top5=accuracy["top5"])
        record["seconds"] = time.perf_counter() - tick
        records.append(record)
        state = {
            "epoch": epoch + 1,
            "head": head.state_dict(),
            "optimizer": optimizer.state_dict(),
            "records": records,
        }
        epoch_done(record, state)
    return records


def linear_eval(
    model: ModelSource,
    data: Any,
    out_dir: str | os.PathLike[str] | None,
    config: LinclsConfig | None = None,
    *,
    val: Any = None,
    log: Callable[[str], None] | None = None,
    progress: bool = False,
    resume: bool = True,
) -> dict[str, Any]:
    """Train a linear classifier on a frozen backbone; return (and save) its accuracy.

    Args:
        model: anything :func:`mocohub.load` accepts (a registry name, an
            artifact folder or ``.safetensors`` file, ``hf-hub:org/name``, a
            mocohub run folder or checkpoint, a reference MoCo ``.pth.tar``),
            or a model it returned.
        data: labelled data :func:`~mocohub.training.data.resolve_dataset` accepts;
            its train split trains the classifier and its val split measures it.
        out_dir: where rank 0 writes ``lincls.json``, ``lincls_epochs.jsonl`` and
            ``linear_head.pt`` (None: nothing is written).
        config: the settings, the reference protocol by default.
        val: other labelled data to validate on (its val split) instead of ``data``'s.
        log: called with one line per epoch on rank 0 (e.g. ``print``).
        progress: a progress bar per epoch on rank 0.
        resume: continue an interrupted evaluation from ``out_dir``'s
            ``lincls_state.pt`` (written atomically after every epoch) when it
            holds the same model and settings; False starts afresh.

    Returns:
        ``top1`` and ``top5`` (fractions) of the last epoch, ``best_top1`` and
        its ``best_epoch``, the ``protocol`` followed (:func:`protocol_name`),
        the per-epoch records, the settings and the model's config.

    Example:
        >>> linear_eval("moco_v2_800ep_pretrain.pth.tar", "imagenet", "lincls")["top1"]
        >>> linear_eval("moco_r18_fashion_mnist", "fashion-mnist", None,
        ...             LinclsConfig(preset="small"))["protocol"]
        'small'

    """
    config = (config or LinclsConfig()).validate()
    started = time.perf_counter()
    env = init_from_env()
    backbone = load_backbone(model)
    model_config = get_config(backbone)
    prep = preprocessing_at(model_config.preprocessing, config.image_size)
    train_set, train_info = resolve_dataset(data, "train")
    val_set, val_info = resolve_dataset(data if val is None else val, "val")
    num_classes = _check_labels(train_info, val_info, _largest_label(val_set))
    val_set, val_info = align_classes(train_info, val_set, val_info, task="A linear classifier")
    val_is_train = same_images(train_set, train_info, val_set, val_info)  # also a --val of them
    dtype = autocast_dtype(config.precision)

    backbone = freeze_backbone(place_backbone(backbone, env.device))
    before = _snapshot(backbone)
    val_resize: EvalResize = "small" if config.preset == "small" else "reference"
    loader = {"batch_size": config.batch_size, "workers": config.workers}
    val_batches = EvalBatches(val_set, val_info, prep, val_resize, env, **loader)
    features: FeatureSource
    if config.cached_features:
        train_plain = EvalBatches(train_set, train_info, prep, val_resize, env, **loader)
        features = CachedFeatures(
            backbone, train_plain, val_batches, env, config.batch_size, config.seed, dtype
        )
    else:
        train_batches = TrainBatches(
            train_set, train_info, prep, config.preset, env, seed=config.seed, **loader
        )
        features = AugmentedFeatures(backbone, train_batches, val_batches, dtype)
    torch.manual_seed(config.seed)  # the same initial classifier on every rank
    head = _new_head(model_config.feature_dim, num_classes).to(env.device)

    described, weights = describe_model(model), _weights_sha256(before)
    resumed = resumable_state(out_dir, described, config, weights) if resume else None
    out = Path(out_dir) if out_dir is not None and env.is_main else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resumed is not None and log is not None:
            log(f"resuming from {out / STATE_NAME} after epoch {resumed['epoch']}")

    def epoch_done(record: dict[str, Any], state: dict[str, Any]) -> None:
        if out is not None:
            saved = {"model": described, "weights_sha256": weights, "config": config.to_dict()}
            atomic_save({**state, **saved}, out / STATE_NAME)
            # Rewritten whole each epoch (at most a few hundred short lines): a run that
            # fails before its first epoch leaves the previous run's file as it was.
            lines = "".join(json.dumps(r) + "\n" for r in state["records"])
            atomic_write_text(out / EPOCHS_NAME, lines)
        if log is not None and env.is_main:
            log(epoch_line(record, config.epochs, val_is_train=val_is_train))

    records = _train_head(head, features, backbone, config, env, epoch_done, progress, resumed)
    check_backbone_unchanged(backbone, before)

    validated = [r for r in records if "val_top1" in r]
    best = max(validated, key=lambda r: r["val_top1"])  # the first of equals
    result: dict[str, Any] = {
        "top1": records[-1]["val_top1"],
        "top5": records[-1]["val_top5"],
        "best_top1": best["val_top1"],
        "best_epoch": best["epoch"],
        "protocol": protocol_name(config),
        "model": described,
        "model_config": model_record(model_config),
        "data": str(train_info),
        "val_data": str(val_info),
        "val_is_train": val_is_train,
        "train_samples": train_info.num_samples,
        "val_samples": val_info.num_samples,
        "num_classes": num_classes,
        "classes": list(train_info.classes),
        "world_size": env.world_size,
        "device": str(env.device),
        "seconds": time.perf_counter() - started,
        "config": config.to_dict(),
        "epochs": records,
    }
    if out is not None:
        atomic_write_text(out / RESULT_NAME, json.dumps(result, indent=2) + "\n")
        classes = list(train_info.classes)
        atomic_save(
            {"fc": head.state_dict(), "classes": classes, "config": result["config"]},
            out / HEAD_NAME,
        )
    return result
