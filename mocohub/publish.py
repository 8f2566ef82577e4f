"""Publishing several files as one: a reader sees all of them from one writer, or a refusal.

:func:`mocohub.fileio.atomic_writer` makes one file atomic; a result made of
several files (an array and the manifest naming its rows) needs more, since
no file system renames several files at once. :class:`Publication` writes
every file completely to a temporary beside its target (flushed to disk,
its SHA-256 computed on the way), then writes the *record* (a small JSON
file naming each file's size and SHA-256) atomically, and only then renames
the files onto their targets. :func:`check_files` compares the files with
the record: a writer stopped anywhere (kill -9, Ctrl-C, a full disk) leaves
either the previous, complete set (stopped before the record) or files that
disagree with the record and are refused, never a mix that looks complete.

Example:
    >>> with Publication() as publication:
    ...     with publication.writer("out/feats.npy", "features") as f:
    ...         np.save(f, features)
    ...     with publication.writer("out/feats.manifest.txt", "manifest") as f:
    ...         f.write(b"a.png\\n")
    ...     publication.publish("out/feats.meta.json", {"rows": 1})
    >>> check_files(json.load(open("out/feats.meta.json")), {"features": ..., "manifest": ...})
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from mocohub.download import file_hash
from mocohub.fileio import atomic_write_text, fsync_dir, temporary_name

__all__ = ["HashingWriter", "Publication", "check_files", "file_sha256"]


class HashingWriter:
    """A binary file that counts and hashes (SHA-256) what is written to it.

    Example:
        >>> with open("x.bin", "wb") as f:
        ...     out = HashingWriter(f)
        ...     out.write(b"abc")
        >>> out.bytes, out.sha256.hexdigest()[:8]
        (3, 'ba7816bf')
    """

    def __init__(self, file: Any) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.file.write(view)
        self.sha256.update(view)
        self.bytes += len(view)
        return len(view)

    def fileno(self) -> int:
        return int(self.file.fileno())


class Publication:
    """Files staged as temporaries, published by :meth:`publish` after their record.

    Leaving the ``with`` block before :meth:`publish` (an error, Ctrl-C)
    deletes the temporaries and leaves the targets as they were; stopped
    inside :meth:`publish`, it leaves the new record beside files that
    :func:`check_files` finds missing or different.
    """

    def __init__(self) -> None:
        self.staged: dict[str, tuple[Path, Path, dict[str, Any]]] = {}

    def __enter__(self) -> Publication:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.discard()

    def discard(self) -> None:
        """Delete the temporaries not yet published."""
        for _, tmp, _ in self.staged.values():
            tmp.unlink(missing_ok=True)
        self.staged.clear()

    @contextmanager
    def writer(
        self, target: str | os.PathLike[str], role: str, *, size: int | None = None
    ) -> Iterator[HashingWriter]:
        """A :class:`HashingWriter` on a temporary for ``target``, named ``role`` in the record.

        ``size``, when known, is reserved on the disk first, so that a disk too
        small fails at once (``ENOSPC``) instead of after most of the writing.
        """
        target = Path(target)
        tmp = temporary_name(target)
        # os.open with 0o666 honours the umask, unlike tempfile's private 0o600.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.staged[role] = (target, tmp, {})
        with os.fdopen(fd, "wb") as file:
            if size and hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # not reserved: fine
                        raise
            out = HashingWriter(file)
            yield out
            file.truncate(out.bytes)  # a reservation larger than the content
            file.flush()
            os.fsync(fd)
        self.staged[role] = (target, tmp, {"bytes": out.bytes, "sha256": out.sha256.hexdigest()})

    def publish(
        self, record_path: str | os.PathLike[str], record: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Write ``record`` plus ``"files"`` (each role's bytes and sha256), then the files.

        Returns the record as written.
        """
        files = {role: digest for role, (_, _, digest) in self.staged.items()}
        written = {**record, "files": files}
        atomic_write_text(record_path, json.dumps(written, indent=2) + "\n")
        for target, tmp, _ in self.staged.values():
            os.replace(tmp, target)
        folders = {target.parent for target, _, _ in self.staged.values()}
        self.staged.clear()
        for folder in folders:
            fsync_dir(folder)
        return written


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 (hex) of a file's content.

    Example:
        >>> file_sha256("feats.npy")[:8]
        '3f2a9c1e'
    """
    return file_hash(path, "sha256")


def check_files(record: Mapping[str, Any], paths: Mapping[str, Path]) -> str | None:
    """What disagrees between the files ``paths`` (role -> path) and ``record``; None if nothing.

    Sizes are compared first (free), then SHA-256s. A record without
    ``"files"`` (written before files were recorded) cannot be checked: that is
    reported too.

    Example:
        >>> check_files(meta, {"features": Path("feats.npy")})
        'feats.npy differs from the one its record names'
    """
    files = record.get("files")
    if not isinstance(files, Mapping):
        return "the record names no file digests (it was written by an older mocohub)"
    for role, path in paths.items():
        expected = files.get(role)
        if not isinstance(expected, Mapping):
            return f"the record does not name {path.name}"
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path.name} is missing"
        if size != expected.get("bytes") or file_sha256(path) != expected.get("sha256"):
            return f"{path.name} is not the file its record names"
    return None
