"""The decoding side of ``mocohub embed``: image files -> batches in the layout the model runs.

Decoding (:func:`mocohub.imageio.decode_image`, the crop, and the
normalisation) happens either in DataLoader worker processes, while the model
runs (with CUDA, or on CPU cores the model's threads leave free), or, with
``workers=0``, on threads of the main process (the default on a CPU the model
keeps busy: :func:`default_workers`, :func:`decode_threads`). Then
:func:`open_batches` decodes batch *i + 1* on a background thread while the
model runs batch *i*: the model's threads wait for each other at every layer,
and decoding fills those gaps (on a 2-core AMD EPYC, ResNet-50 bf16 on 2
threads, 256 JPEGs of 400x300: 4 batches took 8.4-8.8 s with the next batch
decoded alongside, 9.2-9.7 s decoded in turn, 8.7-9.3 s for the model alone).
Workers of a model on the CPU run at the lowest priority (:func:`yield_to_the_model`).
Files that cannot be decoded travel as records, never as exceptions.

Example:
    >>> batches = open_batches(paths, [[0, 1], [2]], embedder, "cpu", None, workers=0)
    >>> [len(b["rows"]) for b in batches]
    [2, 1]
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mocohub.features import CropToTensor, Embedder
from mocohub.imageio import DecodeError, decode_image
from mocohub.preprocessing import Preprocessing
from mocohub.sysinfo import usable_cpus

__all__ = [
    "Batches",
    "Collate",
    "DecodedFiles",
    "Normalise",
    "decode_threads",
    "default_workers",
    "open_batches",
    "yield_to_the_model",
]


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
    cores = usable_cpus()
    if device != "cpu" and torch.cuda.is_available():
        return min(8, cores)
    return max(0, min(4, cores - torch.get_num_threads()))


class DecodedFiles(Dataset):
    """Path i -> (i, normalised float32 (S, S, C) crop or None, failure reason).

    With ``threads`` > 1 the files of a batch are decoded on that many threads
    (Pillow and NumPy release the GIL while they decode, resize and normalise),
    each writing its crop straight into its row of one (N, S, S, C) batch array,
    so that the batch needs no stacking copy (:meth:`Collate.stack`).
    """

    def __init__(
        self,
        paths: Sequence[str],
        prep: Preprocessing,
        max_pixels: int | None,
        threads: int = 1,
        normalise: bool = True,
        source: Any = None,
    ) -> None:
        self.paths, self.prep, self.max_pixels = paths, prep, max_pixels
        self.source = source  # an embed_sources.Inputs: tar members, table rows
        self.crop = CropToTensor(prep)
        self.normalise = Normalise(prep) if normalise else None
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitems__(self, indices: list[int]) -> list[tuple[int, np.ndarray | None, str]]:
        if self.threads < 2 or len(indices) < 2:
            return [self[i] for i in indices]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mocohub-decode")
        s, c = self.prep.image_size, self.prep.channels
        batch = np.empty((len(indices), s, s, c), np.float32 if self.normalise else np.uint8)
        return list(self._pool.map(self._decode, indices, batch))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:  # sent to worker processes without the pool
        return {**self.__dict__, "_pool": None}

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        return self._decode(i)

    def _decode(self, i: int, out: np.ndarray | None = None) -> tuple[int, np.ndarray | None, str]:
        path = self.paths[i]
        if "\n" in path or "\r" in path:
            return i, None, "the path holds a line break, which the manifest cannot; rename it"
        try:
            image = decode_image(
                path if self.source is None else self.source.open(i),
                mode=self.crop.mode,
                min_size=self.prep.resize_size,
                max_pixels=self.max_pixels,
            )
            crop = self.crop.hwc(image)
            if self.normalise is not None:
                return i, self.normalise(crop, out), ""
            if out is None:
                return i, crop, ""
            out[...] = crop
            return i, out, ""
        except DecodeError as e:
            return i, None, e.reason
        except Exception as e:  # preprocessing must not end the run either
            return i, None, f"cannot preprocess ({type(e).__name__}: {e})"


def decode_threads(workers: int) -> int:
    """Threads that decode each batch in the main process: the model's, when it has no workers.

    On a CPU that the model keeps busy, decoding a batch on all cores between two
    forward passes costs no more than overlapping the two jobs, and nothing
    contends with the model's threads. Any ``--max-pixels`` works on threads:
    :func:`~mocohub.imageio.decode_image` checks each caller's limit itself and
    never changes Pillow's process-wide one.

    Example:
        >>> torch.set_num_threads(2)
        >>> decode_threads(0), decode_threads(1)
        (2, 1)
    """
    return 1 if workers > 0 else torch.get_num_threads()


class Normalise:
    """A uint8 (S, S, C) crop -> float32 (S, S, C), exactly as ``Preprocessing.batch()`` does it.

    Per image, on the decoding thread, while the image is still in the cache: one
    conversion pass and two in place, over rows in which the per-channel mean
    and std repeat (``R, G, B, R, G, B, ...``). Normalising whole batches in
    channels_last with torch (the mean broadcast over the channel axis is not
    vectorised) took 1.1 ms of CPU per 224 px image; this takes about 0.15.
    """

    def __init__(self, prep: Preprocessing) -> None:
        self.mean = np.asarray(prep.mean, np.float32)
        self.std = np.asarray(prep.std, np.float32)

    def __call__(self, crop: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The normalised crop, in ``out`` (a float32 (S, S, C) array) when given."""
        h, w, c = crop.shape
        out = np.empty((h, w, c), np.float32) if out is None else out
        np.divide(crop, np.float32(255), out=out)  # float32 division, as torch's .div(255)
        rows = out.reshape(h, w * c)
        rows -= np.tile(self.mean, w)
        rows /= np.tile(self.std, w)
        return out


class Collate:
    """Decoded items -> one batch record: the crops stacked in the layout the backend runs."""

    def __init__(self, prep: Preprocessing, channels_last: bool) -> None:
        self.normalise = Normalise(prep)
        self.channels_last = channels_last

    def stack(self, crops: list[np.ndarray]) -> torch.Tensor:
        """Normalised (S, S, C) crops -> the (N, C, S, S) batch, channels_last or contiguous.

        Crops that are the rows, in order, of one batch array (what the decoding
        threads write) are that array as it is; others are stacked (a copy).
        """
        whole = crops[0].base
        if not (
            isinstance(whole, np.ndarray)
            and len(whole) == len(crops)
            and all(
                x.base is whole and x.ctypes.data == whole[k].ctypes.data
                for k, x in enumerate(crops)
            )
        ):
            whole = np.stack(crops)
        batch = torch.from_numpy(whole).permute(0, 3, 1, 2)  # channels_last order
        return batch if self.channels_last else batch.contiguous()

    def to_model(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, S, S) crops -> exactly what ``Preprocessing.batch()`` gives for them,
        in the memory layout the backend runs (what decoding and :meth:`stack` make)."""
        return self.stack([self.normalise(x.permute(1, 2, 0).numpy()) for x in crops])

    def __call__(self, items: list[tuple[int, np.ndarray | None, str]]) -> dict[str, Any]:
        good = [(i, x) for i, x, _ in items if x is not None]
        return {
            "count": len(items),
            "rows": [i for i, _ in good],
            "images": self.stack([x for _, x in good]) if good else None,
            "failed": [(i, reason) for i, x, reason in items if x is None],
        }


def yield_to_the_model(worker_id: int) -> None:
    """Run this decoding process at the lowest CPU priority (nice 19).

    When the model runs on the CPU it uses every core with threads that wait for
    each other at every layer, so a decoder that takes a core from one of them
    stalls all of them. At the lowest priority the decoders run on cores the
    model leaves idle: while it waits for its next batch, and on cores its
    threads do not use.
    """
    with contextlib.suppress(OSError):
        os.nice(19)


class Batches:
    """The batch records of a DataLoader, each decoded ahead while the caller runs the last.

    With ``prefetch``, one background thread produces batch *i + 1* (its
    decoding threads do the work) while the caller embeds batch *i*. Errors
    reach the caller at the batch that raised them. :meth:`close` stops the
    thread and the decoding pool.
    """

    def __init__(self, loader: DataLoader, dataset: DecodedFiles, prefetch: bool) -> None:
        self._source: Iterator[dict[str, Any]] = iter(loader)
        self._dataset = dataset
        self._pool = ThreadPoolExecutor(1, "mocohub-prefetch") if prefetch else None
        self._next: Future[dict[str, Any]] | None = None

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._pool is None:
            return next(self._source)
        future = self._next or self._pool.submit(next, self._source)
        self._next = None
        item = future.result()  # StopIteration and decoding errors are raised here
        self._next = self._pool.submit(next, self._source)
        return item

    def close(self) -> None:
        if self._pool is not None:
            if self._next is not None:
                self._next.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None
        self._dataset.close()


def open_batches(
    paths: Sequence[str],
    sampler: list[list[int]],
    embedder: Embedder,
    device: str,
    max_pixels: int | None,
    workers: int,
    source: Any = None,
) -> Batches:
    """Batches of ``paths`` (rows as ``sampler`` groups them) decoded for ``embedder``.

    Each record holds ``rows`` (the indices decoded), ``images`` (their
    normalised crops as one batch, or None), ``failed`` ((index, reason) pairs)
    and ``count`` (``source``: the :class:`~mocohub.embed_sources.Inputs` that
    ``paths`` name, which opens each item). With ``workers`` 0, batches are
    decoded on threads of this
    process, each while the model runs the one before. On a GPU, a backend with
    ``takes_uint8`` (the torch backend) gets uint8 crops in pinned memory and
    normalises them on the device.
    """
    on_gpu = device != "cpu" and torch.cuda.is_available()
    # A backend that normalises on its device gets the uint8 crops: a quarter of the
    # bytes to copy (from pinned memory, overlapped), and no float work on the CPU.
    raw = on_gpu and getattr(embedder, "takes_uint8", False)
    threads = decode_threads(workers)
    dataset = DecodedFiles(
        paths, embedder.preprocessing, max_pixels, threads, normalise=not raw, source=source
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=Collate(embedder.preprocessing, getattr(embedder, "channels_last", False)),
        pin_memory=on_gpu,
        worker_init_fn=None if on_gpu else yield_to_the_model,
    )
    return Batches(loader, dataset, prefetch=workers == 0)
