"""mocohub serve: real HTTP requests to its server (in a thread); bad input never takes it down."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from serve_helpers import PNGS, ThreadServer, export_tiny_model, request

import mocohub
from mocohub import cli
from mocohub.export import serve as serve_module
from mocohub.export.serve import Batcher, ServeSettings, create_app, open_served_model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The server of `mocohub serve` for a tiny exported model, with small limits."""
    root = tmp_path_factory.mktemp("serve")
    out = export_tiny_model(root)
    settings = ServeSettings(
        max_body_bytes=250_000, max_pixels=250_000, max_images=8, batch_wait_ms=150
    )
    embedder = open_served_model(out, providers="cpu", threads=1)
    running = ThreadServer(create_app(embedder, settings))
    try:
        yield {"url": running.url, "model": mocohub.load(root / "src"), "out": out}
    finally:
        running.close()


def _expected(model: torch.nn.Module, pngs: list[Path]) -> np.ndarray:
    """PyTorch: decode as RGB, Preprocessing.batch() (luma for this gray model), model, L2."""
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])
    prep = model.mocohub_config.preprocessing
    with torch.inference_mode():
        x = prep.batch()(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        return F.normalize(model(x), dim=1).numpy()


def _embed_one(server: dict, png: Path) -> np.ndarray:
    status, _, body = request(
        server["url"] + "/embed", png.read_bytes(), {"Content-Type": "image/png"}
    )
    assert status == 200, body
    return np.asarray(json.loads(body)["embeddings"], np.float32)


def test_health_and_info(server: dict) -> None:
    status, _, body = request(server["url"] + "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    info = json.loads(request(server["url"] + "/info")[2])
    assert info["model"] == "model.preprocess.onnx" and info["dim"] == 64
    assert info["input"] == "pixels" and info["providers"] == ["CPUExecutionProvider"]
    assert info["preprocessing"]["image_size"] == 28 and info["limits"]["max_images"] == 8


def test_the_command_binds_to_localhost_and_passes_its_limits(
    server: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(serve_module, "serve", lambda embedder, **kw: calls.append(kw))
    out = str(server["out"])
    cli.main(["serve", out, "--max-body-mb", "0.5", "--max-pixels", "1000", "--threads", "1"])
    cli.main(["serve", out, "--host", "0.0.0.0", "--port", "9", "--precision", "fp32"])
    limits = ["--max-aspect-ratio", "8", "--max-request-pixels", "5000", "--header-timeout", "2"]
    limits += ["--body-timeout", "3", "--max-connections", "7", "--decode-threads", "1"]
    cli.main(["serve", out, *limits])
    assert (calls[0]["host"], calls[0]["port"]) == ("127.0.0.1", 8000)
    assert calls[0]["settings"].max_body_bytes == 2**19
    assert calls[0]["settings"].max_pixels == 1000
    assert calls[0]["settings"] == ServeSettings(max_body_bytes=2**19, max_pixels=1000)
    assert (calls[1]["host"], calls[1]["port"]) == ("0.0.0.0", 9)
    assert calls[2]["settings"] == ServeSettings(
        max_aspect_ratio=8,
        max_request_pixels=5000,
        header_timeout_s=2,
        body_timeout_s=3,
        max_connections=7,
        decode_threads=1,
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", out, "--precision", "int8"])
    assert exit_info.value.code == 2


def test_one_image_gives_the_pytorch_embedding(server: dict) -> None:
    out = _embed_one(server, PNGS[0])
    np.testing.assert_allclose(out, _expected(server["model"], PNGS[:1]), atol=1e-5)
    # and the usual per-image transform, which keeps gray as gray: the same embedding
    model = server["model"]
    with torch.inference_mode():
        x = model.mocohub_config.preprocessing.transform()(Image.open(PNGS[0])).unsqueeze(0)
        direct = F.normalize(model(x), dim=1).numpy()
    assert float((out * direct).sum()) > 0.9999


def test_several_images_multipart_json_and_raw_float32(server: dict) -> None:
    expected = _expected(server["model"], PNGS[1:4])

    async def post_multipart() -> dict:
        form = aiohttp.FormData()
        for n, png in enumerate(PNGS[1:4]):
            form.add_field(f"img{n}", png.read_bytes(), filename=png.name, content_type="image/png")
        async with (
            aiohttp.ClientSession() as session,
            session.post(server["url"] + "/embed", data=form) as response,
        ):
            assert response.status == 200
            return await response.json()

    answer = asyncio.run(post_multipart())
    assert answer["count"] == 3 and answer["dim"] == 64
    np.testing.assert_allclose(answer["embeddings"], expected, atol=1e-5)
    body = json.dumps({"images": [base64.b64encode(p.read_bytes()).decode() for p in PNGS[1:4]]})
    status, _, raw_json = request(
        server["url"] + "/embed", body.encode(), {"Content-Type": "application/json"}
    )
    assert status == 200
    np.testing.assert_allclose(json.loads(raw_json)["embeddings"], expected, atol=1e-5)
    status, headers, raw = request(
        server["url"] + "/embed",
        PNGS[1].read_bytes(),
        {"Content-Type": "image/png", "Accept": "application/octet-stream"},
    )
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    assert headers["X-Embedding-Dim"] == "64" and headers["X-Embedding-Count"] == "1"
    np.testing.assert_allclose(np.frombuffer(raw, "<f4"), expected[0], atol=1e-5)


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_input_gets_a_4xx_and_the_server_carries_on(server: dict) -> None:
    url = server["url"] + "/embed"
    good = PNGS[5].read_bytes()
    before = _embed_one(server, PNGS[5])
    too_many = aiohttp.FormData()
    for n in range(9):
        too_many.add_field(f"i{n}", good, filename=f"{n}.png", content_type="image/png")
    cases = [
        (b"this is not an image", {"Content-Type": "image/png"}, 400, "could not be decoded"),
        (good[: len(good) // 2], {"Content-Type": "image/png"}, 400, "could not be decoded"),
        (b"", {"Content-Type": "image/png"}, 400, "is empty"),
        (b'{"images": 3', {"Content-Type": "application/json"}, 400, "Malformed JSON"),
        (b'{"image": "@@@"}', {"Content-Type": "application/json"}, 400, "not valid base64"),
        (os.urandom(300_000), {"Content-Type": "image/png"}, 413, "Maximum request body size"),
        (b"GIF89a\x01", {}, 400, "could not be decoded"),  # no content type at all
        (_png((600, 600)), {"Content-Type": "image/png"}, 413, "over the server's limit"),
    ]
    for data, headers, status, reason in cases:
        got, _, body = request(url, data, headers)
        assert (got, reason in json.loads(body)["error"]) == (status, True), body
        np.testing.assert_allclose(_embed_one(server, PNGS[5]), before, atol=1e-6)

    async def post_form() -> tuple[int, dict]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=too_many) as response,
        ):
            return response.status, await response.json()

    status, answer = asyncio.run(post_form())
    assert status == 413 and "the server takes 8" in answer["error"]
    assert request(server["url"] + "/embed")[0] == 405  # GET
    assert request(server["url"] + "/nowhere")[0] == 404
    np.testing.assert_allclose(_embed_one(server, PNGS[5]), before, atol=1e-6)


def test_requests_arriving_together_share_a_model_call(server: dict) -> None:
    stats_before = json.loads(request(server["url"] + "/info")[2])["stats"]
    pngs = PNGS[10:18]

    async def post_all() -> list[list[list[float]]]:
        async with aiohttp.ClientSession() as session:

            async def one(png: Path) -> list[list[float]]:
                async with session.post(
                    server["url"] + "/embed",
                    data=png.read_bytes(),
                    headers={"Content-Type": "image/png"},
                ) as response:
                    assert response.status == 200
                    return (await response.json())["embeddings"]

            return await asyncio.gather(*(one(p) for p in pngs))

    rows = np.concatenate([np.asarray(r, np.float32) for r in asyncio.run(post_all())])
    np.testing.assert_allclose(rows, _expected(server["model"], pngs), atol=1e-5)
    stats = json.loads(request(server["url"] + "/info")[2])["stats"]
    requests = stats["requests"] - stats_before["requests"]
    batches = stats["batches"] - stats_before["batches"]
    assert requests == 8 and batches < requests
    assert stats["images"] - stats_before["images"] == 8


def test_batcher_groups_submissions_and_spreads_failures() -> None:
    calls: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if (batch < 0).any():
            raise RuntimeError("model failed")
        return batch.reshape(len(batch), -1) * 2.0

    async def scenario() -> None:
        batcher = Batcher(run, max_batch=16, wait_s=0.2)
        await batcher.start()
        try:
            parts = [np.full((k, 2), float(k)) for k in (1, 2, 3)]
            outs = await asyncio.gather(*(batcher.submit(p) for p in parts))
            for part, out in zip(parts, outs, strict=True):
                np.testing.assert_array_equal(out, part * 2.0)
            assert calls == [6]
            results = await asyncio.gather(
                batcher.submit(np.ones((1, 2))),
                batcher.submit(-np.ones((1, 2))),
                return_exceptions=True,
            )
            assert all(isinstance(r, RuntimeError) for r in results)
            np.testing.assert_array_equal(await batcher.submit(np.ones((1, 2))), [[2.0, 2.0]])
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_batcher_never_calls_the_model_with_more_than_max_batch_rows() -> None:
    """Requests of 63 and 64 images once became one call of 127 (a TensorRT engine built
    for 1..64 then rebuilds); one larger than max_batch is spread over several calls."""
    calls: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return batch[:, :1] * 2.0

    async def scenario() -> list[np.ndarray]:
        batcher = Batcher(run, max_batch=64, wait_s=0.2)
        await batcher.start()
        try:
            sizes = (63, 64, 1, 200)
            parts = [np.arange(k, dtype=np.float64)[:, None] + 1000 * k for k in sizes]
            outs = await asyncio.gather(*(batcher.submit(p) for p in parts))
            for part, out in zip(parts, outs, strict=True):
                np.testing.assert_array_equal(out, part * 2.0)  # every row, in order
            return outs
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    assert max(calls) <= 64 and sum(calls) == 63 + 64 + 1 + 200
    assert len(calls) == -(-(63 + 64 + 1 + 200) // 64)  # and no call left part-empty


def test_the_command_opens_the_model_for_its_max_batch(
    server: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mocohub serve --max-batch 8`: the session's batch range (TensorRT's profile) is 8."""
    served: list = []
    monkeypatch.setattr(serve_module, "serve", lambda embedder, **kw: served.append(embedder))
    cli.main(["serve", str(server["out"]), "--max-batch", "8", "--threads", "1"])
    cli.main(["serve", str(server["out"]), "--threads", "1"])
    assert [e.max_batch for e in served] == [8, ServeSettings().max_batch]


@pytest.mark.slow  # a new process imports torch and onnxruntime
def test_the_command_serves_until_sigterm_and_exits_cleanly(server: dict) -> None:
    command = [sys.executable, "-m", "mocohub", "serve", str(server["out"]), "--port", "0"]
    process = subprocess.Popen(
        [*command, "--threads", "1", "--providers", "cpu"], stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # printed once it listens
        url = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        assert url, line
        assert request(url.group(1) + "/health")[0] == 200
        assert _embed_one({"url": url.group(1)}, PNGS[0]).shape == (1, 64)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()
