"""Distributed plumbing for MoCo: rank/world info, gathers and the batch shuffle.

Everything here works with or without a process group: with none (or a world
of one) the functions are the identity, so the single-process path needs no
``torch.distributed`` set-up at all.

Shuffle BN: a rank's key batch is a random subset of the *global* batch, so
that BatchNorm statistics in the key encoder do not leak which samples share a
rank with the query. All ranks hold the same permutation of the global batch
(their generators are seeded from one seed broadcast by rank 0), and every
rank sends each of its samples straight to the rank that will encode it with
one ``all_to_all`` (the reference gathers the whole global batch on every rank
and keeps a slice, moving world-size times more data). The keys travel back
the same way, so each sample gets its own key.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mocohub.errors import InputError
from mocohub.launch import join_process_group, process_place

__all__ = [
    "BatchShuffle",
    "DistributedEnv",
    "all_gather_no_grad",
    "any_rank",
    "broadcast_buffers_from_rank0",
    "check_same_batch_size",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "shared_generator",
    "shuffle_batch",
    "wrap_ddp",
]


# torch 2.14 renamed all_gather_into_tensor to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def is_distributed() -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (one tiny all-reduce).

    Example:
        >>> any_rank(False, torch.device("cpu"))  # one process: the flag itself
        False
    """
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# torch 2.13 deprecated broadcast_buffers (a FutureWarning on every rank) for
# forward_sync_buffers, which still syncs the buffers once at start: harmless here.
_NO_BUFFER_SYNC: dict[str, Any] = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def wrap_ddp(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """``module`` in DistributedDataParallel, without syncing buffers at each forward.

    MoCo needs no per-step buffer broadcast: the queues agree by construction
    and rank 0's BatchNorm statistics are the ones saved. Needs a process group.

    Example:
        >>> net = wrap_ddp(model, env.device)
    """
    return DistributedDataParallel(
        module, device_ids=[device] if device.type == "cuda" else None, **_NO_BUFFER_SYNC
    )


@torch.no_grad()
def broadcast_buffers_from_rank0(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) into ``module`` on every rank.

    :func:`wrap_ddp` syncs no buffers, so each rank's BN statistics follow its
    own batches; anything that uses the model in eval mode on several ranks (the
    k-NN monitor) calls this first, so that every rank runs rank 0's model, the
    one checkpoints save. Buffers are only read in eval mode, so training is
    unchanged. Every rank must call it.

    Example:
        >>> broadcast_buffers_from_rank0(model.encoder_q)  # one process: nothing to do
    """
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (rank order), no gradient.

    Every rank must pass a tensor of the same shape.
    """
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    out = tensor.new_empty((get_world_size() * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor)
    return out


_CPU_GROUPS: dict[int, Any] = {}


def _host_group() -> Any:
    """A process group whose collectives run on the host: the default one when it is
    gloo, else a gloo group over the same ranks (made on first use, by every rank)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _CPU_GROUPS:
        _CPU_GROUPS.clear()  # a group of an earlier, destroyed default group
        _CPU_GROUPS[key] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[key]


def check_same_batch_size(batch_size: int) -> None:
    """Raise :class:`InputError` on every rank unless all ranks hold ``batch_size``.

    Every rank must call it at the same points (MoCo does, at every step): one
    all-gather of one integer, on the host (a gloo group beside NCCL), so the
    GPU's stream is not synchronised. A rank that skipped it while another
    called it would leave both waiting on different collectives.

    Example:
        >>> check_same_batch_size(32)  # one process: nothing to compare
    """
    if not is_distributed():
        return
    group = _host_group()
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([batch_size]), group=group)
    values = [int(size) for size in sizes]
    if len(set(values)) > 1:
        raise InputError(
            f"The ranks got different batch sizes {values} (rank order); MoCo needs the same "
            "batch on every rank: give each rank the same per-rank batch size and drop the "
            "last incomplete batch (DataLoader(drop_last=True))."
        )


def shared_generator(device: torch.device) -> torch.Generator:
    """A CPU generator seeded identically on every rank.

    Rank 0 draws the seed from its default generator (so ``torch.manual_seed``
    makes runs repeatable) and broadcasts it. As long as every rank draws from
    the returned generator in the same order, all ranks see the same numbers
    without any further communication.
    """
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if is_distributed():
        seed = seed.to(device)
        dist.broadcast(seed, src=0)
    return torch.Generator().manual_seed(int(seed.item()))


@dataclass
class BatchShuffle:
    """How a batch was shuffled, so that results computed on it can be put back.

    ``send_order`` lists this rank's local sample indices in the order they
    were sent; ``send_counts[r]``/``recv_counts[r]`` are the numbers of samples
    sent to/received from rank ``r`` (one process: a single local permutation).
    """

    send_order: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]

    @torch.no_grad()
    def unshuffle(self, shuffled: torch.Tensor) -> torch.Tensor:
        """Return results for this rank's own samples, in their original order."""
        if is_distributed():
            back = shuffled.new_empty((sum(self.send_counts), *shuffled.shape[1:]))
            dist.all_to_all_single(
                back,
                shuffled.contiguous(),
                output_split_sizes=self.send_counts,
                input_split_sizes=self.recv_counts,
            )
        else:
            back = shuffled
        out = torch.empty_like(back)
        out[self.send_order] = back
        return out


@torch.no_grad()
def shuffle_batch(
    batch: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, BatchShuffle]:
    """Shuffle ``batch`` across all ranks (or within it, in one process).

    Returns this rank's share of the shuffled global batch and the
    :class:`BatchShuffle` that undoes it. ``generator`` must produce the same
    numbers on every rank (see :func:`shared_generator`); the permutation is
    drawn on the CPU, so no device synchronisation is needed.
    """
    n = batch.shape[0]
    world, rank = get_world_size(), get_rank()
    permutation = torch.randperm(world * n, generator=generator)
    if world == 1:
        order = permutation.to(batch.device, non_blocking=True)
        return batch[order], BatchShuffle(order, [n], [n])
    # Global sample permutation[j] goes to rank j // n.
    destination = torch.empty_like(permutation)
    destination[permutation] = torch.arange(world * n) // n
    destination = destination.view(world, n)
    counts = torch.zeros(world, world, dtype=torch.int64)  # counts[src, dst]
    counts.scatter_add_(1, destination, torch.ones_like(destination))
    send_order = torch.argsort(destination[rank], stable=True)
    send_counts, recv_counts = counts[rank].tolist(), counts[:, rank].tolist()
    send_order = send_order.to(batch.device, non_blocking=True)
    received = batch.new_empty((sum(recv_counts), *batch.shape[1:]))
    dist.all_to_all_single(
        received,
        batch[send_order].contiguous(),
        output_split_sizes=recv_counts,
        input_split_sizes=send_counts,
    )
    return received, BatchShuffle(send_order, send_counts, recv_counts)


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process stands in a run: rank, world size, local rank, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints and logs."""
        return self.rank == 0


def init_from_env(timeout_s: float = 1800.0) -> DistributedEnv:
    """Join the process group described by the environment, if there is one.

    Reads torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) or, under ``srun``, SLURM's
    (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR`` and
    ``MASTER_PORT`` must then be exported by the job script), through
    :mod:`mocohub.launch`. Uses NCCL with one GPU per process when CUDA is
    available, gloo on the CPU. With no such variables (or a world of one)
    nothing is initialised.
    """
    place = process_place()
    if torch.cuda.is_available():
        device = torch.device("cuda", place.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    join_process_group(
        place,
        "nccl" if device.type == "cuda" else "gloo",
        timeout_s=timeout_s,
        device_id=device if device.type == "cuda" else None,
    )
    return DistributedEnv(place.rank, place.world_size, place.local_rank, device)
