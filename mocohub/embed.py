"""The embed pipeline: image files -> ``feats.npy`` + manifest + errors, sharded and resumable.

Files written beside ``OUT.npy`` (all atomically, temp file + fsync + rename):

- ``OUT.npy``: one row per embedded image (float32 or float16, L2-normalised by default);
- ``OUT.manifest.txt``: line *i* is the path of row *i* (plain text, so ``sed -n 5p``
  and ``np.loadtxt``-free readers work; a path holding a line break is refused);
- ``OUT.errors.jsonl``: one ``{"path": ..., "reason": ...}`` per skipped file;
- ``OUT.meta.json``: model, output, dims, precision, input digest, shard, counts.

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
(``restart=True`` discards it). Because every image is embedded in the same
batch of the global list, a resumed run, and shards merged with
:mod:`mocohub.embed_merge`, give exactly the array of one uninterrupted run.

Decoding (:func:`mocohub.imageio.decode_image`, the crop, and the
normalisation into the memory layout the backend runs) happens either in
DataLoader worker processes, while the model runs (with CUDA, or on CPU cores
the model's threads leave free), or, with ``workers=0``, batch by batch on the
model's threads between forward passes (the default on a CPU the model keeps
busy: :func:`default_workers`, :func:`decode_threads`). Workers of a model on
the CPU run at the lowest priority: the model's threads wait for each other at
every layer, so a decoder that takes a core from one of them stalls them all.
Files that cannot be decoded travel as records, never as exceptions.

Example:
    >>> result = embed_files(scan_inputs(["photos/"]), "feats.npy", settings, factory)
    >>> result.rows, result.skipped
    (1998, 2)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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

__all__ = [
    "EmbedResult",
    "EmbedSettings",
    "decode_threads",
    "default_workers",
    "embed_files",
    "output_files",
    "shard_work",
]

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


def default_workers(device: str = "auto") -> int:
    """Decoding processes ``mocohub embed`` starts by default for a model on ``device``.

    With CUDA, ``min(8, cores)``: the CPU decodes while the GPU runs the model. On
    a CPU, one per core the model's threads leave free (at most 4); none when they
    use every core: the batches are then decoded on the model's threads, between
    forward passes (:func:`decode_threads`).

    Example:
        >>> torch.set_num_threads(os.cpu_count())
        >>> default_workers("cpu")
        0
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if device != "cpu" and torch.cuda.is_available():
        return min(8, cores)
    return max(0, min(4, cores - torch.get_num_threads()))


def _model_fingerprint(model: str) -> list[Any]:
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


class _Decoded(Dataset):
    """Path i -> (i, uint8 crop or None, failure reason); normalised later, per batch.

    With ``threads`` > 1 the files of a batch are decoded on that many threads
    (Pillow releases the GIL while it decodes and resizes).
    """

    def __init__(
        self, paths: Sequence[str], prep: Preprocessing, max_pixels: int | None, threads: int = 1
    ) -> None:
        self.paths, self.prep, self.max_pixels = paths, prep, max_pixels
        self.crop = CropToTensor(prep)
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitems__(self, indices: list[int]) -> list[tuple[int, torch.Tensor | None, str]]:
        if self.threads < 2 or len(indices) < 2:
            return [self[i] for i in indices]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mocohub-decode")
        # decode_image silences Pillow's warnings with warnings.catch_warnings, which is not
        # thread-safe: the filters are restored here, once all threads are done
        with warnings.catch_warnings():
            return list(self._pool.map(self.__getitem__, indices))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:  # sent to worker processes without the pool
        return {**self.__dict__, "_pool": None}

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


def decode_threads(workers: int, max_pixels: int | None) -> int:
    """Threads that decode each batch in the main process: the model's, when it has no workers.

    On a CPU that the model keeps busy, decoding a batch on all cores between two
    forward passes costs no more than overlapping the two jobs, and nothing
    contends with the model's threads. One thread when files may exceed Pillow's
    own pixel limit: :func:`~mocohub.imageio.decode_image` then lifts that
    process-wide limit while it decodes, which threads cannot share.
    """
    if workers > 0 or max_pixels is None or max_pixels > DEFAULT_MAX_PIXELS:
        return 1
    return torch.get_num_threads()


class _Collate:
    """Decoded items -> one batch record, the crops normalised as the backend takes them."""

    def __init__(self, prep: Preprocessing, channels_last: bool) -> None:
        self.mean = torch.tensor(prep.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(prep.std).view(1, -1, 1, 1)
        self.layout = torch.channels_last if channels_last else torch.contiguous_format

    def to_model(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, S, S) crops -> exactly what ``Preprocessing.batch()`` gives for them,
        computed in place, in the memory layout the backend runs (half the passes)."""
        x = torch.empty(crops.shape, dtype=torch.float32, memory_format=self.layout)
        return x.copy_(crops).div_(255).sub_(self.mean).div_(self.std)

    def __call__(self, items: list[tuple[int, torch.Tensor | None, str]]) -> dict[str, Any]:
        good = [(i, x) for i, x, _ in items if x is not None]
        return {
            "count": len(items),
            "rows": [i for i, _ in good],
            "images": self.to_model(torch.stack([x for _, x in good])) if good else None,
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
        workers: decoding processes (0: decode in this process, on
            :func:`decode_threads` threads).
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
    owned, batches = shard_work(len(paths), batch, shard)
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
            paths,
            owned,
            files["parts"],
            part_batches,
            pending,
            embedder,
            settings,
            run,
            workers,
            progress,
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
    owned: range,
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
    on_gpu = settings.device != "cpu" and torch.cuda.is_available()
    threads = decode_threads(workers, settings.max_pixels)
    dataset = _Decoded(paths, embedder.preprocessing, settings.max_pixels, threads)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=_Collate(embedder.preprocessing, getattr(embedder, "channels_last", False)),
        pin_memory=on_gpu,
        worker_init_fn=None if on_gpu else _yield_to_the_model,
    )
    todo = sum(i in owned for indices in sampler for i in indices)  # this shard's images
    bar = tqdm(total=todo, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    batches = iter(loader)
    normalize = settings.normalize
    try:
        for k in pending:
            _embed_part(
                folder / f"{k:06d}", len(part_batches[k]), batches, embedder, normalize, owned, bar
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
        dataset.close()
    return todo


def _yield_to_the_model(worker_id: int) -> None:
    """Run this decoding process at the lowest CPU priority (nice 19).

    When the model runs on the CPU it uses every core with threads that wait for
    each other at every layer, so a decoder that takes a core from one of them
    stalls all of them. At the lowest priority the decoders run on cores the
    model leaves idle: while it waits for its next batch, and on cores its
    threads do not use.
    """
    with contextlib.suppress(OSError):
        os.nice(19)


def _embed_part(
    stem: Path,
    count: int,
    batches: Iterator[dict[str, Any]],
    embedder: Embedder,
    normalize: bool,
    owned: range,
    bar: Any,
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
