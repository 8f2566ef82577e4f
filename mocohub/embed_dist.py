"""``mocohub embed`` as one of several processes (torchrun, srun): a share each, then one merge.

Each process (its rank and the world size read by :mod:`mocohub.launch`)
embeds shard ``(rank, world)`` of the input list (the ``--shard i/n``
machinery of :mod:`mocohub.embed`) into its own output in
``OUT.npy.shards/`` (``00003-of-00008.npy``, with its own resumable parts
folder), on its own device (``cuda:LOCAL_RANK`` with CUDA). Then the processes
meet at a barrier of a gloo group and rank 0 merges the shards into ``OUT.npy``
and its manifest, errors and record, then deletes ``OUT.npy.shards/``. The
merged files are byte for byte those of one process, the record included: it
names the key and the parts of the one-process run, so a later run, of one
process or of many, finds the output up to date.

Why rank 0 after a barrier, not the last process to finish under a file lock:
locks on shared file systems (NFS, Lustre) are unreliable or off, and two
finishers racing to merge need a lock to agree on one; a barrier names one
merger with nothing but the connection the launcher already set up
(torchrun's store, or ``MASTER_ADDR`` under Slurm). The barrier waits as long
as the slowest share takes (days allowed: ``wait_s``), and a process that dies
closes its connection, so the others stop at once instead of waiting.

A node that dies: its processes' finished parts stay in their shard folders,
and the other processes' finished shards stay as published outputs. Rerun the
same command (same number of processes): a finished shard is found up to date
and not embedded again, an unfinished one resumes from its last part, and rank
0 merges.

Example:
    >>> # in each process started by `torchrun --nproc-per-node 2 -m mocohub embed ...`
    >>> result = embed_distributed(paths, "feats.npy", settings, opener, process_place())
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mocohub.embed import EmbedResult, EmbedSettings, embed_files, run_record
from mocohub.embed_merge import merge_outputs
from mocohub.embed_outputs import complete_output, output_files, verified_meta
from mocohub.embed_parts import inputs_digests, plan_parts, run_key
from mocohub.embed_sources import Inputs, names_of
from mocohub.errors import DistributedError, InputError
from mocohub.features import Embedder
from mocohub.imageio import paths_digest
from mocohub.launch import ProcessPlace, join_process_group

__all__ = ["embed_distributed", "process_device", "process_workers", "shard_output"]

WAIT_S = 7 * 24 * 3600.0  # the barrier before the merge waits for the slowest share


def shard_output(out: str | os.PathLike[str], rank: int, world: int) -> Path:
    """Where process ``rank`` of ``world`` writes its share of ``out`` (always a ``.npy``).

    Example:
        >>> shard_output("feats.npy", 1, 4)
        PosixPath('feats.npy.shards/00001-of-00004.npy')
    """
    out = Path(out)
    return out.with_name(out.name + ".shards") / f"{rank:05d}-of-{world:05d}.npy"


def process_device(device: str, local_rank: int) -> str:
    """The device of the process of local rank ``local_rank``: its own GPU under ``auto``/``cuda``.

    Example:
        >>> process_device("auto", 3)  # on a machine with 8 GPUs
        'cuda:3'
    """
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return device


def process_workers(device: str) -> int:
    """Default decoding processes of one of the processes of this machine (``--workers``).

    :func:`~mocohub.embed_decode.default_workers`, but on a CPU from this
    process's share of the cores: the ``LOCAL_WORLD_SIZE`` processes torchrun
    started here share them (under srun each task's affinity is its share).

    Example:
        >>> os.environ["LOCAL_WORLD_SIZE"] = "2"
        >>> torch.set_num_threads(1)
        >>> process_workers("cpu")  # on 2 cores: one each, used by the model
        0
    """
    from mocohub.embed_decode import default_workers
    from mocohub.sysinfo import usable_cpus

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return default_workers(device)
    share = usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(0, min(4, share - torch.get_num_threads()))


def _one_process_plan(
    paths: Sequence[str] | Inputs, settings: EmbedSettings, verify_content: bool
) -> tuple[str, list[list[int]], list[str]]:
    """The key, part files and inputs digests a one-process run of ``paths`` would have."""
    names = names_of(paths)
    key = run_key(asdict(settings), settings.model, paths_digest(names), (0, 1))
    _, _, part_files = plan_parts(len(names), settings.batch_size, settings.part_size, (0, 1))
    source = paths if isinstance(paths, Inputs) else None
    digests = inputs_digests(names, part_files, verify_content=verify_content, source=source)
    return key, part_files, digests


def _merge(
    out: Path,
    world: int,
    paths: Sequence[str] | Inputs,
    settings: EmbedSettings,
    plan: tuple[str, list[list[int]], list[str]],
) -> dict[str, Any]:
    """Rank 0: the shards merged into ``out`` under the one-process run's record."""
    key, part_files, digests = plan
    shards = [shard_output(out, rank, world) for rank in range(world)]
    metas = [verified_meta(shard) for shard in shards]
    failed = {int(i) for meta in metas for part in meta["parts"] for i in part["failed"]}
    parts = []
    for files, digest in zip(part_files, digests, strict=True):
        lost = [i for i in files if i in failed]
        parts.append({"inputs": digest, "rows": len(files) - len(lost), "failed": lost})
    names = names_of(paths)
    record = run_record(
        settings, len(names), paths_digest(names), (0, 1), key, metas[0]["precision"], parts
    )
    merged = merge_outputs(shards, out, run_meta=record)
    shutil.rmtree(shards[0].parent, ignore_errors=True)
    return merged


def embed_distributed(
    paths: Sequence[str] | Inputs,
    out: str | os.PathLike[str],
    settings: EmbedSettings,
    open_embedder: Callable[[str], Embedder],
    place: ProcessPlace,
    *,
    workers: int = 0,
    dtype: str = "float32",
    restart: bool = False,
    progress: bool = False,
    verify_content: bool = False,
    timeout_s: float = 1800.0,
    wait_s: float = WAIT_S,
) -> EmbedResult:
    """This process's share of embedding ``paths`` into ``out``; rank 0 merges all shares.

    Every process must get the same ``paths`` and ``settings``. Returns, on
    rank 0, the merged output's figures (``embedded_now``: images embedded by
    all processes in this run); on the others, their own share's.

    Example:
        >>> embed_distributed(paths, "feats.npy", settings, opener, process_place()).rows
        2000
    """
    import torch.distributed as dist

    started = time.perf_counter()
    joined = not dist.is_initialized()
    join_process_group(place, "gloo", timeout_s=timeout_s)
    rank, world = place.rank, place.world_size
    files = output_files(out)
    try:
        seen: list[Any] = [None] * world
        dist.all_gather_object(seen, paths_digest(names_of(paths)))
        if len(set(seen)) > 1:
            other = next(r for r, d in enumerate(seen) if d != seen[0])
            raise InputError(
                f"Rank {other} found other input files than rank 0; every process must see "
                "the same inputs (a file system shared by all nodes, the same arguments)."
            )
        # Rank 0 alone reads every input's size and time (a one-process run does too).
        verdict: list[Any] = [None]
        plan = None
        if rank == 0:
            plan = _one_process_plan(paths, settings, verify_content)
            earlier = None if restart else complete_output(files, plan[0], dtype)
            if earlier is not None and [p["inputs"] for p in earlier["parts"]] == plan[2]:
                verdict[0] = earlier
                shutil.rmtree(shard_output(out, 0, world).parent, ignore_errors=True)
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            meta = verdict[0]
            return EmbedResult(
                files["features"], meta["rows"], meta["skipped"], 0, 0.0, meta["precision"], True
            )
        mine = embed_files(
            paths,
            shard_output(out, rank, world),
            settings,
            open_embedder,
            shard=(rank, world),
            workers=workers,
            dtype=dtype,
            restart=restart,
            progress=progress and rank == 0,
            verify_content=verify_content,
        )
        try:  # a process that died (its node, an error) closes its connection: no long wait
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=wait_s), wait_all_ranks=True)
        except RuntimeError as e:
            raise DistributedError(
                f"Another process of this run stopped before its share was done ({e}); the "
                "finished parts are kept: rerun the same command to resume them."
            ) from e
        counts: list[Any] = [None] * world
        dist.all_gather_object(counts, mine.embedded_now)
        if rank != 0:
            return mine
        assert plan is not None
        merged = _merge(files["features"], world, paths, settings, plan)
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
    seconds = time.perf_counter() - started
    result = (files["features"], merged["rows"], merged["skipped"], sum(counts), seconds)
    return EmbedResult(*result, merged["precision"])
