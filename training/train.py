"""The MoCo pre-training loop: one function, read top to bottom.

``train(config, data, run_dir)`` runs in every process of a run (one process,
or one per GPU under torchrun/srun): it joins the process group the
environment describes, builds MoCo, and loops over epochs with mixed
precision, channels_last and ``torch.compile`` where they are safe. Only rank
0 writes checkpoints, metrics and logs. Checkpoints come at each epoch's end
and, with ``checkpoint_every``, inside epochs; SIGTERM/SIGINT save one at the
next agreement point and stop. ``resume="auto"`` continues from the newest
checkpoint in the run folder, identically, also mid-epoch: the batch order,
the augmentations and the key shuffle all derive from (seed, epoch, step),
and the RNG states and the epoch's loss sum travel in the checkpoint. The
bookkeeping around the step is :class:`~mocohub.training.progress.TrainingProgress`'s.

Example:
    >>> from mocohub.training.config import preset
    >>> train(preset("fashion_mnist", epochs=1), "samples/fashion-mnist", Path("runs/demo"))
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mocohub.backbones import build_backbone
from mocohub.errors import ConfigError, InputError, error_summary
from mocohub.precision import prefers_channels_last

from . import v3_training
from .config import TrainConfig
from .distributed import init_from_env, wrap_ddp
from .moco import MoCo
from .monitor import KnnMonitor
from .optim import build_optimizer, use_fastest_sgd_kernel
from .progress import (
    StopSignal,
    TrainingDivergedError,
    TrainingInterrupted,
    TrainingProgress,
    interrupted,
)
from .resume import check_resume_settings
from .run_folder import (
    FailedStartCleanup,
    claim_run_folder,
    discard_files,
    disk_errors,
    load_weights,
    open_run,
    prune_checkpoints,
    tensor_bytes,
)
from .schedule import epoch_lr, late_milestones_note
from .views import ViewPipeline, saving_before_bad_data, step_seed

logger = logging.getLogger(__name__)

__all__ = [
    "TrainingDivergedError",
    "TrainingInterrupted",
    "build_moco",
    "load_encoders",
    "lr_at",
    "train",
]


def build_moco(config: TrainConfig, in_channels: int, world_size: int = 1) -> MoCo:
    """The MoCo model ``config`` describes, for images with ``in_channels`` channels."""
    encoder = functools.partial(
        build_backbone,
        config.arch,
        small_stem=config.small_stem,
        width=config.width,
        in_channels=in_channels,
    )
    return MoCo(
        encoder,
        dim=config.dim,
        K=config.K,
        m=config.m,
        T=config.T,
        mlp=config.mlp,
        symmetric=config.symmetric,
        # Split BN imitates several GPUs; with several processes, shuffle BN does it.
        bn_splits=config.bn_splits if world_size == 1 else 1,
    )


def load_encoders(model: MoCo, checkpoint: dict[str, Any]) -> None:
    """Copy both encoders' weights from a checkpoint (mocohub's or the reference's)."""
    from . import checkpoint as ckpt

    ckpt.check_same_method(checkpoint, model)  # not a MoCo v3 checkpoint
    reference = ckpt.is_reference_checkpoint(checkpoint)
    state = ckpt.moco_state_from_reference(checkpoint) if reference else checkpoint["model"]
    encoders = {k: v for k, v in state.items() if k.startswith(("encoder_q.", "encoder_k."))}
    try:
        missing, unexpected = model.load_state_dict(encoders, strict=False)
    except RuntimeError as error:
        raise ConfigError(
            f"The checkpoint's encoders do not fit this configuration ({error_summary(error)}); "
            "use the same --arch, --width, --dim and --mlp as the checkpoint."
        ) from None
    missing = [k for k in missing if k not in ("queue", "queue_ptr")]
    if missing or unexpected:
        raise ConfigError(
            f"The checkpoint's encoders do not fit this configuration (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); use the same --arch, --dim and --mlp as it."
        )


def lr_at(config: TrainConfig, epoch: int) -> float:
    """The reference's per-epoch learning rate: cosine, or x0.1 at each milestone."""
    return epoch_lr(
        config.scaled_lr(),
        epoch,
        epochs=config.epochs,
        schedule=config.schedule,
        milestones=config.lr_steps,
    )


def use_fixed_size_kernels(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per shape and keep the fastest.

    Training sees one input shape (fixed crops, ``drop_last`` batches), so the
    search pays for itself after a few steps, as in the reference
    ``main_moco.py``. It is process-wide, and nothing changes on the CPU.

    Example:
        >>> use_fixed_size_kernels(torch.device("cuda", 0))
        >>> torch.backends.cudnn.benchmark
        True
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def choose_precision(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: float32), by mocohub's one precision policy."""
    from mocohub.precision import autocast_dtype

    return autocast_dtype(config.precision, device)


def choose_channels_last(config: TrainConfig, device: torch.device) -> bool:
    """Whether the loop runs the encoders in channels_last (``"auto"``: the one layout rule,
    :func:`mocohub.precision.prefers_channels_last`)."""
    if config.channels_last == "auto":
        return prefers_channels_last(device)
    return config.channels_last == "on"


def train(
    config: TrainConfig,
    data: Any,
    run_dir: str | os.PathLike[str],
    *,
    resume: str | Path | None = None,
    restart: bool = False,
    knn_data: tuple[Any, Any] | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    weights: str | Path | None = None,
) -> dict[str, Any]:
    """Pre-train MoCo on ``data`` and write checkpoints and metrics to ``run_dir``.

    A ``run_dir`` that already holds a run is refused unless ``resume``
    continues it or ``restart`` discards it (see
    :mod:`mocohub.training.run_folder`); a start that fails before its first
    checkpoint leaves no run files behind.

    Args:
        config: the run's settings (see :mod:`mocohub.training.config`).
        data: anything :func:`mocohub.training.data.resolve_dataset` takes.
        run_dir: the run folder (created; holds config.json, metrics.jsonl and
            checkpoints: the last 2 of epoch ends and the newest mid-epoch one,
            see :func:`~mocohub.training.run_folder.prune_checkpoints`). A disk
            that fills up or turns read-only raises one-line
            :class:`~mocohub.errors.InputError`.
        resume: ``"auto"`` (the newest checkpoint in ``run_dir``, if any), a
            checkpoint path (mocohub's or the reference code's), or None.
        restart: discard the run already in ``run_dir`` (resuming from one of
            its checkpoints: the checkpoints after it) instead of refusing.
        knn_data: (train, val) labelled data for the k-NN monitor.
        progress: show a progress bar (rank 0 only).
        weights: start a new run (epoch 0, fresh optimiser and queue) from the
            encoders of a checkpoint, mocohub's or the reference code's, or of a
            mocohub run folder's newest checkpoint: fine-tuning. Ignored when
            ``resume`` finds a checkpoint.
        stop_after_steps: stop after this many steps of this call, as if
            SIGTERM had arrived (a checkpoint, then :class:`TrainingInterrupted`),
            for time-boxed jobs. The ranks agree on stopping every 10 steps, at
            each ``config.checkpoint_every`` step and at the end of each epoch, so
            the stop comes at the first such point.

    Returns:
        The last epoch's metrics and ``"epoch"``, the epochs done. When the
        checkpoint resumed from is already at ``config.epochs`` or beyond,
        nothing runs and nothing is written: ``{"epoch": E, "already_complete": True}``.

    Example:
        >>> metrics = train(preset("fashion_mnist", epochs=1), "samples/fashion-mnist", "runs/demo")
        >>> metrics["epoch"]
        1
    """
    from . import checkpoint as ckpt
    from .data import resolve_dataset

    config.validate()
    env = init_from_env()
    use_fixed_size_kernels(env.device)
    world = env.world_size
    if config.batch_size % world:
        raise ConfigError(
            f"The global batch size {config.batch_size} must divide evenly over {world} "
            "processes; change --batch-size."
        )
    # Bad data, checkpoints or run folders fail before anything is written.
    dataset, info = resolve_dataset(data, "train")
    run_dir = Path(run_dir)
    source, damaged = ckpt.find_resumable_checkpoint(run_dir) if resume == "auto" else (resume, [])
    if damaged and source is None:
        raise InputError(
            f"Every checkpoint in {run_dir} is damaged ({damaged[0][0].name}: {damaged[0][1]}); "
            "start the run again with --restart instead of --resume auto."
        )
    checkpoint = ckpt.load_checkpoint(Path(source)) if source is not None else None
    notes: list[str] = []
    if checkpoint is not None:
        ckpt.check_same_method(checkpoint, config.method)  # v3 into v1/v2, or the other way
        same_run = not restart and Path(str(source)).parent.resolve() == Path(run_dir).resolve()
        notes = check_resume_settings(checkpoint.get("config"), config, source, same_run=same_run)
    point = ckpt.checkpoint_point(checkpoint) if checkpoint is not None else None
    discard = claim_run_folder(run_dir, env, resume, source, point, restart)
    if point is not None and point >= (config.epochs, 0):
        return {"epoch": point[0], "already_complete": True}
    initial = load_weights(weights) if weights is not None and checkpoint is None else None
    if weights is not None and checkpoint is not None:
        notes.append(f"--weights {weights} is not used: the run continues from {source}.")
    late = late_milestones_note(config.schedule, config.lr_steps, config.epochs)
    if late is not None:
        notes.append(late)

    torch.manual_seed(config.seed)  # identical initial weights and queue on every rank
    v3 = config.method == "moco_v3"  # MoCo v3's parts: training/v3_training.py
    sync_bn = v3 and world > 1 and env.device.type == "cuda"
    model: Any = (
        v3_training.build_moco_v3(config, info.channels, sync_bn)
        if v3
        else build_moco(config, info.channels, world)
    ).to(env.device)
    dtype = choose_precision(config, env.device)
    channels_last = choose_channels_last(config, env.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer: torch.optim.Optimizer = (
        v3_training.build_v3_optimizer(config, model)
        if v3
        else build_optimizer(config, model, env.device)
    )
    scaler = torch.amp.GradScaler(env.device.type, enabled=dtype == torch.float16)

    start_epoch, start_step, resumed_epoch = 0, 0, None
    if checkpoint is not None:
        # mocohub's own checkpoints, or the reference code's (model + optimizer).
        start_epoch, start_step = ckpt.restore_training_state(checkpoint, model, optimizer, scaler)
        resumed_epoch = checkpoint.get("loop") if start_step else None
        # The saved param groups bring the saving run's kernel choice (or none, from
        # the reference's): this device's fastest one again, with identical results.
        if not v3:
            use_fastest_sgd_kernel(optimizer, env.device)
    elif initial is not None:
        v3_training.load_v3_weights(model, initial) if v3 else load_encoders(model, initial)
    if config.compile and v3:
        v3_training.compile_encoders(model)
    elif config.compile:
        model.encoder_q.compile()
        model.encoder_k.compile()
    net: torch.nn.Module = wrap_ddp(model, env.device) if world > 1 else model

    pipeline = ViewPipeline(dataset, info, config, env)
    if env.is_main:
        pipeline.warn_if_resized(resumed_epoch, start_epoch)
    knn = KnnMonitor(knn_data, config, info, env) if knn_data is not None else None
    with disk_errors(run_dir):
        if env.is_main:
            discard_files(discard)
            ckpt.remove_orphan_temporaries(run_dir)
            for bad, problem in damaged:
                # Renamed, so that the run can save past it; kept for inspection.
                aside = ckpt.set_aside_damaged([bad])
                logger.warning(
                    "mocohub: %s is damaged (%s); resuming from %s instead%s.",
                    bad,
                    problem,
                    Path(str(source)).name,
                    f" (the damaged file is kept as {aside[0].name})" if aside else "",
                )
            if checkpoint is not None:  # said, so a rerun that continues is not taken for new
                logger.warning("mocohub: resuming from %s.", source)
            for note in notes:
                logger.warning("mocohub: %s", note)
    # From here on files are written; a failure before the first checkpoint removes them.
    cleanup = FailedStartCleanup(run_dir, enabled=env.is_main)

    def save(epoch: int, step: int) -> Path | None:
        """Rank 0 writes the checkpoint that continues at (epoch, step)."""
        path = None
        if env.is_main:
            run = config.to_dict()
            state = ckpt.training_state(model, optimizer, scaler, None, epoch, step, run)
            loop = {**tracker.state_dict(), "samples": pipeline.num_samples}
            state["loop"] = loop if step else None
            with disk_errors(run_dir, needed=tensor_bytes(state)):
                path = ckpt.save_checkpoint(run_dir, state, epoch=epoch, step=step, keep_last=None)
            prune_checkpoints(run_dir)
            cleanup.checkpoint_saved()
        tracker.checkpoint_saved()
        return path

    metrics: dict[str, Any] = {}
    with (
        disk_errors(run_dir),
        cleanup,
        StopSignal() as stop,
        open_run(run_dir, config, env, point) as log,
    ):
        tracker = TrainingProgress(
            config,
            env,
            pipeline.steps_per_epoch,
            log,
            stop,
            stop_after_steps=stop_after_steps,
            progress_bar=progress,
            run_dir=run_dir,
        )
        tracker.have_checkpoint = checkpoint is not None
        for epoch in range(start_epoch, config.epochs):
            steps = pipeline.steps_per_epoch
            lr = lr_at(config, epoch)
            if v3:
                lr = v3_training.step_lr(config, epoch, start_step, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            net.train()
            tracker.begin_epoch(epoch, start_step, lr, resumed_epoch)
            batches = pipeline.epoch(epoch, start_step)
            if env.is_main:
                batches = saving_before_bad_data(batches, epoch, start_step, save)
            for step, (im_q, im_k) in batches:
                if channels_last:
                    im_q = im_q.contiguous(memory_format=torch.channels_last)
                    im_k = im_k.contiguous(memory_format=torch.channels_last)
                if v3:  # per-step lr and momentum; the loss comes from the model
                    for group in optimizer.param_groups:
                        group["lr"] = v3_training.step_lr(config, epoch, step, steps)
                    m = v3_training.step_momentum(config, epoch, step, steps)
                    with torch.autocast(env.device.type, dtype=dtype, enabled=dtype is not None):
                        loss = net(im_q, im_k, m)
                else:
                    model.set_shuffle_seed(step_seed(config.seed, epoch, step))
                    with torch.autocast(env.device.type, dtype=dtype, enabled=dtype is not None):
                        logits, labels = net(im_q, im_k)
                    loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # scaling only with fp16: else the identity
                scaler.step(optimizer)
                scaler.update()
                checkpoint_now, stop_now = tracker.step_done(step, loss.detach(), len(im_q))
                if checkpoint_now or stop_now:
                    path = save(epoch, step + 1)
                    if stop_now:
                        raise interrupted(stop.signum, epoch, step + 1, path)
            metrics = tracker.end_epoch()
            start_step, resumed_epoch = 0, None
            last_epoch = epoch + 1 == config.epochs
            if knn is not None and (
                last_epoch or (config.knn_every and (epoch + 1) % config.knn_every == 0)
            ):
                metrics.update(knn(v3_training.knn_encoder(model) if v3 else model.encoder_q))
            # The summary before the checkpoint: a stop between the two redoes the
            # epoch on resume (its records are cut back to the last checkpoint).
            log.write({"event": "epoch", **metrics})
            path = save(epoch + 1, 0)
            if stop.signum and not last_epoch:
                raise interrupted(stop.signum, epoch + 1, 0, path)
    return metrics
