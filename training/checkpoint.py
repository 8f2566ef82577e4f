"""Native training checkpoints: save, load and resume a MoCo run bit for bit.

The format itself (its keys, version, file names, how the newest is found and
how damaged bytes are detected) is defined once in
:mod:`mocohub.checkpoint_format`, which :mod:`mocohub.convert` reads too; the
names it defines are re-exported here. The global random generators' state is
:mod:`.rng`'s job; MoCo's shuffle-BN generator travels in the model's own
state (``MoCo.get_extra_state``). Checkpoints of format version 1, which kept
that generator beside the model, are upgraded on load and resume exactly.

Every file is written to a hidden temporary file and renamed into place,
so a crash leaves either the old file or the new one, never half of one.
The temporary names carry the writer's pid (:func:`mocohub.fileio.temporary_name`):
:func:`remove_orphan_temporaries` deletes those whose writer is gone.

Bytes damaged after the write are caught on load: :func:`load_checkpoint`
first runs :func:`verify_checkpoint`, and :func:`find_resumable_checkpoint`
skips damaged checkpoints for the newest intact one.

The reference code's ``.pth.tar`` (``main_moco.py`` of facebookresearch/moco,
MoCo v1/v2, and of facebookresearch/moco-v3) is understood too: see
:func:`is_reference_checkpoint`. A checkpoint of one MoCo never resumes a run of
the other (:func:`check_same_method`).

Example:
    >>> state = training_state(model, optimizer, None, None, epoch=3, step=1200, config={})
    >>> save_checkpoint("runs/a", state, epoch=3, step=1200)
    PosixPath('runs/a/checkpoint_0003_00001200.pt')
    >>> epoch, step = restore_training_state(
    ...     load_checkpoint(find_latest_checkpoint("runs/a")), model, optimizer
    ... )
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mocohub import __version__
from mocohub.checkpoint_format import (
    FORMAT,
    FORMAT_VERSION,
    LAST_NAME,
    checkpoint_name,
    find_latest_checkpoint,
    find_resumable_checkpoint,
    is_native_checkpoint,
    numbered_checkpoints,
    upgrade_checkpoint,
    verify_checkpoint,
)
from mocohub.convert import (
    checkpoint_method,
    is_reference_checkpoint,
    moco_state_from_reference,
    optimizer_state_from_reference,
    read_checkpoint,
)
from mocohub.errors import ConfigError, InputError, error_summary
from mocohub.fileio import atomic_link, atomic_writer, fsync_dir, remove_dead_temporaries

from .moco import MoCo
from .moco_v3 import MoCoV3
from .rng import capture_rng_state, restore_rng_state

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LAST_NAME",
    "atomic_save",
    "check_same_method",
    "checkpoint_method",
    "checkpoint_point",
    "find_latest_checkpoint",
    "find_resumable_checkpoint",
    "is_reference_checkpoint",
    "load_checkpoint",
    "moco_state_from_reference",
    "numbered_checkpoints",
    "remove_orphan_temporaries",
    "restore_training_state",
    "save_checkpoint",
    "set_aside_damaged",
    "training_state",
    "verify_checkpoint",
]

_NATIVE_KEYS = {"epoch", "step", "model", "optimizer", "rng"}
DAMAGED_SUFFIX = ".damaged"


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)`` so that ``path`` is either the old file or all of the new one.

    See :mod:`mocohub.fileio`: on any failure the error propagates and an
    existing ``path`` is untouched.

    Example:
        >>> atomic_save({"w": torch.zeros(2)}, "runs/a/weights.pt")
    """
    with atomic_writer(path) as f:
        torch.save(obj, f)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    epoch: int,
    step: int,
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything needed to continue a run identically, as one checkpoint dict.

    ``epoch`` is the epoch in progress (after the last step of epoch ``e``,
    pass ``e + 1``) and ``step`` the optimizer steps completed in the whole
    run; a resumed loop skips ``step - epoch * steps_per_epoch`` batches.
    The tensors are the live ones: save the dict at once.

    Example:
        >>> state = training_state(model, optimizer, scaler, None, 1, 500, {"lr": 0.03})
        >>> sorted(state)[:4]
        ['config', 'epoch', 'format', 'format_version']
    """
    if epoch < 0 or step < 0:
        raise ConfigError(f"epoch ({epoch}) and step ({step}) must be non-negative.")
    try:
        plain_config = json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"The run config must hold only JSON values ({e}); convert paths and "
            "objects to strings or numbers before checkpointing."
        ) from e
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mocohub_version": __version__,
        "epoch": int(epoch),
        "step": int(step),
        "model": _unwrap(model).state_dict(),  # MoCo's includes its shuffle generator
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "config": plain_config,
    }


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    epoch: int,
    step: int,
    keep_last: int | None = 2,
) -> Path:
    """Write ``state`` as ``run_dir/checkpoint_{epoch:04d}_{step:08d}.pt``; return its path.

    Each file is written atomically, then ``checkpoint_last.pt`` is pointed at
    it, then older checkpoints beyond ``keep_last`` are deleted (the new one
    always stays; None deletes none). Checkpoints numbered *after* the new one belong to another
    history (a later resume would jump back into it): they are never deleted
    here, the save is refused instead (``mocohub train --restart`` discards
    them knowingly). Under DDP call it on rank 0 only.

    Example:
        >>> save_checkpoint("runs/a", state, epoch=3, step=1200, keep_last=2).name
        'checkpoint_0003_00001200.pt'
    """
    if keep_last is not None and keep_last < 1:
        raise ConfigError(f"keep_last must be at least 1, got {keep_last}.")
    if epoch < 0 or step < 0:
        raise ConfigError(f"epoch ({epoch}) and step ({step}) must be non-negative.")
    for key, value in (("epoch", epoch), ("step", step)):
        if key in state and state[key] != value:
            raise ConfigError(
                f"The state says {key}={state[key]} but save_checkpoint got {key}={value}; "
                "pass the same numbers to training_state and save_checkpoint."
            )
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(
            f"Cannot create the run folder {run_dir} ({e.strerror}); choose a folder you can write."
        ) from e
    later = [p.name for number, p in numbered_checkpoints(run_dir) if number > (epoch, step)]
    if later:
        raise ConfigError(
            f"{run_dir} holds checkpoints after epoch {epoch} step {step} ({', '.join(later[:3])}) "
            "from another history; move them away or save into another folder."
        )
    path = run_dir / checkpoint_name(epoch, step)
    atomic_save(dict(state), path)
    atomic_link(path, path.with_name(LAST_NAME))

    older = [p for number, p in numbered_checkpoints(run_dir) if number < (epoch, step)]
    for stale in older[: max(len(older) - (keep_last - 1), 0)] if keep_last else []:
        stale.unlink(missing_ok=True)
    return path


def set_aside_damaged(paths: list[Path]) -> list[Path]:
    """Rename damaged checkpoints to ``<name>.damaged`` so that the run can go on past them.

    They are kept (not deleted) for inspection; a renamed file is no longer a
    checkpoint of the run. ``checkpoint_last.pt`` is left alone: the next save
    points it at the new checkpoint. Returns the new paths.

    Example:
        >>> set_aside_damaged([Path("runs/a/checkpoint_0003_00000000.pt")])
        [PosixPath('runs/a/checkpoint_0003_00000000.pt.damaged')]
    """
    moved = []
    for path in paths:
        if path.name == LAST_NAME or not path.exists():
            continue
        target = path.with_name(path.name + DAMAGED_SUFFIX)
        os.replace(path, target)
        moved.append(target)
    if moved:
        fsync_dir(moved[0].parent)
    return moved


def remove_orphan_temporaries(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete the checkpoint temporaries in ``run_dir`` whose writing process is gone.

    Only ``.checkpoint_*.<pid>.<random>.tmp`` files (see
    :func:`mocohub.fileio.temporary_name`) on this machine: a file of a live
    process, or one whose name does not say its writer, is kept. Returns the
    deleted paths.

    Example:
        >>> remove_orphan_temporaries("runs/a")
        [PosixPath('runs/a/.checkpoint_0003_00000000.pt.4242.9f3a1c0d.tmp')]
    """
    return remove_dead_temporaries(run_dir, lambda name: name.startswith("checkpoint_"))


def checkpoint_point(checkpoint: Mapping[str, Any]) -> tuple[int, int]:
    """Where a loaded checkpoint continues: ``(epoch, step)`` (a reference one records no step).

    Example:
        >>> checkpoint_point(load_checkpoint("runs/a/checkpoint_0003_00000000.pt"))
        (3, 0)
    """
    return int(checkpoint.get("epoch", 0)), int(checkpoint.get("step", 0))


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a mocohub or reference MoCo checkpoint safely (``weights_only=True``).

    Raises :class:`~mocohub.errors.InputError` for a missing, truncated,
    damaged (:func:`verify_checkpoint`), unsafe or unrecognised file, or one
    written by a newer mocohub.

    Example:
        >>> ckpt = load_checkpoint("runs/a/checkpoint_last.pt")
        >>> ckpt["epoch"], ckpt["step"]
        (3, 1200)
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass a checkpoint file such as {path / LAST_NAME}.")
    if not path.is_file():
        raise InputError(f"No checkpoint at {path}; check the path.")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise InputError(
            f"The checkpoint {path} is damaged ({problem}); pass an intact checkpoint, "
            "or resume with --resume auto, which continues from the newest intact one."
        )
    ckpt = read_checkpoint(path, map_location)
    if is_native_checkpoint(ckpt):
        ckpt = upgrade_checkpoint(ckpt, path)  # refuses a newer format version
        missing = sorted(_NATIVE_KEYS - ckpt.keys())
        if missing:
            raise InputError(
                f"The checkpoint {path} lacks {', '.join(missing)}; "
                "resume from a checkpoint written by save_checkpoint(training_state(...))."
            )
        return ckpt
    if is_reference_checkpoint(ckpt):
        return ckpt
    raise InputError(
        f"{path} is neither a mocohub training checkpoint nor a reference MoCo "
        "checkpoint; pass a file written by mocohub train or by the reference main_moco.py."
    )


def _load(what: str, target: Any, state: Any) -> None:
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        head, expected = "", target.state_dict() if isinstance(target, nn.Module) else {}
        v1, v2 = "encoder_q.fc.weight", "encoder_q.fc.0.weight"
        if isinstance(state, dict) and v1 in state and v2 in expected:
            head = " (its head is one linear layer, MoCo v1's: add --preset moco_v1 or --no-mlp)"
        elif isinstance(state, dict) and v2 in state and v1 in expected:
            head = " (its head is MoCo v2's MLP: add --mlp, or --preset moco_v2)"
        raise ConfigError(
            f"The checkpoint's {what} state does not fit this {what} ({error_summary(e)}); "
            f"build it with the settings of the run that wrote the checkpoint{head}."
        ) from e


#: method: (its name, its checkpoints' keys, presets that train it)
_METHODS = {
    "moco": ("MoCo v1/v2", "encoder_q, encoder_k, queue", "moco_v2, moco_v1 or fashion_mnist"),
    "moco_v3": (
        "MoCo v3",
        "base_encoder, momentum_encoder, predictor",
        "moco_v3_r50, moco_v3_vit_s or fashion_mnist_v3",
    ),
}


def _method_of(model: nn.Module) -> str | None:
    """``"moco_v3"``, ``"moco"`` or None (not a MoCo): what ``model`` trains."""
    target = _unwrap(model)
    if isinstance(target, MoCoV3):
        return "moco_v3"
    return "moco" if isinstance(target, MoCo) else None


def check_same_method(checkpoint: Mapping[str, Any], model: nn.Module | str) -> None:
    """Refuse, in one sentence, a MoCo v3 checkpoint for a MoCo v1/v2 run or the other way.

    The checkpoint's method is read from its keys (:func:`checkpoint_method`,
    mocohub's format or the reference's); the run's is ``model``'s class
    (:class:`~mocohub.training.moco.MoCo` or :class:`~mocohub.training.moco_v3.MoCoV3`,
    inside any DDP or compile wrapper) or ``model`` itself when it is a method
    name (``TrainConfig.method``: ``"moco"`` or ``"moco_v3"``). Anything else (a
    detector and its checkpoints) is not checked.

    Example:
        >>> check_same_method(load_checkpoint("r-50-100ep.pth.tar"), "moco")
        Traceback (most recent call last):
        mocohub.errors.ConfigError: The checkpoint holds a MoCo v3 model ...
    """
    wanted = model if isinstance(model, str) else _method_of(model)
    held = checkpoint_method(checkpoint)
    if wanted not in _METHODS or held is None or held == wanted:
        return
    held_name, held_keys, presets = _METHODS[held]
    raise ConfigError(
        f"The checkpoint holds a {held_name} model ({held_keys}) but this run trains "
        f"{_METHODS[wanted][0]}; use it with a {held_name} preset such as --preset {presets}."
    )


def restore_training_state(
    checkpoint: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> tuple[int, int]:
    """Load a checkpoint into the run's objects; return ``(epoch, step)`` to continue from.

    A mocohub checkpoint restores the model (strictly), the optimizer, the
    scaler and scheduler when given, every global random generator and MoCo's
    shuffle-BN generator: the run continues bit for bit on the same hardware.
    Under DDP its RNG state is the saving rank's.

    A reference ``main_moco.py`` checkpoint restores the model and, when given,
    the optimizer: for MoCo v1/v2 built over ``model.parameters()`` as the
    reference does or over ``model.encoder_q.parameters()`` (the only ones
    with state); for MoCo v3 LARS (its ``mu``) or AdamW (its moments and step
    counts) over ``model.parameters()``, and the scaler from its ``scaler``
    entry (a disabled scaler, fp32 or bf16, ignores it). Its ``epoch`` is
    already the next epoch to run and is returned as is, as the reference's
    own resume starts there. It records no step (0 is returned), no RNG state
    and no scheduler: those start afresh (a passed scheduler is left
    untouched). mocohub's loop draws its batches and views from
    (seed, epoch, step), so it continues as it would have from its own
    checkpoint of that epoch end.

    A MoCo v3 checkpoint for a v1/v2 model, or the other way, is one
    :class:`~mocohub.errors.ConfigError` (:func:`check_same_method`).

    Example:
        >>> epoch, step = restore_training_state(load_checkpoint(path), model, optimizer)
    """
    target = _unwrap(model)
    check_same_method(checkpoint, target)
    if not is_native_checkpoint(checkpoint):
        _load("model", target, moco_state_from_reference(checkpoint))
        if optimizer is not None and checkpoint.get("optimizer") is not None:
            groups = optimizer.param_groups
            own = len(groups[0]["params"]) if len(groups) == 1 else None
            _load("optimizer", optimizer, optimizer_state_from_reference(checkpoint, own))
        if scaler is not None and checkpoint.get("scaler"):  # MoCo v3's: fp16 autocast
            _load("scaler", scaler, checkpoint["scaler"])
        return int(checkpoint.get("epoch", 0)), 0

    checkpoint = upgrade_checkpoint(checkpoint, "the checkpoint")  # a version-1 one, too
    _load("model", target, checkpoint["model"])
    if optimizer is not None:
        _load("optimizer", optimizer, checkpoint["optimizer"])
    # An empty scaler state comes from a disabled GradScaler: nothing to restore.
    if scaler is not None and checkpoint.get("scaler"):
        _load("scaler", scaler, checkpoint["scaler"])
    if scheduler is not None:
        if checkpoint.get("scheduler") is None:
            raise ConfigError(
                "The checkpoint holds no LR scheduler state but a scheduler was passed; "
                "resume with the run's own settings or start the scheduler yourself."
            )
        _load("scheduler", scheduler, checkpoint["scheduler"])
    restore_rng_state(checkpoint["rng"])
    return int(checkpoint["epoch"]), int(checkpoint["step"])
