from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mocohub.backbones import resnet18
from mocohub.errors import ConfigError, InputError
from mocohub.training import SplitBatchNorm, convert_split_batchnorm

CL = torch.channels_last
FORMATS = [
    pytest.param(torch.contiguous_format, id="nchw"),
    pytest.param(CL, id="channels_last"),
]


def _interleaved_forward(bn: SplitBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """The reference demo's split BN (sample ``i`` in sub-batch ``i % s``).

    ``(n, c, h, w) -> (n/s, s*c, h, w)``, one ``F.batch_norm``; updates ``bn``'s
    buffers as that implementation did. See :func:`_reference_forward`.
    """
    splits = bn.num_splits
    n, c, h, w = x.shape
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    running_mean = running_var = None
    if bn.track_running_stats:
        running_mean = bn.running_mean.repeat(splits)
        running_var = bn.running_var.repeat(splits)
    weight = bn.weight.repeat(splits) if bn.weight is not None else None
    bias = bn.bias.repeat(splits) if bn.bias is not None else None
    out = F.batch_norm(
        x.reshape(n // splits, splits * c, h, w),
        running_mean,
        running_var,
        weight,
        bias,
        True,
        momentum,
        bn.eps,
    ).view(n, c, h, w)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            bn.running_mean.copy_(running_mean.view(splits, c).mean(0))
            bn.running_var.copy_(running_var.view(splits, c).mean(0))
    return out


def _sub_batch(x: torch.Tensor, k: int, splits: int) -> slice:
    """The samples of sub-batch ``k``: ``k::s`` for NCHW ``x``, else block ``k``."""
    if x.is_contiguous():
        return slice(k, None, splits)
    rows = x.shape[0] // splits
    return slice(k * rows, (k + 1) * rows)


def _reference_forward(bn: SplitBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """The oracle: the reference demo's split BN. For NCHW ``x`` as it is; for
    other layouts on the batch reordered so that the demo's sub-batch ``k``
    (samples ``k::s``) is block ``k``, and the output ordered back
    (differentiable, so ``x.grad`` comes back in block order)."""
    if x.is_contiguous():
        return _interleaved_forward(bn, x)
    splits, rest = bn.num_splits, x.shape[1:]
    rows = x.shape[0] // splits
    interleaved = x.reshape(splits, rows, *rest).transpose(0, 1).reshape(x.shape)
    out = _interleaved_forward(bn, interleaved)
    # In x's memory format, so that the next layer sees the layout (and grouping) it would.
    blocks = out.reshape(rows, splits, *rest).transpose(0, 1).reshape(x.shape)
    return torch.empty_like(x).copy_(blocks)


def _plain_bn_per_split(bn: SplitBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Plain BatchNorm on each sub-batch separately, running stats averaged."""
    splits = bn.num_splits
    out = torch.empty_like(x)
    means, variances = [], []
    for k in range(splits):
        block = _sub_batch(x, k, splits)
        running_mean = bn.running_mean.clone() if bn.track_running_stats else None
        running_var = bn.running_var.clone() if bn.track_running_stats else None
        momentum = bn.momentum
        if bn.track_running_stats and bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked + 1)
        out[block] = F.batch_norm(
            x[block], running_mean, running_var, bn.weight, bn.bias, True, momentum, bn.eps
        )
        means.append(running_mean)
        variances.append(running_var)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            bn.running_mean.copy_(torch.stack(means).mean(0))
            bn.running_var.copy_(torch.stack(variances).mean(0))
    return out


def _twin_layers(
    c: int, splits: int, affine: bool, momentum: float | None, dtype: torch.dtype
) -> tuple[SplitBatchNorm, SplitBatchNorm]:
    torch.manual_seed(0)
    bn = SplitBatchNorm(c, num_splits=splits, affine=affine, momentum=momentum)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    oracle = SplitBatchNorm(c, num_splits=splits, affine=affine, momentum=momentum)
    oracle.load_state_dict(bn.state_dict())
    return bn.to(dtype), oracle.to(dtype)


def _run(
    fn: Any, bn: SplitBatchNorm, x: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Output, input/weight/bias grads, then the buffers after the step."""
    x = x.detach().clone().requires_grad_()
    out = fn(bn, x)
    out.backward(grad)
    grads = [x.grad] + ([bn.weight.grad, bn.bias.grad] if bn.affine else [])
    buffers = [bn.running_mean, bn.running_var, bn.num_batches_tracked]
    return (out.detach(), *[g.clone() for g in grads], *[b.clone() for b in buffers])


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_todays_grouping_and_plain_bn_per_split(
    memory_format: torch.memory_format, affine: bool, momentum: float | None, dtype: torch.dtype
) -> None:
    splits, c = 3, 5
    bn, oracle = _twin_layers(c, splits, affine, momentum, dtype)
    _, per_split = _twin_layers(c, splits, affine, momentum, dtype)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {}
    for step in range(2):  # two steps: the running averages (and momentum=None) compound
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(12, c, 5, 4, generator=gen, dtype=dtype) * 3 + 2
        x = x.contiguous(memory_format=memory_format)
        grad = torch.randn(12, c, 5, 4, generator=gen, dtype=dtype)
        grad = grad.contiguous(memory_format=memory_format)
        for module in (bn, oracle, per_split):
            module.zero_grad()
        got = _run(SplitBatchNorm.__call__, bn, x, grad)
        today = _run(_reference_forward, oracle, x, grad)
        plain = _run(_plain_bn_per_split, per_split, x, grad)
        for a, b, e in zip(got, today, plain, strict=True):
            torch.testing.assert_close(a, b, **tol)
            torch.testing.assert_close(a, e, **tol)
        assert got[0].stride() == x.stride()  # output in the input's memory format
    assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bf16_under_autocast_keeps_float32_statistics(
    memory_format: torch.memory_format, affine: bool, half: torch.dtype
) -> None:
    """bf16/fp16 activations, float32 parameters (CPU autocast): statistics in float32."""
    splits, c = 4, 6
    bn, oracle = _twin_layers(c, splits, affine, 0.1, torch.float32)
    gen = torch.Generator().manual_seed(0)
    # A mean far from 0: a bf16-rounded mean (step 2^-6 near 6) would move the
    # running mean by ~1e-3 and the output by ~0.1 std.
    x = (torch.randn(16, c, 6, 6, generator=gen) * 0.5 + 6).to(half)
    x = x.contiguous(memory_format=memory_format)
    grad = torch.randn(16, c, 6, 6, generator=gen).to(half)
    grad = grad.contiguous(memory_format=memory_format)

    x_in = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=half):
        out = bn(x_in)
    out.backward(grad)
    assert out.dtype == half and x_in.grad is not None
    assert x_in.grad.dtype == half
    assert out.stride() == x.stride() and x_in.grad.stride() == x.stride()
    # The oracle: today's code in float32 on the same (bf16-exact) values.
    want = _run(_reference_forward, oracle, x.float(), grad.float())

    # Within bf16 rounding of the float32 result (half an ulp: 2^-9 relative).
    torch.testing.assert_close(out.float(), want[0], atol=1e-2, rtol=4e-3)
    torch.testing.assert_close(x_in.grad.float(), want[1], atol=1e-2, rtol=4e-3)
    if affine:  # reductions accumulated in float32: float32 tolerances
        torch.testing.assert_close(bn.weight.grad, want[2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bn.bias.grad, want[3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bn.running_mean, want[-3], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bn.running_var, want[-2], atol=1e-6, rtol=1e-6)
    assert bn.running_mean.dtype == torch.float32


class _CopyRecorder(TorchDispatchMode):
    """Records each activation-sized tensor an op writes: op name, strides, dtype and
    the dtype read (metadata only: holding the tensors would change what autograd
    copies)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.writes: list[tuple[str, tuple[int, ...], torch.dtype, torch.dtype | None]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        name = str(func.overloadpacket.__name__)
        # The tensor read: copy_(dst, src) reads its second argument.
        source = args[1] if name == "copy_" else args[0] if args else None
        read = source.dtype if isinstance(source, torch.Tensor) else None
        for t in outs:
            if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                self.writes.append((name, t.stride(), t.dtype, read))
        return out


def _channels_last_strides(
    splits: int, shape: tuple[int, int, int, int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """channels_last strides of the 4-D tensor and of its ``(n/s, s, c, h, w)`` view."""
    _, c, h, w = shape
    return (h * w * c, 1, w * c, c), (splits * h * w * c, h * w * c, 1, w * c, c)


_COPY_OPS = ("copy_", "_to_copy", "clone", "contiguous", "_unsafe_view", "_reshape_copy")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_channels_last_runs_without_layout_copies(autocast: bool) -> None:
    """Every activation-sized tensor written in forward and backward stays
    channels_last, and no copy runs: the reference demo's grouping fails this (its
    reshape copies to NCHW, and its output is NCHW), and so did the float32
    slices this layer converted bf16 activations to before it ran BatchNorm's
    own kernels."""
    n, c, h, w = 8, 16, 5, 5
    bn = SplitBatchNorm(c, num_splits=4)
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if autocast else torch.float32
    x = torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(memory_format=CL)
    x.requires_grad_()
    grad = torch.randn(n, c, h, w, generator=gen).to(dtype).contiguous(memory_format=CL)
    recorder = _CopyRecorder(x.numel())
    with recorder, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = bn(x)
        out.backward(grad)
    assert recorder.writes  # the recorder sees the layer's work
    allowed = _channels_last_strides(4, (n, c, h, w))
    for op, strides, _, _ in recorder.writes:
        assert strides in allowed, (op, strides)
    # No copy at all: neither a layout copy nor a float32 copy of bf16 activations.
    copies = [w for w in recorder.writes if w[0] in _COPY_OPS]
    assert not copies, copies
    assert out.is_contiguous(memory_format=CL)
    assert x.grad is not None and x.grad.is_contiguous(memory_format=CL)


def test_inplace_relu_after_channels_last_bf16_resnet() -> None:
    """The way the MoCo encoders run: channels_last, bf16 autocast, in-place ReLU
    after each BN; the gradients match the reference demo's split BN (on the same
    sub-batches)."""
    torch.manual_seed(0)
    net = convert_split_batchnorm(resnet18(num_classes=4, small_stem=True, width=4), 2)
    oracle = convert_split_batchnorm(resnet18(num_classes=4, small_stem=True, width=4), 2)
    oracle.load_state_dict(net.state_dict())
    net = net.to(memory_format=CL)
    for module in oracle.modules():
        if isinstance(module, SplitBatchNorm):
            module.forward = lambda x, m=module: _reference_forward(m, x)  # type: ignore[method-assign]
    x = torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(x.contiguous(memory_format=CL)).float().square().sum()
        loss_ref = oracle(x.contiguous(memory_format=CL)).float().square().sum()
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=1e-2)
    grad, grad_ref = net.conv1.weight.grad, oracle.conv1.weight.grad
    assert grad is not None and grad_ref is not None
    cosine = F.cosine_similarity(grad.flatten(), grad_ref.flatten(), dim=0)
    assert cosine > 0.99
    torch.testing.assert_close(net.bn1.running_mean, oracle.bn1.running_mean, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize(
    ("memory_format", "members"),
    [
        pytest.param(torch.contiguous_format, [0, 3, 6, 9], id="nchw_every_third"),
        pytest.param(CL, [0, 1, 2, 3], id="channels_last_blocks"),
    ],
)
def test_train_mode_normalises_each_split_on_its_own(
    memory_format: torch.memory_format, members: list[int]
) -> None:
    """Sub-batch 0 of 12 samples in 3 splits: samples 0, 3, 6, 9 (NCHW, the
    demo's grouping) or 0-3 (channels_last, contiguous blocks)."""
    torch.manual_seed(0)
    bn = SplitBatchNorm(6, num_splits=3, momentum=0.1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = (torch.randn(12, 6, 4, 4) * 3 + 2).contiguous(memory_format=memory_format)
    out = bn(x)
    assert list(range(12))[_sub_batch(x, 0, 3)] == members
    expected_running_mean = torch.zeros(6)
    expected_running_var = torch.zeros(6)
    for s in range(3):
        block = _sub_batch(x, s, 3)
        plain = nn.BatchNorm2d(6, momentum=0.1)
        plain.load_state_dict(
            {**bn.state_dict(), "running_mean": torch.zeros(6), "running_var": torch.ones(6)}
        )
        torch.testing.assert_close(out[block], plain(x[block]), atol=1e-5, rtol=1e-5)
        expected_running_mean += plain.running_mean / 3
        expected_running_var += plain.running_var / 3
    torch.testing.assert_close(bn.running_mean, expected_running_mean)
    torch.testing.assert_close(bn.running_var, expected_running_var)
    assert int(bn.num_batches_tracked) == 1
    # A single BN over the whole batch gives something else: the split matters.
    whole = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True)
    assert not torch.allclose(out, whole, atol=1e-3)


def test_eval_mode_is_plain_batchnorm_and_keys_are_unchanged() -> None:
    bn = SplitBatchNorm(4, num_splits=2)
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    bn.eval()
    x = torch.randn(3, 4, 2, 2)  # any batch size in eval mode
    torch.testing.assert_close(bn(x), (x - 0.5) / torch.sqrt(torch.tensor(2.0) + bn.eps))
    assert set(bn.state_dict()) == set(nn.BatchNorm2d(4).state_dict())


def test_convert_keeps_parameters_and_state_dict() -> None:
    net = resnet18(num_classes=8, small_stem=True, width=8)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    weight = net.bn1.weight
    convert_split_batchnorm(net, 4)
    assert isinstance(net.bn1, SplitBatchNorm) and net.bn1.num_splits == 4
    assert isinstance(net.layer3[0].downsample[1], SplitBatchNorm)
    assert net.bn1.weight is weight
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
    assert list(net.state_dict()) == list(state)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert net(torch.randn(8, 3, 16, 16)).shape == (8, 8)


@pytest.mark.parametrize("memory_format", FORMATS)
def test_errors(memory_format: torch.memory_format) -> None:
    bn = SplitBatchNorm(4, num_splits=4)
    with pytest.raises(InputError, match="divisible by 4"):
        bn(torch.randn(6, 4, 2, 2).contiguous(memory_format=memory_format))
    with pytest.raises(InputError, match="more than 1 value per channel"):
        bn(torch.randn(4, 4, 1, 1).contiguous(memory_format=memory_format))
    with pytest.raises(ConfigError):
        SplitBatchNorm(4, num_splits=0)


def test_torch_compile_traces_without_graph_breaks() -> None:
    """``--compile`` (``encoder.compile()``) traces the layer whole and agrees with eager."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SplitBatchNorm(8, 2), nn.ReLU(True))
    eager = eager.to(memory_format=CL)
    compiled = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SplitBatchNorm(8, 2), nn.ReLU(True))
    compiled.load_state_dict(eager.state_dict())
    compiled = compiled.to(memory_format=CL)
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=CL)
    # aot_eager: Dynamo + AOTAutograd (the custom backward) without a C++ compiler.
    out = torch.compile(compiled, backend="aot_eager")(x)
    want = eager(x)
    out.square().sum().backward()
    want.square().sum().backward()
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(compiled[0].weight.grad, eager[0].weight.grad)
    torch.testing.assert_close(compiled[1].running_var, eager[1].running_var)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("memory_format", FORMATS)
def test_cuda_bf16_autocast_matches_the_reference_grouping(
    memory_format: torch.memory_format,
) -> None:
    """On CUDA (the kernels' ``out=`` forms there), bf16 autocast: within bf16
    rounding of the reference demo's split BN in float32, same sub-batches."""
    splits, c = 4, 8
    bn, oracle = _twin_layers(c, splits, True, 0.1, torch.float32)
    bn = bn.cuda()
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, c, 6, 6, generator=gen) * 0.5 + 6).to(torch.bfloat16)
    grad = torch.randn(16, c, 6, 6, generator=gen).to(torch.bfloat16)
    x, grad = (t.contiguous(memory_format=memory_format) for t in (x, grad))
    x_in = x.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = bn(x_in)
    out.backward(grad.cuda())
    assert out.stride() == x.stride() and x_in.grad is not None
    want = _run(_reference_forward, oracle, x.float(), grad.float())
    torch.testing.assert_close(out.float().cpu(), want[0], atol=1e-2, rtol=4e-3)
    torch.testing.assert_close(x_in.grad.float().cpu(), want[1], atol=1e-2, rtol=4e-3)
    torch.testing.assert_close(bn.weight.grad.cpu(), want[2], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(bn.running_var.cpu(), want[-2], atol=1e-5, rtol=1e-5)
