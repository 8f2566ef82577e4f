"""Publishing an export folder all at once: built beside the target, swapped in when complete.

``mocohub export`` writes every file into a hidden staging folder next to the
target (``.NAME.export-PID-RANDOM``, same file system), verifies it there, and
only then swaps it in with two renames: the old folder aside
(``.NAME.replaced-PID-RANDOM``), the staging folder onto its name. A reader
therefore finds the old complete artifact, or (between the two renames, a few
microseconds) no folder at all, never a mix of two exports. Files in the old
folder that an export does not write (``notes.txt``, subfolders) are carried
over as hard links (copies where links are impossible).

A killed export leaves its hidden folders behind; the next export into the
same target removes those whose process is gone, and puts back an old folder
that was set aside when the target itself is missing.

The readers' side of the same promise: every graph and ``verify.json`` name
the SHA-256 of the ``model.safetensors`` they were made with, and
:func:`check_graph_folder` (run by :class:`~mocohub.export.OnnxEmbedder`, so by
``serve`` and ``embed --backend onnxruntime``) and
:func:`mocohub.artifact.load_pretrained` refuse a folder whose files disagree.

Example:
    >>> with staging_folder(Path("out/fm")) as staging:
    ...     (staging / "config.json").write_text("{}")
    ...     publish(staging, Path("out/fm"), artifact_files={"config.json"})
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from mocohub.artifact import (
    VERIFY_NAME,
    WEIGHTS_DIGEST_KEY,
    WEIGHTS_NAME,
    ArtifactMismatchError,
    check_weights_digest,
    read_verify_record,
)
from mocohub.errors import ConfigError, InputError
from mocohub.fileio import fsync_dir, process_is_gone

__all__ = ["check_graph_folder", "prepare_target", "publish", "reject", "staging_folder"]

_HIDDEN = re.compile(r"\.(?P<name>.+)\.(?P<kind>export|replaced)-(?P<pid>\d+)-[0-9a-f]+")


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def prepare_target(out: str | os.PathLike[str]) -> Path:
    """The absolute target folder for ``--out``, checked, its leftovers cleaned.

    Raises:
        InputError: a file stands where the folder (or one of its parents) would be.
        ConfigError: the target is the current folder or one of its parents, or a
            mount point (a folder that cannot be swapped).
    """
    target = Path(os.path.abspath(out))
    if target.is_symlink() and target.is_dir():
        target = target.resolve()  # swap the folder the link names, keep the link
    for place in [target, *target.parents]:
        if place.exists() or place.is_symlink():
            if not place.is_dir():
                raise InputError(
                    f"{place} is a file, not a folder, so --out {out} cannot be created there; "
                    "choose another --out."
                )
            break
    cwd = Path.cwd().resolve()
    if target.exists() and (target.resolve() == cwd or target.resolve() in cwd.parents):
        raise ConfigError(
            f"--out {out} is the current folder (or holds it), which an export replaces as a "
            "whole; name a subfolder, e.g. --out export."
        )
    if target.is_dir() and os.path.ismount(target):
        raise ConfigError(
            f"--out {out} is a mount point, which an export cannot replace as a whole; name a "
            "folder inside it."
        )
    _clean_leftovers(target)
    return target


def _clean_leftovers(target: Path) -> None:
    """Remove a killed export's hidden folders; restore a target it had set aside."""
    parent = target.parent
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        match = _HIDDEN.fullmatch(entry.name)
        if not match or match["name"] != target.name or not process_is_gone(int(match["pid"])):
            continue
        if match["kind"] == "replaced" and not target.exists():
            os.rename(entry, target)  # killed between the two renames: the old one comes back
        else:
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new hidden folder beside ``target``, removed on leaving unless it was published."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "export")
    os.mkdir(staging, 0o777)  # the umask decides, as for a folder the user makes
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, target: Path, artifact_files: Collection[str]) -> list[str]:
    """Swap the complete ``staging`` folder in as ``target``; returns the replaced files.

    Entries of the old ``target`` not named in ``artifact_files`` are carried
    over; the returned names are the old folder's artifact files that the new
    export does not hold (removed with the old folder).
    """
    dropped: list[str] = []
    old = None
    if target.exists():
        for entry in sorted(target.iterdir()):
            if entry.name in artifact_files:
                if not (staging / entry.name).exists():
                    dropped.append(entry.name)
            elif not (staging / entry.name).exists():
                _link(entry, staging / entry.name)
        old = _sibling(target, "replaced")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dropped


def reject(staging: Path, target: Path) -> Path:
    """Keep a staged export that failed verification as ``NAME.rejected`` beside ``target``."""
    rejected = target.with_name(f"{target.name}.rejected")
    if rejected.is_dir():
        shutil.rmtree(rejected)
    os.rename(staging, rejected)
    return rejected


def _link(source: Path, destination: Path) -> None:
    """``source`` at ``destination`` too: hard links (copies where impossible), links as links."""
    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
    elif source.is_dir():
        shutil.copytree(source, destination, symlinks=True, copy_function=_link_file)
    else:
        _link_file(str(source), str(destination))


def _link_file(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def check_graph_folder(graph: str | os.PathLike[str], recorded: str | None) -> None:
    """Refuse a graph whose folder holds another export's weights or checks.

    ``recorded`` is the SHA-256 of ``model.safetensors`` in the graph's metadata
    (None: written by a mocohub older than these hashes, loaded with a warning).
    It must match the folder's ``model.safetensors`` and ``verify.json`` when
    they are there; a graph on its own has nothing to be checked against.

    Raises:
        ArtifactMismatchError: the folder mixes files of two exports.

    Example:
        >>> check_graph_folder("out/onnx/model.onnx", read_metadata("out/onnx/model.onnx")[
        ...     "weights_sha256"])
    """
    path = Path(graph)
    folder = path.parent
    record = read_verify_record(folder)
    if record is not None:
        listed = record.get(WEIGHTS_DIGEST_KEY)
        if listed != recorded:
            raise ArtifactMismatchError(
                f"The files in {folder} come from different exports: {path.name} was made "
                f"from weights {_short(recorded)} but {VERIFY_NAME} checked weights "
                f"{_short(listed)}; re-run `mocohub export` into this folder."
            )
    if (folder / WEIGHTS_NAME).is_file():
        check_weights_digest(folder, recorded, str(path))  # warns when recorded is None
    elif recorded is None and record is not None:
        warnings.warn(
            f"{path} was written by an older mocohub and records no hash of its weights, so "
            f"mocohub cannot check that the files of {folder} belong together; re-run "
            "`mocohub export` to record it.",
            UserWarning,
            stacklevel=3,
        )


def _short(digest: object) -> str:
    return "(none recorded: an older mocohub)" if digest is None else str(digest)[:12]
