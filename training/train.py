"""The MoCo pre-training loop: one function, read top to bottom.

``train(config, data, run_dir)`` runs in every process of a run (one process,
or one per GPU under torchrun/srun): it joins the process group the
environment describes, builds MoCo, and loops over epochs with mixed
precision, channels_last and ``torch.compile`` where they are safe. Only rank
0 writes checkpoints, metrics and logs. SIGTERM/SIGINT save a checkpoint at
the next step and stop; ``resume="auto"`` continues from the newest checkpoint
in the run folder, identically: the batch order, the augmentations and the
key shuffle all derive from (seed, epoch, step), and the RNG states travel in
the checkpoint.

Example:
    >>> from mocohub.training.config import preset
    >>> train(preset("fashion_mnist", epochs=1), "samples/fashion-mnist", Path("runs/demo"))
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from mocohub.backbones import build_backbone
from mocohub.errors import ConfigError, InputError, MocohubError

from .config import TrainConfig
from .distributed import init_from_env, wrap_ddp
from .moco import MoCo
from .monitor import KnnMonitor
from .run_folder import FailedStartCleanup, claim_run_folder, discard_files, open_run
from .views import ViewPipeline, step_seed

logger = logging.getLogger(__name__)

# Steps between the ranks' agreement on stop signals and NaN losses (and logs).
SYNC_EVERY = 10

__all__ = [
    "TrainingDivergedError",
    "TrainingInterrupted",
    "build_moco",
    "load_encoders",
    "lr_at",
    "train",
]


class TrainingDivergedError(MocohubError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(MocohubError):
    """SIGTERM/SIGINT stopped the run after saving a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


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
    from .checkpoint import is_reference_checkpoint, moco_state_from_reference

    state = (
        moco_state_from_reference(checkpoint)
        if is_reference_checkpoint(checkpoint)
        else checkpoint["model"]
    )
    encoders = {k: v for k, v in state.items() if k.startswith(("encoder_q.", "encoder_k."))}
    try:
        missing, unexpected = model.load_state_dict(encoders, strict=False)
    except RuntimeError as error:
        raise ConfigError(
            f"The checkpoint's encoders do not fit this configuration ({str(error)[:300]}); "
            "use the same --arch, --width, --dim and --mlp as the checkpoint."
        ) from None
    missing = [k for k in missing if k not in ("queue", "queue_ptr")]
    if missing or unexpected:
        raise ConfigError(
            f"The checkpoint's encoders do not fit this configuration (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); use the same --arch, --dim and --mlp as it."
        )


def load_weights(source: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint to fine-tune from: a checkpoint file (mocohub's or the reference
    code's ``.pth.tar``) or a mocohub run folder (its newest checkpoint).

    Example:
        >>> load_encoders(model, load_weights("moco_v2_800ep_pretrain.pth.tar"))
    """
    from .checkpoint import find_latest_checkpoint, load_checkpoint

    path = Path(source)
    if path.is_dir():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise InputError(
                f"{path} holds no checkpoint; pass a checkpoint file (a reference MoCo "
                ".pth.tar or a mocohub checkpoint) or a mocohub run folder."
            )
        path = latest
    return load_checkpoint(path)


def lr_at(config: TrainConfig, epoch: int) -> float:
    """The reference's per-epoch learning rate: cosine, or x0.1 at each milestone."""
    lr = config.scaled_lr()
    if config.schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return lr * 0.1 ** sum(epoch >= milestone for milestone in config.lr_steps)


def choose_precision(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: float32), by mocohub's one precision policy."""
    from mocohub.precision import autocast_dtype

    return autocast_dtype(config.precision, device)


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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
            checkpoints).
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
            for time-boxed jobs. The ranks agree on stopping every 10 steps and at
            the end of each epoch, so the stop comes at the first such point.

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
    point = ckpt.checkpoint_point(checkpoint) if checkpoint is not None else None
    discard = claim_run_folder(run_dir, env, resume, source, point, restart)
    if point is not None and point >= (config.epochs, 0):
        return {"epoch": point[0], "already_complete": True}
    initial = load_weights(weights) if weights is not None and checkpoint is None else None

    torch.manual_seed(config.seed)  # identical initial weights and queue on every rank
    model = build_moco(config, info.channels, world).to(env.device)
    dtype = choose_precision(config, env.device)
    channels_last = config.channels_last == "on" or (
        config.channels_last == "auto" and (env.device.type == "cuda" or dtype is not None)
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.encoder_q.parameters(),
        lr=lr_at(config, 0),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        **({"fused": True} if env.device.type == "cuda" else {"foreach": True}),
    )
    scaler = torch.amp.GradScaler(env.device.type) if dtype == torch.float16 else None

    start_epoch, start_step = 0, 0
    if checkpoint is not None:
        # mocohub's own checkpoints, or the reference code's (model + optimizer).
        start_epoch, start_step = ckpt.restore_training_state(checkpoint, model, optimizer, scaler)
    elif initial is not None:
        load_encoders(model, initial)
    if config.compile:
        model.encoder_q.compile()
        model.encoder_k.compile()
    net: torch.nn.Module = wrap_ddp(model, env.device) if world > 1 else model

    pipeline = ViewPipeline(dataset, info, config, env)
    steps_per_epoch = pipeline.steps_per_epoch
    knn = KnnMonitor(knn_data, config, info, env) if knn_data is not None else None
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
    # From here on files are written; a failure before the first checkpoint removes them.
    cleanup = FailedStartCleanup(run_dir, enabled=env.is_main)
    have_checkpoint = checkpoint is not None

    def save(epoch: int, step: int) -> Path | None:
        """Rank 0 writes the checkpoint that continues at (epoch, step)."""
        nonlocal have_checkpoint
        path = None
        if env.is_main:
            state = ckpt.training_state(
                model, optimizer, scaler, None, epoch, step, config.to_dict()
            )
            path = ckpt.save_checkpoint(run_dir, state, epoch=epoch, step=step)
            cleanup.checkpoint_saved()
        have_checkpoint = True
        return path

    metrics: dict[str, Any] = {}
    steps_run = 0
    with cleanup, _StopSignal() as stop, open_run(run_dir, config, env, point) as log:
        for epoch in range(start_epoch, config.epochs):
            lr = lr_at(config, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            net.train()
            bar = tqdm(
                total=steps_per_epoch,
                initial=start_step,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                disable=not (progress and env.is_main),
                unit="step",
                leave=False,
            )
            window_loss = torch.zeros((), device=env.device)
            epoch_loss = torch.zeros((), device=env.device)
            finite = torch.ones((), dtype=torch.bool, device=env.device)
            seen, tick, window_start = 0, time.perf_counter(), start_step
            for step, (im_q, im_k) in pipeline.epoch(epoch, start_step):
                if channels_last:
                    im_q = im_q.contiguous(memory_format=torch.channels_last)
                    im_k = im_k.contiguous(memory_format=torch.channels_last)
                model.set_shuffle_seed(step_seed(config.seed, epoch, step))
                with torch.autocast(env.device.type, dtype=dtype, enabled=dtype is not None):
                    logits, labels = net(im_q, im_k)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                loss = loss.detach()
                finite &= torch.isfinite(loss)
                window_loss += loss
                epoch_loss += loss
                seen += im_q.shape[0] * world
                done, steps_run = step + 1, steps_run + 1
                if stop_after_steps is not None and steps_run >= stop_after_steps:
                    stop.signum = stop.signum or signal.SIGTERM
                if done % SYNC_EVERY and done != steps_per_epoch:
                    continue
                # Every few steps the ranks agree (one tiny all-reduce) on a
                # loss gone NaN or inf and on stop signals, and rank 0 logs.
                flags = torch.stack([~finite, torch.tensor(stop.signum > 0, device=env.device)])
                flags = flags.to(torch.int32)
                if world > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                if bool(flags[0]):
                    kept = (
                        f"keeping the last good checkpoint in {run_dir}"
                        if have_checkpoint
                        else "before its first checkpoint (nothing was kept)"
                    )
                    raise TrainingDivergedError(
                        f"The loss became NaN or infinite in epoch {epoch + 1} (by step {done}); "
                        f"the run stopped, {kept}. Lower --lr, or try --precision fp32."
                    )
                elapsed = time.perf_counter() - tick
                window = {
                    "loss": float(window_loss) / (done - window_start),
                    "lr": lr,
                    "img_per_s": seen / max(elapsed, 1e-9),
                }
                log.write(
                    {
                        "epoch": epoch + 1,
                        "step": done,
                        "global_step": epoch * steps_per_epoch + done,
                        **window,
                    }
                )
                bar.set_postfix(
                    loss=f"{window['loss']:.3f}", lr=f"{lr:.3g}", img_s=f"{window['img_per_s']:.0f}"
                )
                bar.update(done - bar.n)
                window_loss.zero_()
                seen, tick, window_start = 0, time.perf_counter(), done
                if bool(flags[1]) and done < steps_per_epoch:
                    raise _interrupted(stop.signum, epoch, done, save(epoch, done))
            bar.close()
            metrics = {
                "loss": float(epoch_loss) / (steps_per_epoch - start_step),
                "lr": lr,
                "epoch": epoch + 1,
            }
            start_step = 0
            last_epoch = epoch + 1 == config.epochs
            if knn is not None and (
                last_epoch or (config.knn_every and (epoch + 1) % config.knn_every == 0)
            ):
                metrics.update(knn(model.encoder_q))
            # The summary before the checkpoint: a stop between the two redoes the
            # epoch on resume (its records are cut back to the last checkpoint).
            log.write({"event": "epoch", **metrics})
            path = save(epoch + 1, 0)
            if stop.signum and not last_epoch:
                raise _interrupted(stop.signum, epoch + 1, 0, path)
    return metrics


def _interrupted(signum: int, epoch: int, step: int, path: Path | None) -> TrainingInterrupted:
    name = signal.Signals(signum or signal.SIGTERM).name
    where = f"after epoch {epoch}" if step == 0 else f"in epoch {epoch + 1} at step {step}"
    saved = f"checkpoint {path}" if path is not None else "rank 0 saved a checkpoint"
    return TrainingInterrupted(
        f"Stopped by {name} {where}; {saved}. Continue with --resume auto.", signum or 15
    )
