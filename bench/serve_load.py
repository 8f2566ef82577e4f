"""``mocohub serve`` under load and under abuse: throughput, latency, memory, and each refusal.

It exports the bundled ``moco_r18_fashion_mnist`` (``mocohub export ...
--with-preprocessing --no-verify``: the parity checks do not change the
server) into a temporary folder, starts ``mocohub serve`` on it as a separate
process on 127.0.0.1, and measures from this process (an aiohttp client):

- load: ``--requests`` POSTs of one Fashion-MNIST PNG (from ``samples/``) at
  concurrency 1, 8 and 32: throughput (requests/s), p50 and p99 latency, errors;
- the server's resident memory (VmRSS) after start, after the load and after
  the abuse;
- abuse (issue 18, items 5-9), each case with the answer it got (HTTP status
  or what happened), how long it took, and the slowest ``GET /health`` seen
  while it ran (probed every 50 ms): whether the server stayed responsive.
  The server runs with ``--header-timeout 2 --body-timeout 2
  --max-connections 64`` so that the slow-client cases end within seconds;
  the other limits are the defaults.

The client and the server share the machine's cores: on a 2-core machine the
figures are the server's speed with a client beside it, not its speed alone.

Run (from the repository root)::

    python bench/serve_load.py                      # 2,000 requests per concurrency
    python bench/serve_load.py --requests 200       # quicker

Writes every figure as JSON to ``--json`` (default ``bench/results/serve_load.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gzip
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image

from mocohub.sysinfo import cpu_model, speed_flags

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted((ROOT / "samples" / "fashion-mnist").glob("*.png"))
DEFAULT_JSON = ROOT / "bench" / "results" / "serve_load.json"
SERVER_LIMITS = ["--header-timeout", "2", "--body-timeout", "2", "--max-connections", "64"]


class Server:
    """``mocohub serve MODEL --port 0`` in a child process; its stderr is collected."""

    def __init__(self, model: Path, threads: int) -> None:
        command = [sys.executable, "-m", "mocohub", "serve", str(model), "--port", "0"]
        self.command = [*command, "--threads", str(threads), "--providers", "cpu", *SERVER_LIMITS]
        self.process = subprocess.Popen(self.command, stderr=subprocess.PIPE, text=True)
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        found = re.search(r"on http://([\d.]+):(\d+)", line)
        if not found:
            self.process.kill()
            raise RuntimeError(f"mocohub serve did not start: {line}")
        self.host, self.port = found.group(1), int(found.group(2))
        self.url = f"http://{self.host}:{self.port}"
        self.log: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line.rstrip("\n"))

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]

    def connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=30)
        sock.settimeout(30)
        return sock

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


async def load(url: str, concurrency: int, requests: int) -> dict[str, Any]:
    """``requests`` POSTs of a sample PNG, ``concurrency`` at a time."""
    bodies = [p.read_bytes() for p in SAMPLES]
    latencies: list[float] = []
    errors = 0
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal errors, next_index
            while next_index < requests:
                body = bodies[next_index % len(bodies)]
                next_index += 1
                started = time.perf_counter()
                async with session.post(
                    url + "/embed", data=body, headers={"Content-Type": "image/png"}
                ) as response:
                    await response.read()
                    errors += response.status != 200
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "req_per_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def png(size: tuple[int, int], value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a few bytes of data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def multipart(parts: list[bytes], boundary: str = "b0und4ry") -> tuple[bytes, str]:
    body = b""
    for n, data in enumerate(parts):
        disposition = f'form-data; name="i{n}"; filename="{n}.png"'
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/png"
        body += head.encode() + b"\r\n\r\n" + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def answer_of(raw: bytes) -> str:
    """'408' from 'HTTP/1.1 408 Request Timeout ...'; 'closed' when nothing came."""
    return raw.split(b" ", 2)[1].decode() if raw.startswith(b"HTTP/") else "closed"


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


async def with_health_probe(
    url: str, case: Callable[[], Awaitable[str]]
) -> tuple[str, float, float]:
    """(answer, seconds, slowest GET /health in ms) of running ``case`` with probes beside it."""
    done = asyncio.Event()
    slowest = 0.0

    async def probe() -> None:
        nonlocal slowest
        async with aiohttp.ClientSession() as session:
            while not done.is_set():
                started = time.perf_counter()
                async with session.get(url + "/health") as response:
                    await response.read()
                slowest = max(slowest, time.perf_counter() - started)
                await asyncio.sleep(0.05)

    prober = asyncio.ensure_future(probe())
    started = time.perf_counter()
    try:
        answer = await case()
    finally:
        seconds = time.perf_counter() - started
        done.set()
        await prober
    return answer, seconds, 1000 * slowest


def abuse_cases(server: Server) -> list[tuple[str, str, Callable[[], Awaitable[str]]]]:
    """(issue item, description, coroutine giving the answer) for each abuse."""
    url = server.url + "/embed"

    async def post(body: bytes, headers: dict[str, str]) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=body, headers=headers) as response,
        ):
            await response.read()
            return str(response.status)

    def in_thread(function: Callable[[], str]) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            return await asyncio.get_running_loop().run_in_executor(None, function)

        return run

    def stalled_headers() -> str:
        with server.connect() as sock:
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Ty")
            return answer_of(read_until_closed(sock))

    def stalled_body() -> str:
        with server.connect() as sock:
            sock.sendall(
                b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n" + b"\0" * 10
            )
            return answer_of(read_until_closed(sock))

    def trickling_body() -> str:
        with server.connect() as sock:
            sock.sendall(
                b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n"
            )
            sock.settimeout(0.1)
            for _ in range(600):  # a byte every 100 ms, for a minute at most
                try:
                    sock.sendall(b"\0")
                    raw = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    raw = b""
                sock.settimeout(30)
                return answer_of(raw + read_until_closed(sock))
            return "still open after 60 s"

    def connection_cap() -> str:
        held = [server.connect() for _ in range(64)]
        try:
            with server.connect() as extra:
                return answer_of(read_until_closed(extra)) + " (65th connection)"
        finally:
            for sock in held:
                sock.close()

    def disconnect_mid_body() -> str:
        before = len(server.log)
        with server.connect() as sock:
            sock.sendall(
                b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
            )
            sock.recv(100)
            sock.sendall(b"\0" * 1000)
        time.sleep(0.5)  # let the server notice and log
        return f"{len(server.log) - before} log line(s)"

    async def starved_small_request() -> str:
        # 16 images of 2500 x 2500 (100 M pixels, the per-request limit) in one
        # request, and a one-image request sent just after it
        body, kind = multipart([png((2500, 2500), v) for v in range(16)])
        async with aiohttp.ClientSession() as session:

            async def timed(data: bytes, content_type: str) -> tuple[int, float]:
                started = time.perf_counter()
                async with session.post(
                    url, data=data, headers={"Content-Type": content_type}
                ) as response:
                    await response.read()
                    return response.status, time.perf_counter() - started

            large = asyncio.ensure_future(timed(body, kind))
            await asyncio.sleep(0.2)
            small = await timed(SAMPLES[0].read_bytes(), "image/png")
            large_done = await large
        return (
            f"large {large_done[0]} in {large_done[1]:.2f} s, small {small[0]} in {small[1]:.2f} s"
        )

    png_type = {"Content-Type": "image/png"}
    wide = png((300_000, 1))
    bomb = gzip.compress(b"\0" * 2**20) * 1024  # 1 MB that inflates to 1 GiB
    big_form, big_kind = multipart([png((6000, 6000))] * 64)
    form, form_kind = multipart([SAMPLES[0].read_bytes()])
    deep = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    def posting(body: bytes, headers: dict[str, str]) -> Callable[[], Awaitable[str]]:
        return lambda: post(body, headers)

    return [
        ("5", f"300,000 x 1 PNG ({len(wide)} bytes)", posting(wide, png_type)),
        ("5", "PNG header claiming 40,000,000 x 1", posting(png_header(40_000_000, 1), png_type)),
        ("5", "PNG header claiming 10,000 x 10,000", posting(png_header(10_000, 10_000), png_type)),
        ("6", "headers stalled after 40 bytes", in_thread(stalled_headers)),
        ("6", "body stalled after 10 of 100,000 bytes", in_thread(stalled_body)),
        ("6", "body trickled at 10 bytes/s", in_thread(trickling_body)),
        ("6", "65 idle connections (cap 64)", in_thread(connection_cap)),
        (
            "7",
            f"gzip body of {len(bomb) / 1e6:.1f} MB inflating to 1 GiB",
            posting(bomb, {**png_type, "Content-Encoding": "gzip"}),
        ),
        ("8", "multipart without a boundary", posting(form, {"Content-Type": form_kind[:19]})),
        (
            "8",
            "multipart with a wrong boundary",
            posting(form, {"Content-Type": form_kind.replace("b0und4ry", "wrong")}),
        ),
        ("8", "multipart of garbage", posting(os.urandom(100_000), {"Content-Type": form_kind})),
        ("8", "multipart without its end marker", posting(form[:-20], {"Content-Type": form_kind})),
        ("8", "JSON nested 100,000 deep", posting(deep, {"Content-Type": "application/json"})),
        ("8", "client gone mid-body", in_thread(disconnect_mid_body)),
        (
            "9",
            f"64 x 6000 x 6000 PNGs in one request ({len(big_form) / 1e6:.1f} MB)",
            posting(big_form, {"Content-Type": big_kind}),
        ),
        ("9", "1 image sent 0.2 s after 16 x 2500 x 2500", starved_small_request),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads of the server")
    parser.add_argument("--model", type=Path, help="exported folder (default: the bundled model)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = Path(tmp) / "model"
            subprocess.run(
                [sys.executable, "-m", "mocohub", "export", "moco_r18_fashion_mnist", "--out",
                 str(model), "--with-preprocessing", "--no-verify"],
                check=True, capture_output=True,
            )  # fmt: skip
        load_before = os.getloadavg()
        server = Server(model, args.threads)
        try:
            asyncio.run(load(server.url, 1, 20))  # warm-up
            rss = {"after start": server.rss_mb()}
            loads = []
            for concurrency in args.concurrency:
                loads.append(asyncio.run(load(server.url, concurrency, args.requests)))
                loads[-1]["load1"] = os.getloadavg()[0]
            rss["after load"] = server.rss_mb()
            abuses = []
            for item, description, case in abuse_cases(server):
                answer, seconds, health_ms = asyncio.run(with_health_probe(server.url, case))
                abuses.append(
                    {
                        "item": item,
                        "case": description,
                        "answer": answer,
                        "seconds": seconds,
                        "slowest_health_ms": health_ms,
                    }
                )
            rss["after abuse"] = server.rss_mb()
            exit_code = server.stop()
        finally:
            if server.process.poll() is None:
                server.process.kill()
    tracebacks = sum("Traceback" in line for line in server.log)

    flags = speed_flags()
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "server_command": " ".join(["python", *server.command[1:]]),
        "load": loads,
        "rss_mb": rss,
        "abuse": abuses,
        "server_log_lines": len(server.log),
        "server_tracebacks": tracebacks,
        "server_log": server.log,
        "server_exit_code": exit_code,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{result['cpu']} ({', '.join(flags)}), {result['cores']} cores, load average "
          f"{load_before[0]:.2f} before, {result['load_average_after'][0]:.2f} after")  # fmt: skip
    print(f"server: {result['server_command']}\n")
    print("concurrency  requests  errors    req/s   p50 ms   p99 ms  load1")
    for row in loads:
        print(f"{row['concurrency']:>11}  {row['requests']:>8}  {row['errors']:>6}  "
              f"{row['req_per_s']:>7.1f}  {row['p50_ms']:>7.1f}  {row['p99_ms']:>7.1f}  "
              f"{row['load1']:>5.2f}")  # fmt: skip
    print("\nserver RSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    print(f"\n{'item':>4}  {'abuse':<48}  {'answer':<42}  {'seconds':>7}  health max ms")
    for row in abuses:
        print(f"{row['item']:>4}  {row['case']:<48}  {row['answer']:<42}  {row['seconds']:>7.2f}  "
              f"{row['slowest_health_ms']:>13.1f}")  # fmt: skip
    print(f"\nserver log: {len(server.log)} lines, {tracebacks} tracebacks; exit code {exit_code}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
