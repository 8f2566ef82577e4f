"""Shared fixtures, and ``--cpu-flags``: run the suite as if on another kind of CPU.

``python -m pytest -m precision --cpu-flags=avx512_bf16`` runs the tests marked
``precision`` (their numbers depend on the precision ``auto`` picks, or they
check that pick) as a CPU with bf16 matrix units would: ``MOCOHUB_CPU_FLAGS``
replaces the flags :func:`mocohub.sysinfo.cpu_flags` reports, in this process and
in the ``mocohub`` processes tests start. On an AVX2-only machine PyTorch then
emulates bf16 (slowly), so CI catches what only a bf16 machine would show.
``--cpu-flags=avx2`` does the opposite on a bf16 machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from mocohub.sysinfo import CPU_FLAGS_ENV

_SAVED = pytest.StashKey[str | None]()  # MOCOHUB_CPU_FLAGS before --cpu-flags replaced it


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-flags",
        default=None,
        help="Pretend the CPU reports these flags (comma-separated), e.g. avx512_bf16 "
        "(a CPU with bf16 units) or avx2 (one without); sets MOCOHUB_CPU_FLAGS.",
    )


def pytest_configure(config: pytest.Config) -> None:
    forced = config.getoption("--cpu-flags")
    if forced is not None:
        config.stash[_SAVED] = os.environ.get(CPU_FLAGS_ENV)
        os.environ[CPU_FLAGS_ENV] = forced


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SAVED in config.stash:
        saved = config.stash[_SAVED]
        if saved is None:
            os.environ.pop(CPU_FLAGS_ENV, None)
        else:
            os.environ[CPU_FLAGS_ENV] = saved


def pytest_report_header(config: pytest.Config) -> str:
    from mocohub.precision import resolve_precision
    from mocohub.sysinfo import cpu_flags

    forced = os.environ.get(CPU_FLAGS_ENV)
    origin = f"{CPU_FLAGS_ENV}={forced!r}" if forced is not None else "this CPU"
    units = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"}) or "none"
    return f"cpu flags from {origin}: bf16 units {units}, precision auto -> {resolve_precision()}"


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def registry_rows() -> Iterator[Callable[..., Any]]:
    """``registry_rows(weights, ...)``: rows added to the weights registry, or standing in
    for registered ones, until the test ends (through the public ``registry.registered``)."""
    from mocohub.registry import registered

    with contextlib.ExitStack() as stack:
        yield lambda *weights: stack.enter_context(registered(*weights, replace=True))


@pytest.fixture
def cpu_kind(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``cpu_kind("avx2,fma")``: this test's process, and those it starts, see these flags."""

    def emulate(flags: str) -> None:
        monkeypatch.setenv(CPU_FLAGS_ENV, flags)

    return emulate


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread in every test: the same reduction order on every run
    (the bit-for-bit resume tests rely on it), and fast on small shared CPUs,
    where two threads contending with other work ran about 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
