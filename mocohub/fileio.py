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

import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from mocohub.errors import InputError

__all__ = [
    "atomic_link",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_writer",
    "disk_error",
    "disk_errors",
    "fsync_dir",
    "process_is_gone",
    "remove_dead_temporaries",
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
        raise disk_error(e, path) or InputError(
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


def atomic_link(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make ``target`` a hard link to ``source`` atomically; an atomic copy where links fail.

    A reader of ``target`` sees its old content or all of ``source``'s, never
    a part (a fixed name such as ``checkpoint_last.pt`` pointing at the newest file).

    Example:
        >>> atomic_link("runs/a/checkpoint_0003_00000000.pt", "runs/a/checkpoint_last.pt")
    """
    target = Path(target)
    tmp = temporary_name(target)
    try:
        os.link(source, tmp)
    except OSError:  # no hard links on this file system: copy, through atomic_writer
        with open(source, "rb") as src, atomic_writer(target) as dst:
            shutil.copyfileobj(src, dst)
        return
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


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


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_error(
    error: OSError,
    path: str | os.PathLike[str],
    *,
    needed: int | None = None,
    option: str = "--out",
) -> InputError | None:
    """The one-line :class:`InputError` for a write under ``path`` that failed with ``error``.

    Covers a full disk (ENOSPC, EDQUOT), a read-only file system (EROFS), a
    folder the user may not write to (EACCES, EPERM) and a path through a file
    (ENOTDIR, or EEXIST from ``mkdir`` on a file); None for other errors.
    ``needed`` (bytes), when known, turns "full" into how much to free.

    Example:
        >>> str(disk_error(OSError(errno.ENOSPC, "No space left"), "out/feats.npy", needed=10**8))
        'The disk holding /data/out is full: free 88 MB or choose another --out.'
    """
    path = Path(path)
    code = error.errno
    if code is None and re.fullmatch(r"\d+ requested and \d+ written", str(error)):
        code = errno.ENOSPC  # numpy's tofile on a full disk: a short write, no errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        where = _existing_ancestor(path.parent)
        free = shutil.disk_usage(where).free if where.exists() else 0
        if needed is not None and needed > free:
            amount = f": free {-(-(needed - free) // 1_000_000)} MB"
        else:
            amount = f" ({free // 1_000_000} MB free): free some space"
        return InputError(f"The disk holding {where} is full{amount} or choose another {option}.")
    if code == errno.EROFS:
        where = _existing_ancestor(path.parent)
        return InputError(f"{where} is on a read-only file system; choose another {option}.")
    if code in (errno.EACCES, errno.EPERM):
        where = _existing_ancestor(path.parent)
        return InputError(
            f"Cannot write in {where} (permission denied); choose another {option} "
            "or make it writable."
        )
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is None or (blocker == path and code == errno.EEXIST):
            return None
        return InputError(
            f"{blocker} is a file, so {path} cannot be created under it; choose another {option}."
        )
    return None


@contextmanager
def disk_errors(
    path: str | os.PathLike[str], *, needed: int | None = None, option: str = "--out"
) -> Iterator[None]:
    """Turn the :func:`disk_error` kinds of ``OSError`` raised in the block into one line.

    Other errors pass through unchanged.

    Example:
        >>> with disk_errors("out/feats.npy"):
        ...     atomic_write_text("out/feats.npy", "...")  # a full disk: InputError, one line
    """
    try:
        yield
    except OSError as e:
        clear = disk_error(e, path, needed=needed, option=option)
        if clear is None:
            raise
        raise clear from e


def process_is_gone(pid: int) -> bool:
    """True when no process ``pid`` runs on this machine (False when unsure, or ourselves).

    Example:
        >>> process_is_gone(os.getpid())
        False
    """
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive under another user, or cannot tell: keep its files
    return False


def remove_dead_temporaries(
    folder: str | os.PathLike[str], owns: Callable[[str], bool]
) -> list[Path]:
    """Delete the :func:`temporary_name` files in ``folder`` of dead writers; returns them.

    Only files whose target name ``owns(name)`` accepts and whose writing
    process is gone (:func:`process_is_gone`) are removed: a live writer's
    file, or one whose name does not say its writer, is kept.

    Example:
        >>> remove_dead_temporaries("out", lambda name: name.startswith("feats."))
        [PosixPath('out/.feats.npy.4242.9f3a1c0d.tmp')]
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.glob(".*.tmp")):
        owner = temporary_owner(path)
        if owner is None or not owns(owner[0]) or not process_is_gone(owner[1]):
            continue
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
