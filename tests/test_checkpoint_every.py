"""`mocohub train --checkpoint-every`: mid-epoch checkpoints that resume exactly.

A run killed after a mid-epoch checkpoint and resumed with ``--resume auto``
must end with the weights, optimizer state and metrics log of an
uninterrupted run (fp32, in-memory images augmented on the device, and image
files augmented in DataLoader workers).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY_TRAIN, run_cli
from train_helpers import SAMPLES, assert_same_weights, image_folder, records

from mocohub.errors import ConfigError
from mocohub.training import checkpoint as ckpt
from mocohub.training import progress as progress_module
from mocohub.training import train as train_module
from mocohub.training.config import TrainConfig, preset
from mocohub.training.run_folder import prune_checkpoints
from mocohub.training.train import train


class Killed(BaseException):
    """Stands for kill -9 in the middle of a step (not an Exception: no handler catches it)."""


def kill_at_step(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the ``n``-th training step of the run (1-based, counted over the call) die
    in its forward pass, before its update."""
    calls = {"n": 0}
    cross_entropy = train_module.F.cross_entropy

    def dying(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == n:
            raise Killed
        return cross_entropy(logits, labels)

    monkeypatch.setattr(train_module.F, "cross_entropy", dying)


def numbered(run_dir: Path) -> list[str]:
    return [path.name for _, path in ckpt.numbered_checkpoints(run_dir)]


def test_killed_after_a_mid_epoch_checkpoint_resumes_to_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 300 images / 32 = 9 steps per epoch; a checkpoint every 4 steps of the run:
    # global steps 4 and 8 in epoch 1, 12 and 16 in epoch 2 (epoch 2's steps 3 and 7).
    config = preset("fashion_mnist", **{**TINY_TRAIN, "epochs": 2, "checkpoint_every": 4})
    plain = preset("fashion_mnist", **{**TINY_TRAIN, "epochs": 2})
    train(plain, SAMPLES, tmp_path / "plain", progress=False)
    train(config, SAMPLES, tmp_path / "straight", progress=False)

    run_dir = tmp_path / "killed"
    kill_at_step(monkeypatch, 15)  # epoch 2, step 6: after the checkpoint at its step 3
    with pytest.raises(Killed):
        train(config, SAMPLES, run_dir, progress=False)
    monkeypatch.undo()
    # Pruned to the epoch checkpoint and the newest mid-epoch one.
    assert numbered(run_dir) == ["checkpoint_0001_00000000.pt", "checkpoint_0001_00000003.pt"]
    # Epoch 1's records at steps 4, 8 and 9, its summary, epoch 2's record at step 3.
    assert records(run_dir) == records(tmp_path / "straight")[:5]
    assert records(run_dir)[-1]["global_step"] == 12

    train(config, SAMPLES, run_dir, resume="auto", progress=False)
    assert_same_weights(tmp_path / "straight", run_dir)
    # The log too, the epoch's mean loss included (its first 3 steps came from the checkpoint).
    assert records(run_dir) == records(tmp_path / "straight")
    # Checkpointing changes nothing in the training itself.
    assert_same_weights(tmp_path / "plain", run_dir)
    assert numbered(run_dir) == ["checkpoint_0001_00000000.pt", "checkpoint_0002_00000000.pt"]


@pytest.mark.parametrize("workers", [0, 2])
def test_image_files_in_workers_resume_from_a_mid_epoch_checkpoint_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Per-image augmentation of decoded PNGs, in the main process or in 2 workers."""
    folder = image_folder(tmp_path / "images", per_class=4)  # 40 images / 8 = 5 steps per epoch
    settings = {"workers": workers, "batch_size": 8, "K": 32, "image_size": 24, "epochs": 2}
    config = preset("fashion_mnist", **{**TINY_TRAIN, **settings, "checkpoint_every": 2})
    train(config, folder, tmp_path / "straight", progress=False)
    kill_at_step(monkeypatch, 9)  # epoch 2, step 4: after the checkpoint at global step 8
    with pytest.raises(Killed):
        train(config, folder, tmp_path / "killed", progress=False)
    monkeypatch.undo()
    assert numbered(tmp_path / "killed")[-1] == "checkpoint_0001_00000003.pt"
    train(config, folder, tmp_path / "killed", resume="auto", progress=False)
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")
    assert records(tmp_path / "killed") == records(tmp_path / "straight")


def test_checkpoint_every_minutes_saves_at_the_next_agreement_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 600 images / 32 = 18 steps: the ranks agree at steps 10 and 18 of each epoch.
    from mocohub.training.data import resolve_dataset

    dataset, _ = resolve_dataset(SAMPLES)
    images = torch.cat([dataset.images, dataset.images.flip(-1)])
    config = preset("fashion_mnist", **{**TINY_TRAIN, "epochs": 1, "checkpoint_every": "1m"})
    train(config, images, tmp_path / "straight", progress=False)

    now = {"t": 0.0}

    def clock() -> float:  # 61 s pass between two readings: due at the first agreement
        now["t"] += 61.0
        return now["t"]

    monkeypatch.setattr(progress_module, "_clock", clock)
    kill_at_step(monkeypatch, 13)
    with pytest.raises(Killed):
        train(config, images, tmp_path / "killed", progress=False)
    monkeypatch.undo()
    assert numbered(tmp_path / "killed") == ["checkpoint_0000_00000010.pt"]
    train(config, images, tmp_path / "killed", resume="auto", progress=False)
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")


def test_a_real_kill_after_a_mid_epoch_checkpoint_resumes_exactly_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 (SIGKILL, nothing runs after it) in step 15 of `mocohub train`."""
    flags = [
        "--preset", "fashion_mnist", "--width", "8", "--dim", "16", "--queue-size", "64",
        "--batch-size", "32", "--bn-splits", "4", "--workers", "0", "--precision", "fp32",
        "--epochs", "2", "--quiet", "--checkpoint-every", "4",
    ]  # fmt: skip
    code, _, err = run_cli(["train", SAMPLES, "--out", tmp_path / "straight", *flags], capsys)
    assert code == 0, err
    script = textwrap.dedent(
        """
        import os, signal, sys
        import torch
        from mocohub import cli
        from mocohub.training import train

        torch.set_num_threads(1)
        calls = [0]
        cross_entropy = train.F.cross_entropy

        def dying(logits, labels):
            calls[0] += 1
            if calls[0] == 15:
                os.kill(os.getpid(), signal.SIGKILL)
            return cross_entropy(logits, labels)

        train.F.cross_entropy = dying
        cli.main(sys.argv[1:])
        """
    )
    killed = tmp_path / "killed"
    args = [sys.executable, "-c", script, "train", str(SAMPLES), "--out", str(killed), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    assert numbered(killed)[-1] == "checkpoint_0001_00000003.pt"

    code, _, err = run_cli(["train", SAMPLES, "--out", killed, *flags, "--resume", "auto"], capsys)
    assert code == 0, err
    assert_same_weights(tmp_path / "straight", killed)
    assert records(killed) == records(tmp_path / "straight")


def test_pruning_keeps_two_epoch_checkpoints_and_the_newest_mid_epoch_one(
    tmp_path: Path,
) -> None:
    def make(*points: tuple[int, int]) -> None:
        for epoch, step in points:
            (tmp_path / f"checkpoint_{epoch:04d}_{step:08d}.pt").write_bytes(b"")

    make((1, 0), (1, 500), (2, 0), (2, 300), (2, 600), (3, 0), (3, 200), (3, 400))
    assert [p.name for p in prune_checkpoints(tmp_path)] == [
        "checkpoint_0001_00000000.pt",
        "checkpoint_0001_00000500.pt",
        "checkpoint_0002_00000300.pt",
        "checkpoint_0002_00000600.pt",
        "checkpoint_0003_00000200.pt",
    ]
    assert numbered(tmp_path) == [
        "checkpoint_0002_00000000.pt",
        "checkpoint_0003_00000000.pt",
        "checkpoint_0003_00000400.pt",
    ]
    make((4, 0))  # an epoch end supersedes the mid-epoch checkpoint before it
    prune_checkpoints(tmp_path)
    assert numbered(tmp_path) == ["checkpoint_0003_00000000.pt", "checkpoint_0004_00000000.pt"]


@pytest.mark.parametrize(
    ("value", "interval"),
    [
        (0, (0, 0.0)),
        (500, (500, 0.0)),
        ("500", (500, 0.0)),
        ("30m", (0, 1800.0)),
        ("1.5m", (0, 90.0)),
    ],
)
def test_checkpoint_every_reads_steps_or_minutes(value: int | str, interval: tuple) -> None:
    assert TrainConfig(checkpoint_every=value).checkpoint_interval() == interval


@pytest.mark.parametrize("value", ["30s", "-5", "2.5", "m", "every epoch"])
def test_a_checkpoint_interval_that_is_neither_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="neither a number of steps"):
        preset("fashion_mnist", checkpoint_every=value)
