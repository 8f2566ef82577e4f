"""Faults injected into a run's checkpoints and metrics log: damaged and truncated
checkpoints, a stop right before or after a checkpoint write, orphan temporaries."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import TINY_TRAIN, run_cli
from train_helpers import SAMPLES, assert_same_weights, records

from mocohub.errors import InputError
from mocohub.fileio import temporary_name, temporary_owner
from mocohub.training import checkpoint as ckpt
from mocohub.training.config import preset
from mocohub.training.monitor import truncate_metrics
from mocohub.training.run_folder import run_contents
from mocohub.training.train import train

TINY = {**TINY_TRAIN, "epochs": 2}  # 300 images / 32 = 9 steps per epoch
TINY_FLAGS = [
    "--preset", "fashion_mnist", "--width", "8", "--dim", "16", "--queue-size", "64",
    "--batch-size", "32", "--workers", "0", "--precision", "fp32", "--epochs", "2", "--quiet",
]  # fmt: skip


def run(run_dir: Path, **kwargs: Any) -> dict[str, Any]:
    return train(preset("fashion_mnist", **TINY), SAMPLES, run_dir, progress=False, **kwargs)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, the reference every faulted run must end up equal to."""
    run_dir = tmp_path_factory.mktemp("straight")
    # Module fixtures run outside conftest's one_thread: pin it, as the tests run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights and optimizer state, and the same metrics log."""
    assert_same_weights(a, b)
    assert records(a) == records(b)


def largest_entry_data(path: Path) -> tuple[str, int, int]:
    """(name, offset of its data in the file, size) of the largest entry of a zip checkpoint."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with path.open("rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)  # the local file header; its name and extra field follow
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.filename, info.header_offset + 30 + name_length + extra_length, info.file_size


def zero_4k(path: Path) -> str:
    """Zero 4 KiB inside the largest tensor of ``path`` (as a bad disk block would)."""
    name, offset, size = largest_entry_data(path)
    assert size >= 8192, (name, size)
    data = bytearray(path.read_bytes())
    data[offset + 4096 : offset + 8192] = bytes(4096)
    path.write_bytes(bytes(data))
    return name


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


# --- verification -------------------------------------------------------------


def test_verify_names_the_damaged_entry_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    ckpt.atomic_save({"w": torch.arange(8192, dtype=torch.float32)}, path)
    assert ckpt.verify_checkpoint(path) is None
    name = zero_4k(path)
    problem = ckpt.verify_checkpoint(path)
    assert problem is not None and f"the entry {name} fails its CRC check" in problem
    # torch.load itself does not notice: it returns the zeroed weights.
    assert float(torch.load(path, weights_only=True)["w"][1024:2048].abs().sum()) == 0.0

    ckpt.atomic_save({"w": torch.zeros(4096)}, path)
    truncate(path)
    assert "truncated" in (ckpt.verify_checkpoint(path) or "")
    torch.save({"w": torch.zeros(4)}, path, _use_new_zipfile_serialization=False)
    assert ckpt.verify_checkpoint(path) is None  # the legacy format has no checksums


def test_damage_in_an_entry_name_is_damage_not_a_crash(tmp_path: Path) -> None:
    """A checkpoint has hundreds of small entries: bytes lost in a name make zipfile
    raise UnicodeDecodeError (not BadZipFile), which must read as damage too."""
    path = tmp_path / "state.pt"
    ckpt.atomic_save({"w": torch.arange(8192, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    entry = data.rfind(b"PK\x01\x02")  # the last central-directory entry; its name at +46
    data[entry + 46 : entry + 48] = b"\xff\xfe"
    path.write_bytes(bytes(data))
    problem = ckpt.verify_checkpoint(path)
    assert problem is not None and "damaged (UnicodeDecodeError" in problem


def damaged_run(tmp_path: Path, damage: Any) -> tuple[Path, Path]:
    """A finished run whose newest checkpoint is then damaged; (run folder, that file)."""
    run_dir = tmp_path / "run"
    run(run_dir)
    newest = ckpt.find_latest_checkpoint(run_dir)
    assert newest is not None and newest.name == "checkpoint_0002_00000000.pt"
    damage(newest)  # checkpoint_last.pt is a hard link: it shares the damage
    return run_dir, newest


@pytest.mark.parametrize("damage", [zero_4k, truncate], ids=["zeroed-4k", "truncated"])
def test_resume_auto_falls_back_from_a_damaged_newest_checkpoint(
    tmp_path: Path, straight: Path, damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir, newest = damaged_run(tmp_path, damage)
    with caplog.at_level(logging.WARNING, logger="mocohub.training.train"):
        metrics = run(run_dir, resume="auto")
    assert metrics["epoch"] == 2 and "already_complete" not in metrics  # epoch 2 was redone
    (message,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert "\n" not in message
    assert f"{newest} is damaged (" in message
    assert "resuming from checkpoint_0001_00000000.pt instead" in message
    aside = run_dir / (newest.name + ".damaged")
    assert aside.is_file()  # kept, out of the way, and part of the run (--restart removes it)
    assert aside in run_contents(run_dir)
    assert_same_run(straight, run_dir)


def test_every_checkpoint_damaged_is_refused(tmp_path: Path) -> None:
    run_dir, _ = damaged_run(tmp_path, truncate)
    zero_4k(run_dir / "checkpoint_0001_00000000.pt")
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(InputError, match=r"Every checkpoint in .* is damaged .*--restart"):
        run(run_dir, resume="auto")
    assert sorted(p.name for p in run_dir.iterdir()) == before


@pytest.mark.parametrize("name", ["checkpoint_0002_00000000.pt", ckpt.LAST_NAME])
def test_an_explicitly_named_damaged_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    run_dir, _ = damaged_run(tmp_path, zero_4k)
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    out = tmp_path / "continued"
    code, _, err = run_cli(
        ["train", SAMPLES, "--out", out, "--resume", run_dir / name, *TINY_FLAGS], capsys
    )
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"{run_dir / name} is damaged (the entry " in lines[0]
    assert "fails its CRC check" in lines[0] and "Traceback" not in err
    assert not out.exists()  # no fallback: the user named that file
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


# --- the metrics log ------------------------------------------------------------


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs (an Exception would trigger clean-ups)."""


def run_killed_at_save(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, epoch: int, *, after: bool
) -> None:
    """Run into ``run_dir`` until the save of checkpoint (epoch, 0) dies just before or
    just after it is written."""
    real = ckpt.save_checkpoint

    def save(run_dir: Path, state: Any, **kwargs: Any) -> Path:
        if kwargs["epoch"] == epoch and not after:
            raise Killed
        path = real(run_dir, state, **kwargs)
        if kwargs["epoch"] == epoch:
            raise Killed
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    with pytest.raises(Killed):
        run(run_dir)
    monkeypatch.undo()


def test_killed_before_a_checkpoint_the_log_is_cut_back_on_resume(
    tmp_path: Path, straight: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run_killed_at_save(run_dir, monkeypatch, 2, after=False)
    # The log holds epoch 2's records, written after the last checkpoint (1, 0),
    # and a line torn by the kill.
    with (run_dir / "metrics.jsonl").open("a") as log:
        log.write('{"epoch": 2, "step": 9, "glo')
    assert [r["epoch"] for r in records_lenient(run_dir)] == [1, 1, 2, 2]
    run(run_dir, resume="auto")
    assert_same_run(straight, run_dir)


def test_killed_right_after_a_checkpoint_the_log_keeps_the_epoch_summary(
    tmp_path: Path, straight: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run_killed_at_save(run_dir, monkeypatch, 1, after=True)
    run(run_dir, resume="auto")
    assert_same_run(straight, run_dir)


def records_lenient(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_truncate_metrics_keeps_what_precedes_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"epoch": 1, "step": 10, "loss": 1.0},
        {"epoch": 1, "step": 18, "loss": 0.9},
        {"event": "epoch", "epoch": 1, "loss": 0.95},
        {"epoch": 2, "step": 10, "loss": 0.8},  # checkpoint (1, 10) is after this one
        {"epoch": 2, "step": 18, "loss": 0.7},
        {"event": "epoch", "epoch": 2, "loss": 0.75},
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    path.write_text(text + '{"epoch": 3, "st')
    assert truncate_metrics(path, (1, 10)) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:4]
    assert truncate_metrics(path, (1, 10)) == 0  # nothing more to drop: the file is kept
    assert truncate_metrics(tmp_path / "absent.jsonl", (0, 0)) == 0
    assert not list(tmp_path.glob(".*.tmp"))


# --- orphan temporaries -----------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporary_names_carry_the_writer_pid(tmp_path: Path) -> None:
    tmp = temporary_name(tmp_path / "checkpoint_last.pt")
    assert temporary_owner(tmp) == ("checkpoint_last.pt", os.getpid())
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
    assert temporary_owner(tmp_path / ".checkpoint_last.pt.1a2b3c4d.tmp") is None


def test_a_resume_removes_only_orphan_checkpoint_temporaries(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    gone, alive = dead_pid(), os.getppid()
    orphans = [
        run_dir / f".checkpoint_0002_00000000.pt.{gone}.1a2b3c4d.tmp",
        run_dir / f".{ckpt.LAST_NAME}.{gone}.5e6f7a8b.tmp",
    ]
    kept = [
        run_dir / f".checkpoint_0002_00000000.pt.{alive}.0badcafe.tmp",  # a live writer's
        run_dir / ".checkpoint_0002_00000000.pt.1a2b3c4d.tmp",  # its writer is unknown
        run_dir / f".config.json.{gone}.1a2b3c4d.tmp",  # not a checkpoint's
    ]
    for path in orphans + kept:
        path.write_bytes(b"PK\x03\x04half")
    assert ckpt.remove_orphan_temporaries(run_dir) == sorted(orphans)
    assert sorted(p for p in run_dir.iterdir()) == sorted(kept)


def test_train_resume_cleans_orphans_of_a_killed_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run_killed_at_save(run_dir, monkeypatch, 2, after=False)
    orphan = run_dir / f".checkpoint_0002_00000000.pt.{dead_pid()}.1a2b3c4d.tmp"
    orphan.write_bytes(b"PK\x03\x04half")
    live = run_dir / f".checkpoint_0002_00000000.pt.{os.getppid()}.0badcafe.tmp"
    live.write_bytes(b"PK\x03\x04half")
    run(run_dir, resume="auto")
    assert not orphan.exists()
    assert live.exists()
