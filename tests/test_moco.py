"""MoCo in one process: the reference's interface, the v2 head, the queue, errors."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.overrides import TorchFunctionMode

from mocohub.backbones import resnet18
from mocohub.errors import ConfigError, InputError
from mocohub.training import MoCo

tiny = functools.partial(resnet18, small_stem=True, width=8)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def reference_checkpoint_state_dict(dim: int, K: int) -> dict[str, torch.Tensor]:
    """What a reference MoCo v2 ``checkpoint['state_dict']`` holds (DDP-wrapped),
    written out from torchvision's ResNet-50 without using mocohub."""
    trunk = torchvision.models.resnet50().state_dict()
    state: dict[str, torch.Tensor] = {}
    for encoder in ("encoder_q", "encoder_k"):
        for name, value in trunk.items():
            if not name.startswith("fc."):
                state[f"module.{encoder}.{name}"] = value.clone()
        state[f"module.{encoder}.fc.0.weight"] = torch.randn(2048, 2048)
        state[f"module.{encoder}.fc.0.bias"] = torch.randn(2048)
        state[f"module.{encoder}.fc.2.weight"] = torch.randn(dim, 2048)
        state[f"module.{encoder}.fc.2.bias"] = torch.randn(dim)
    state["module.queue"] = F.normalize(torch.randn(dim, K), dim=0)
    state["module.queue_ptr"] = torch.tensor([256])
    return state


def test_loads_a_reference_checkpoint_state_dict() -> None:
    model = MoCo(torchvision.models.resnet50, dim=128, K=65536, m=0.999, T=0.2, mlp=True)
    reference = reference_checkpoint_state_dict(128, 65536)
    stripped = {k.removeprefix("module."): v for k, v in reference.items()}
    # The reference's keys, plus MoCo's own state (the shuffle generator, none yet).
    assert set(model.state_dict()) == {*stripped, "_extra_state"}
    model.load_state_dict(stripped, strict=True)
    assert model.get_extra_state().numel() == 0
    assert torch.equal(model.queue, stripped["queue"])
    assert int(model.queue_ptr) == 256
    assert isinstance(model.encoder_q.fc, torch.nn.Sequential)
    assert [type(m).__name__ for m in model.encoder_q.fc] == ["Linear", "ReLU", "Linear"]


def test_construction_matches_the_reference() -> None:
    model = MoCo(torchvision.models.resnet18, dim=64, K=1024, m=0.99, T=0.1, mlp=True)
    assert (model.K, model.m, model.T) == (1024, 0.99, 0.1)
    assert model.queue.shape == (64, 1024)
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(1024))
    assert model.queue_ptr.dtype == torch.long and model.queue_ptr.tolist() == [0]
    # v2 head: hidden width = feature width.
    assert model.encoder_q.fc[0].weight.shape == (512, 512)
    assert model.encoder_q.fc[2].weight.shape == (64, 512)
    for q, k in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
        assert torch.equal(q, k) and q.data_ptr() != k.data_ptr()
        assert q.requires_grad and not k.requires_grad
    v1 = MoCo(torchvision.models.resnet18, dim=128, K=512)
    assert isinstance(v1.encoder_q.fc, torch.nn.Linear) and v1.T == 0.07 and v1.m == 0.999


def test_forward_logits_labels_and_queue_without_process_group() -> None:
    assert not dist.is_initialized()
    model = MoCo(tiny, dim=16, K=24, m=0.9, T=0.2)
    queue_before = model.queue.clone()
    im_q, im_k = images(8, 1), images(8, 2)
    logits, labels = model(im_q, im_k)
    assert logits.shape == (8, 25) and logits.dtype == torch.float32
    assert labels.dtype == torch.long and not labels.any()
    # Negatives are the queue as it was before this step's keys went in.
    q = F.normalize(model.encoder_q(im_q), dim=1)
    torch.testing.assert_close(logits[:, 1:], q @ queue_before / 0.2, atol=1e-5, rtol=1e-5)
    # Positives (column 0) are q . k with this step's keys, now at queue[:, 0:8].
    keys = model.queue[:, :8].T
    torch.testing.assert_close(logits[:, 0], (q * keys).sum(1) / 0.2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(8))
    assert torch.equal(model.queue[:, 8:], queue_before[:, 8:])
    assert model.queue_ptr.tolist() == [8]
    # Gradients reach the query encoder only.
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())
    # Three steps of 8 fill K=24: the pointer wraps to 0.
    model(images(8, 3), images(8, 4))
    model(images(8, 5), images(8, 6))
    assert model.queue_ptr.tolist() == [0]


def test_momentum_update_is_one_fused_pass() -> None:
    model = MoCo(tiny, dim=16, K=32, m=0.75, mlp=True)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    bn_stats_k = [b.clone() for b in model.encoder_k.buffers()]
    calls = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Record():
        model._momentum_update_key_encoder()
    # One call updates every parameter; no per-tensor arithmetic from Python.
    assert calls.count("_foreach_lerp_") == 1
    assert not {"lerp_", "mul", "add", "add_", "mul_", "__mul__", "__add__"} & set(calls)
    for k0, k, q in zip(
        before_k, model.encoder_k.parameters(), model.encoder_q.parameters(), strict=True
    ):
        torch.testing.assert_close(k, 0.75 * k0 + 0.25 * q, atol=1e-6, rtol=1e-6)
    # BN running statistics are not averaged: the key encoder keeps its own.
    assert all(
        torch.equal(a, b) for a, b in zip(bn_stats_k, model.encoder_k.buffers(), strict=True)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_stay_float32_under_autocast(dtype: torch.dtype) -> None:
    model = MoCo(tiny, dim=16, K=16, T=0.2)
    seen: list[torch.dtype] = []
    model.encoder_q.register_forward_hook(lambda _m, _args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=dtype):
        logits, _ = model(images(8, 1), images(8, 2))
    assert seen == [dtype]  # the encoder did run in low precision
    assert logits.dtype == torch.float32
    assert model.queue.dtype == torch.float32


def test_symmetric_uses_both_views_as_queries() -> None:
    model = MoCo(tiny, dim=16, K=32, T=0.2, symmetric=True)
    model.eval()  # BN per sample: every output is a function of one image
    queue_before = model.queue.clone()
    im1, im2 = images(8, 1), images(8, 2)
    with torch.no_grad():
        logits, labels = model(im1, im2)
        q1 = F.normalize(model.encoder_q(im1), dim=1)
        q2 = F.normalize(model.encoder_q(im2), dim=1)
        k1 = F.normalize(model.encoder_k(im1), dim=1)
        k2 = F.normalize(model.encoder_k(im2), dim=1)
    assert logits.shape == (16, 33) and labels.shape == (16,)
    close = functools.partial(torch.testing.assert_close, atol=1e-5, rtol=1e-5)
    close(logits[:8, 0], (q1 * k2).sum(1) / 0.2)
    close(logits[8:, 0], (q2 * k1).sum(1) / 0.2)
    close(logits[8:, 1:], q2 @ queue_before / 0.2)
    close(model.queue[:, :16].T, torch.cat([k1, k2]))
    assert model.queue_ptr.tolist() == [16]


def test_split_bn_shuffles_keys_and_returns_each_its_own() -> None:
    model = MoCo(tiny, dim=16, K=32, bn_splits=4)
    fed: list[torch.Tensor] = []
    model.encoder_k.register_forward_pre_hook(lambda _m, args: fed.append(args[0]))
    im_q, im_k = images(8, 1), images(8, 2)
    model(im_q, im_k)
    # The key encoder saw a permutation of the key batch, not the batch itself.
    assert not torch.equal(fed[0], im_k)
    assert torch.equal(fed[0].flatten(1).sum(1).sort().values, im_k.flatten(1).sum(1).sort().values)
    # In eval mode each key must be f_k(own image): a wrong unshuffle would not be.
    model.eval()
    with torch.no_grad():
        model(im_q, im_k)
        k = F.normalize(model.encoder_k(im_k), dim=1)
    torch.testing.assert_close(model.queue[:, 8:16].T, k, atol=1e-5, rtol=1e-5)


def test_state_dict_carries_the_shuffle_generator() -> None:
    torch.manual_seed(0)
    model = MoCo(tiny, dim=16, K=32, bn_splits=4)
    model(images(8, 1), images(8, 2))  # the first shuffle seeds the generator
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert state["_extra_state"].dtype == torch.uint8 and state["_extra_state"].numel() > 0

    torch.manual_seed(1)  # another default generator: only a restored one shuffles alike
    twin = MoCo(tiny, dim=16, K=32, bn_splits=4)
    twin.load_state_dict(state, strict=True)
    logits, _ = model(images(8, 3), images(8, 4))
    logits2, _ = twin(images(8, 3), images(8, 4))
    assert torch.equal(logits, logits2)
    assert torch.equal(model.get_extra_state(), twin.get_extra_state())

    # Without the entry a strict load leaves no generator (a reference checkpoint's case).
    del state["_extra_state"]
    twin.load_state_dict(state, strict=True)
    assert twin.get_extra_state().numel() == 0
    with pytest.raises(InputError, match="shuffle generator's uint8 tensor"):
        twin.set_extra_state({"generator": None})


def test_k_must_be_a_multiple_of_the_batch() -> None:
    model = MoCo(tiny, dim=16, K=20)
    queue, weights = model.queue.clone(), model.encoder_k.conv1.weight.clone()
    with pytest.raises(ConfigError, match=r"K=20 is not a multiple of the global batch size, 8"):
        model(images(8, 1), images(8, 2))
    # Nothing changed: no partial step.
    assert torch.equal(model.queue, queue) and model.queue_ptr.tolist() == [0]
    assert torch.equal(model.encoder_k.conv1.weight, weights)
    symmetric = MoCo(tiny, dim=16, K=24, symmetric=True)
    with pytest.raises(ConfigError, match="twice the global batch size"):
        symmetric(images(8, 1), images(8, 2))
    model(images(4, 1), images(4, 2))  # 20 = 5 x 4 is fine


def test_batches_of_different_sizes_are_refused() -> None:
    model = MoCo(tiny, dim=16, K=16)
    with pytest.raises(InputError, match=r"differ in size \(8 vs 4\)"):
        model(images(8, 1), images(4, 2))
    assert model.queue_ptr.tolist() == [0]


@pytest.mark.parametrize(
    "kwargs",
    [{"K": 0}, {"m": 1.5}, {"T": 0.0}, {"bn_splits": 0}],
)
def test_bad_hyperparameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        MoCo(tiny, **kwargs)


def test_logits_gradients_are_exact_with_the_in_place_division() -> None:
    # The logits are divided by T in place on cat's output: neither backward reads the
    # values it overwrites, which gradcheck confirms against finite differences.
    model = MoCo(tiny, dim=8, K=16, T=0.2).double()
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(4, 8, generator=gen, dtype=torch.float64), dim=1)
    q.requires_grad_()
    k.requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k: model._logits(q, k, model.queue), (q, k))
    logits = model._logits(q, k, model.queue)
    expected = torch.cat([(q * k).sum(1, keepdim=True), q @ model.queue], dim=1) / 0.2
    assert torch.equal(logits, expected)
