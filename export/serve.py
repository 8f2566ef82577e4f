"""``mocohub serve``: an HTTP server of embeddings around an exported model (aiohttp).

Endpoints:

- ``POST /embed``: one image as the raw body (any image content type, or
  ``application/octet-stream``); several as ``multipart/form-data`` (one image
  per part); or JSON ``{"image": BASE64}`` / ``{"images": [BASE64, ...]}``.
  Returns ``{"embeddings": [[...]], "dim": D, "count": N, "model": FILE}``
  (rows L2-normalised, in request order), or with ``Accept:
  application/octet-stream`` the raw little-endian float32 rows (N x D), with
  ``X-Embedding-Count`` and ``X-Embedding-Dim`` headers.
- ``GET /health``: ``{"status": "ok"}``.
- ``GET /info``: the model (file, arch, dim, precision, providers,
  preprocessing), the limits, and counters (requests, batches, images).

Requests that arrive within ``batch_wait_ms`` of each other are put into one
model call (up to ``max_batch`` images): an asyncio queue feeds one worker that
runs onnxruntime in a thread, so the event loop keeps accepting requests.
Images are decoded and resized in a thread pool. Bad input gets a 4xx JSON
``{"error": REASON}`` and the server carries on: 400 for undecodable images
or malformed JSON, 413 for a body over ``max_body_bytes``, an image over
``max_pixels`` (checked from its header, before decoding) or more than
``max_images`` images. A body that is neither multipart nor JSON is taken as
one encoded image whatever its content type.

Example:
    >>> app = create_app(open_embedder("out/onnx"), ServeSettings(max_pixels=10_000_000))
    >>> web.run_app(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import web
from PIL import Image, ImageOps, UnidentifiedImageError

from mocohub.imageio import to_mode

from .onnx_embedder import OnnxEmbedder, find_model_file

__all__ = ["Batcher", "ServeSettings", "create_app", "open_served_model", "serve"]

log = logging.getLogger("mocohub.serve")


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits and batching.

    Args:
        max_body_bytes: the largest request body (aiohttp's ``client_max_size``).
        max_pixels: the most pixels one image may have (width x height).
        max_images: the most images in one request.
        max_batch: the most images in one model call.
        batch_wait_ms: how long the first request of a batch waits for company.
    """

    max_body_bytes: int = 32 * 2**20
    max_pixels: int = 40_000_000
    max_images: int = 64
    max_batch: int = 64
    batch_wait_ms: float = 5.0


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a one-sentence ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class _Job:
    pixels: np.ndarray
    future: asyncio.Future[np.ndarray]


@dataclass
class Batcher:
    """Micro-batching: :meth:`submit` calls that arrive together share one ``run`` call."""

    run: Callable[[np.ndarray], np.ndarray]
    max_batch: int = 64
    wait_s: float = 0.005
    stats: dict[str, int] = field(
        default_factory=lambda: {"requests": 0, "batches": 0, "images": 0}
    )

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mocohub-model")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        """The embeddings of ``pixels`` (a batch), computed with whatever else is waiting."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.stats["requests"] += 1
        await self._queue.put(_Job(pixels, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            count = len(jobs[0].pixels)
            deadline = loop.time() + self.wait_s
            while count < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                jobs.append(job)
                count += len(job.pixels)
            await self._run(loop, [j for j in jobs if not j.future.done()])

    async def _run(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        if not jobs:
            return
        batch = np.concatenate([j.pixels for j in jobs])
        try:
            out = await loop.run_in_executor(self._executor, self.run, batch)
        except Exception as e:  # the model failed: every waiting request gets a 500
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        self.stats["batches"] += 1
        self.stats["images"] += len(batch)
        start = 0
        for job in jobs:
            rows = out[start : start + len(job.pixels)]
            start += len(job.pixels)
            if not job.future.done():  # the client may have gone
                job.future.set_result(rows)


def decode(data: bytes, embedder: OnnxEmbedder, max_pixels: int, label: str) -> np.ndarray:
    """One encoded image -> uint8 (S, S, 3) at the model's crop size; RequestError if unusable."""
    if not data:
        raise RequestError(400, f"{label} is empty.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise RequestError(
                    413,
                    f"{label} has {width}x{height} pixels, over the server's limit of "
                    f"{max_pixels}; send a smaller image.",
                )
            image.seek(0)
            oriented = ImageOps.exif_transpose(image) or image
            oriented.load()
            pixels: np.ndarray = embedder.pixels([to_mode(oriented, "RGB")])[0]
            return pixels
    except RequestError:
        raise
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        ValueError,
        SyntaxError,
    ) as e:
        reason = "not an image format Pillow knows" if isinstance(e, UnidentifiedImageError) else e
        raise RequestError(400, f"{label} could not be decoded ({reason}).") from e


async def _read_images(request: web.Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    kind = request.content_type
    if kind == "multipart/form-data":
        form = await request.post()
        items: list[tuple[str, bytes]] = []
        for name, value in form.items():
            if isinstance(value, web.FileField):
                items.append((f"Part {name!r} ({value.filename})", value.file.read()))
            elif isinstance(value, bytes | bytearray):
                items.append((f"Part {name!r}", bytes(value)))
            else:
                raise RequestError(
                    400, f"Form part {name!r} is text; send each image as a file part."
                )
        return items
    if kind == "application/json":
        try:
            body = await request.json()
            encoded = body["images"] if "images" in body else [body["image"]]
            if not isinstance(encoded, list) or not all(isinstance(e, str) for e in encoded):
                raise TypeError("images must be a list of base64 strings")
            return [
                (f"Image {i}", base64.b64decode(e, validate=True)) for i, e in enumerate(encoded)
            ]
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
            raise RequestError(
                400,
                f'Malformed JSON body ({type(e).__name__}: {e}); send {{"image": BASE64}} or '
                '{"images": [BASE64, ...]}.',
            ) from e
        except binascii.Error as e:
            raise RequestError(400, f"An image is not valid base64 ({e}).") from e
    return [("The image", await request.read())]  # any other type: the body is one image


def create_app(embedder: OnnxEmbedder, settings: ServeSettings | None = None) -> web.Application:
    """The aiohttp application serving ``embedder`` (see the module docstring)."""
    settings = settings or ServeSettings()
    batcher = Batcher(embedder.embed_images, settings.max_batch, settings.batch_wait_ms / 1000)
    decoder = ThreadPoolExecutor(
        max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="mocohub-decode"
    )

    async def embed(request: web.Request) -> web.Response:
        items = await _read_images(request, settings)
        if not items:
            raise RequestError(400, "The request holds no image.")
        if len(items) > settings.max_images:
            raise RequestError(
                413, f"{len(items)} images in one request; the server takes {settings.max_images}."
            )
        loop = asyncio.get_running_loop()
        pixels = await asyncio.gather(
            *(
                loop.run_in_executor(decoder, decode, data, embedder, settings.max_pixels, label)
                for label, data in items
            )
        )
        rows = await batcher.submit(np.stack(pixels))
        if "application/octet-stream" in request.headers.get("Accept", ""):
            return web.Response(
                body=rows.astype("<f4").tobytes(),
                content_type="application/octet-stream",
                headers={
                    "X-Embedding-Count": str(len(rows)),
                    "X-Embedding-Dim": str(rows.shape[1]),
                },
            )
        return web.json_response(
            {
                "embeddings": rows.tolist(),
                "dim": int(rows.shape[1]),
                "count": len(rows),
                "model": embedder.path.name,
            }
        )

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def info(_: web.Request) -> web.Response:
        return web.json_response(
            {**embedder.info(), "limits": asdict(settings), "stats": dict(batcher.stats)}
        )

    @web.middleware
    async def errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestError as e:
            return web.json_response({"error": e.reason}, status=e.status)
        except web.HTTPException as e:  # aiohttp's own: 404, 405, 413 (body too large) ...
            if e.status < 400:
                raise
            return web.json_response({"error": e.text or e.reason}, status=e.status)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return web.json_response({"error": "Internal error; see the server log."}, status=500)

    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[errors])
    app.router.add_post("/embed", embed)
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()
        decoder.shutdown(wait=False)

    app.cleanup_ctx.append(lifecycle)
    return app


def open_served_model(
    path: str | os.PathLike[str],
    *,
    precision: str | None = None,
    providers: str = "auto",
    threads: int | None = None,
) -> OnnxEmbedder:
    """The model ``mocohub serve`` runs: a file, or in a folder a pixels graph when present."""
    source = Path(path)
    if source.is_dir():
        source = find_model_file(source, precision=precision, pixels=None)
    return OnnxEmbedder(source, providers, threads=threads)


def serve(
    embedder: OnnxEmbedder,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Serve ``embedder`` until interrupted (Ctrl-C or SIGTERM).

    Example:
        >>> serve(open_served_model("out/onnx"), port=8000)
    """
    echo(
        f"mocohub serve: {embedder.path.name} ({embedder.dim}-d, {embedder.precision}, "
        f"{embedder.providers[0]}) on http://{host}:{port} (POST /embed, GET /health, GET /info)"
    )
    web.run_app(create_app(embedder, settings), host=host, port=port, print=None)
