"""`mocohub train` on a disk that fills up or turns read-only: one line, exit 2, no
traceback, and nothing half-written left as if it were complete.

The faults are injected where the operating system would raise them: the file
objects that checkpoints, metrics and curves are written through fail with
ENOSPC part-way through a write, or opening a file for writing in the run
folder fails with EROFS (we run as root: ``chmod`` would not stop us).
"""

from __future__ import annotations

import builtins
import errno
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib
import pytest
from cli_helpers import run_cli

from mocohub.training import checkpoint as ckpt
from mocohub.training import monitor
from mocohub.training.monitor import plot_curves

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "fashion-mnist"
FLAGS = [
    "--preset", "fashion_mnist", "--width", "8", "--dim", "16", "--queue-size", "64",
    "--batch-size", "32", "--bn-splits", "4", "--workers", "0", "--precision", "fp32",
    "--epochs", "2", "--quiet",
]  # fmt: skip

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="names open files through /proc/self/fd"
)


def full(what: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)


class FullDiskFile:
    """A file object that takes ``room`` more bytes, then fails as a full disk does:
    the bytes that fit are written, the write raises ENOSPC, and so does every later
    write and flush (and close, which flushes what is left in its buffer)."""

    def __init__(self, file: Any, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data: Any) -> int:
        if len(data) > self.room:
            self.file.write(data[: self.room])
            self.room = 0
            raise full(getattr(self.file, "name", "?"))
        self.room -= len(data)
        return self.file.write(data)

    def flush(self) -> None:
        if self.room == 0:
            raise full(getattr(self.file, "name", "?"))
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.room == 0:
            raise full(getattr(self.file, "name", "?"))

    def __enter__(self) -> FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def fill_disk_at(monkeypatch: pytest.MonkeyPatch, name: str, room: int = 4096) -> None:
    """Files written through ``os.fdopen`` (atomic writes) whose name contains ``name``
    get ``room`` bytes before the disk is full."""
    fdopen = os.fdopen

    def opened(fd: int, *args: Any, **kwargs: Any) -> Any:
        file = fdopen(fd, *args, **kwargs)
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            return FullDiskFile(file, room)
        return file

    monkeypatch.setattr(os, "fdopen", opened)


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@linux_only
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    fill_disk_at(monkeypatch, ".checkpoint_0002_")  # epoch 1's checkpoint fits, epoch 2's not
    code, _, err = run_cli(["train", SAMPLES, "--out", run, *FLAGS], capsys)
    line = one_line_error(code, err)
    assert line.startswith(f"Error: The disk holding {run} is full"), line
    assert line.endswith("or choose another --out."), line
    # Nothing half-written: no temporary, and the newest checkpoint is epoch 1's, intact.
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert [p.name for _, p in ckpt.numbered_checkpoints(run)] == ["checkpoint_0001_00000000.pt"]
    assert os.path.samefile(run / ckpt.LAST_NAME, run / "checkpoint_0001_00000000.pt")
    assert ckpt.verify_checkpoint(run / ckpt.LAST_NAME) is None

    monkeypatch.undo()  # space freed: the run continues from epoch 1
    code, _, err = run_cli(["train", SAMPLES, "--out", run, *FLAGS, "--resume", "auto"], capsys)
    assert code == 0, err
    assert ckpt.load_checkpoint(run / ckpt.LAST_NAME)["epoch"] == 2


def test_a_full_disk_while_writing_metrics_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    init = monitor.MetricsLog.__init__

    def filling(self: monitor.MetricsLog, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if self._file is not None:
            self._file = FullDiskFile(self._file, room=100)  # the first record does not fit

    monkeypatch.setattr(monitor.MetricsLog, "__init__", filling)
    code, _, err = run_cli(["train", SAMPLES, "--out", tmp_path / "run", *FLAGS], capsys)
    line = one_line_error(code, err)
    assert line.startswith("Error: The disk holding ") and " is full" in line, line
    assert not (tmp_path / "run").exists()  # a start that failed before its first checkpoint


@linux_only
def test_a_run_folder_turned_read_only_is_one_line_not_hidden_by_the_curves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After epoch 1's checkpoint the file system is remounted read-only: the save of
    epoch 2's fails, and so does drawing curves.png while the log closes."""
    run = tmp_path / "run"
    read_only = {"on": False}
    save, os_open, open_ = ckpt.save_checkpoint, os.open, builtins.open

    def saving(*args: Any, **kwargs: Any) -> Path:
        path = save(*args, **kwargs)
        read_only["on"] = True
        return path

    def refuse(path: Any, writing: bool) -> None:
        if read_only["on"] and writing and str(run) in os.path.abspath(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def opening(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        refuse(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
        return os_open(path, flags, *args, **kwargs)

    def opening_file(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | os.PathLike):
            refuse(file, any(c in mode for c in "wax+"))
        return open_(file, mode, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", saving)
    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(builtins, "open", opening_file)
    code, _, err = run_cli(["train", SAMPLES, "--out", run, *FLAGS], capsys)
    monkeypatch.undo()
    line = one_line_error(code, err)
    assert "Read-only file system" in line or "read-only" in line, line
    assert [p.name for _, p in ckpt.numbered_checkpoints(run)] == ["checkpoint_0001_00000000.pt"]


def test_drawing_the_curves_leaves_matplotlib_s_backend_alone(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"event": "epoch", "epoch": 1, "loss": 7.5}\n')
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # say, the backend a notebook chose
    try:
        assert plot_curves(metrics, tmp_path / "curves.png") == tmp_path / "curves.png"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_closing_the_log_when_the_curves_cannot_be_written_only_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = monitor.MetricsLog(tmp_path)
    log.write({"event": "epoch", "epoch": 1, "loss": 7.5})
    (tmp_path / "curves.png").mkdir()  # in the way of the PNG: its write fails
    with caplog.at_level("WARNING"):
        log.close()
    assert "could not draw curves.png" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert not list(tmp_path.glob(".*.tmp"))
