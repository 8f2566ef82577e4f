"""The embed pipeline: image files -> ``feats.npy`` + manifest + errors, sharded and resumable.

The files written beside ``OUT.npy`` (array, manifest, errors, and the record
``OUT.meta.json`` naming their digests), and how they are published together
or not at all, are described in :mod:`mocohub.embed_outputs`.

How the work is cut: the full, sorted input list is split into batches of
``batch_size`` paths. ``shard=(i, n)`` owns the *i*-th of *n* contiguous runs of
*images* (``i * N // n`` up to ``(i + 1) * N // n``), so every shard gets about
1/n of the images whatever the batch size; it runs the batches that hold its
images, whole, and keeps only its own rows (a batch at a shard's edge is run by
both neighbours: at most two batches more than its share). A shard's batches
are grouped into parts of about ``part_size`` images. Each finished part is
saved in ``OUT.npy.parts/``, so an interrupted run resumes from its last
finished part; the folder records a key of every setting that changes the
numbers (model files, backend, output, precision, batch size, ...) and the
input list, and a run with a different key refuses to mix with it
(``restart=True`` discards it). Each part also records its files by path, size
and modification time (or content, ``verify_content=True``): a rerun embeds
again the parts whose files changed, also those of a finished output
(:mod:`mocohub.embed_parts`). Because every image is embedded in the same
batch of the global list, a resumed run, and shards merged with
:mod:`mocohub.embed_merge`, give exactly the array of one uninterrupted run.

Decoding (files -> batches in the layout the backend runs, on threads while
the model runs, or in worker processes) is :mod:`mocohub.embed_decode`'s.

Example:
    >>> result = embed_files(scan_inputs(["photos/"]), "feats.npy", settings, factory)
    >>> result.rows, result.skipped
    (1998, 2)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocohub.embed_decode import decode_threads, default_workers, open_batches
from mocohub.embed_outputs import (
    FORMAT,
    complete_output,
    output_files,
    remove_orphans,
    write_outputs,
)
from mocohub.embed_parts import (
    assemble,
    inputs_digests,
    plan_parts,
    resume,
    run_key,
    save_part,
    shard_work,
)
from mocohub.embed_sources import Inputs, names_of
from mocohub.errors import ConfigError, InputError, MocohubError
from mocohub.features import Embedder
from mocohub.fileio import atomic_write_text, disk_errors
from mocohub.imageio import DEFAULT_MAX_PIXELS, paths_digest

__all__ = [
    "FORMAT",
    "EmbedResult",
    "EmbedSettings",
    "decode_threads",
    "default_workers",
    "embed_files",
    "output_files",
    "run_record",
    "shard_work",
    "write_outputs",
]


@dataclass(frozen=True)
class EmbedSettings:
    """Everything that decides the numbers an embed run writes (part of its resume key)."""

    model: str
    backend: str = "torch"
    output: str = "pooled"
    precision: str = "auto"
    device: str = "auto"
    normalize: bool = True
    batch_size: int = 64
    part_size: int = 1024
    max_pixels: int | None = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class EmbedResult:
    """What a run did: rows written, files skipped, time and speed of this invocation."""

    out: Path
    rows: int
    skipped: int
    embedded_now: int
    seconds: float
    precision: str | None
    up_to_date: bool = False  # a complete earlier run had the same inputs and settings
    kept: int = 0  # files whose rows were taken from the earlier output (they did not change)

    @property
    def images_per_s(self) -> float:
        return self.embedded_now / self.seconds if self.seconds > 0 else 0.0


def embed_files(
    paths: Sequence[str] | Inputs,
    out: str | os.PathLike[str],
    settings: EmbedSettings,
    open_embedder: Callable[[str], Embedder],
    *,
    shard: tuple[int, int] = (0, 1),
    workers: int = 0,
    dtype: str = "float32",
    restart: bool = False,
    progress: bool = False,
    verify_content: bool = False,
    run_parts: Callable[..., int] | None = None,
) -> EmbedResult:
    """Embed ``paths`` (the full input list) into ``out``; see the module docstring.

    Args:
        paths: image paths, or the :class:`~mocohub.embed_sources.Inputs` of
            webdataset shards and tables (their keys/ids are the manifest).
        open_embedder: called with a precision (``settings.precision``, or the one
            a resumed run already used) and returns the :class:`Embedder`.
        shard: ``(i, n)``: do the *i*-th of *n* shares of the work.
        workers: decoding processes (0: decode in this process, on
            :func:`decode_threads` threads).
        dtype: ``"float32"`` or ``"float16"`` rows in ``out``.
        verify_content: know each input file by its content's SHA-256 instead of
            its size and modification time (reads every file on every run).
        run_parts: another engine's runner of the pending parts, called with the
            arguments of this module's own (``_run_parts``), which saves each part
            as it does (:mod:`mocohub.embed_ray`: on a Ray cluster).

    A full, read-only or unwritable disk is one :class:`InputError`; the
    finished parts are kept and an earlier output is left as it was.
    """
    names = names_of(paths)
    source = paths if isinstance(paths, Inputs) else None
    if not len(names):
        raise InputError("No image files were found in the inputs; check the paths.")
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"dtype must be float32 or float16, got {dtype}.")
    if settings.batch_size < 1 or settings.part_size < 1:
        raise ConfigError("--batch-size and --part-size must be at least 1.")
    files = output_files(out)
    batch = settings.batch_size
    owned, part_batches, part_files = plan_parts(len(names), batch, settings.part_size, shard)
    digest = paths_digest(names)
    key = run_key(asdict(settings), settings.model, digest, shard)
    with disk_errors(files["features"]):
        files["features"].parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(files)
        inputs = inputs_digests(names, part_files, verify_content=verify_content, source=source)
        earlier = None if restart else complete_output(files, key, dtype)
        if earlier is not None and [p["inputs"] for p in earlier.get("parts", [])] == inputs:
            rows, skipped, used = earlier["rows"], earlier["skipped"], earlier["precision"]
            return EmbedResult(files["features"], rows, skipped, 0, 0.0, used, up_to_date=True)
        plan = (files, key, asdict(settings), inputs, part_files, owned)
        run, pending, kept = resume(*plan, restart=restart, earlier=earlier)
        try:
            embedder = open_embedder(run["precision"] or settings.precision)
        except BaseException:  # a model that does not load: leave no work folder of nothing
            parts = files["parts"]
            if parts.is_dir() and {p.name for p in parts.iterdir()} <= {"run.json"}:
                shutil.rmtree(parts, ignore_errors=True)
            raise
        started = time.perf_counter()
        embedded_now = 0
        if pending:
            embedded_now = (run_parts or _run_parts)(
                names,
                source,
                owned,
                files["parts"],
                [(k, part_batches[k], inputs[k]) for k in pending],
                embedder,
                settings,
                run,
                workers,
                progress,
            )
        seconds = time.perf_counter() - started
        found = assemble(files["parts"], names, len(part_batches))
        precision: str | None = run["precision"] or getattr(embedder, "precision", None)
        meta = run_record(settings, len(names), digest, shard, key, precision, found["parts"])
        arrays, rows, errors = found["arrays"], found["rows"], found["errors"]
        written = write_outputs(files, arrays, rows, errors, embedder.dim, dtype, meta)
        shutil.rmtree(files["parts"], ignore_errors=True)
    rows_written, skipped_now = written["rows"], written["skipped"]
    out_file = files["features"]
    result = (out_file, rows_written, skipped_now, embedded_now, seconds, precision)
    return EmbedResult(*result, kept=kept)


def run_record(
    settings: EmbedSettings,
    inputs: int,
    digest: str,
    shard: tuple[int, int],
    key: str,
    precision: str | None,
    parts: list[dict[str, Any]],
) -> dict[str, Any]:
    """What the record (``OUT.meta.json``) of a run says besides the counts and file digests.

    Example:
        >>> run_record(settings, 2000, paths_digest(paths), (0, 1), key, "fp32", parts)["shard"]
        [0, 1]
    """
    return {
        "model": settings.model,
        "backend": settings.backend,
        "output": settings.output,
        "normalized": settings.normalize,
        "precision": precision,
        "batch_size": settings.batch_size,
        "inputs": inputs,
        "inputs_sha256": digest,
        "shard": list(shard),
        "key": key,
        "parts": parts,
    }


def _run_parts(
    paths: Sequence[str],
    source: Inputs | None,
    owned: range,
    folder: Path,
    pending: list[tuple[int, range, str]],  # (part, its batches, its inputs digest)
    embedder: Embedder,
    settings: EmbedSettings,
    run: dict[str, Any],
    workers: int,
    progress: bool,
) -> int:
    from tqdm.auto import tqdm

    b = settings.batch_size
    sampler = [
        list(range(j * b, min((j + 1) * b, len(paths)))) for _, group, _ in pending for j in group
    ]
    batches = open_batches(
        paths, sampler, embedder, settings.device, settings.max_pixels, workers, source
    )
    todo = sum(i in owned for indices in sampler for i in indices)  # this shard's images
    bar = tqdm(total=todo, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    normalize = settings.normalize
    try:
        for k, group, inputs in pending:
            stem = folder / f"{k:06d}"
            _embed_part(stem, len(group), batches, embedder, normalize, owned, bar, inputs)
            if run["precision"] is None and hasattr(embedder, "precision"):
                run["precision"] = embedder.precision
                atomic_write_text(folder / "run.json", json.dumps(run, indent=2) + "\n")
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise MocohubError(
            f"A decoding worker process died ({e}); the finished parts are kept, so rerun the "
            "same command to resume, or use --workers 0 to find the file that crashes it."
        ) from e
    finally:
        bar.close()
        batches.close()
    return todo


def _embed_part(
    stem: Path,
    count: int,
    batches: Iterator[dict[str, Any]],
    embedder: Embedder,
    normalize: bool,
    owned: range,
    bar: Any,
    inputs: str,
) -> None:
    """Embed the next ``count`` batches and save this shard's rows as one part (.npy, .json)."""
    feats: list[np.ndarray] = []
    rows: list[int] = []
    failed: list[tuple[int, str]] = []
    for _ in range(count):
        item = next(batches)
        if item["images"] is not None:
            keep = [n for n, i in enumerate(item["rows"]) if i in owned]
            if keep:
                raw = embedder.embed_batch(item["images"])  # the whole batch: same numbers
                x = torch.from_numpy(np.asarray(raw, np.float32)[keep])
                if normalize:
                    x = torch.nn.functional.normalize(x, dim=1)
                feats.append(x.numpy())
                rows.extend(item["rows"][n] for n in keep)
        failed.extend((i, reason) for i, reason in item["failed"] if i in owned)
        bar.update(
            sum(i in owned for i in item["rows"]) + sum(i in owned for i, _ in item["failed"])
        )
    array = np.concatenate(feats) if feats else np.zeros((0, embedder.dim), np.float32)
    save_part(stem, array, rows, failed, inputs)
