"""Two processes (gloo on 127.0.0.1): shuffle BN, the shared queue, synced gradients."""

from __future__ import annotations

import datetime
import functools
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mocohub.backbones import resnet18
from mocohub.errors import InputError
from mocohub.training import MoCo
from mocohub.training.distributed import (
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


def _worker(rank: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
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
