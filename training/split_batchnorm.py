"""Split BatchNorm: BatchNorm statistics over sub-batches, for one-process MoCo.

With a single GPU (or the CPU) there is no other rank to shuffle the key batch
with, so shuffle BN has nothing to break: one batch is one BN batch. The MoCo
CIFAR demo instead normalises ``num_splits`` sub-batches separately (after
shuffling the key batch), which imitates ``num_splits`` GPUs. The layer is a
``BatchNorm2d`` subclass with the same parameters and buffers, so state dicts
(and torchvision's key names) are unchanged; in eval mode it is plain BN.

The demo groups samples with ``view(-1, C * num_splits, H, W)``. That is free
on an NCHW tensor, where this layer does the same and BatchNorm's own kernel
does the work; on a channels_last tensor it was a copy to NCHW at every BN
layer (and the next convolution copied back). There the statistics are taken
on the ``(n/s, s, c, h, w)`` view instead (splitting the batch dimension is a
view in every layout), with the backward pass written out: no activation-sized
layout copy runs and the output keeps the input's memory format.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mocohub.errors import ConfigError, InputError

__all__ = ["SplitBatchNorm", "convert_split_batchnorm"]


def _per_split_sum(t: torch.Tensor) -> torch.Tensor:
    """``(n/s, s, c, h, w) -> (s, c)`` sums.

    Reducing ``h, w`` first keeps the reduction a fast one in both memory
    formats (one reduction over the non-adjacent dims 0, 3, 4 is several times
    slower on channels_last); the second sum is over a tiny ``(n/s, s, c)``.
    """
    return t.sum((3, 4)).sum(0)


def _into(dst: torch.Tensor, op: Any, *args: torch.Tensor) -> torch.Tensor:
    """``op(*args, out=dst)``; under ``torch.compile``, ``dst.copy_(op(*args))``
    (Dynamo breaks the graph on ``out=`` into a strided view; Inductor fuses the copy)."""
    if torch.compiler.is_compiling():
        return dst.copy_(op(*args))
    return op(*args, out=dst)


# bf16/fp16 activations are processed in slices of the batch of about this many
# float32 bytes: float32 temporaries of the whole activation would be fresh
# memory at every layer (page faults cost more than the arithmetic on a CPU),
# while slices stay in cache and their memory is reused.
_SLICE_BYTES = 1 << 21


def _slices(t: torch.Tensor) -> list[slice]:
    """Slices of ``t``'s dim 0 of about ``_SLICE_BYTES`` (float32) each; one slice
    off the CPU (cached allocators) and under compile (Inductor fuses the ops)."""
    rows = t.shape[0]
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return [slice(0, rows)]
    step = max(1, _SLICE_BYTES // (t[:1].numel() * 4))
    return [slice(i, i + step) for i in range(0, rows, step)]


class _SplitBatchNormFunction(torch.autograd.Function):
    """Training-mode split BN on ``x`` of shape ``(n, c, h, w)``, any memory format.

    Returns the output (same dtype and strides as ``x``) and the per-split
    mean and biased variance, ``(num_splits, c)`` in the accumulation dtype
    (float32 for bf16/fp16 ``x``, as BatchNorm's own kernels accumulate).
    All the work is on the ``(n/s, s, c, h, w)`` view (splitting dim 0 is a
    view in every layout) and keeps ``x``'s strides. The backward is the
    standard BN backward per (split, channel), ``xhat = (x - mean) * invstd``:
    ``dx = scale * (g - mean(g) - xhat * mean(g * xhat))``.
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
        n, c, h, w = x.shape
        acc = torch.promote_types(x.dtype, torch.float32)
        shape5 = (n // num_splits, num_splits, c, h, w)
        stat5 = (1, num_splits, c, 1, 1)
        count = shape5[0] * h * w
        xs = x.view(shape5)
        # Two passes (mean, then squared deviations), as BatchNorm's kernels do:
        # a one-pass E[x^2] - E[x]^2 loses the variance when |mean| >> std.
        if x.dtype == acc:
            mean = _per_split_sum(xs).div_(count)
            centered = xs - mean.view(stat5)  # kept for backward instead of x
            out = torch.empty_like(x)  # 4-D: autograd forbids returning a view
            squares = _into(out.view(shape5), torch.mul, centered, centered)
            var = _per_split_sum(squares).div_(count)
            invstd = (var + eps).rsqrt_()
            scale = invstd if weight is None else invstd * weight
            shift = torch.zeros_like(scale) if bias is None else bias.to(acc).expand_as(scale)
            _into(out.view(shape5), torch.addcmul, shift.view(stat5), centered, scale.view(stat5))
            ctx.save_for_backward(centered, weight, mean, invstd)
        else:
            parts = _slices(xs)
            total = torch.zeros(num_splits, c, dtype=acc, device=x.device)
            for part in parts:
                total += _per_split_sum(xs[part].to(acc))
            mean = total.div_(count)
            total = torch.zeros_like(mean)
            for part in parts:
                total += _per_split_sum(xs[part].to(acc).sub_(mean.view(stat5)).square_())
            var = total.div_(count)
            invstd = (var + eps).rsqrt_()
            scale = invstd if weight is None else invstd * weight
            shift = -mean * scale if bias is None else bias - mean * scale
            # x * scale + shift in float32, as BatchNorm's kernels do, then bf16.
            out = torch.empty_like(x)
            out_s = out.view(shape5)
            for part in parts:
                out_s[part] = torch.addcmul(shift.view(stat5), xs[part], scale.view(stat5))
            ctx.save_for_backward(x, weight, mean, invstd)
        ctx.num_splits = num_splits
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor, _grad_mean: torch.Tensor, _grad_var: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        saved, weight, mean, invstd = ctx.saved_tensors
        num_splits = ctx.num_splits
        n, c, h, w = grad_out.shape
        shape5 = (n // num_splits, num_splits, c, h, w)
        stat5 = (1, num_splits, c, 1, 1)
        count = shape5[0] * h * w
        grad = grad_out.reshape(shape5)  # a view unless autograd handed odd strides
        scale = invstd if weight is None else invstd * weight
        if saved.dim() == 5:  # float32/float64: the saved centred input
            centered = saved
            # The one activation-sized buffer, in x's layout; it becomes dx (4-D,
            # no view, so autograd takes it as is).
            buffer = torch.empty_like(centered.view(n, c, h, w))
            products = _into(buffer.view(shape5), torch.mul, grad, centered)
            sum_grad = _per_split_sum(grad)
            sum_grad_centered = _per_split_sum(products)
        else:  # bf16/fp16: x was saved; float32 slices of g and x - mean
            xs = saved.view(shape5)
            parts = _slices(xs)
            sum_grad = torch.zeros_like(mean)
            sum_grad_centered = torch.zeros_like(mean)
            for part in parts:
                g = grad[part].to(mean.dtype)
                sum_grad += _per_split_sum(g)
                centered = xs[part].to(mean.dtype).sub_(mean.view(stat5))
                sum_grad_centered += _per_split_sum(centered.mul_(g))
        # dx = scale * g + k_centered * (x - mean) + k_const
        k_centered = -scale * invstd.square() * sum_grad_centered / count
        k_const = -scale * sum_grad / count
        grad_input = None
        if ctx.needs_input_grad[0] and saved.dim() == 5:
            grad_input = buffer
            dx = buffer.view(shape5)  # overwrites the products
            _into(dx, torch.addcmul, k_const.view(stat5), centered, k_centered.view(stat5))
            dx.addcmul_(grad, scale.view(stat5))
        elif ctx.needs_input_grad[0]:
            k_const = k_const - k_centered * mean  # (x - mean) * k_centered + k_const
            grad_input = torch.empty_like(saved)
            dx = grad_input.view(shape5)
            for part in parts:
                slice_ = torch.addcmul(k_const.view(stat5), xs[part], k_centered.view(stat5))
                dx[part] = slice_.addcmul_(grad[part], scale.view(stat5))
        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_grad_centered * invstd).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_grad.sum(0).to(weight.dtype if weight is not None else mean.dtype)
        return grad_input, grad_weight, grad_bias, None, None


class SplitBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are taken per sub-batch.

    Sample ``i`` belongs to sub-batch ``i % num_splits``; the running statistics
    are the mean of the sub-batches' running statistics. Any memory format
    works without layout copies, and the output has the input's strides.

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
        return self._forward_split_view(x, momentum)

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

    def _forward_split_view(self, x: torch.Tensor, momentum: float) -> torch.Tensor:
        """channels_last (any other layout): statistics on the free
        ``(n/s, s, c, h, w)`` view, output in ``x``'s memory format."""
        n, _, h, w = x.shape
        count = (n // self.num_splits) * h * w
        out, mean, var = _SplitBatchNormFunction.apply(
            x, self.weight, self.bias, self.num_splits, self.eps
        )
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            # Each split's running update, averaged: (1 - m) * r + m * mean(stat_k),
            # with the unbiased variance, as F.batch_norm stores it.
            with torch.no_grad():
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), momentum)
                unbiased = var.mean(0) * (count / (count - 1))
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
