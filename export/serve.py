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
  preprocessing), the limits, and counters (requests, batches, images,
  decoded, disconnected, body_timeouts, header_timeouts, connections_refused).

Requests that arrive within ``batch_wait_ms`` of each other are put into one
model call (up to ``max_batch`` images, a fair share from each waiting request;
see :mod:`.batcher`): one worker runs onnxruntime in a thread, so the event
loop keeps accepting requests. Images are decoded and resized in a thread pool
where each request has at most ``decode_threads`` images at a time, so a small
request is not queued behind every image of a large one.

Nothing a client sends can take the server down or hold it (see
:mod:`.serve_request`): bad input gets a 4xx JSON ``{"error": REASON}`` and
the server carries on. 400: undecodable images, malformed JSON or multipart;
408: a body not received within ``body_timeout_s``; 413: a body over
``max_body_bytes``, more than ``max_images`` images, an image over
``max_pixels`` or too elongated to resize (``max_aspect_ratio``), or more than
``max_request_pixels`` in one request (all checked from the image headers,
before decoding); 415: a compressed body. A connection that has not sent a
request's headers within ``header_timeout_s`` is closed (with a 408), and one
over ``max_connections`` open at once is answered 503 and closed. A body that
is neither multipart nor JSON is taken as one encoded image whatever its
content type.

Example:
    >>> app = create_app(open_served_model("out/onnx"), ServeSettings(max_pixels=10_000_000))
    >>> runner = await start_server(app, "127.0.0.1", 8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from aiohttp import web

from mocohub.errors import InputError
from mocohub.sysinfo import usable_cpus

from .batcher import Batcher
from .model_files import find_model_file
from .onnx_embedder import OnnxEmbedder
from .serve_connections import ClientErrorLog, ConnectionGuard
from .serve_request import RequestError, decode_for_model, probe_images, read_images

__all__ = [
    "Batcher",
    "RequestError",
    "ServeSettings",
    "create_app",
    "open_served_model",
    "serve",
    "start_server",
]

log = logging.getLogger("mocohub.serve")


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits, timeouts and batching.

    Args:
        max_body_bytes: the largest request body (aiohttp's ``client_max_size``).
        max_pixels: the most pixels one image may have (width x height), also
            once its short side is resized to the model's resize size.
        max_aspect_ratio: the most elongated image accepted (long side / short side).
        max_request_pixels: the most pixels all images of one request may have
            together (the decode work one request may ask for).
        max_images: the most images in one request.
        max_batch: the most images in one model call.
        batch_wait_ms: how long the first request of a batch waits for company.
        header_timeout_s: how long a connection may take to send a request's
            headers (and how long an idle keep-alive connection is kept).
        body_timeout_s: how long a request may take to send its body.
        max_connections: the most connections open at once; more are answered 503.
        decode_threads: threads decoding images (None: up to 4, one per CPU);
            also the most images of one request decoded at a time.

    Example:
        >>> ServeSettings(max_pixels=10_000_000, body_timeout_s=30)
    """

    max_body_bytes: int = 32 * 2**20
    max_pixels: int = 40_000_000
    max_aspect_ratio: float = 50.0
    max_request_pixels: int = 100_000_000
    max_images: int = 64
    max_batch: int = 64
    batch_wait_ms: float = 5.0
    header_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    max_connections: int = 512
    decode_threads: int | None = None


_GUARD = web.AppKey("mocohub_connection_guard", ConnectionGuard)
_T = TypeVar("_T")


async def _within(seconds: float, work: Coroutine[Any, Any, _T]) -> _T:
    """``await work``, or asyncio.TimeoutError after ``seconds``."""
    if sys.version_info >= (3, 11):  # no extra task per request
        async with asyncio.timeout(seconds):
            return await work
    return await asyncio.wait_for(work, seconds)


def create_app(embedder: OnnxEmbedder, settings: ServeSettings | None = None) -> web.Application:
    """The aiohttp application serving ``embedder`` (see the module docstring).

    Run it with :func:`start_server` (or :func:`serve`), which also applies the
    header timeout and the connection cap; any aiohttp runner applies the rest.

    Example:
        >>> app = create_app(open_served_model("out/onnx"), ServeSettings(max_images=16))
    """
    settings = settings or ServeSettings()
    batcher = Batcher(embedder.embed_images, settings.max_batch, settings.batch_wait_ms / 1000)
    threads = settings.decode_threads or min(4, usable_cpus())
    decoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mocohub-decode")
    stats = {
        "decoded": 0,
        "disconnected": 0,
        "body_timeouts": 0,
        "header_timeouts": 0,
        "connections_refused": 0,
    }
    guard = ConnectionGuard(settings, stats)
    resize_size = embedder.preprocessing.resize_size

    async def decode_all(items: list[tuple[str, bytes]]) -> list[np.ndarray]:
        # At most `threads` images of this request in the pool at once: the pool's
        # queue then holds a few images of each request, not all of the first one's.
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(threads)

        async def one(label: str, data: bytes) -> np.ndarray:
            async with gate:
                pixels = await loop.run_in_executor(
                    decoder, decode_for_model, data, embedder, label
                )
                stats["decoded"] += 1
                return pixels

        tasks = [asyncio.ensure_future(one(label, data)) for label, data in items]
        try:
            return await asyncio.gather(*tasks)
        finally:  # one image failed: the others are not decoded for nothing
            for task in tasks:
                task.cancel()

    async def embed(request: web.Request) -> web.Response:
        try:
            items = await _within(settings.body_timeout_s, read_images(request, settings, decoder))
        except asyncio.TimeoutError:
            stats["body_timeouts"] += 1
            raise RequestError(
                408,
                f"The request body did not arrive within {settings.body_timeout_s:g} s.",
                close=True,
            ) from None
        if not items:
            raise RequestError(400, "The request holds no image.")
        if len(items) > settings.max_images:
            raise RequestError(
                413, f"{len(items)} images in one request; the server takes {settings.max_images}."
            )
        loop = asyncio.get_running_loop()
        if len(items) == 1:  # checked from the header and decoded in one pass
            (label, data), one = items[0], decode_for_model
            pixels = [await loop.run_in_executor(decoder, one, data, embedder, label, settings)]
            stats["decoded"] += 1
        else:  # all checked before any is decoded
            await loop.run_in_executor(decoder, probe_images, items, settings, resize_size)
            pixels = await decode_all(items)
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
            {
                **embedder.info(),
                "limits": asdict(settings),
                "stats": {**batcher.stats, **stats},
            }
        )

    @web.middleware
    async def errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        guard.request_started(request.protocol)
        try:
            return await handler(request)
        except RequestError as e:
            response = web.json_response({"error": e.reason}, status=e.status)
            if e.close:  # answer, then drop the connection instead of reading on
                response.force_close()
                await response.prepare(request)
                await response.write_eof()
                request.protocol.force_close()
            return response
        except web.HTTPException as e:  # aiohttp's own: 404, 405, 413 (body too large) ...
            if e.status < 400:
                raise
            return web.json_response({"error": e.text or e.reason}, status=e.status)
        except ConnectionError as e:  # the client went away mid-request: its loss, one line
            stats["disconnected"] += 1
            log.warning(
                "%s %s from %s: the client disconnected before the answer (%s)",
                request.method,
                request.path,
                request.remote,
                e,
            )
            return web.json_response({"error": "disconnected"}, status=400)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return web.json_response({"error": "Internal error; see the server log."}, status=500)

    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[errors],
        handler_args={
            # idle keep-alive connections, and partial headers after the first request
            "keepalive_timeout": settings.header_timeout_s,
            # bodies are read as sent: compressed ones are refused, never inflated
            "auto_decompress": False,
            "logger": ClientErrorLog(logging.getLogger("aiohttp.server")),
        },
    )
    app[_GUARD] = guard
    app.router.add_post("/embed", embed)
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()
        decoder.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(lifecycle)
    return app


async def start_server(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    handle_signals: bool = False,
) -> web.AppRunner:
    """Start serving ``app`` (from :func:`create_app`) on ``host:port``; returns the runner.

    ``runner.addresses`` says where (``port=0``: a free port); ``await
    runner.cleanup()`` stops it. ``handle_signals``: Ctrl-C and SIGTERM raise
    ``web.GracefulExit`` (main thread only).

    Raises:
        InputError: the address cannot be bound (in use, not this machine's).

    Example:
        >>> runner = await start_server(create_app(embedder), "127.0.0.1", 0)
        >>> runner.addresses[0][:2]
        ('127.0.0.1', 41123)
    """
    runner = web.AppRunner(app, handle_signals=handle_signals)
    await runner.setup()
    guard = app.get(_GUARD)
    if guard is not None and runner.server is not None:
        guard.attach(runner.server)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        raise InputError(
            f"Cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host."
        ) from e
    return runner


def open_served_model(
    path: str | os.PathLike[str],
    *,
    precision: str | None = None,
    providers: str = "auto",
    threads: int | None = None,
    max_batch: int = ServeSettings.max_batch,
) -> OnnxEmbedder:
    """The model ``mocohub serve`` runs: a file, or in a folder a pixels graph when present.

    ``max_batch``: the server's (``ServeSettings.max_batch``), TensorRT's batch range.

    Example:
        >>> open_served_model("out/onnx", max_batch=32).path.name
        'model.preprocess.onnx'
    """
    source = Path(path)
    if source.is_dir():
        source = find_model_file(source, precision=precision, pixels=None)
    return OnnxEmbedder(source, providers, threads=threads, max_batch=max_batch)


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
    app = create_app(embedder, settings)

    async def run() -> None:
        runner = await start_server(app, host, port, handle_signals=True)
        bound_host, bound_port = runner.addresses[0][:2]  # port 0: the one the system chose
        echo(
            f"mocohub serve: {embedder.path.name} ({embedder.dim}-d, {embedder.precision}, "
            f"{embedder.providers[0]}) on http://{bound_host}:{bound_port} "
            "(POST /embed, GET /health, GET /info)"
        )
        try:
            await asyncio.Event().wait()  # until Ctrl-C or SIGTERM
        finally:
            await runner.cleanup()

    with contextlib.suppress(web.GracefulExit, KeyboardInterrupt):
        asyncio.run(run())
