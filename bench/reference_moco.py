"""The reference MoCo (facebookresearch/moco, ``moco/builder.py``), transcribed
for the benchmarks: the baseline that mocohub is measured against, in the same run.

``.cuda()`` calls are dropped so that it runs on the CPU too; everything else
(the per-tensor momentum loop, ``queue.clone().detach()``, ``int(queue_ptr)``,
the all-gather shuffle) is the reference's. Without a process group the
gathers are the identity, as in one GPU process.

``tests/test_moco_reference.py`` also trains ``mocohub.training.MoCo`` against it
in float64 (to 1e-12), so it must stay the reference's, statement for statement.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


@torch.no_grad()
def reference_momentum_update(encoder_q: nn.Module, encoder_k: nn.Module, m: float) -> None:
    """The reference's ``_momentum_update_key_encoder`` body."""
    for param_q, param_k in zip(encoder_q.parameters(), encoder_k.parameters(), strict=True):
        param_k.data = param_k.data * m + param_q.data * (1.0 - m)


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The reference's ``concat_all_gather`` (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    tensors_gather = [torch.ones_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(tensors_gather, tensor, async_op=False)
    return torch.cat(tensors_gather, dim=0)


@torch.no_grad()
def reference_batch_shuffle_ddp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``_batch_shuffle_ddp``."""
    batch_size_this = x.shape[0]
    x_gather = concat_all_gather(x)
    batch_size_all = x_gather.shape[0]
    num_gpus = batch_size_all // batch_size_this
    # random shuffle index, broadcast to all ranks
    idx_shuffle = torch.randperm(batch_size_all)
    dist.broadcast(idx_shuffle, src=0)
    # index for restoring
    idx_unshuffle = torch.argsort(idx_shuffle)
    # shuffled index for this gpu
    gpu_idx = dist.get_rank()
    idx_this = idx_shuffle.view(num_gpus, -1)[gpu_idx]
    return x_gather[idx_this], idx_unshuffle


@torch.no_grad()
def reference_batch_unshuffle_ddp(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """The reference's ``_batch_unshuffle_ddp``."""
    batch_size_this = x.shape[0]
    x_gather = concat_all_gather(x)
    batch_size_all = x_gather.shape[0]
    num_gpus = batch_size_all // batch_size_this
    gpu_idx = dist.get_rank()
    idx_this = idx_unshuffle.view(num_gpus, -1)[gpu_idx]
    return x_gather[idx_this]


class ReferenceMoCo(nn.Module):
    """The reference ``MoCo`` for one process: no DDP, so no batch shuffle and no gather."""

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        mlp: bool = False,
    ) -> None:
        super().__init__()
        self.K = K
        self.m = m
        self.T = T
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:  # hack: brute-force replacement
            dim_mlp = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(
                nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_q.fc
            )
            self.encoder_k.fc = nn.Sequential(
                nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_k.fc
            )
        for param_q, param_k in zip(
            self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True
        ):
            param_k.data.copy_(param_q.data)  # initialize
            param_k.requires_grad = False  # not update by gradient
        self.register_buffer("queue", torch.randn(dim, K))
        self.queue = nn.functional.normalize(self.queue, dim=0)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        reference_momentum_update(self.encoder_q, self.encoder_k, self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0  # for simplicity
        # replace the keys at ptr (dequeue and enqueue)
        self.queue[:, ptr : ptr + batch_size] = keys.T
        ptr = (ptr + batch_size) % self.K  # move pointer
        self.queue_ptr[0] = ptr

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.encoder_q(im_q)  # queries: NxC
        q = nn.functional.normalize(q, dim=1)
        with torch.no_grad():  # no gradient to keys
            self._momentum_update_key_encoder()  # update the key encoder
            k = self.encoder_k(im_k)  # keys: NxC
            k = nn.functional.normalize(k, dim=1)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1)
        logits /= self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k)
        return logits, labels
