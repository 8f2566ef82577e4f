"""Split BatchNorm: BatchNorm statistics over sub-batches, for one-process MoCo.

With a single GPU (or the CPU) there is no other rank to shuffle the key batch
with, so shuffle BN has nothing to break: one batch is one BN batch. The MoCo
CIFAR demo instead normalises ``num_splits`` sub-batches separately (after
shuffling the key batch), which imitates ``num_splits`` GPUs. The layer is a
``BatchNorm2d`` subclass with the same parameters and buffers, so state dicts
(and torchvision's key names) are unchanged; in eval mode it is plain BN.

Which samples form a sub-batch depends on the memory format, so that neither
runs a layout copy:

- NCHW input: the demo's grouping, ``view(-1, C * num_splits, H, W)`` (free
  there), sample ``i`` in sub-batch ``i % num_splits``; BatchNorm's own kernel
  normalises the ``num_splits * C`` channels in one call, exactly as the demo.
- channels_last (any other layout): contiguous blocks, sample ``i`` in
  sub-batch ``i // (n / num_splits)``, as GPU ``k`` holds the ``k``-th block of
  a global batch. A block of the batch dimension is itself channels_last
  contiguous, so BatchNorm's own kernels (``native_batch_norm`` and its
  backward, float32 statistics for bf16/fp16 activations) run on each block and
  write (``out=``) into one output in the input's memory format: no layout copy,
  no float32 copy of bf16 activations. The demo's grouping there would be a copy
  to NCHW and back at every layer.

Both are partitions of an already shuffled batch (the key batch is shuffled
before the key encoder; the query batch comes in the loader's random order)
into equal sub-batches, so the maths, BatchNorm per sub-batch, is the same.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mocohub.errors import ConfigError, InputError

__all__ = ["SplitBatchNorm", "convert_split_batchnorm"]

_aten = torch.ops.aten


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` unchanged when it is NCHW- or channels_last-contiguous, else NCHW."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _affine(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' weight and bias: ones and zeros when the layer has none, in
    float32 for bf16/fp16 ``x`` so that the statistics stay float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    c = x.shape[1]
    if weight is None:
        weight = torch.ones(c, dtype=dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(c, dtype=weight.dtype, device=x.device)
    return weight, bias


class _SplitBatchNormFunction(torch.autograd.Function):
    """Training-mode split BN on ``x`` of shape ``(n, c, h, w)``, NCHW or channels_last.

    Returns the output (``x``'s dtype and strides) and each block's mean and
    inverse standard deviation, ``(num_splits, c)`` in the kernels' statistics
    dtype (float32 for bf16/fp16 ``x`` under autocast). Forward and backward
    are BatchNorm's own kernels on each block, writing (``out=``) into the
    block's rows of one output tensor.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        num_splits: int,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _dense(x)
        w, b = _affine(x, weight, bias)
        rows = x.shape[0] // num_splits
        out = torch.empty_like(x)
        mean = torch.empty(num_splits, x.shape[1], dtype=w.dtype, device=x.device)
        invstd = torch.empty_like(mean)
        for k, (block, out_block) in enumerate(zip(x.split(rows), out.split(rows), strict=True)):
            _aten.native_batch_norm.out(
                block, w, b, None, None, True, 0.0, eps,
                out=out_block, save_mean=mean[k], save_invstd=invstd[k],
            )  # fmt: skip
        ctx.save_for_backward(x, w, mean, invstd)
        ctx.num_splits, ctx.eps = num_splits, eps
        ctx.mark_non_differentiable(mean, invstd)
        return out, mean, invstd

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor, _grad_mean: torch.Tensor, _grad_invstd: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        x, w, mean, invstd = ctx.saved_tensors
        grad_out = grad_out.contiguous(
            memory_format=torch.contiguous_format if x.is_contiguous() else torch.channels_last
        )
        rows = x.shape[0] // ctx.num_splits
        grad_input = torch.empty_like(x)
        # Per-block weight and bias gradients, summed below (the kernel's .out
        # form computes all three: masked outputs would have to be undefined).
        grad_w = torch.empty_like(mean)
        grad_b = torch.empty_like(mean)
        blocks = zip(x.split(rows), grad_out.split(rows), grad_input.split(rows), strict=True)
        for k, (block, grad_block, grad_in_block) in enumerate(blocks):
            _aten.native_batch_norm_backward.out(
                grad_block, block, w, None, None, mean[k], invstd[k], True, ctx.eps,
                [True, True, True], out0=grad_in_block, out1=grad_w[k], out2=grad_b[k],
            )  # fmt: skip
        needs = ctx.needs_input_grad
        return (
            grad_input if needs[0] else None,
            grad_w.sum(0).to(w.dtype) if needs[1] else None,
            grad_b.sum(0).to(w.dtype) if needs[2] else None,
            None,
            None,
        )


def _split_batch_norm_traced(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_splits: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same per block, out of place, for ``torch.compile`` (Dynamo breaks the
    graph on ``out=`` into views; Inductor fuses the concatenation away)."""
    w, b = _affine(x, weight, bias)
    parts = [
        _aten.native_batch_norm(block, w, b, None, None, True, 0.0, eps)
        for block in x.split(x.shape[0] // num_splits)
    ]
    out = torch.cat([p[0] for p in parts])
    mean = torch.stack([p[1] for p in parts]).detach()
    invstd = torch.stack([p[2] for p in parts]).detach()
    return out, mean, invstd


class SplitBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are taken per sub-batch.

    Sample ``i`` of a batch of ``n`` belongs to sub-batch ``i % num_splits`` for
    NCHW input (the reference demo's grouping) and ``i // (n / num_splits)``
    (contiguous blocks) for channels_last (see the module's docstring); the
    running statistics are the mean of the sub-batches' running statistics.
    Neither layout runs a layout copy, and the output has the input's strides.

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
        self._check_input_dim(x)
        n, _, h, w = x.shape
        if n % splits:
            raise InputError(
                f"Split BN with {splits} splits needs a batch size divisible by {splits}, "
                f"got {n}; change the batch size or the number of BN splits."
            )
        if (n // splits) * h * w < 2:
            # F.batch_norm's own check, per split.
            raise InputError(
                f"Split BN needs more than 1 value per channel in each of its {splits} "
                f"sub-batches, got input size {list(x.shape)}; use a larger batch or "
                "fewer BN splits."
            )
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        if x.is_contiguous():
            return self._forward_grouped_channels(x, momentum)
        return self._forward_blocks(x, momentum)

    def _forward_grouped_channels(self, x: torch.Tensor, momentum: float) -> torch.Tensor:
        """NCHW: ``(n, c, h, w) -> (n/s, s*c, h, w)`` is a free view there (the
        reference demo's grouping), so BatchNorm's own kernel does the work."""
        splits = self.num_splits
        n, c, h, w = x.shape
        running_mean = running_var = None
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            running_mean = self.running_mean.repeat(splits)
            running_var = self.running_var.repeat(splits)
        weight = self.weight.repeat(splits) if self.weight is not None else None
        bias = self.bias.repeat(splits) if self.bias is not None else None
        # Channel s*c + j holds channel j of sample i*splits + s.
        out = F.batch_norm(
            x.view(n // splits, splits * c, h, w),
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

    def _forward_blocks(self, x: torch.Tensor, momentum: float) -> torch.Tensor:
        """channels_last (any layout but NCHW): BatchNorm's kernels on each
        contiguous block of ``n / num_splits`` samples, output in ``x``'s format."""
        splits = self.num_splits
        n, _, h, w = x.shape
        count = (n // splits) * h * w
        split_bn = (
            _split_batch_norm_traced
            if torch.compiler.is_compiling()
            else _SplitBatchNormFunction.apply
        )
        out, mean, invstd = split_bn(x, self.weight, self.bias, splits, self.eps)
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            # Each split's running update, averaged: (1 - m) * r + m * mean(stat_k),
            # with the unbiased variance, as F.batch_norm stores it.
            with torch.no_grad():
                # BatchNorm's kernels return 1 / sqrt(var + eps), not var.
                var = invstd.to(torch.promote_types(invstd.dtype, torch.float32))
                var = var.pow(-2).sub_(self.eps).clamp_(min=0)
                unbiased = var.mean(0) * (count / (count - 1))
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a :class:`SplitBatchNorm`.

    Parameters and buffers are kept (the same tensors), so the state dict is
    unchanged. Returns the converted module (``module`` itself unless it is a
    ``BatchNorm2d``), like ``nn.SyncBatchNorm.convert_sync_batchnorm``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> type(convert_split_batchnorm(net, 2)[1]).__name__
        'SplitBatchNorm'
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
