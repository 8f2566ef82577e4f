"""Detection fine-tuning: a MoCo backbone in torchvision's Mask/Faster R-CNN, trained on COCO data.

``finetune_detector(config, data, run_dir)`` runs in every process of a run,
like :func:`mocohub.training.train.train`, and shares its machinery rather
than copying it: the process group from the environment (torchrun, srun),
the run folder's rules (:mod:`.run_folder`: refusal, ``--restart``, cleanup of a
failed start, pruning), atomic checkpoints (:mod:`.checkpoint`), the
bookkeeping of the steps (:class:`~.progress.TrainingProgress`: SIGTERM,
NaN losses, progress bar, ``metrics.jsonl``, TensorBoard, ``curves.png``) and
mocohub's precision policy. Only rank 0 writes.

A resumed run continues bit for bit (on the same hardware and threads): the
batches and their flips derive from (seed, epoch), the learning rate from the
iteration alone, the detector's own sampling from the global RNG that the
checkpoint restores, and DataLoader workers never draw from it.

COCO evaluation (:mod:`mocohub.detection.evaluate`) runs every
``eval_every`` epochs and at the end, each rank predicting its share of the
validation images; its AP goes into the epoch's record and the final one
into ``RUN/eval.json``.

Example:
    >>> config = DetConfig(model="moco_r18_fashion_mnist", batch_size=8, epochs=12)
    >>> finetune_detector(config, "shapes", "runs/det")["bbox_AP"]
    0.51
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mocohub.detection.coco import CocoDetection, coco_split, collate_detection
from mocohub.errors import ConfigError, InputError
from mocohub.precision import autocast_dtype
from mocohub.sysinfo import loader_workers

from .det_config import DetConfig
from .det_eval import (
    EVAL_NAME,
    build_run_detector,
    detector_channels,
    evaluate_detector,
    write_eval,
)
from .distributed import DistributedEnv, init_from_env, wrap_ddp
from .progress import StopSignal, TrainingProgress, ignore_stop_signals, interrupted
from .run_folder import (
    FailedStartCleanup,
    claim_run_folder,
    discard_files,
    disk_errors,
    open_run,
    prune_checkpoints,
    tensor_bytes,
)
from .views import epoch_batches, step_seed

__all__ = ["finetune_detector"]

logger = logging.getLogger(__name__)


def _to_device(
    images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Plain tensors (not tv_tensors) on ``device``, as torchvision's detectors take them."""
    moved = [
        {
            k: v.as_subclass(torch.Tensor).to(device) if torch.is_tensor(v) else v
            for k, v in t.items()
        }
        for t in targets
    ]
    return [image.as_subclass(torch.Tensor).to(device) for image in images], moved


def _epoch_loader(
    data: CocoDetection, epoch: int, steps: range, config: DetConfig, env: DistributedEnv
) -> DataLoader[Any]:
    """This rank's batches of ``epoch`` for ``steps``: a seeded order and seeded flips."""
    rows = epoch_batches(len(data), epoch, config.seed, config.batch_size, env).tolist()
    flip_generator = torch.Generator().manual_seed(step_seed(config.seed, epoch, 0, -2))
    flips = (torch.rand(len(data), generator=flip_generator) < 0.5).tolist()
    keys = [[(index, flips[index]) for index in rows[step]] for step in steps]
    return DataLoader(
        data,
        batch_sampler=keys,
        collate_fn=collate_detection,
        num_workers=loader_workers(config.workers),
        worker_init_fn=ignore_stop_signals,  # the main process stops them
        # Its own generator: worker seeds never draw from the global RNG the run restores.
        generator=torch.Generator().manual_seed(config.seed),
    )


def _val_data(
    data: str | os.PathLike[str], val_ann: str | None, masks: bool
) -> CocoDetection | None:
    """The validation split, or None when DATA has none and none was named."""
    try:
        files = coco_split(data, "val", val_ann)
    except InputError:
        if val_ann is not None:
            raise
        return None
    return CocoDetection(*files, train=False, masks=masks)


def finetune_detector(
    config: DetConfig,
    data: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    *,
    train_ann: str | None = None,
    val_ann: str | None = None,
    resume: str | None = None,
    restart: bool = False,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``config.model`` as a detector on COCO data ``data``; write the run to ``run_dir``.

    Args:
        config: the run's settings (:class:`~mocohub.training.det_config.DetConfig`).
        data: a COCO folder (:func:`mocohub.detection.coco.coco_split`).
        run_dir: the run folder: config.json, metrics.jsonl, curves.png,
            tensorboard/, checkpoints, eval.json.
        train_ann, val_ann: annotation files instead of DATA/annotations/instances_*.json.
        resume: ``"auto"`` (the newest intact checkpoint in ``run_dir``) or a
            checkpoint of this run; None starts afresh.
        restart: discard the run already in ``run_dir`` instead of refusing.
        progress: show a progress bar (rank 0).
        stop_after_steps: stop after this many steps as if SIGTERM had come.

    Returns:
        The last epoch's metrics (losses, lr, AP where evaluated); when the
        run was already complete, ``{"epoch": E, "already_complete": True}``.
    """
    from . import checkpoint as ckpt

    config.validate()
    env = init_from_env()
    if config.batch_size % env.world_size:
        raise ConfigError(
            f"The global batch size {config.batch_size} must divide evenly over "
            f"{env.world_size} processes; change --batch-size."
        )
    masks = config.kind == "mask_rcnn"
    # Bad data fails here, before anything is built or written.
    train_data = CocoDetection(*coco_split(data, "train", train_ann), train=True, masks=masks)
    val_data = _val_data(data, val_ann, masks)
    steps_per_epoch = len(train_data) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"The {len(train_data)} training images make no batch of {config.batch_size}; "
            "lower --batch-size."
        )
    total = config.total_iters(steps_per_epoch)
    end = divmod(total, steps_per_epoch)  # the final checkpoint's (epoch, step)
    run_config = replace(config, epochs=config.run_epochs(steps_per_epoch))

    run_dir = Path(run_dir)
    source, damaged = ckpt.find_resumable_checkpoint(run_dir) if resume == "auto" else (resume, [])
    if damaged and source is None:
        raise InputError(
            f"Every checkpoint in {run_dir} is damaged ({damaged[0][0].name}: {damaged[0][1]}); "
            "start the run again with --restart instead of --resume auto."
        )
    checkpoint = ckpt.load_checkpoint(Path(source)) if source is not None else None
    if checkpoint is not None and "categories" not in checkpoint:
        raise InputError(f"{source} is not a checkpoint of `mocohub finetune-det`; pass one.")
    point = ckpt.checkpoint_point(checkpoint) if checkpoint is not None else None
    discard = claim_run_folder(run_dir, env, resume, source, point, restart)
    if point is not None and point >= end:
        return {"epoch": point[0], "already_complete": True}

    torch.manual_seed(config.seed)  # the same new heads on every rank
    detector = build_run_detector(config, train_data.num_classes).to(env.device)
    for dataset in (train_data, val_data):
        if dataset is not None:
            dataset.channels = detector_channels(detector)
    dtype = autocast_dtype(config.precision, env.device)
    optimizer = torch.optim.SGD(
        [p for p in detector.parameters() if p.requires_grad],
        lr=config.lr_at(0, total),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scaler = torch.amp.GradScaler(env.device.type, enabled=dtype == torch.float16)
    start_epoch, start_step, resumed = 0, 0, None
    if checkpoint is not None:
        if checkpoint["categories"] != train_data.category_ids:
            raise ConfigError(
                f"{source} was trained on categories {checkpoint['categories'][:5]}..., "
                "not this data's; resume on the same data."
            )
        start_epoch, start_step = ckpt.restore_training_state(
            checkpoint, detector, optimizer, scaler
        )
        resumed = checkpoint.get("loop") if start_step else None
    net: torch.nn.Module = wrap_ddp(detector, env.device) if env.world_size > 1 else detector
    with disk_errors(run_dir):
        if env.is_main:
            discard_files(discard)
            ckpt.remove_orphan_temporaries(run_dir)
            for bad, problem in damaged:
                aside = ckpt.set_aside_damaged([bad])  # kept for inspection
                logger.warning(
                    "mocohub: %s is damaged (%s); resuming from %s instead (kept as %s).",
                    bad,
                    problem,
                    Path(str(source)).name,
                    aside[0].name if aside else bad.name,
                )
    cleanup = FailedStartCleanup(run_dir, enabled=env.is_main)
    losses: dict[str, torch.Tensor] = {}

    def save(epoch: int, step: int) -> Path | None:
        path = None
        if env.is_main:
            state = ckpt.training_state(
                detector, optimizer, scaler, None, epoch, step, run_config.to_dict()
            )
            state["categories"] = train_data.category_ids
            parts = {k: v.detach().cpu() for k, v in losses.items()}
            state["loop"] = {**tracker.state_dict(), "losses": parts} if step else None
            with disk_errors(run_dir, needed=tensor_bytes(state)):
                path = ckpt.save_checkpoint(run_dir, state, epoch=epoch, step=step, keep_last=None)
            prune_checkpoints(run_dir)
            cleanup.checkpoint_saved()
        tracker.checkpoint_saved()
        return path

    def evaluate() -> dict[str, Any]:
        if val_data is None:
            return {}
        batch = max(config.batch_size // env.world_size, 1)
        # None (null in JSON): a number COCO leaves undefined, e.g. APl without large objects.
        return evaluate_detector(
            net, val_data, env, batch_size=batch, workers=config.workers, dtype=dtype
        )

    metrics: dict[str, Any] = {}
    with (
        disk_errors(run_dir),
        cleanup,
        StopSignal() as stop,
        open_run(run_dir, run_config, env, point) as log,
    ):
        tracker = TrainingProgress(
            run_config,
            env,
            steps_per_epoch,
            log,
            stop,
            stop_after_steps=stop_after_steps,
            progress_bar=progress,
            run_dir=run_dir,
        )
        tracker.have_checkpoint = checkpoint is not None
        for epoch in range(start_epoch, run_config.epochs):
            last_step = steps_per_epoch if epoch < end[0] else end[1]
            net.train()
            tracker.begin_epoch(
                epoch, start_step, config.lr_at(epoch * steps_per_epoch, total), resumed
            )
            losses = {k: v.to(env.device) for k, v in (resumed or {}).get("losses", {}).items()}
            loader = _epoch_loader(train_data, epoch, range(start_step, last_step), config, env)
            for step, (images, targets) in enumerate(loader, start=start_step):
                tracker.lr = config.lr_at(epoch * steps_per_epoch + step, total)
                for group in optimizer.param_groups:
                    group["lr"] = tracker.lr
                images, targets = _to_device(images, targets, env.device)
                with torch.autocast(env.device.type, dtype=dtype, enabled=dtype is not None):
                    loss_dict = net(images, targets)
                loss = torch.stack(list(loss_dict.values())).sum()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                for name, value in loss_dict.items():
                    losses[name] = losses.get(name, 0) + value.detach().float()
                checkpoint_now, stop_now = tracker.step_done(step, loss.detach(), len(images))
                if (checkpoint_now or stop_now) and step + 1 < last_step:
                    path = save(epoch, step + 1)
                    if stop_now:
                        raise interrupted(stop.signum, epoch, step + 1, path)
            done_steps = tracker.epoch_steps
            metrics = tracker.end_epoch()
            metrics.update({k: float(v) / max(done_steps, 1) for k, v in losses.items()})
            finished = (epoch + 1, 0) if last_step == steps_per_epoch else (epoch, last_step)
            final = finished == end
            if final or (config.eval_every and (epoch + 1) % config.eval_every == 0):
                metrics.update(evaluate())
            log.write({"event": "epoch", **metrics})
            path = save(*finished)
            if final and env.is_main and val_data is not None:
                where = {
                    "checkpoint": path.name if path else None,
                    "epoch": finished[0],
                    "step": finished[1],
                }
                scores = {k: v for k, v in metrics.items() if k.startswith(("bbox_", "segm_"))}
                write_eval(
                    run_dir / EVAL_NAME,
                    {**where, "annotations": str(val_data.annotation_file), **scores},
                )
            if stop.signum and not final:
                raise interrupted(stop.signum, *finished, path)
            start_step, resumed = 0, None
    return metrics
