"""Running as one of several processes: where this one stands, their group, and launching them.

One place for three things that ``mocohub train`` and ``mocohub embed`` share:

- :func:`process_place` reads this process's rank, world size and local rank
  from torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or,
  under ``srun``, Slurm's (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``);
- :func:`join_process_group` joins the process group they describe
  (``MASTER_ADDR`` and ``MASTER_PORT`` from torchrun, or exported by a Slurm
  job script);
- :func:`launch_workers` starts ``mocohub <command>`` in ``--nproc-per-node``
  workers through torch.distributed.run (torchrun, elastic, ``--max-restarts``),
  with the options the command was given less the launch options
  (:func:`worker_args`, :func:`launch_options`).

Example:
    >>> process_place()  # a plain process: alone
    ProcessPlace(rank=0, world_size=1, local_rank=0, nodes=1)
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from mocohub.errors import DistributedError, MocohubError, Stopped

__all__ = [
    "LAUNCH_PARAMS",
    "ProcessPlace",
    "elastic_retry",
    "inside_launcher",
    "join_process_group",
    "launch_options",
    "launch_workers",
    "leave_process_group",
    "process_place",
    "worker_args",
]

# The options that start the workers; the workers themselves do not get them.
LAUNCH_PARAMS = frozenset(
    {"nodes", "nproc_per_node", "node_rank", "master_addr", "master_port", "max_restarts"}
)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ProcessPlace:
    """Where this process stands among the processes of one run."""

    rank: int
    world_size: int
    local_rank: int
    nodes: int


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def process_place() -> ProcessPlace:
    """This process's place, from torchrun's variables or else Slurm's (alone without either).

    Example:
        >>> os.environ |= {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
        >>> process_place()
        ProcessPlace(rank=3, world_size=8, local_rank=1, nodes=1)
    """
    return ProcessPlace(
        rank=_env_int("RANK", "SLURM_PROCID") or 0,
        world_size=_env_int("WORLD_SIZE", "SLURM_NTASKS") or 1,
        local_rank=_env_int("LOCAL_RANK", "SLURM_LOCALID") or 0,
        nodes=_env_int("SLURM_NNODES", "SLURM_JOB_NUM_NODES") or 1,
    )


def join_process_group(
    place: ProcessPlace, backend: str, *, timeout_s: float, device_id: Any = None
) -> None:
    """Join the process group of ``place`` (nothing to do alone or when already joined).

    ``MASTER_ADDR`` and ``MASTER_PORT`` must be in the environment (torchrun
    sets them; a Slurm job script exports them): their absence is one
    :class:`~mocohub.errors.DistributedError`.

    Example:
        >>> join_process_group(process_place(), "gloo", timeout_s=600)
    """
    import torch.distributed as dist

    if place.world_size < 2 or dist.is_initialized():
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedError(
            f"A distributed run of {place.world_size} processes needs {' and '.join(missing)} in "
            "the environment; launch with `mocohub train` (or `embed`) `--nodes ... "
            "--nproc-per-node ...` or torchrun, or export them in the SLURM job script."
        )
    if place.rank == 0 and place.nodes > 1 and "LOCAL_RANK" not in os.environ:
        # Under srun the processes meet here (torchrun's agents meet before they
        # start the workers, and the launcher says so itself).
        print(
            f"rank 0: waiting for {place.nodes} nodes ({place.world_size} processes) at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            file=sys.stderr,
            flush=True,
        )
    dist.init_process_group(
        backend,
        rank=place.rank,
        world_size=place.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device_id,
    )


def leave_process_group() -> None:
    """Leave the process group :func:`join_process_group` joined, if any, all ranks together.

    A barrier first, so that rank 0, which holds the rendezvous store, does not
    exit while another process still talks to it; then the group is destroyed,
    so that gloo's threads end before the interpreter does (a process that exits
    with them running can abort with "terminate called without an active
    exception"). The ``mocohub`` command group calls it after every command that
    succeeds; a script that calls the library under torchrun calls it itself.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def inside_launcher() -> bool:
    """True in a worker started by torchrun or srun (never launch again there)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def elastic_retry() -> bool:
    """True in workers that torchrun started again after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def launch_options(command: F) -> F:
    """Add the launch options (``--nodes``, ``--nproc-per-node``, ...) to a click command.

    Example:
        >>> @click.command("embed")
        ... @launch_options
        ... def embed(**kwargs): ...
    """
    options = [
        click.option("--nodes", type=int, default=1, show_default=True),
        click.option(
            "--nproc-per-node",
            type=int,
            default=1,
            show_default=True,
            help="Processes on this machine (one per GPU), started through torchrun.",
        ),
        click.option("--node-rank", type=int, default=0, show_default=True),
        click.option("--master-addr", default="127.0.0.1", show_default=True),
        click.option("--master-port", type=int, default=29500, show_default=True),
        click.option(
            "--max-restarts",
            type=int,
            default=0,
            show_default=True,
            help="Elastic restarts of failed workers.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def worker_args(ctx: click.Context) -> list[str]:
    """The ``mocohub`` arguments that repeat this command in each worker.

    Built from the parsed parameters (whatever way the command was called):
    every option given is written back, the launch options left out.

    Example:
        >>> ctx = embed_command.make_context("embed", ["a/", "--out", "f.npy", "-m", "m",
        ...                                           "--nproc-per-node", "2"])
        >>> worker_args(ctx)
        ['embed', 'a/', '--out', 'f.npy', '--model', 'm']
    """
    args = [str(ctx.command.name)]
    for param in ctx.command.params:
        name = param.name
        if name is None or name in LAUNCH_PARAMS:
            continue
        value = ctx.params.get(name)
        if value is None or ctx.get_parameter_source(name) in (None, ParameterSource.DEFAULT):
            continue
        if isinstance(param, click.Argument):
            args.extend(str(v) for v in (value if isinstance(value, tuple) else (value,)))
        elif isinstance(param, click.Option) and param.is_flag:
            if value:
                args.append(param.opts[0])
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
        elif isinstance(param, click.Option):
            args += [param.opts[0], str(value)]
    return args


def launch_workers(
    args: list[str], nodes: int, nproc: int, node_rank: int, addr: str, port: int, max_restarts: int
) -> None:
    """Run ``mocohub *args`` in ``nproc`` workers on this node through torchrun; wait for them.

    A failed worker is one :class:`~mocohub.errors.MocohubError` with its exit code.

    Example:
        >>> launch_workers(["embed", "photos/", "--out", "f.npy", "-m", "m"], 1, 2, 0,
        ...                "127.0.0.1", 29500, 0)
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if nodes > 1 and node_rank == 0:
        others = "--node-rank 1" if nodes == 2 else f"--node-rank 1 ... {nodes - 1}"
        click.echo(
            f"node 0: waiting for {nodes} nodes at {addr}:{port} "
            f"(run the same command with {others} on the other machines)",
            err=True,
        )
    handshake = _ExitHandshake(nodes, node_rank, addr, port)
    try:
        torchrun(
            [
                f"--nnodes={nodes}",
                f"--nproc-per-node={nproc}",
                f"--node-rank={node_rank}",
                f"--master-addr={addr}",
                f"--master-port={port}",
                f"--max-restarts={max_restarts}",
                "-m",
                "mocohub",
                *args,
            ]
        )
    except SignalException as stopped:
        # torchrun has passed the signal on to the workers and waited for them:
        # each has said what it saved. Exit as a process stopped by it does.
        name = signal.Signals(stopped.sigval).name
        message = f"Stopped by {name}: the workers were stopped (see above)."
        raise Stopped(message, int(stopped.sigval)) from None
    except ChildFailedError as failed:
        # Each worker has printed its own one-line error; exit as the first did.
        rank, failure = failed.get_first_failure()
        error = MocohubError(
            f"Worker rank {rank} exited with code {failure.exitcode} (its message is above); "
            "the other workers were stopped."
        )
        error.exit_code = failure.exitcode if failure.exitcode > 0 else 1
        raise error from None
    handshake.finish()


class _ExitHandshake:
    """Keeps node 0's store up until every other node's torchrun has returned.

    torchrun's agents meet at an exit barrier on the store that node 0's agent
    serves; node 0's agent can return (and its store go down) before the
    others have read the barrier's answer, and they then log a traceback
    ("Error waiting on exit barrier") at the end of a run that succeeded
    (pytorch/pytorch#69520). Node 0 therefore opens that store itself first
    (torchrun's static rendezvous shares it: ``multi_tenant``), and after its
    agent returns waits until each other node has checked in on it, or for
    :attr:`WAIT` seconds at most. Only after a run that succeeded, and best
    effort: a node that cannot check in changes nothing but node 0's wait.

    Example:
        >>> _ExitHandshake(nodes=1, node_rank=0, addr="127.0.0.1", port=29500).finish()
    """

    KEY = "mocohub/exited"
    WAIT = 30.0  # node 0: seconds to wait for the others
    CHECK_IN = 5.0  # another node: seconds to try to reach node 0's store

    def __init__(self, nodes: int, node_rank: int, addr: str, port: int) -> None:
        self.nodes, self.node_rank, self.addr, self.port = nodes, node_rank, addr, port
        self.store: Any = None
        if nodes > 1 and node_rank == 0:
            self.store = self._open(is_master=True, seconds=self.WAIT)

    def _open(self, is_master: bool, seconds: float) -> Any:
        from torch.distributed import TCPStore

        try:
            return TCPStore(
                # Node 0 serves on every interface: its own client goes through loopback.
                "localhost" if is_master else self.addr,
                self.port,
                is_master=is_master,
                timeout=datetime.timedelta(seconds=seconds),
                wait_for_workers=False,
                multi_tenant=True,
            )
        except RuntimeError:  # torch.distributed.DistError: DistNetworkError, DistStoreError
            return None

    def finish(self) -> None:
        """Node 0: wait for the others to check in. Any other node: check in."""
        if self.nodes <= 1:
            return
        if self.node_rank != 0:
            client = self._open(is_master=False, seconds=self.CHECK_IN)
            if client is not None:
                with contextlib.suppress(RuntimeError):  # a store's DistError
                    client.add(self.KEY, 1)
            return
        if self.store is None:
            return
        deadline = time.monotonic() + self.WAIT
        with contextlib.suppress(RuntimeError):  # a store's DistError
            while self.store.add(self.KEY, 0) < self.nodes - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        self.store = None
