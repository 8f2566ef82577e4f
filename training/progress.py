"""The training loop's bookkeeping, so that the loop itself shows only the MoCo step.

:class:`TrainingProgress` counts the steps and sums the losses, and every few
steps (:data:`SYNC_EVERY`, the epoch's last step, each ``--checkpoint-every``
step) makes the ranks agree, with one tiny all-reduce, on a loss gone NaN or
infinite, on a stop signal and on a time-based checkpoint being due; rank 0
logs there. It tells the loop when to save a mid-epoch checkpoint and when to
stop, and its sums travel in those checkpoints, so that a resumed epoch logs
what an uninterrupted one would.

Example:
    >>> with StopSignal() as stop:
    ...     progress = TrainingProgress(config, env, steps_per_epoch, log, stop)
    ...     progress.begin_epoch(0, 0, lr=0.06)
    ...     for step, batch in batches:
    ...         loss = ...  # the MoCo step
    ...         checkpoint_now, stop_now = progress.step_done(step, loss, len(batch))
    ...     metrics = progress.end_epoch()
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mocohub.errors import MocohubError, Stopped

from .distributed import DistributedEnv
from .monitor import MetricsLog

__all__ = [
    "SYNC_EVERY",
    "RunSettings",
    "StopSignal",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "TrainingProgress",
]

# Steps between the ranks' agreement on stop signals and NaN losses (and logs).
SYNC_EVERY = 10

_clock = time.monotonic  # for --checkpoint-every in minutes (tests put a fake clock here)


class RunSettings(Protocol):
    """What the bookkeeping and the run folder read of a run's settings: a
    :class:`~mocohub.training.config.TrainConfig`, or a detection run's
    :class:`~mocohub.training.det_config.DetConfig`."""

    epochs: int

    def checkpoint_interval(self) -> tuple[int, float]: ...

    def save(self, path: Path) -> None: ...


class TrainingDivergedError(MocohubError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Stopped):
    """SIGTERM/SIGINT stopped the run after saving a checkpoint."""


def interrupted(signum: int, epoch: int, step: int, path: Path | None) -> TrainingInterrupted:
    """The error that ends a run stopped by ``signum`` after saving ``path``.

    ``step`` 0: after ``epoch`` epochs; else in (0-based) ``epoch`` at ``step``.
    """
    name = signal.Signals(signum or signal.SIGTERM).name
    where = f"after epoch {epoch}" if step == 0 else f"in epoch {epoch + 1} at step {step}"
    return TrainingInterrupted(
        f"Stopped by {name} {where}; {saved_phrase(epoch, step, path)}. "
        "Continue with --resume auto.",
        signum or 15,
    )


def saved_phrase(epoch: int, step: int, path: Path | None) -> str:
    """What a stopping run saved: "checkpoint PATH (after E epochs and S steps)".

    ``step`` 0: after ``epoch`` epochs; else in (0-based) ``epoch`` at ``step``.
    ``path`` None (a rank other than 0): "rank 0 saved a checkpoint".
    """
    if path is None:
        return "rank 0 saved a checkpoint"
    # Checkpoint names count finished epochs (checkpoint_0021_00000120.pt: 21 epochs
    # and 120 steps), while people count the epoch they are in (epoch 22): say both.
    epochs = f"{epoch} epoch" + ("" if epoch == 1 else "s")
    done = f" (after {epochs} and {step} steps)" if step else ""
    return f"checkpoint {path}{done}"


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: leave SIGTERM and SIGINT to the main process.

    ``timeout``, Slurm and Kubernetes signal the whole process group. A worker
    killed by that SIGTERM makes the main process raise at its next batch
    (PyTorch reports a worker's death), before it can save its checkpoint. So
    the worker ignores SIGINT, and a SIGTERM from anyone but the main process:
    it serves batches until the main process stops and shuts it down, as after
    the last epoch. A SIGTERM from the main process itself still ends it: that
    is how multiprocessing stops a worker that outlives its DataLoader (after an
    error, or at exit), and a worker deaf to it hangs the exit for ever.

    Where Python cannot tell who sent a signal (no ``signal.sigwaitinfo``, as
    on macOS), SIGTERM keeps its default action.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    main_process = os.getppid()
    # Blocked in this thread before the watcher starts, so in every thread the
    # worker will have: a SIGTERM then waits for the watcher, which learns its sender.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == main_process:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="mocohub-sigterm", daemon=True).start()


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class TrainingProgress:
    """Step counters, loss sums, and the periodic agreement of the ranks (see the module).

    Args:
        config: the run's settings (``checkpoint_every`` is read here).
        env: the process's place in the run.
        steps_per_epoch: optimizer steps in one epoch.
        log: the run's metrics log (rank 0 writes, the others' is disabled).
        stop: the stop-signal flag.
        stop_after_steps: stop after this many steps of this call, as if
            SIGTERM had arrived.
        progress_bar: show a progress bar (rank 0 only).
        run_dir: the run folder, named in the NaN error.
    """

    def __init__(
        self,
        config: RunSettings,
        env: DistributedEnv,
        steps_per_epoch: int,
        log: MetricsLog,
        stop: StopSignal,
        *,
        stop_after_steps: int | None = None,
        progress_bar: bool = False,
        run_dir: Path | None = None,
    ) -> None:
        self.config, self.env, self.log, self.stop = config, env, log, stop
        self.steps_per_epoch = steps_per_epoch
        self.every_steps, self.every_seconds = config.checkpoint_interval()
        self.stop_after_steps = stop_after_steps
        self.progress_bar, self.run_dir = progress_bar, run_dir
        self.steps_run = 0  # in this call
        self.have_checkpoint = False
        self.last_checkpoint = _clock()

    def begin_epoch(
        self, epoch: int, start_step: int, lr: float, state: dict[str, Any] | None = None
    ) -> None:
        """Start counting ``epoch`` at ``start_step``; ``state`` is :meth:`state_dict`'s,
        from the mid-epoch checkpoint resumed from (None: a fresh epoch, or an older
        checkpoint without it, whose epoch loss then averages the resumed steps only)."""
        device = self.env.device
        self.epoch, self.lr = epoch, lr
        self.epoch_loss = torch.zeros((), device=device)
        self.epoch_steps = 0
        if state is not None:
            self.epoch_loss = state["epoch_loss"].to(device).clone()
            self.epoch_steps = int(state["epoch_steps"])
        self.window_loss = torch.zeros((), device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.seen, self.tick, self.window_start = 0, time.perf_counter(), start_step
        self.bar = tqdm(
            total=self.steps_per_epoch,
            initial=start_step,
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            disable=not (self.progress_bar and self.env.is_main),
            unit="step",
            leave=False,
        )

    def state_dict(self) -> dict[str, Any]:
        """What a mid-epoch checkpoint must carry for the epoch's loss to come out the same."""
        return {"epoch_loss": self.epoch_loss.detach().cpu(), "epoch_steps": self.epoch_steps}

    def checkpoint_saved(self) -> None:
        """A checkpoint was written: the run has one, and the time-based interval starts again."""
        self.have_checkpoint = True
        self.last_checkpoint = _clock()

    def step_done(self, step: int, loss: torch.Tensor, batch: int) -> tuple[bool, bool]:
        """Account for step ``step`` (0-based) of the epoch, with its detached ``loss`` and
        this rank's ``batch`` size; return ``(checkpoint_now, stop_now)``, both only
        ever true before the epoch's last step (the epoch end saves anyway).

        Raises :class:`TrainingDivergedError` at the first agreement point after a
        NaN or infinite loss on any rank.
        """
        self.finite &= torch.isfinite(loss)
        self.window_loss += loss
        self.epoch_loss += loss
        self.epoch_steps += 1
        self.seen += batch * self.env.world_size
        done, self.steps_run = step + 1, self.steps_run + 1
        if self.stop_after_steps is not None and self.steps_run >= self.stop_after_steps:
            self.stop.signum = self.stop.signum or signal.SIGTERM
        global_step = self.epoch * self.steps_per_epoch + done
        due_by_steps = self.every_steps > 0 and global_step % self.every_steps == 0
        if done % SYNC_EVERY and done != self.steps_per_epoch and not due_by_steps:
            return False, False
        due_by_time = 0 < self.every_seconds <= _clock() - self.last_checkpoint
        device = self.env.device
        signals = torch.tensor([self.stop.signum > 0, due_by_time], device=device)
        flags = torch.cat([~self.finite.view(1), signals]).to(torch.int32)
        if self.env.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if bool(flags[0]):
            kept = (
                f"keeping the last good checkpoint in {self.run_dir}"
                if self.have_checkpoint
                else "before its first checkpoint (nothing was kept)"
            )
            raise TrainingDivergedError(
                f"The loss became NaN or infinite in epoch {self.epoch + 1} (by step {done}); "
                f"the run stopped, {kept}. Lower --lr, or try --precision fp32."
            )
        self._log(done)
        mid_epoch = done < self.steps_per_epoch
        return mid_epoch and (due_by_steps or bool(flags[2])), mid_epoch and bool(flags[1])

    def _log(self, done: int) -> None:
        elapsed = time.perf_counter() - self.tick
        loss = float(self.window_loss) / (done - self.window_start)
        images_per_s = self.seen / max(elapsed, 1e-9)
        self.log.write(
            {
                "epoch": self.epoch + 1,
                "step": done,
                "global_step": self.epoch * self.steps_per_epoch + done,
                "loss": loss,
                "lr": self.lr,
                "img_per_s": images_per_s,
            }
        )
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.lr:.3g}", img_s=f"{images_per_s:.0f}")
        self.bar.update(done - self.bar.n)
        self.window_loss.zero_()
        self.seen, self.tick, self.window_start = 0, time.perf_counter(), done

    def end_epoch(self) -> dict[str, Any]:
        """The epoch's summary: mean loss, learning rate and the epoch number (1-based)."""
        self.bar.close()
        return {
            "loss": float(self.epoch_loss) / max(self.epoch_steps, 1),
            "lr": self.lr,
            "epoch": self.epoch + 1,
        }
