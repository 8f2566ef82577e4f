"""Shared by the ``mocohub serve`` tests: a tiny exported model, a server in a thread, clients."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch
from aiohttp import web

from mocohub.artifact import ModelConfig, build_model, save_pretrained
from mocohub.export import export_model
from mocohub.export.serve import start_server
from mocohub.preprocessing import Preprocessing

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "fashion-mnist"
PNGS = sorted(SAMPLES.glob("*.png"))


def export_tiny_model(root: Path) -> Path:
    """A gray ResNet-18 (width 8, 64-d) exported with its preprocessing graph into root/out."""
    prep = Preprocessing(28, 32, (0.286,), (0.353,), channels=1)
    torch.manual_seed(0)
    config = ModelConfig("resnet18", small_stem=True, in_channels=1, width=8, preprocessing=prep)
    save_pretrained(build_model(config), root / "src")
    torch.set_num_threads(1)
    export_model(
        root / "src", root / "out", formats="onnx", with_preprocessing=True, verify=False, log=str
    )
    return root / "out"


def request(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP request; 4xx/5xx answers are returned, not raised."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class ThreadServer:
    """A served app on 127.0.0.1 (a free port) in a thread with its own event loop.

    Started with :func:`mocohub.export.serve.start_server`, as ``mocohub serve`` starts it.
    """

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(
            start_server(app, "127.0.0.1", 0), self.loop
        ).result(60)
        host, self.port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{self.port}"

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """A raw TCP connection to the server (reads time out after ``timeout`` s)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock.settimeout(timeout)
        return sock

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=60)
        self.loop.close()

    def __enter__(self) -> ThreadServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_until_closed(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection (or the socket's timeout raises)."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``condition`` until true; fail after ``seconds`` (a bound, not a measurement)."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {seconds} s")
        time.sleep(0.02)
