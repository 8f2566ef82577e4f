from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread in every test: the same reduction order on every run
    (the bit-for-bit resume tests rely on it), and fast on small shared CPUs,
    where two threads contending with other work ran about 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
