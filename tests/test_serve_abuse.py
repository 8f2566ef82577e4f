"""mocohub serve under abuse (issue 18, items 5-9): each fault injected over real HTTP on 127.0.0.1.

Every wait is bounded (socket timeouts, polling with a deadline); no assertion
measures time. The server runs in a thread of this process with small limits.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import io
import json
import logging
import select
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import numpy as np
import pytest
from embed_helpers import png_header_claiming
from PIL import Image
from serve_helpers import (
    PNGS,
    ThreadServer,
    export_tiny_model,
    read_until_closed,
    request,
    wait_for,
)

from mocohub.export.onnx_embedder import OnnxEmbedder
from mocohub.export.serve import ServeSettings, create_app, open_served_model
from mocohub.export.serve_request import RequestError, check_size


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> OnnxEmbedder:
    out = export_tiny_model(tmp_path_factory.mktemp("serve_abuse"))
    return open_served_model(out, providers="cpu", threads=1)


@contextmanager
def running(embedder: OnnxEmbedder, **limits: float) -> Iterator[ThreadServer]:
    """A server with these ServeSettings, stopped on exit."""
    defaults: dict = {"max_body_bytes": 2_000_000, "max_pixels": 250_000, "max_images": 8}
    with ThreadServer(create_app(embedder, ServeSettings(**{**defaults, **limits}))) as server:
        yield server


def png(size: tuple[int, int], value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def stats(server: ThreadServer) -> dict[str, int]:
    return json.loads(request(server.url + "/info")[2])["stats"]


def post(server: ThreadServer, data: bytes, headers: dict[str, str]) -> tuple[int, str]:
    status, _, body = request(server.url + "/embed", data, headers)
    return status, json.loads(body).get("error", "")


def good_request_works(server: ThreadServer) -> bool:
    status, _, body = request(
        server.url + "/embed", PNGS[0].read_bytes(), {"Content-Type": "image/png"}
    )
    return status == 200 and json.loads(body)["count"] == 1


# item 5 -------------------------------------------------------------------------------------


def test_a_wide_image_is_refused_from_its_header_before_resizing(embedder: OnnxEmbedder) -> None:
    with running(embedder) as server:
        # 200,000 x 1 is under max_pixels (250,000), but resizing its short side to 32
        # would make it 6,400,000 x 32
        wide = png((200_000, 1))
        status, reason = post(server, wide, {"Content-Type": "image/png"})
        assert status == 413 and "aspect ratio of 2e+05:1" in reason, reason
        tall = png_header_claiming(1, 240_000)
        status, reason = post(server, tall, {"Content-Type": "image/png"})
        assert status == 413 and "crop it first" in reason, reason
        assert stats(server)["decoded"] == 0  # refused from the headers alone
        status, _ = post(server, png((600, 20)), {"Content-Type": "image/png"})  # 30:1 is fine
        assert status == 200 and stats(server)["decoded"] == 1


def test_the_default_limits_refuse_40_million_by_1() -> None:
    # --max-pixels (40 M) alone would admit it: about 200 GB once resized to 32 px
    with pytest.raises(RequestError, match="aspect ratio") as refused:
        check_size(40_000_000, 1, ServeSettings(), 32, "The image")
    assert refused.value.status == 413
    check_size(4000, 100, ServeSettings(), 256, "A panorama")  # 40:1, 10,240 x 256 resized
    with pytest.raises(RequestError, match="pixels once the short side is resized"):
        check_size(4000, 100, ServeSettings(max_pixels=1_000_000), 256, "A panorama")


# item 6 -------------------------------------------------------------------------------------


def test_stalled_and_trickling_clients_are_answered_408_and_dropped(
    embedder: OnnxEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with running(embedder, header_timeout_s=0.5, body_timeout_s=0.5) as server:
        stalled_headers = server.connect()
        stalled_headers.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Ty")
        stalled_body = server.connect()
        stalled_body.sendall(
            b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\n\r\n" + PNGS[0].read_bytes()[:10]
        )
        for sock in (stalled_headers, stalled_body):  # recv times out (fails) after 10 s
            answer = read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            sock.close()

        trickling = server.connect()
        trickling.sendall(
            b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        answer = b""
        for _ in range(200):  # one byte every 20 ms, for 4 s at most
            try:
                trickling.sendall(b"\0")
            except OSError:  # closed by the server: its answer is waiting
                answer = read_until_closed(trickling)
                break
            if select.select([trickling], [], [], 0.02)[0]:
                answer = read_until_closed(trickling)
                break
        trickling.close()
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer

        counts = stats(server)
        assert counts["header_timeouts"] == 1 and counts["body_timeouts"] == 2
        assert good_request_works(server)
    gc.collect()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_connections_over_the_cap_get_503_and_the_server_recovers(
    embedder: OnnxEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with running(embedder, max_connections=3, header_timeout_s=30) as server:
        idle = [server.connect() for _ in range(3)]
        extra = server.connect()
        answer = read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503") and b"3 connections open" in answer
        extra.close()
        idle.pop().close()

        def health() -> bool:
            try:
                return request(server.url + "/health")[0] == 200
            except OSError:  # refused while the closed connection is still counted
                return False

        wait_for(health)
        for sock in idle:
            sock.close()
        assert stats(server)["connections_refused"] >= 1
    gc.collect()  # asyncio reports a failed task that nobody awaited when it is collected
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors
    assert [r.getMessage() for r in caplog.records] == [
        "3 connections open, the limit (--max-connections): refusing more"
    ]


# item 7 -------------------------------------------------------------------------------------


def test_a_gzip_bomb_is_refused_without_inflating_it(
    embedder: OnnxEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1,024 gzip members of 1 MiB of zeros: a 1 MB body that inflates to 1 GiB
    member = gzip.compress(b"\0" * 2**20)
    bomb = member * 1024
    assert len(bomb) < 2_000_000
    inflaters: list[object] = []
    decompressobj = zlib.decompressobj

    def counted(*args: object, **kwargs: object) -> object:
        inflaters.append(args)
        return decompressobj(*args, **kwargs)  # type: ignore[arg-type]

    with running(embedder) as server:
        monkeypatch.setattr(zlib, "decompressobj", counted)  # the server is in this process
        status, reason = post(
            server, bomb, {"Content-Type": "image/png", "Content-Encoding": "gzip"}
        )
        assert status == 415 and "send the body uncompressed" in reason
        part = (
            b'--B\r\nContent-Disposition: form-data; name="a"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\nContent-Encoding: gzip\r\n\r\n" + member + b"\r\n--B--\r\n"
        )
        status, reason = post(server, part, {"Content-Type": "multipart/form-data; boundary=B"})
        assert status == 415 and "raw image bytes" in reason
        assert good_request_works(server)
        assert not inflaters  # not a byte inflated, not even while draining the refused body


# item 8 -------------------------------------------------------------------------------------


def _multipart(boundary: bytes, payload: bytes, *, end: bool = True) -> bytes:
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="a"; filename="a.png"'
        b"\r\nContent-Type: image/png\r\n\r\n" + payload
    )
    return body + (b"\r\n--" + boundary + b"--\r\n" if end else b"")


def test_client_mistakes_get_400_with_a_reason_and_no_traceback(
    embedder: OnnxEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    image = PNGS[0].read_bytes()
    multipart = "multipart/form-data"
    cases = [
        (_multipart(b"B", image), multipart, "Malformed multipart"),  # no boundary
        (_multipart(b"B", image), multipart + "; boundary=WRONG", "Malformed multipart"),
        (bytes(range(256)) * 20, multipart + "; boundary=B", "Malformed multipart"),  # garbage
        (_multipart(b"B", image, end=False), multipart + "; boundary=B", "Malformed multipart"),
        (b"[" * 100_000, "application/json", "nested too deeply"),
        (b'{"images": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "application/json", "nested"),
        (b"[1, 2]", "application/json", "Malformed JSON"),
        (b"null", "application/json", "Malformed JSON"),
        (b'{"images": []}', "application/json", "holds no image"),
    ]
    caplog.set_level(logging.WARNING)
    with running(embedder) as server:
        for body, kind, expected in cases:
            status, reason = post(server, body, {"Content-Type": kind})
            assert (status, expected in reason) == (400, True), (kind, body[:40], reason)
        malformed_http = [  # answered by aiohttp itself, logged in one line
            b"POST /embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n",
            b"GET /health HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
        ]
        for raw in malformed_http:
            sock = server.connect()
            sock.sendall(raw)
            assert read_until_closed(sock).startswith(b"HTTP/1.0 400")
            sock.close()
        assert good_request_works(server)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]
    assert len(lines) == len(malformed_http) and not any("\n" in line for line in lines)
    assert "Error handling request from 127.0.0.1: 400 (Invalid character in chunk" in lines[0]


def test_a_client_leaving_mid_body_is_one_log_line(
    embedder: OnnxEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with running(embedder) as server:
        sock = server.connect()
        sock.sendall(
            b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 100")  # the request is being handled
        sock.sendall(b"\0" * 1000)
        sock.close()
        wait_for(lambda: stats(server)["disconnected"] == 1)
        assert good_request_works(server)
    records = [r for r in caplog.records if r.name.startswith(("mocohub", "aiohttp"))]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is None and "disconnected" in records[0].getMessage()
    assert "\n" not in records[0].getMessage()


# item 9 -------------------------------------------------------------------------------------


def test_the_pixels_of_one_request_are_bounded_before_decoding(embedder: OnnxEmbedder) -> None:
    with running(embedder, max_request_pixels=1_000_000, max_pixels=2_000_000) as server:

        async def post_form(images: list[bytes]) -> tuple[int, dict]:
            form = aiohttp.FormData()
            for n, data in enumerate(images):
                form.add_field(f"i{n}", data, filename=f"{n}.png", content_type="image/png")
            async with (
                aiohttp.ClientSession() as session,
                session.post(server.url + "/embed", data=form) as response,
            ):
                return response.status, await response.json()

        status, answer = asyncio.run(post_form([png((800, 800)), png((800, 800))]))
        assert status == 413 and "1280000 pixels" in answer["error"]
        status, answer = asyncio.run(post_form([png((1100, 1000))]))  # one image, too
        assert status == 413 and "1100000 pixels" in answer["error"]
        assert stats(server)["decoded"] == 0  # refused from the headers
        status, answer = asyncio.run(post_form([png((800, 800))]))
        assert status == 200 and answer["count"] == 1


def test_a_small_request_is_answered_while_a_large_one_is_decoding(
    embedder: OnnxEmbedder,
) -> None:
    large = [png((2000, 2000), value) for value in range(40, 64)]  # 24 images
    limits = {"decode_threads": 1, "max_images": 64, "max_pixels": 4_000_000}
    with running(embedder, max_request_pixels=10**9, **limits) as server:

        async def scenario() -> tuple[int, int, bool, int]:
            async with aiohttp.ClientSession() as session:

                async def post_large() -> int:
                    form = aiohttp.FormData()
                    for n, data in enumerate(large):
                        form.add_field(f"i{n}", data, filename=f"{n}.png", content_type="image/png")
                    async with session.post(server.url + "/embed", data=form) as response:
                        return response.status

                async def decoded() -> int:
                    async with session.get(server.url + "/info") as response:
                        return (await response.json())["stats"]["decoded"]

                big = asyncio.ensure_future(post_large())
                for _ in range(500):  # until the large request is being decoded (10 s at most)
                    if await decoded() >= 1 or big.done():
                        break
                    await asyncio.sleep(0.02)
                async with session.post(
                    server.url + "/embed",
                    data=PNGS[1].read_bytes(),
                    headers={"Content-Type": "image/png"},
                ) as response:
                    small_status = response.status
                decoded_then, large_done_then = await decoded(), big.done()
                return small_status, decoded_then, large_done_then, await big

        small_status, decoded_then, large_done, large_status = asyncio.run(scenario())
        assert (small_status, large_status) == (200, 200)
        # the small request's image went in between: the large one was not all decoded yet
        assert decoded_then < len(large) + 1 and not large_done, decoded_then
        assert stats(server)["decoded"] == len(large) + 1


def test_a_large_request_does_not_keep_a_small_one_out_of_the_model() -> None:
    from mocohub.export.batcher import Batcher

    calls: list[list[float]] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first_call_running = asyncio.Event()
        release = asyncio.Event()

        def run(batch: np.ndarray) -> np.ndarray:
            calls.append(batch[:, 0].tolist())
            loop.call_soon_threadsafe(first_call_running.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
            return batch * 2.0

        batcher = Batcher(run, max_batch=4, wait_s=0.0)
        await batcher.start()
        try:
            big1 = asyncio.ensure_future(batcher.submit(np.full((12, 1), 1.0)))
            await first_call_running.wait()  # big1's first call is in the model
            big2 = asyncio.ensure_future(batcher.submit(np.full((12, 1), 2.0)))
            small = asyncio.ensure_future(batcher.submit(np.full((1, 1), 3.0)))
            await asyncio.sleep(0)  # let both reach the queue
            release.set()
            np.testing.assert_array_equal(await small, [[6.0]])
            assert not big2.done()  # the small one did not wait for the large ones
            np.testing.assert_array_equal(await big1, np.full((12, 1), 2.0))
            np.testing.assert_array_equal(await big2, np.full((12, 1), 4.0))
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    assert all(len(c) <= 4 for c in calls)  # max_batch holds, however large a request is
    assert calls[0] == [1.0] * 4 and 3.0 in calls[1]
