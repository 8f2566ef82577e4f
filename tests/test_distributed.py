"""Two processes (gloo on 127.0.0.1): shuffle BN, the shared queue, synced gradients,
and failures that must reach every rank instead of leaving ranks waiting on each other."""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mocohub.backbones import resnet18
from mocohub.errors import ConfigError, InputError
from mocohub.training import MoCo
from mocohub.training.config import preset
from mocohub.training.distributed import (
    DistributedEnv,
    all_gather_no_grad,
    any_rank,
    shared_generator,
    shuffle_batch,
    wrap_ddp,
)

WORLD = 2
LOCAL_BATCH = 6
K = 36  # three steps of 2 x 6 keys fill it: the pointer wraps around
STEPS = 4


def _encoder(num_classes: int) -> torch.nn.Module:
    return resnet18(num_classes=num_classes, small_stem=True, width=8)


def _same_on_all_ranks(tensor: torch.Tensor) -> bool:
    gathered = all_gather_no_grad(tensor.unsqueeze(0))
    return all(torch.equal(gathered[0], t) for t in gathered[1:])


def _check_shuffle(rank: int) -> None:
    generator = shared_generator(torch.device("cpu"))
    # Each sample is tagged with its global index.
    local = torch.arange(LOCAL_BATCH, dtype=torch.float32) + rank * LOCAL_BATCH
    shuffled, shuffle = shuffle_batch(local.view(-1, 1).repeat(1, 3), generator)
    assert shuffled.shape == (LOCAL_BATCH, 3)
    # The global batch is split into two disjoint sets that cover it.
    seen = all_gather_no_grad(shuffled[:, 0])
    assert sorted(seen.tolist()) == list(range(WORLD * LOCAL_BATCH))
    # Unshuffle returns each sample's own result.
    results = shuffled * 10 + 1
    back = shuffle.unshuffle(results)
    assert torch.equal(back[:, 0], local * 10 + 1)
    # Over several draws the shuffle really mixes ranks.
    mixed = 0
    for _ in range(5):
        out, _ = shuffle_batch(local.view(-1, 1), generator)
        mixed += int(((out.flatten() // LOCAL_BATCH) != rank).any())
    assert mixed > 0


def _check_moco(rank: int) -> None:
    torch.manual_seed(0)  # identical initial weights and queue on both ranks
    model = MoCo(_encoder, dim=16, K=K, m=0.9, T=0.2, mlp=True)
    seen_by_key_encoder: list[torch.Tensor] = []
    model.encoder_k.register_forward_pre_hook(
        lambda _mod, args: seen_by_key_encoder.append(args[0].detach().clone())
    )
    # DDP as training wraps it, no buffer sync per step: queues must agree because
    # every rank enqueues the same gathered keys, not because DDP copies rank 0's buffers.
    ddp = wrap_ddp(model, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.5, momentum=0.9)
    torch.manual_seed(100 + rank)  # different data on each rank
    assert STEPS * WORLD * LOCAL_BATCH > K  # the pointer wraps around
    for _ in range(STEPS):
        im_q = torch.randn(LOCAL_BATCH, 3, 16, 16)
        im_k = torch.randn(LOCAL_BATCH, 3, 16, 16)
        ptr_before = int(model.queue_ptr)
        logits, labels = ddp(im_q, im_k)
        assert logits.shape == (LOCAL_BATCH, 1 + K)
        assert torch.equal(labels, torch.zeros(LOCAL_BATCH, dtype=torch.long))

        # The key encoder saw a shuffled share of the global batch.
        fed = seen_by_key_encoder[-1]
        assert not torch.equal(fed, im_k)
        global_keys_in = all_gather_no_grad(im_k).flatten(1)
        fed_all = all_gather_no_grad(fed).flatten(1)
        match = (fed_all[:, None, :] == global_keys_in[None, :, :]).all(-1)
        assert torch.equal(match.sum(0), torch.ones(WORLD * LOCAL_BATCH, dtype=torch.long))
        assert torch.equal(match.sum(1), torch.ones(WORLD * LOCAL_BATCH, dtype=torch.long))

        # The queue holds both ranks' keys, in rank order, at the old pointer.
        # Column 0 of the logits is q . k, so each rank's key is recoverable.
        new = (ptr_before + torch.arange(WORLD * LOCAL_BATCH)) % K
        assert int(model.queue_ptr) == (ptr_before + WORLD * LOCAL_BATCH) % K
        assert _same_on_all_ranks(model.queue)
        assert _same_on_all_ranks(model.queue_ptr)
        q = F.normalize(model.encoder_q(im_q).detach(), dim=1)  # train-mode BN, same batch
        own_keys = model.queue[:, new[rank * LOCAL_BATCH : (rank + 1) * LOCAL_BATCH]].T
        torch.testing.assert_close(
            logits[:, 0].detach(), (q * own_keys).sum(1) / model.T, atol=2e-5, rtol=1e-5
        )

        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.encoder_q.parameters()])
        assert grads.abs().sum() > 0
        assert _same_on_all_ranks(grads)
        assert all(p.grad is None for p in model.encoder_k.parameters())
        optimizer.step()
        assert _same_on_all_ranks(torch.cat([p.flatten() for p in model.encoder_k.parameters()]))

    # In eval mode BN is per sample, so each key must be exactly f_k(own image):
    # a wrong unshuffle would hand a sample another sample's key.
    # Each rank's BN running statistics have followed its own key batches;
    # make them one set, as DDP's default buffer broadcast would.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    model.eval()
    im_q = torch.randn(LOCAL_BATCH, 3, 16, 16)
    im_k = torch.randn(LOCAL_BATCH, 3, 16, 16)
    with torch.no_grad():
        logits, _ = model(im_q, im_k)
        q = F.normalize(model.encoder_q(im_q), dim=1)
        k = F.normalize(model.encoder_k(im_k), dim=1)
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / model.T, atol=2e-5, rtol=1e-5)


def _check_unequal_batches(rank: int) -> None:
    model = MoCo(_encoder, dim=16, K=K)
    n = LOCAL_BATCH if rank == 0 else LOCAL_BATCH // 2
    with pytest.raises(InputError, match="different batch sizes"):
        model(torch.randn(n, 3, 16, 16), torch.randn(n, 3, 16, 16))
    assert int(model.queue_ptr) == 0


def _join_group(rank: int, port: int, *, timeout_s: float) -> None:
    """Join the gloo group of WORLD processes on this host as ``rank``, on one thread."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _worker(rank: int, port: int) -> None:
    _join_group(rank, port, timeout_s=120)
    try:
        _check_shuffle(rank)
        _check_moco(rank)
        _check_unequal_batches(rank)
        # K must be a multiple of the *global* batch: 36 is one of 12, not of 2 x 12.
        model = MoCo(_encoder, dim=16, K=K)
        with pytest.raises(Exception, match="multiple of the global batch size, 24"):
            model(torch.randn(12, 3, 16, 16), torch.randn(12, 3, 16, 16))
    finally:
        dist.destroy_process_group()


def test_two_process_moco(free_port: int) -> None:
    mp.spawn(functools.partial(_worker), args=(free_port,), nprocs=WORLD, join=True)


def test_wrap_ddp_turns_off_per_step_buffer_sync_without_a_deprecation_warning(
    free_port: int,
) -> None:
    """torch >= 2.13 deprecates broadcast_buffers (a FutureWarning printed by every rank)."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port}", rank=0, world_size=1
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            ddp = wrap_ddp(torch.nn.BatchNorm1d(2), torch.device("cpu"))
        assert not ddp.broadcast_buffers
        assert any_rank(True, torch.device("cpu")) and not any_rank(False, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Failures every rank must see, and the k-NN monitor's BN statistics. One pair of
# processes runs these checks in turn (starting processes is the slow part) and
# records each one's outcome per rank; a test per check reads them. The process
# group's timeout is short, so a rank left waiting fails within seconds instead of
# hanging, and the processes are killed if they outlive a deadline.
# ---------------------------------------------------------------------------

SHORT_TIMEOUT_S = 15
DEADLINE_S = 150  # process start-up and imports on a busy 2-core machine included


def _batch_shrinks_on_one_rank(rank: int) -> None:
    model = MoCo(_encoder, dim=16, K=16)
    model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))  # both ranks at 4: checked
    n = 4 if rank == 0 else 2  # rank 0's size is unchanged, rank 1's is new
    with pytest.raises(InputError, match=r"different batch sizes \[4, 2\]"):
        model(torch.randn(n, 3, 16, 16), torch.randn(n, 3, 16, 16))
    assert int(model.queue_ptr) == 8  # the refused step enqueued nothing


def _knn_with_each_rank_s_own_bn_statistics(rank: int) -> None:
    from mocohub.training import monitor
    from mocohub.training.data import resolve_dataset
    from mocohub.training.eval_data import backbone_features

    torch.manual_seed(0)  # the same weights and data on both ranks
    config = preset("fashion_mnist", knn_k=5, workers=0, precision="fp32")
    data = (torch.randint(0, 256, (22, 1, 28, 28), dtype=torch.uint8), torch.arange(22) % 3)
    info = resolve_dataset(data, "train")[1]
    encoder = resnet18(num_classes=16, small_stem=True, width=8, in_channels=1)
    # As after training under DDP (no buffer sync): each rank has its own BN statistics.
    generator = torch.Generator().manual_seed(rank)
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    rank0_buffers = [b.clone() for b in encoder.buffers()]
    for buffer in rank0_buffers:
        dist.broadcast(buffer, src=0)
    assert rank == 0 or not all(map(torch.equal, encoder.buffers(), rank0_buffers))

    banks: list[torch.Tensor] = []
    real_knn = monitor.knn_accuracy

    def recording(bank: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, float]:
        banks.append(bank)
        return real_knn(bank, *args, **kwargs)

    env = DistributedEnv(rank, WORLD, rank, torch.device("cpu"))
    monitor.knn_accuracy = recording
    try:
        result = monitor.KnnMonitor((data, data), config, info, env)(encoder)
    finally:
        monitor.knn_accuracy = real_knn

    # The bank (each rank embedded half) equals rank 0's model's features of all
    # 22 images, computed here in one process with rank 0's statistics.
    for buffer, wanted in zip(encoder.buffers(), rank0_buffers, strict=True):
        buffer.copy_(wanted)
    alone = monitor.KnnMonitor((data, data), config, info, DistributedEnv(0, 1, 0, env.device))
    with monitor.pooled_features(encoder) as backbone:
        reference = torch.cat(
            [F.normalize(backbone_features(backbone, x), dim=1) for x, _ in alone.batches[0]]
        )
    torch.testing.assert_close(banks[0], reference)
    assert _same_on_all_ranks(torch.tensor([result["knn_top1"], result["knn_top5"]]))


TINY_RUN = {"width": 8, "dim": 16, "K": 64, "batch_size": 32, "workers": 0, "precision": "fp32"}


def _resume_auto_on_separate_folders(rank: int, folders: list[str], data: Any) -> None:
    """Two nodes, each with its own disk: only rank 0's copy holds the checkpoint."""
    from mocohub.training.train import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK="0")
    run_dir = Path(folders[rank])
    before = sorted(p.name for p in run_dir.iterdir())
    config = preset("fashion_mnist", epochs=2, **TINY_RUN)
    with pytest.raises(ConfigError, match="different checkpoints") as refused:
        train(config, data, run_dir, resume="auto", progress=False)
    message = str(refused.value)
    assert "rank 0: epoch 1 step 0" in message and "rank 1: none" in message
    assert "filesystem that every node shares" in message
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written or deleted


CHECKS: dict[str, Callable[..., None]] = {
    "batch": _batch_shrinks_on_one_rank,
    "knn": _knn_with_each_rank_s_own_bn_statistics,
    "resume": _resume_auto_on_separate_folders,
}


def _checks_worker(rank: int, port: int, out: str, folders: list[str], data: Any) -> None:
    import traceback

    _join_group(rank, port, timeout_s=SHORT_TIMEOUT_S)
    outcome: dict[str, str] = {}
    try:
        for name, check in CHECKS.items():
            try:
                check(rank, folders, data) if name == "resume" else check(rank)
                outcome[name] = "ok"
            except BaseException:
                outcome[name] = traceback.format_exc()
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(outcome))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Each check's outcome on each rank: "ok" or the traceback."""
    from mocohub.training.train import train

    tmp = tmp_path_factory.mktemp("two_ranks")
    torch.manual_seed(0)
    data = (torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8), torch.arange(64) % 4)
    node0, node1 = tmp / "node0" / "run", tmp / "node1" / "run"
    with _one_thread():
        train(preset("fashion_mnist", epochs=1, **TINY_RUN), data, node0, progress=False)
    assert any(node0.glob("checkpoint_0001_*.pt"))
    node1.mkdir(parents=True)  # the other node's copy of the run folder: no checkpoint
    shutil.copy(node0 / "config.json", node1 / "config.json")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    context = mp.start_processes(
        _checks_worker,
        args=(port, str(tmp), [str(node0), str(node1)], data),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes were still running after {DEADLINE_S} s")
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {name: [r.get(name, "not run") for r in ranks] for name in CHECKS}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _passed(outcome: list[str]) -> None:
    for rank, text in enumerate(outcome):
        assert text == "ok", f"rank {rank}:\n{text}"


def test_a_batch_size_that_changes_on_one_rank_is_refused_on_both(
    outcomes: dict[str, list[str]],
) -> None:
    """Rank 0 keeps the batch size it checked before, rank 1's changes (4 vs 2): both
    raise InputError (a check on rank 1 alone left the ranks in different collectives)."""
    _passed(outcomes["batch"])


def test_the_knn_monitor_embeds_every_share_with_rank_0_s_bn_statistics(
    outcomes: dict[str, list[str]],
) -> None:
    """Without a buffer sync each rank has its own BN statistics; the monitor must
    embed every rank's share with rank 0's (the model that checkpoints save)."""
    _passed(outcomes["knn"])


def test_resume_auto_without_a_shared_run_folder_is_refused_on_every_rank(
    outcomes: dict[str, list[str]],
) -> None:
    """Each node has its own run folder and only rank 0's holds the checkpoint: both
    ranks refuse with one line (they used to run different epochs and wait for ever)."""
    _passed(outcomes["resume"])
