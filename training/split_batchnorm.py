"""Split BatchNorm: BatchNorm statistics over sub-batches, for one-process MoCo.

With a single GPU (or the CPU) there is no other rank to shuffle the key batch
with, so shuffle BN has nothing to break: one batch is one BN batch. The MoCo
CIFAR demo instead normalises ``num_splits`` sub-batches separately (after
shuffling the key batch), which imitates ``num_splits`` GPUs. The layer is a
``BatchNorm2d`` subclass with the same parameters and buffers, so state dicts
(and torchvision's key names) are unchanged; in eval mode it is plain BN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mocohub.errors import ConfigError, InputError

__all__ = ["SplitBatchNorm", "convert_split_batchnorm"]


class SplitBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are taken per sub-batch.

    Sample ``i`` belongs to sub-batch ``i % num_splits``; the running statistics
    are the mean of the sub-batches' running statistics.

    Example:
        >>> bn = SplitBatchNorm(16, num_splits=4)
        >>> bn(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        if num_splits < 1:
            raise ConfigError(f"num_splits must be at least 1, got {num_splits}.")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        splits = self.num_splits
        if not self.training or splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % splits:
            raise InputError(
                f"Split BN with {splits} splits needs a batch size divisible by {splits}, "
                f"got {n}; change the batch size or the number of BN splits."
            )
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        running_mean = running_var = None
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            running_mean = self.running_mean.repeat(splits)
            running_var = self.running_var.repeat(splits)
        weight = self.weight.repeat(splits) if self.weight is not None else None
        bias = self.bias.repeat(splits) if self.bias is not None else None
        # (n, c, h, w) -> (n/splits, splits*c, h, w): channel s*c + j holds
        # channel j of sample i*splits + s, so each BN channel sees one split.
        out = F.batch_norm(
            x.reshape(n // splits, splits * c, h, w),
            running_mean,
            running_var,
            weight,
            bias,
            True,
            momentum,
            self.eps,
        ).view(n, c, h, w)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(splits, c).mean(0))  # type: ignore[union-attr]
                self.running_var.copy_(running_var.view(splits, c).mean(0))  # type: ignore[union-attr]
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a :class:`SplitBatchNorm`.

    Parameters and buffers are kept (the same tensors), so the state dict is
    unchanged. Returns the converted module (``module`` itself unless it is a
    ``BatchNorm2d``), like ``nn.SyncBatchNorm.convert_sync_batchnorm``.
    """
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm):
        split = SplitBatchNorm(
            module.num_features,
            num_splits,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        split.weight, split.bias = module.weight, module.bias
        split.running_mean = module.running_mean
        split.running_var = module.running_var
        split.num_batches_tracked = module.num_batches_tracked
        split.train(module.training)
        return split
    for name, child in module.named_children():
        converted = convert_split_batchnorm(child, num_splits)
        if converted is not child:
            setattr(module, name, converted)
    return module
