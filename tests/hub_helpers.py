"""Shared by the hub tests: reference-format MoCo checkpoints and a local HTTP server."""

from __future__ import annotations

import functools
import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from mocohub.artifact import HeadConfig, ModelConfig, build_model
from mocohub.backbones import resnet18
from mocohub.preprocessing import Preprocessing


def reference_encoder(arch: str = "resnet18", mlp: bool = True, dim: int = 16, **options: Any):
    """A query encoder as the reference builds it (torchvision ResNet, fc -> MLP for v2),
    with BN running statistics moved away from their initial values."""
    torch.manual_seed(0)
    if options:  # a small mocohub ResNet with torchvision's key names
        encoder: nn.Module = functools.partial(resnet18, **options)(num_classes=dim)
    else:
        encoder = getattr(torchvision.models, arch)(num_classes=dim)
    if mlp:
        hidden = int(encoder.fc.weight.shape[1])
        encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), encoder.fc)
    channels = int(encoder.conv1.weight.shape[1])
    with torch.no_grad():
        encoder.train()(torch.rand(2, channels, 32, 32))
    return encoder.eval()


def tiny_fmnist_model(
    meta: dict[str, Any], *, head: bool = False, batch: int = 4, seed: int = 0
) -> nn.Module:
    """A Fashion-MNIST sized mocohub model (1 channel, 28 px, ResNet-18 width 8, small
    stem; an MLP head to 16 dims with ``head``), seeded, in eval mode, with BN statistics
    moved by one training-mode pass over ``batch`` random images."""
    torch.manual_seed(seed)
    config = ModelConfig(
        "resnet18",
        small_stem=True,
        in_channels=1,
        width=8,
        head=HeadConfig("mlp", 16) if head else None,
        preprocessing=Preprocessing(28, 32, (0.286,), (0.353,), channels=1),
        meta=meta,
    )
    model = build_model(config)
    with torch.no_grad():
        model.train()(torch.rand(batch, 1, 28, 28))
    return model.eval()


def reference_checkpoint(
    encoder: nn.Module, *, arch: str | None = "resnet18", prefix: str = "module.", K: int = 64
) -> dict[str, Any]:
    """Exactly what facebookresearch/moco main_moco.py saves for a DDP-wrapped MoCo model:
    epoch, arch, state_dict (encoder_q, encoder_k, queue, queue_ptr) and optimizer."""
    query = encoder.state_dict()
    dim = int(encoder(torch.zeros(1, encoder.conv1.weight.shape[1], 32, 32)).shape[1])
    state = {f"{prefix}encoder_q.{k}": v.clone() for k, v in query.items()}
    state |= {f"{prefix}encoder_k.{k}": v.clone() for k, v in query.items()}
    state[f"{prefix}queue"] = F.normalize(torch.randn(dim, K), dim=0)
    state[f"{prefix}queue_ptr"] = torch.zeros(1, dtype=torch.long)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    checkpoint = {"epoch": 200, "state_dict": state, "optimizer": optimizer.state_dict()}
    if arch is not None:
        checkpoint["arch"] = arch
    return checkpoint


def backbone_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The encoder's pooled features: everything but its head."""
    head, encoder.fc = encoder.fc, nn.Identity()
    try:
        with torch.no_grad():
            return encoder.eval()(images)
    finally:
        encoder.fc = head


@contextmanager
def serve(folder: Path, status: int | None = None) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server for ``folder`` on 127.0.0.1: (base URL, the paths requested so far,
    a HEAD request as ``"HEAD /path"``).

    ``status``: answer every request with that status and no body instead (a
    server in trouble, e.g. 503 Service Unavailable).
    """
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def _failed(self) -> bool:
            if status is None:
                return False
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

        def do_GET(self) -> None:
            requests.append(self.path)
            if not self._failed():
                super().do_GET()

        def do_HEAD(self) -> None:
            requests.append(f"HEAD {self.path}")
            if not self._failed():
                super().do_HEAD()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def no_retries(monkeypatch: Any) -> None:
    """Make any back-off sleep (a retry) fail the test at once, whoever sleeps."""

    def sleep(seconds: float) -> None:
        raise AssertionError(f"something slept {seconds} s: a retry with back-off")

    monkeypatch.setattr(time, "sleep", sleep)


def short_chain(error: BaseException) -> bool:
    """True when ``error`` carries at most one cause, with no implicit context shown."""
    shown = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if shown is None:
        return True
    inner = shown.__cause__ or (None if shown.__suppress_context__ else shown.__context__)
    return inner is None
