"""Running the ``mocohub`` command line in-process, for tests."""

from __future__ import annotations

import os

import pytest

from mocohub import cli


def run_cli(
    args: list[str | os.PathLike[str]], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """``mocohub ARGS`` in this process: its exit code, stdout and stderr."""
    try:
        cli.main([str(a) for a in args])
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


#: The smallest training settings the tests use (fashion_mnist preset, 1 thread, fp32).
TINY_TRAIN = {
    "width": 8,
    "dim": 16,
    "K": 64,
    "batch_size": 32,
    "workers": 0,
    "precision": "fp32",
    "bn_splits": 4,
}
