"""The embed pipeline: image files -> ``feats.npy`` + manifest + errors, sharded and resumable.

Files written beside ``OUT.npy`` (all atomically, temp file + fsync + rename):

- ``OUT.npy``: one row per embedded image (float32 or float16, L2-normalised by default);
- ``OUT.manifest.txt``: line *i* is the path of row *i* (plain text, so ``sed -n 5p``
  and ``np.loadtxt``-free readers work; a path holding a line break is refused);
- ``OUT.errors.jsonl``: one ``{"path": ..., "reason": ...}`` per skipped file;
- ``OUT.meta.json``: model, output, dims, precision, input digest, shard, counts.

How the work is cut: the full, sorted input list is split into batches of
``batch_size`` paths; ``shard=(i, n)`` takes the *i*-th of *n* contiguous runs
of batches; a shard's batches are grouped into parts of about ``part_size``
images. Each finished part is saved in ``OUT.npy.parts/``, so an interrupted
run resumes from its last finished part; the folder records a key of every
setting that changes the numbers (model files, backend, output, precision,
batch size, ...) and the input list, and a run with a different key refuses
to mix with it (``restart=True`` discards it). Because batches are cut from
the global list, a resumed run, and shards merged with :mod:`mocohub.embed_merge`,
give exactly the array of one uninterrupted run.

Decoding (:func:`mocohub.imageio.decode_image` + the model's preprocessing)
runs in DataLoader worker processes while the model runs; files that cannot
be decoded travel as records, never as exceptions.

Example:
    >>> result = embed_files(scan_inputs(["photos/"]), "feats.npy", settings, factory)
    >>> result.rows, result.skipped
    (1998, 2)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mocohub.errors import ConfigError, InputError, MocohubError
from mocohub.features import CropToTensor, Embedder
from mocohub.fileio import atomic_write_text, atomic_writer
from mocohub.imageio import DEFAULT_MAX_PIXELS, DecodeError, decode_image, paths_digest
from mocohub.preprocessing import Preprocessing

__all__ = ["EmbedResult", "EmbedSettings", "embed_files", "output_files"]

FORMAT = "mocohub-embeddings"


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

    @property
    def images_per_s(self) -> float:
        return self.embedded_now / self.seconds if self.seconds > 0 else 0.0


def output_files(out: str | os.PathLike[str]) -> dict[str, Path]:
    """The files an embed run writes for ``out`` (which must end in ``.npy``)."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ConfigError(f"--out must be a .npy file name, got {out}.")
    stem = out.with_suffix("")
    return {
        "features": out,
        "manifest": stem.with_name(stem.name + ".manifest.txt"),
        "errors": stem.with_name(stem.name + ".errors.jsonl"),
        "meta": stem.with_name(stem.name + ".meta.json"),
        "parts": out.with_name(out.name + ".parts"),
    }


def _model_fingerprint(model: str) -> list[Any]:
    """The model source plus size and mtime of its files: changed weights change the key."""
    path = Path(model)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [model, *[(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()]]


def _shard_batches(total: int, batch_size: int, shard: tuple[int, int]) -> range:
    index, count = shard
    if not 0 <= index < count:
        raise ConfigError(f"--shard must be i/n with 0 <= i < n, got {index}/{count}.")
    batches = math.ceil(total / batch_size)
    return range(index * batches // count, (index + 1) * batches // count)


class _Decoded(Dataset):
    """Path i -> (i, uint8 crop or None, failure reason); normalised later, per batch."""

    def __init__(self, paths: Sequence[str], prep: Preprocessing, max_pixels: int | None) -> None:
        self.paths, self.prep, self.max_pixels = paths, prep, max_pixels
        self.crop = CropToTensor(prep)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        path = self.paths[i]
        if "\n" in path or "\r" in path:
            return i, None, "the path holds a line break, which the manifest cannot; rename it"
        try:
            image = decode_image(
                path,
                mode=self.crop.mode,
                min_size=self.prep.resize_size,
                max_pixels=self.max_pixels,
            )
            return i, self.crop(image), ""
        except DecodeError as e:
            return i, None, e.reason
        except Exception as e:  # preprocessing must not end the run either
            return i, None, f"cannot preprocess ({type(e).__name__}: {e})"


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> dict[str, Any]:
    good = [(i, x) for i, x, _ in items if x is not None]
    return {
        "count": len(items),
        "rows": [i for i, _ in good],
        "images": torch.stack([x for _, x in good]) if good else None,
        "failed": [(i, reason) for i, x, reason in items if x is None],
    }


def _open_workdir(parts: Path, key: str, settings: EmbedSettings, restart: bool) -> dict[str, Any]:
    run_file = parts / "run.json"
    # Nothing finished yet (e.g. the model failed to load): nothing to keep, start afresh.
    nothing_done = parts.exists() and all(p.name == run_file.name for p in parts.iterdir())
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
    run = {"key": key, "settings": asdict(settings), "precision": None}
    atomic_write_text(run_file, json.dumps(run, indent=2) + "\n")
    return run


def embed_files(
    paths: Sequence[str],
    out: str | os.PathLike[str],
    settings: EmbedSettings,
    open_embedder: Callable[[str], Embedder],
    *,
    shard: tuple[int, int] = (0, 1),
    workers: int = 0,
    dtype: str = "float32",
    restart: bool = False,
    progress: bool = False,
) -> EmbedResult:
    """Embed ``paths`` (the full input list) into ``out``; see the module docstring.

    Args:
        open_embedder: called with a precision (``settings.precision``, or the one
            a resumed run already used) and returns the :class:`Embedder`.
        shard: ``(i, n)``: do the *i*-th of *n* shares of the work.
        workers: decoding processes (0: decode in this process).
        dtype: ``"float32"`` or ``"float16"`` rows in ``out``.
    """
    if not paths:
        raise InputError("No image files were found in the inputs; check the paths.")
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"dtype must be float32 or float16, got {dtype}.")
    if settings.batch_size < 1 or settings.part_size < 1:
        raise ConfigError("--batch-size and --part-size must be at least 1.")
    files = output_files(out)
    batch = settings.batch_size
    batches = _shard_batches(len(paths), batch, shard)
    per_part = max(1, settings.part_size // batch)
    part_batches = [batches[i : i + per_part] for i in range(0, len(batches), per_part)]
    digest = paths_digest(paths)
    key_data = [asdict(settings), _model_fingerprint(settings.model), digest, list(shard)]
    key = hashlib.sha256(json.dumps(key_data, default=str).encode()).hexdigest()
    finished = None if restart else _finished(files, key, dtype)
    if finished is not None:
        rows, skipped, used = finished["rows"], finished["skipped"], finished["precision"]
        return EmbedResult(files["features"], rows, skipped, 0, 0.0, used, up_to_date=True)
    files["features"].parent.mkdir(parents=True, exist_ok=True)
    run = _open_workdir(files["parts"], key, settings, restart)
    pending = [
        k for k in range(len(part_batches)) if not (files["parts"] / f"{k:06d}.json").exists()
    ]
    embedder = open_embedder(run["precision"] or settings.precision)
    started = time.perf_counter()
    embedded_now = 0
    if pending:
        embedded_now = _run_parts(
            paths, files["parts"], part_batches, pending, embedder, settings, run, workers, progress
        )
    seconds = time.perf_counter() - started
    rows, skipped = _assemble(paths, files, len(part_batches), embedder.dim, dtype)
    precision: str | None = run["precision"] or getattr(embedder, "precision", None)
    meta = {
        "format": FORMAT,
        "rows": rows,
        "skipped": skipped,
        "dim": embedder.dim,
        "dtype": dtype,
        "model": settings.model,
        "backend": settings.backend,
        "output": settings.output,
        "normalized": settings.normalize,
        "precision": precision,
        "batch_size": batch,
        "inputs": len(paths),
        "inputs_sha256": digest,
        "shard": list(shard),
        "key": key,
    }
    atomic_write_text(files["meta"], json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(files["parts"], ignore_errors=True)
    return EmbedResult(files["features"], rows, skipped, embedded_now, seconds, precision)


def _finished(files: dict[str, Path], key: str, dtype: str) -> dict[str, Any] | None:
    """The meta of a complete earlier run with the same key and dtype, else None."""
    if not all(files[name].exists() for name in ("features", "manifest", "errors", "meta")):
        return None
    try:
        meta = json.loads(files["meta"].read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = isinstance(meta, dict) and meta.get("key") == key and meta.get("dtype") == dtype
    return meta if same else None


def _run_parts(
    paths: Sequence[str],
    folder: Path,
    part_batches: list[range],
    pending: list[int],
    embedder: Embedder,
    settings: EmbedSettings,
    run: dict[str, Any],
    workers: int,
    progress: bool,
) -> int:
    from tqdm.auto import tqdm

    b = settings.batch_size
    sampler = [
        list(range(j * b, min((j + 1) * b, len(paths)))) for k in pending for j in part_batches[k]
    ]
    loader = DataLoader(
        _Decoded(paths, embedder.preprocessing, settings.max_pixels),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=settings.device != "cpu" and torch.cuda.is_available(),
    )
    todo = sum(len(s) for s in sampler)
    bar = tqdm(total=todo, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    batches = iter(loader)
    normalize = settings.normalize
    try:
        for k in pending:
            _embed_part(
                folder / f"{k:06d}", len(part_batches[k]), batches, embedder, normalize, bar
            )
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
    return todo


def _embed_part(
    stem: Path,
    count: int,
    batches: Iterator[dict[str, Any]],
    embedder: Embedder,
    normalize: bool,
    bar: Any,
) -> None:
    """Embed the next ``count`` batches and save them as one part (``.npy``, then ``.json``)."""
    to_model = embedder.preprocessing.batch()  # uint8 crops -> normalised float32
    feats, rows, failed = [], [], []
    for _ in range(count):
        item = next(batches)
        if item["images"] is not None:
            raw = embedder.embed_batch(to_model(item["images"]))
            x = torch.from_numpy(np.asarray(raw, np.float32))
            if normalize:
                x = torch.nn.functional.normalize(x, dim=1)
            feats.append(x.numpy())
            rows.extend(item["rows"])
        failed.extend(item["failed"])
        bar.update(item["count"])
    array = np.concatenate(feats) if feats else np.zeros((0, embedder.dim), np.float32)
    with atomic_writer(stem.with_suffix(".npy")) as f:
        np.save(f, array)
    # the .json is written last: its presence marks the part as finished
    record = {"rows": rows, "failed": [[i, r] for i, r in failed]}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(record) + "\n")


def _assemble(
    paths: Sequence[str], files: dict[str, Path], parts: int, dim: int, dtype: str
) -> tuple[int, int]:
    """Concatenate finished parts into the final files; returns (rows, skipped)."""
    records = [json.loads((files["parts"] / f"{k:06d}.json").read_text()) for k in range(parts)]
    arrays = [files["parts"] / f"{k:06d}.npy" for k in range(parts)]
    errors = [(paths[i], reason) for r in records for i, reason in r["failed"]]
    rows = [paths[i] for r in records for i in r["rows"]]
    write_outputs(files, arrays, rows, errors, dim, dtype)
    return len(rows), len(errors)


def write_outputs(
    files: dict[str, Path],
    arrays: Sequence[Path],
    rows: Sequence[str],
    errors: Sequence[tuple[str, str]],
    dim: int,
    dtype: str,
) -> None:
    text = "".join(json.dumps({"path": p, "reason": r}) + "\n" for p, r in errors)
    atomic_write_text(files["errors"], text)
    atomic_write_text(files["manifest"], "".join(p + "\n" for p in rows))
    # the array is streamed part by part into a memory map: bounded memory at any size
    out = files["features"]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        target = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(rows), dim))
        start = 0
        for path in arrays:
            part = np.load(path, mmap_mode="r")
            if part.shape[1:] != (dim,):
                raise InputError(f"{path} holds {part.shape[1:]} features, not ({dim},).")
            target[start : start + len(part)] = part
            start += len(part)
        if start != len(rows):
            raise InputError(f"The parts hold {start} rows but their records name {len(rows)}.")
        target.flush()
        del target
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
