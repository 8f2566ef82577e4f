"""The working folder of an embed run (``OUT.npy.parts/``): finished parts, kept until published.

A run's work is cut into parts (whole batches of the global input list, see
:mod:`mocohub.embed`). Each finished part is saved as ``NNNNNN.npy`` (its
rows) and ``NNNNNN.json`` (which inputs they are, which failed and why, and the
*inputs digest*: each file of its batches by path, size and modification time,
or with ``verify_content`` by size and content SHA-256). ``run.json`` holds
the run's key (settings, model, input list, shard); a run with another key
refuses to mix with the folder. A part whose inputs digest no longer matches
its files (a file replaced under the same name) is embedded again; so are the
parts of a finished output whose files changed: the unchanged parts are taken
back from the output (:func:`seed_from_output`) and only the others are run.

Example:
    >>> digests = inputs_digests(paths, parts_indices, verify_content=False)
    >>> pending = unfinished(Path("feats.npy.parts"), digests)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mocohub.embed_outputs import load_features
from mocohub.errors import ConfigError, InputError
from mocohub.fileio import atomic_write_text, atomic_writer
from mocohub.publish import file_sha256

__all__ = [
    "assemble",
    "inputs_digests",
    "open_workdir",
    "plan_parts",
    "resume",
    "run_key",
    "save_part",
    "seed_from_output",
    "shard_work",
    "unfinished",
]


def _model_files(model: str) -> list[Any]:
    """The model source plus size and mtime of its files: changed weights change the key."""
    path = Path(model)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [model, *[(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()]]


def shard_work(total: int, batch_size: int, shard: tuple[int, int]) -> tuple[range, range]:
    """(images, batches) of shard ``(i, n)``: the input indices it owns, the global batches it runs.

    Example:
        >>> shard_work(20, 64, (1, 2))  # 20 images, one batch: each shard keeps 10 rows
        (range(10, 20), range(0, 1))
    """
    index, count = shard
    if not 0 <= index < count:
        raise ConfigError(f"--shard must be i/n with 0 <= i < n, got {index}/{count}.")
    owned = range(index * total // count, (index + 1) * total // count)
    if not owned:
        return owned, range(0)
    return owned, range(owned.start // batch_size, math.ceil(owned.stop / batch_size))


def plan_parts(
    total: int, batch_size: int, part_size: int, shard: tuple[int, int]
) -> tuple[range, list[range], list[list[int]]]:
    """The images shard ``shard`` owns, its parts' global batches, and each part's input indices.

    Example:
        >>> plan_parts(20, 8, 16, (0, 1))[1]  # 3 batches of 8: two parts
        [range(0, 2), range(2, 3)]
    """
    owned, batches = shard_work(total, batch_size, shard)
    per_part = max(1, part_size // batch_size)
    groups = [batches[i : i + per_part] for i in range(0, len(batches), per_part)]
    files = [
        [i for j in group for i in range(j * batch_size, min((j + 1) * batch_size, total))]
        for group in groups
    ]
    return owned, groups, files


def run_key(settings: dict[str, Any], model: str, paths_sha256: str, shard: tuple[int, int]) -> str:
    """The key of a run: what decides its numbers (settings, model files, input list, shard).

    Example:
        >>> len(run_key(asdict(settings), "runs/fm/model", paths_digest(paths), (0, 1)))
        64
    """
    data = [settings, _model_files(model), paths_sha256, list(shard)]
    return hashlib.sha256(json.dumps(data, default=str).encode()).hexdigest()


def _fingerprint(path: str, verify_content: bool) -> list[Any]:
    try:
        stat = os.stat(path)
        if verify_content:
            return [path, stat.st_size, file_sha256(path)]
        return [path, stat.st_size, stat.st_mtime_ns]
    except OSError:  # gone or unreadable: it is recorded as a failure, and rechecked next time
        return [path, None, None]


def inputs_digests(
    paths: Sequence[str],
    parts: Sequence[Sequence[int]],
    *,
    verify_content: bool = False,
    source: Any = None,
) -> list[str]:
    """One digest per part of its input files (path + size + mtime, or + content SHA-256).

    ``source``: the :class:`~mocohub.embed_sources.Inputs` that ``paths`` name
    (webdataset samples, table rows), which fingerprint their items themselves.

    Example:
        >>> inputs_digests(["a.png", "b.png"], [[0, 1]])
        ['5f0c...']
    """
    needed = sorted({i for part in parts for i in part})
    chunks = [needed[i : i + 512] for i in range(0, len(needed), 512)]

    def fingerprints(chunk: list[int]) -> list[list[Any]]:
        if source is not None:
            return [source.fingerprint(i, verify_content) for i in chunk]
        return [_fingerprint(paths[i], verify_content) for i in chunk]

    # stat (and read) calls wait on the disk, more so on network file systems: threads overlap
    # the waits (the GIL is released); chunks keep the pool's own cost small
    with ThreadPoolExecutor(8) as pool:
        found = dict(
            zip(needed, (f for part in pool.map(fingerprints, chunks) for f in part), strict=True)
        )
    kind = "content-sha256" if verify_content else "size-mtime"
    digests = []
    for part in parts:
        data = json.dumps([kind, *(found[i] for i in part)], ensure_ascii=False)
        digests.append(hashlib.sha256(data.encode("utf-8", "surrogateescape")).hexdigest())
    return digests


def open_workdir(parts: Path, key: str, settings: dict[str, Any], restart: bool) -> dict[str, Any]:
    """The run record of the folder ``parts`` for run ``key``: resumed, or started afresh.

    Example:
        >>> run = open_workdir(Path("feats.npy.parts"), key, asdict(settings), restart=False)
        >>> run["key"] == key
        True
    """
    run_file = parts / "run.json"
    if parts.exists() and not parts.is_dir():
        raise InputError(
            f"{parts} is a file, but mocohub embed keeps its unfinished parts in a folder of "
            "that name; move or delete the file, or choose another --out."
        )
    # Nothing finished yet (e.g. the model failed to load): nothing to keep, start afresh.
    nothing_done = parts.exists() and all(
        p.name == run_file.name or p.name.endswith(".tmp") for p in parts.iterdir()
    )
    if parts.exists() and (restart or nothing_done):
        shutil.rmtree(parts)
    if run_file.exists():
        run = json.loads(run_file.read_text())
        if run.get("key") == key:
            return dict(run)
        raise InputError(
            f"{parts} holds an unfinished run with other settings or inputs; rerun with the "
            "same ones to resume it, or add --restart to discard it."
        )
    parts.mkdir(parents=True, exist_ok=True)
    run = {"key": key, "settings": settings, "precision": None}
    atomic_write_text(run_file, json.dumps(run, indent=2) + "\n")
    return run


def save_part(
    stem: Path, array: np.ndarray, rows: list[int], failed: list[tuple[int, str]], inputs: str
) -> None:
    """Save one finished part: its rows (``stem.npy``), then its record (``stem.json``).

    Example:
        >>> save_part(Path("feats.npy.parts/000003"), rows_array, [12, 13], [(14, "empty")], d)
    """
    content = io.BytesIO()  # np.save into a file would use tofile, whose short writes on a
    np.save(content, array)  # full disk raise OSError without an errno
    with atomic_writer(stem.with_suffix(".npy")) as f:
        f.write(content.getbuffer())
    # the .json is written last: its presence marks the part as finished
    record = {"rows": rows, "failed": [[i, r] for i, r in failed], "inputs": inputs}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(record) + "\n")


def unfinished(folder: Path, digests: Sequence[str]) -> list[int]:
    """The parts still to embed: not saved, or saved from files that changed since.

    Example:
        >>> unfinished(Path("feats.npy.parts"), digests)  # part 2 was never saved
        [2]
    """
    pending = []
    for k, digest in enumerate(digests):
        try:
            record = json.loads((folder / f"{k:06d}.json").read_text())
        except (OSError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict) or record.get("inputs") != digest:
            pending.append(k)
    return pending


def assemble(folder: Path, paths: Sequence[str], count: int) -> dict[str, Any]:
    """The finished parts of ``folder``: their arrays, row paths, errors and per-part record.

    Example:
        >>> assemble(Path("feats.npy.parts"), paths, 3)["rows"][:1]
        ['photos/a.png']
    """
    records = [json.loads((folder / f"{k:06d}.json").read_text()) for k in range(count)]
    return {
        "arrays": [folder / f"{k:06d}.npy" for k in range(count)],
        "rows": [paths[i] for r in records for i in r["rows"]],
        "errors": [(paths[i], reason) for r in records for i, reason in r["failed"]],
        "parts": [
            {"inputs": r["inputs"], "rows": len(r["rows"]), "failed": [i for i, _ in r["failed"]]}
            for r in records
        ],
    }


def seed_from_output(
    folder: Path,
    files: dict[str, Path],
    meta: dict[str, Any],
    parts: Sequence[Sequence[int]],
    owned: range,
    digests: Sequence[str],
) -> int:
    """Save the parts of a finished output (checked: ``meta``) whose inputs did not change.

    Their rows are copied from the output's array and errors file, so only the
    changed parts are embedded again; the result equals a run from scratch.
    Returns the number of files taken from the output.

    Example:
        >>> seed_from_output(files["parts"], files, meta, part_files, owned, digests)
        1996
    """
    recorded = meta.get("parts")
    if not isinstance(recorded, list) or len(recorded) != len(parts):
        return 0
    array = load_features(files["features"])
    lines = files["errors"].read_text(encoding="utf-8").splitlines()
    reasons = [json.loads(line)["reason"] for line in lines]
    kept = row = error = 0
    for k, (part, record) in enumerate(zip(parts, recorded, strict=True)):
        failed = [int(i) for i in record["failed"]]
        count = int(record["rows"])
        if record["inputs"] == digests[k]:
            skip = set(failed)
            rows = [i for i in part if i in owned and i not in skip]
            if len(rows) != count:  # not the layout this record describes: embed it again
                return kept
            failures = list(zip(failed, reasons[error : error + len(failed)], strict=True))
            block = np.asarray(array[row : row + count], dtype=np.float32)
            save_part(folder / f"{k:06d}", block, rows, failures, digests[k])
            kept += count + len(failed)
        row += count
        error += len(failed)
    return kept


def resume(
    files: dict[str, Path],
    key: str,
    settings: dict[str, Any],
    digests: Sequence[str],
    parts: Sequence[Sequence[int]],
    owned: range,
    *,
    restart: bool,
    earlier: dict[str, Any] | None,
) -> tuple[dict[str, Any], list[int], int]:
    """The run record, the parts still to embed, and the files kept from ``earlier``.

    ``earlier`` is the checked record of a finished output of this run whose
    files partly changed since: its unchanged parts are taken back
    (:func:`seed_from_output`), at the precision it ran in.

    Example:
        >>> run, pending, kept = resume(files, key, data, digests, parts, owned,
        ...                             restart=False, earlier=None)
    """
    run = open_workdir(files["parts"], key, settings, restart)
    pending = unfinished(files["parts"], digests)
    kept = 0
    if earlier is not None and len(pending) == len(digests):  # nothing of this run saved yet
        kept = seed_from_output(files["parts"], files, earlier, parts, owned, digests)
        run["precision"] = earlier["precision"]
        atomic_write_text(files["parts"] / "run.json", json.dumps(run, indent=2) + "\n")
        pending = unfinished(files["parts"], digests)
    return run, pending, kept
