"""Atomic file writes: a reader sees the old file or all of the new one, never a part.

The data goes to a hidden temporary file in the same folder, is flushed to
disk, and is renamed onto the target with :func:`os.replace`; the folder entry
is then synced too. On any failure the temporary file is removed, the error
propagates and an existing target is untouched.

Example:
    >>> atomic_write_text("out/result.json", '{"top1": 0.8}\\n')
    >>> with atomic_writer("out/feats.npy") as f:
    ...     np.save(f, features)
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from mocohub.errors import InputError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_writer",
    "fsync_dir",
    "temporary_name",
    "temporary_owner",
]

# ".<name>.<pid>.<random>.tmp": the pid says whose it is, so leftovers can be cleaned.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp")


def temporary_name(path: str | os.PathLike[str]) -> Path:
    """The hidden temporary file next to ``path`` that this process writes before renaming.

    It names the writing process (``.<name>.<pid>.<random>.tmp``), so that a
    later start can tell a crashed writer's leftover from a live writer's
    file (see :func:`temporary_owner`).

    Example:
        >>> temporary_name("runs/a/checkpoint_last.pt").name  # doctest: +SKIP
        '.checkpoint_last.pt.4242.9f3a1c0d.tmp'
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def temporary_owner(path: str | os.PathLike[str]) -> tuple[str, int] | None:
    """``(target name, pid)`` of a :func:`temporary_name` file, or None for other names.

    Example:
        >>> temporary_owner("runs/a/.checkpoint_last.pt.4242.9f3a1c0d.tmp")
        ('checkpoint_last.pt', 4242)
    """
    match = _TEMPORARY.fullmatch(Path(path).name)
    return (match["name"], int(match["pid"])) if match else None


@contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces ``path`` when the block ends without error."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        # os.open with 0o666 honours the umask, unlike tempfile's private 0o600.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise InputError(
            f"Cannot write a file in {path.parent} ({e.strerror}); "
            "create that folder or choose one you can write to."
        ) from e
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (POSIX only; Windows cannot open folders)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
