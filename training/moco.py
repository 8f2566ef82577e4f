"""MoCo v1/v2: Momentum Contrast (He et al., 2020; Chen et al., 2020).

A drop-in for the reference ``moco/builder.py``: the same constructor, the same
``forward(im_q, im_k) -> (logits, labels)`` with the positive in column 0, and
the same state-dict keys (``encoder_q.*``, ``encoder_k.*``, ``queue``,
``queue_ptr``), so a reference checkpoint's ``state_dict`` (``module.`` prefix
stripped) loads as it is. Read ``forward`` next to the paper's Algorithm 1.
The state dict adds one entry, ``_extra_state``: the shuffle-BN generator's
state (:meth:`MoCo.get_extra_state`), so that a saved model resumes exactly.

What differs from the reference, none of it changing the maths:
- the key encoder's momentum update is one ``torch._foreach_lerp_`` call over
  all parameters (a fused multi-tensor kernel on CUDA, one in-place pass with
  no temporaries on the CPU), not a Python loop of per-tensor arithmetic;
- shuffle BN sends each sample straight to the rank that encodes it
  (``all_to_all``) instead of gathering the global batch everywhere;
- the queue pointer never leaves the device (no host sync per step);
- logits are computed in float32, also under autocast (in float64 for a
  float64 model: features are cast up to float32, never down);
- it runs in one process with no process group, where ``bn_splits > 1`` gives
  the shuffle-BN effect with split BatchNorm (as the reference CIFAR demo);
- ``symmetric=True`` uses both views as queries (as that demo offers).

Example:
    >>> import torchvision
    >>> model = MoCo(torchvision.models.resnet18, dim=128, K=4096, mlp=True, T=0.2)
    >>> logits, labels = model(torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64))
    >>> logits.shape, int(model.queue_ptr)
    (torch.Size([8, 4097]), 8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mocohub.errors import ConfigError, InputError

from .distributed import (
    all_gather_no_grad,
    check_same_batch_size,
    get_world_size,
    is_distributed,
    shared_generator,
    shuffle_batch,
)
from .split_batchnorm import convert_split_batchnorm

__all__ = ["MoCo"]


def _at_least_float32(features: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 features (autocast) up to float32; float32 and float64 as they are."""
    return features.to(torch.promote_types(features.dtype, torch.float32))


def _no_generator_unless_given(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, _: Any, strict: bool, *__: Any
) -> None:
    """A strict load of a state dict without ``_extra_state`` (a reference
    checkpoint's) leaves MoCo with no shuffle generator yet, instead of failing."""
    if strict:
        state_dict.setdefault(prefix + "_extra_state", torch.empty(0, dtype=torch.uint8))


class MoCo(nn.Module):
    """A query encoder, a momentum key encoder and a queue of keys.

    Args:
        base_encoder: builds an encoder when called with ``num_classes=dim``,
            e.g. ``torchvision.models.resnet50``; its last layer must be ``fc``.
        dim: feature dimension of the keys and queries (default 128).
        K: queue size, the number of negative keys (default 65536). It must be
            a multiple of the keys enqueued per step (the global batch size,
            twice that with ``symmetric``).
        m: momentum of the key encoder's moving average (default 0.999).
        T: softmax temperature (default 0.07; 0.2 for MoCo v2).
        mlp: MoCo v2's projection head, ``fc`` becoming Linear-ReLU-Linear with
            hidden width equal to the feature width (default False).
        symmetric: use both views as queries, each against the other's key;
            the logits of both directions are stacked (2N rows), so the mean
            cross-entropy is the mean of the two losses (the CIFAR demo sums
            them: multiply the loss by 2 to match its gradient scale).
        bn_splits: with more than 1, every ``BatchNorm2d`` of both encoders
            computes statistics over that many sub-batches, and in one process
            the key batch is shuffled first (the demo's single-GPU shuffle BN).
    """

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        mlp: bool = False,
        *,
        symmetric: bool = False,
        bn_splits: int = 1,
    ) -> None:
        super().__init__()
        if K < 1 or dim < 1:
            raise ConfigError(f"K ({K}) and dim ({dim}) must be positive.")
        if not 0.0 <= m <= 1.0:
            raise ConfigError(f"The momentum m must lie in [0, 1], got {m}.")
        if T <= 0:
            raise ConfigError(f"The temperature T must be positive, got {T}.")
        if bn_splits < 1:
            raise ConfigError(f"bn_splits must be at least 1, got {bn_splits}.")
        self.K, self.m, self.T = K, m, T
        self.symmetric, self.bn_splits = symmetric, bn_splits

        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:
            hidden = int(self.encoder_q.fc.weight.shape[1])  # type: ignore[union-attr, index]
            for encoder in (self.encoder_q, self.encoder_k):
                fc = encoder.get_submodule("fc")
                encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), fc)
        if bn_splits > 1:
            convert_split_batchnorm(self.encoder_q, bn_splits)
            convert_split_batchnorm(self.encoder_k, bn_splits)
        # The key encoder starts as a copy of the query encoder and is never
        # trained by gradient: only by the moving average.
        for param_q, param_k in zip(
            self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True
        ):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False

        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.queue: torch.Tensor
        self.queue_ptr: torch.Tensor
        self._shuffle_generator: torch.Generator | None = None
        self._checked_batch_size: int | None = None
        self.register_load_state_dict_pre_hook(_no_generator_unless_given)

    def set_shuffle_seed(self, seed: int) -> None:
        """Seed the key-batch shuffle; every rank must pass the same seed.

        By default the first shuffle seeds it from rank 0's default generator.
        A training loop that must resume identically seeds it at each step.
        """
        self._shuffle_generator = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> torch.Tensor:
        """The shuffle-BN generator's state (uint8), empty until the first shuffle seeds it.

        ``state_dict()`` stores it as ``_extra_state`` and ``load_state_dict``
        gives it to :meth:`set_extra_state`, so a checkpoint of the model
        carries the generator with it.

        Example:
            >>> model.set_shuffle_seed(0)
            >>> model.state_dict()["_extra_state"].dtype
            torch.uint8
        """
        generator = self._shuffle_generator
        return generator.get_state() if generator is not None else torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        """Restore the shuffle-BN generator from :meth:`get_extra_state`'s tensor.

        An empty tensor means none yet: as in the saved run, the next shuffle
        seeds it from the (restored) torch RNG.

        Example:
            >>> twin.set_extra_state(model.get_extra_state())
        """
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            raise InputError(
                f"MoCo's extra state is the shuffle generator's uint8 tensor, got "
                f"{type(state).__name__}; load a state dict written by MoCo.state_dict()."
            )
        generator = None
        if state.numel():
            generator = torch.Generator()
            generator.set_state(state)
        self._shuffle_generator = generator

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """key <- m * key + (1 - m) * query, for all parameters in one fused pass."""
        params_k: list[torch.Tensor] = list(self.encoder_k.parameters())
        params_q = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_lerp_(params_k, params_q, 1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest keys in the queue by this step's keys from all ranks."""
        keys = all_gather_no_grad(keys)
        # Index arithmetic on the device: the pointer is never read by the host.
        columns = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % self.K
        self.queue.index_copy_(1, columns, keys.T.to(self.queue.dtype))
        self.queue_ptr.add_(keys.shape[0]).remainder_(self.K)

    def _query(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(_at_least_float32(self.encoder_q(images)), dim=1)

    @torch.no_grad()
    def _key(self, images: torch.Tensor) -> torch.Tensor:
        if not is_distributed() and self.bn_splits == 1:
            # One BN batch either way: a shuffle would change nothing.
            return F.normalize(_at_least_float32(self.encoder_k(images)), dim=1)
        if self._shuffle_generator is None:
            self._shuffle_generator = shared_generator(images.device)
        shuffled, shuffle = shuffle_batch(images, self._shuffle_generator)
        keys = F.normalize(_at_least_float32(self.encoder_k(shuffled)), dim=1)
        return shuffle.unshuffle(keys)

    def _logits(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast: logits / T reach ~1/T and bf16 keeps
        # only 3 significant digits.
        with torch.autocast(q.device.type, enabled=False):
            # The wider of features and queue (a float64 model stays float64).
            dtype = torch.promote_types(q.dtype, queue.dtype)
            q, k, queue = q.to(dtype), k.to(dtype), queue.to(dtype)
            l_pos = (q * k).sum(dim=1, keepdim=True)  # positives: N x 1
            l_neg = q @ queue  # negatives: N x K
            # In place: the same division without a second N x (1 + K) tensor (neither
            # cat's nor the division's backward reads these values).
            return torch.cat([l_pos, l_neg], dim=1).div_(self.T)

    def _check_inputs(self, im_q: torch.Tensor, im_k: torch.Tensor) -> None:
        if im_q.shape[0] != im_k.shape[0]:
            raise InputError(
                f"The query and key batches differ in size ({im_q.shape[0]} vs "
                f"{im_k.shape[0]}); pass two views of the same images."
            )
        batch = im_q.shape[0]
        # On every step and every rank, never only where the batch changed: a rank
        # that skipped it while another checked would leave both waiting forever.
        check_same_batch_size(batch)
        if batch == self._checked_batch_size:
            return
        keys_per_step = batch * get_world_size() * (2 if self.symmetric else 1)
        if self.K % keys_per_step:
            what = (
                "twice the global batch size (symmetric loss)"
                if self.symmetric
                else ("the global batch size")
            )
            raise ConfigError(
                f"The queue size K={self.K} is not a multiple of {what}, {keys_per_step} "
                f"keys per step ({batch} per process x {get_world_size()} processes); "
                "choose K and the batch size so that it is."
            )
        self._checked_batch_size = batch

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One MoCo step's logits: ``(logits, labels)``, the positive in column 0.

        Args:
            im_q: a batch of query views, N x C x H x W.
            im_k: the key views of the same images, same shape.

        Returns:
            ``logits`` (N x (1 + K), or 2N rows with ``symmetric``), already
            divided by T, and ``labels`` (zeros), ready for ``F.cross_entropy``.
            The queue is updated with this step's keys.
        """
        self._check_inputs(im_q, im_k)
        self._momentum_update_key_encoder()
        queue = self.queue.clone()  # enqueueing below must not touch saved tensors
        if self.symmetric:
            q1, q2 = self._query(im_q), self._query(im_k)
            k1, k2 = self._key(im_q), self._key(im_k)
            logits = torch.cat([self._logits(q1, k2, queue), self._logits(q2, k1, queue)])
            keys = torch.cat([k1, k2])
        else:
            q = self._query(im_q)
            k = self._key(im_k)
            logits = self._logits(q, k, queue)
            keys = k
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(keys)
        return logits, labels
