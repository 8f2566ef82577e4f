"""The launcher's exit handshake: node 0's store outlives its torchrun until the others check in.

torchrun's agents meet at an exit barrier on the store node 0's agent serves;
when node 0's agent returns first, its store can go down before the others
have read the barrier's answer (pytorch/pytorch#69520), and they log a
traceback at the end of a run that succeeded. Here "the agent's store" is a
TCPStore opened as torchrun's static rendezvous opens it (``multi_tenant``).
"""

from __future__ import annotations

import datetime
import socket
import threading
import time

import pytest
from readme_helpers import free_ports
from torch.distributed import TCPStore

from mocohub import launch
from mocohub.launch import _ExitHandshake

HOST = "127.0.0.1"


def agent_store(port: int, is_master: bool) -> TCPStore:
    """A store as torchrun's static rendezvous opens it on node 0 (master) or another node."""
    return TCPStore(
        HOST,
        port,
        is_master=is_master,
        timeout=datetime.timedelta(seconds=5),
        wait_for_workers=False,
        multi_tenant=True,
    )


def listening(port: int) -> bool:
    """Whether a server accepts connections on ``port`` now."""
    with socket.socket() as probe:
        return probe.connect_ex((HOST, port)) == 0


def goes_down(port: int, seconds: float = 10.0) -> bool:
    """Whether the server on ``port`` stops listening within ``seconds`` (it stops later)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not listening(port):
            return True
        time.sleep(0.05)
    return False


def test_without_the_handshake_node_0_s_store_goes_down_with_its_agent() -> None:
    (port,) = free_ports(1)
    agent = agent_store(port, is_master=True)
    assert listening(port)
    del agent  # node 0's torchrun returns
    assert goes_down(port)


def test_with_it_node_0_s_store_stays_up_until_the_other_node_checks_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (port,) = free_ports(1)
    node_0 = _ExitHandshake(nodes=2, node_rank=0, addr=HOST, port=port)
    agent = agent_store(port, is_master=True)  # shares node 0's server
    other_node = agent_store(port, is_master=False)
    other_node.set("barrier", "answer")
    del agent  # node 0's torchrun returns
    assert not goes_down(port, seconds=1.0)
    assert other_node.get("barrier") == b"answer"  # the other node can still read it

    sleeps: list[float] = []
    monkeypatch.setattr(launch.time, "sleep", sleeps.append)
    _ExitHandshake(nodes=2, node_rank=1, addr=HOST, port=port).finish()
    node_0.finish()
    assert sleeps == []  # the other node had checked in: node 0 did not wait
    assert goes_down(port)  # and node 0's store goes once it has returned


def test_node_0_waits_for_a_late_node_then_returns() -> None:
    (port,) = free_ports(1)
    node_0 = _ExitHandshake(nodes=3, node_rank=0, addr=HOST, port=port)
    checked_in: list[int] = []

    def late(rank: int) -> None:
        _ExitHandshake(nodes=3, node_rank=rank, addr=HOST, port=port).finish()
        checked_in.append(rank)

    threads = [threading.Timer(0.3 * rank, late, (rank,)) for rank in (1, 2)]
    for thread in threads:
        thread.start()
    node_0.finish()
    for thread in threads:
        thread.join()
    assert sorted(checked_in) == [1, 2]
    assert node_0.store is None


def test_a_node_that_never_checks_in_costs_node_0_the_wait_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_ExitHandshake, "WAIT", 0.3)
    (port,) = free_ports(1)
    node_0 = _ExitHandshake(nodes=2, node_rank=0, addr=HOST, port=port)
    assert node_0.store is not None
    node_0.finish()  # returns, no error
    assert node_0.store is None


def test_another_node_whose_node_0_is_gone_returns_without_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_ExitHandshake, "CHECK_IN", 0.5)
    (port,) = free_ports(1)
    _ExitHandshake(nodes=2, node_rank=1, addr=HOST, port=port).finish()


def test_a_port_node_0_cannot_serve_leaves_the_error_to_torchrun() -> None:
    (port,) = free_ports(1)
    # Another program serving the port: here a server that does not share it (not multi-tenant).
    blocker = TCPStore(HOST, port, is_master=True, wait_for_workers=False)
    try:
        node_0 = _ExitHandshake(nodes=2, node_rank=0, addr=HOST, port=port)
        assert node_0.store is None
        node_0.finish()
    finally:
        del blocker
