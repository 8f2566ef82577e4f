"""One ``mocohub serve`` request's images: read from the body, checked from headers, decoded.

Everything a client can get wrong is a :class:`RequestError` (HTTP status and
one sentence): 400 for a malformed body (multipart without or with a wrong
boundary, without its end marker, garbage, JSON that is malformed or nested too
deeply, an undecodable image), 413 for too much (body bytes, images, pixels in
one image or in the request, an aspect ratio that resizing would blow up), 415
for a compressed body. The checks on pixels read only the image headers, so
nothing large is allocated for an image that is refused.

Example:
    >>> items = await read_images(request, settings, executor)
    >>> pixel_counts = probe_images(items, settings, resize_size=256)  # all, then
    >>> pixels = decode_for_model(items[0][1], embedder, items[0][0])  # each
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from mocohub.imageio import DecodeError, load_image, open_image

if TYPE_CHECKING:
    from .onnx_embedder import OnnxEmbedder
    from .serve import ServeSettings

__all__ = ["RequestError", "decode_for_model", "probe_images", "read_images"]

_JSON_SHAPE = '{"image": BASE64} or {"images": [BASE64, ...]}'


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a one-sentence ``reason``.

    ``close``: also close the connection after answering (the rest of the body
    is not worth reading, e.g. after a read timeout).
    """

    def __init__(self, status: int, reason: str, *, close: bool = False) -> None:
        super().__init__(reason)
        self.status, self.reason, self.close = status, reason, close


def _too_large(settings: ServeSettings, size: int | str) -> RequestError:
    return RequestError(
        413,
        f"Maximum request body size {settings.max_body_bytes} exceeded ({size} bytes); "
        "send fewer or smaller images per request.",
    )


def _too_many(settings: ServeSettings, count: int | str) -> RequestError:
    return RequestError(
        413,
        f"{count} images in one request; the server takes {settings.max_images}: "
        "split them over several requests.",
    )


async def read_images(
    request: web.Request, settings: ServeSettings, executor: Executor
) -> list[tuple[str, bytes]]:
    """(label, encoded image) for each image of the request, in order.

    The body is one image (any content type but these two), ``multipart/*``
    with one image per part, or JSON with base64 images (parsed in ``executor``,
    off the event loop).
    """
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding not in ("", "identity"):
        # Refused rather than inflated up to a limit: images are compressed already, so
        # gzip gains little, and inflating costs the server CPU for each byte the client
        # sends (a 1 MB gzip body is 1 GiB of zeros). The server reads bodies without
        # decompressing them (auto_decompress=False), so refusing costs nothing.
        raise RequestError(
            415,
            f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed.",
        )
    if request.content_length is not None and request.content_length > settings.max_body_bytes:
        raise _too_large(settings, request.content_length)
    kind = request.content_type
    if kind.startswith("multipart/"):
        return await _read_multipart(request, settings)
    body = await request.read()  # aiohttp stops at client_max_size with a 413
    if kind == "application/json":
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, _parse_json, body, settings)
    return [("The image", body)]  # any other type: the body is one image


def _malformed_multipart(error: Exception) -> RequestError:
    return RequestError(
        400,
        f"Malformed multipart body ({error}); send one image per part between "
        "--BOUNDARY lines, ending with --BOUNDARY--, the boundary as in the Content-Type.",
    )


async def _read_multipart(request: web.Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    try:
        reader = await request.multipart()
    except (ValueError, KeyError, AssertionError) as e:  # no boundary, a bad one
        raise _malformed_multipart(e) from e
    items: list[tuple[str, bytes]] = []
    total = 0
    while True:
        try:
            part = await reader.next()
        except (ValueError, RuntimeError, HttpProcessingError) as e:
            raise _malformed_multipart(e) from e
        if part is None:
            return items
        if not isinstance(part, BodyPartReader):
            raise RequestError(400, "Nested multipart bodies are not accepted; one image a part.")
        name = part.name or str(len(items))
        if len(items) == settings.max_images:
            raise _too_many(settings, f"More than {settings.max_images}")
        encoding = part.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
        transfer = part.headers.get(hdrs.CONTENT_TRANSFER_ENCODING, "binary").strip().lower()
        if encoding not in ("", "identity") or transfer not in ("", "binary", "8bit", "7bit"):
            raise RequestError(
                415, f"Part {name!r} is encoded ({encoding}, {transfer}); send the raw image bytes."
            )
        data = bytearray()
        try:
            while chunk := await part.read_chunk():
                total += len(chunk)
                if total > settings.max_body_bytes:
                    raise _too_large(settings, f"over {settings.max_body_bytes}")
                data += chunk
        except (ValueError, RuntimeError, HttpProcessingError) as e:
            raise _malformed_multipart(e) from e
        kind = part.headers.get(hdrs.CONTENT_TYPE)
        if part.filename is None and (kind is None or kind.startswith("text/")):
            raise RequestError(400, f"Form part {name!r} is text; send each image as a file part.")
        label = f"Part {name!r}" + (f" ({part.filename})" if part.filename else "")
        items.append((label, bytes(data)))


def _parse_json(body: bytes, settings: ServeSettings) -> list[tuple[str, bytes]]:
    try:
        document: Any = json.loads(body)
    except RecursionError:
        raise RequestError(
            400, f"Malformed JSON body (nested too deeply); send {_JSON_SHAPE}."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(
            400, f"Malformed JSON body ({type(e).__name__}: {e}); send {_JSON_SHAPE}."
        ) from e
    encoded = None
    if isinstance(document, dict):
        encoded = document["images"] if "images" in document else [document.get("image")]
    if not isinstance(encoded, list) or not all(isinstance(e, str) for e in encoded):
        raise RequestError(
            400, f"Malformed JSON body (not a list of base64 strings); send {_JSON_SHAPE}."
        )
    if len(encoded) > settings.max_images:
        raise _too_many(settings, len(encoded))
    try:
        return [(f"Image {i}", base64.b64decode(e, validate=True)) for i, e in enumerate(encoded)]
    except binascii.Error as e:
        raise RequestError(400, f"An image is not valid base64 ({e}).") from e


def check_size(
    width: int, height: int, settings: ServeSettings, resize_size: int, label: str
) -> None:
    """Refuse (413) an image too large as it is or once its short side is resized.

    Resizing the short side to ``resize_size`` multiplies the long one: a
    300,000 x 1 image would become 9,600,000 x 32 at 32 px. The aspect ratio is
    bounded, and so is the resized image's pixel count.
    """
    if width * height > settings.max_pixels:
        raise RequestError(
            413,
            f"{label} has {width}x{height} pixels, over the server's limit of "
            f"{settings.max_pixels}; send a smaller image.",
        )
    short, long = sorted((max(width, 1), max(height, 1)))
    ratio = long / short
    resized = resize_size * int(resize_size * ratio)
    if ratio > settings.max_aspect_ratio or resized > settings.max_pixels:
        raise RequestError(
            413,
            f"{label} is {width}x{height}, an aspect ratio of {ratio:.4g}:1 (the server takes "
            f"{settings.max_aspect_ratio:g}:1 and {settings.max_pixels} pixels once the short "
            f"side is resized to {resize_size}, which would make it "
            f"{int(resize_size * ratio)}x{resize_size}); crop it first.",
        )


def _check_request_pixels(counts: list[int], settings: ServeSettings) -> None:
    if sum(counts) > settings.max_request_pixels:
        raise RequestError(
            413,
            f"The request's {len(counts)} image(s) hold {sum(counts)} pixels, over the "
            f"server's limit of {settings.max_request_pixels} per request; send them in "
            "several requests.",
        )


def probe_images(
    items: list[tuple[str, bytes]], settings: ServeSettings, resize_size: int
) -> list[int]:
    """The pixel count of each image, from its header; RequestError for any refused.

    The whole request is refused (413) when its images hold more than
    ``settings.max_request_pixels`` pixels together: the decode work one
    request may ask for.
    """
    counts = []
    for label, data in items:
        if not data:
            raise RequestError(400, f"{label} is empty.")
        try:
            with open_image(io.BytesIO(data), max_pixels=None) as image:
                width, height = image.size
        except DecodeError as e:
            raise RequestError(400, f"{label} could not be decoded ({e.reason}).") from e
        check_size(width, height, settings, resize_size, label)
        counts.append(width * height)
    _check_request_pixels(counts, settings)
    return counts


def decode_for_model(
    data: bytes, embedder: OnnxEmbedder, label: str, settings: ServeSettings | None = None
) -> np.ndarray:
    """One encoded image -> uint8 (S, S, C) at the model's crop size; RequestError if unusable.

    Decoded and cropped as ``mocohub embed`` decodes and crops files
    (:func:`mocohub.imageio.load_image`: EXIF orientation, first frame, any
    mode to the model's RGB or gray, large JPEGs at a reduced scale still twice
    the resize size, transparency on white; then :meth:`OnnxEmbedder.pixels`).
    With ``settings``, the image is first checked from its header as
    :func:`probe_images` checks a one-image request (without: the caller has
    probed it).
    """
    if not data:
        raise RequestError(400, f"{label} is empty.")
    resize_size = embedder.preprocessing.resize_size
    try:
        with open_image(io.BytesIO(data), max_pixels=None) as image:
            if settings is not None:
                width, height = image.size
                check_size(width, height, settings, resize_size, label)
                _check_request_pixels([width * height], settings)
            decoded = load_image(image, mode=embedder.mode, min_size=resize_size)
    except DecodeError as e:
        raise RequestError(400, f"{label} could not be decoded ({e.reason}).") from e
    pixels: np.ndarray = embedder.pixels([decoded])[0]
    return pixels
