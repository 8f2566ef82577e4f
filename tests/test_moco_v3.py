"""MoCo v3 against a transcription of the reference, step by step, in float64.

The oracle (``v3_reference.py``) is an independent transcription of facebookresearch/moco-v3's
``moco/builder.py`` (``MoCo``, ``_build_mlp``, ``MoCo_ResNet``, ``MoCo_ViT``,
``contrastive_loss``, ``_update_momentum_encoder``), of ``moco/optimizer.py``
(``LARS``) and of ``main_moco.py``'s two schedules, kept as close to the
reference's arithmetic as a one-process run allows (``concat_all_gather`` is
the identity and the rank is 0 in one process; the 2-process test runs
``MoCoV3`` itself under gloo). ``MoCoV3`` and the oracle start from the same
weights and train side by side on the same views. The oracle follows the
reference line by line on purpose (it is what the implementation is checked
against, and it lives in the tests only, never in the package; the reference is
CC-BY-NC 4.0).

Tolerances: in float64 the two differ only by rounding (a fused lerp against
``m_param * m + b_param * (1 - m)``, foreach norms against ``torch.norm``, the
order of a few sums). Measured over these steps: at most 1.3e-15 on the losses
and 1e-13 on the weights with SGD and LARS, so TOL = 1e-11 leaves a wide margin
and still catches any float32 step (float32 rounding is ~6e-8). AdamW divides
each gradient by its own running RMS, so a parameter whose gradient is zero in
exact arithmetic (the key third of the ``qkv`` bias: softmax ignores it; the
last norm's bias: the projector's first BN removes any shift) turns the two
runs' different rounding noise (~1e-18) into steps of up to lr: measured up to
4.4e-11 on those weights, hence ADAMW_TOL = 1e-9 on the weights, with the loss
still held to TOL.
"""

from __future__ import annotations

import datetime
import doctest
import functools
import importlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from v3_reference import (
    RefLARS,
    RefMoCo,
    RefMoCoResNet,
    RefMoCoViT,
    ref_adjust_learning_rate,
    ref_adjust_moco_momentum,
)

from mocohub.backbones import resnet18, resnet50
from mocohub.errors import ConfigError, InputError
from mocohub.training import MoCoV3
from mocohub.training.distributed import wrap_ddp
from mocohub.training.lars import LARS
from mocohub.training.schedule import cosine_momentum, warmup_cosine_lr
from mocohub.vit import vit_nano, vit_small

TOL = 1e-11
ADAMW_TOL = 1e-9
BATCH, DIM, MLP_DIM, STEPS = 8, 16, 32, 4
tiny_resnet = functools.partial(resnet18, small_stem=True, width=8)


# ---------------------------------------------------------------------------
# Side by side.
# ---------------------------------------------------------------------------

# name: (encoder, oracle class, T, image channels, optimizer)
CONFIGS: dict[str, tuple[Callable[..., nn.Module], type[RefMoCo], float, int, str]] = {
    "resnet-sgd": (tiny_resnet, RefMoCoResNet, 1.0, 3, "sgd"),
    "resnet-lars": (tiny_resnet, RefMoCoResNet, 1.0, 3, "lars"),
    "vit-adamw": (vit_nano, RefMoCoViT, 0.2, 1, "adamw"),
}


def _optimizers(kind: str, model: nn.Module, oracle: nn.Module) -> tuple[Any, Any]:
    # Both get all parameters, as main_moco.py passes model.parameters().
    if kind == "sgd":
        make = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4)
        return make(model.parameters()), make(oracle.parameters())
    if kind == "lars":
        kwargs = {"lr": 2.0, "weight_decay": 1e-4, "momentum": 0.9}
        return LARS(model.parameters(), **kwargs), RefLARS(oracle.parameters(), **kwargs)
    make = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    return make(model.parameters()), make(oracle.parameters())


def _views(step: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Two "augmentations" of the same images: a flip and independent noise.
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, channels, 16, 16, generator=g, dtype=torch.float64)
    noise = functools.partial(torch.randn, x.shape, generator=g, dtype=torch.float64)
    return x + 0.3 * noise(), x.flip(-1) + 0.3 * noise()


def _module_diff(a: nn.Module, b: nn.Module) -> float:
    """The largest difference over parameters and float buffers; integer buffers equal."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    diffs = [0.0]
    for name, value in sa.items():
        other = sb[name]
        if value.is_floating_point():
            assert value.dtype == other.dtype == torch.float64, name
            diffs.append((value - other).abs().max().item())
        else:
            assert torch.equal(value, other), name
    return max(diffs)


def _run(
    name: str, oracle_class: type[RefMoCo] | None = None
) -> tuple[list[dict[str, float]], float]:
    """Train MoCoV3 and the oracle side by side: per-step differences, and how far
    the weights moved (so that a small difference means something)."""
    encoder, default_oracle, T, channels, kind = CONFIGS[name]
    torch.manual_seed(0)
    model = MoCoV3(encoder, dim=DIM, mlp_dim=MLP_DIM, T=T).double().train()
    oracle = (oracle_class or default_oracle)(encoder, DIM, MLP_DIM, T).double().train()
    oracle.load_state_dict(model.state_dict(), strict=True)
    opt_model, opt_oracle = _optimizers(kind, model, oracle)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    diffs = []
    for step in range(STEPS):
        x1, x2 = _views(step, channels)
        m_model = cosine_momentum(0.9, step, epochs=STEPS)
        m_oracle = ref_adjust_moco_momentum(step, 0.9, STEPS)
        loss = model(x1, x2, m_model)
        opt_model.zero_grad()
        loss.backward()
        opt_model.step()
        ref_loss = oracle(x1.clone(), x2.clone(), m_oracle)
        opt_oracle.zero_grad()
        ref_loss.backward()
        opt_oracle.step()
        assert loss.dtype == ref_loss.dtype == torch.float64
        diffs.append(
            {
                "loss": abs(loss.item() - ref_loss.item()),
                "base_encoder": _module_diff(model.base_encoder, oracle.base_encoder),
                "momentum_encoder": _module_diff(model.momentum_encoder, oracle.momentum_encoder),
                "predictor": _module_diff(model.predictor, oracle.predictor),
            }
        )
    final = model.state_dict()
    moved = min(  # the least any of the three parts moved (its largest change)
        max(
            (final[k] - initial[k]).abs().max().item()
            for k in initial
            if k.startswith(part + ".") and initial[k].is_floating_point()
        )
        for part in ("base_encoder", "momentum_encoder", "predictor")
    )
    return diffs, moved


def _report(diffs: list[dict[str, float]]) -> str:
    return "\n".join(
        f"step {i}: " + ", ".join(f"{k}={v:.2g}" for k, v in d.items()) for i, d in enumerate(diffs)
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float64_moco_v3_matches_the_reference_for_several_steps(name: str) -> None:
    diffs, moved = _run(name)
    weight_tol = ADAMW_TOL if CONFIGS[name][4] == "adamw" else TOL
    assert moved > 1e4 * weight_tol, f"the weights barely moved ({moved}): the comparison is empty"
    for step, d in enumerate(diffs):
        for key, value in d.items():
            tol = TOL if key == "loss" else weight_tol
            assert value <= tol, f"{name}: {key} differs at step {step}\n{_report(diffs)}"


class _OwnViewKeys(RefMoCoResNet):
    """A wrong MoCo v3: queries against the keys of their own view."""

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k1) + self.contrastive_loss(q2, k2)


class _PredictorWithLastBN(RefMoCoResNet):
    """A wrong MoCo v3 ResNet: the ViT's predictor (last BN) on a ResNet."""

    def _build_projector_and_predictor_mlps(self, dim: int, mlp_dim: int) -> None:
        super()._build_projector_and_predictor_mlps(dim, mlp_dim)
        self.predictor = self._build_mlp(2, dim, mlp_dim, dim, True)


def test_the_comparison_catches_a_wrong_pairing_of_views() -> None:
    """Negative control: the side-by-side run fails for an oracle that pairs each
    query with its own view's key; the tolerance is far below the difference."""
    diffs, _ = _run("resnet-sgd", _OwnViewKeys)
    assert diffs[0]["loss"] > 1e6 * TOL, _report(diffs)


def test_a_resnet_predictor_has_no_last_bn_unlike_a_vit_s() -> None:
    """The ResNet predictor's layout is the reference's: an oracle with a last BN
    (the ViT's predictor) has a different state dict, so it cannot even load."""
    torch.manual_seed(0)
    model = MoCoV3(tiny_resnet, dim=DIM, mlp_dim=MLP_DIM)
    with pytest.raises(RuntimeError, match=r"predictor\.4"):
        _PredictorWithLastBN(tiny_resnet, DIM, MLP_DIM, 1.0).load_state_dict(model.state_dict())
    vit = MoCoV3(vit_nano, dim=DIM, mlp_dim=MLP_DIM)
    assert isinstance(vit.predictor[4], nn.BatchNorm1d) and not vit.predictor[4].affine
    assert len(vit.base_encoder.head) == 8 and len(model.base_encoder.fc) == 5


@pytest.mark.parametrize(
    ("encoder", "oracle_class"), [(tiny_resnet, RefMoCoResNet), (vit_nano, RefMoCoViT)]
)
def test_one_seed_gives_the_reference_s_initial_weights(
    encoder: Callable[..., nn.Module], oracle_class: type[RefMoCo]
) -> None:
    """MoCoV3 builds its modules in the reference's order: the same seed gives the
    same initial weights (a run seeded like a reference run starts where it did)."""
    torch.manual_seed(1)
    model = MoCoV3(encoder, dim=DIM, mlp_dim=MLP_DIM)
    torch.manual_seed(1)
    oracle = oracle_class(encoder, DIM, MLP_DIM, 1.0)
    assert _module_diff(model.double(), oracle.double()) == 0.0
    # The parameters come in the same order too (optimizer state is stored by position).
    shapes = [p.shape for p in model.parameters()]
    assert shapes == [p.shape for p in oracle.parameters()]
    assert [p.requires_grad for p in model.parameters()] == [
        p.requires_grad for p in oracle.parameters()
    ]


def test_a_reference_checkpoint_loads_strictly_and_computes_the_same_loss() -> None:
    """A reference-format checkpoint (``module.`` + the oracle's keys, as main_moco.py
    saves it from DDP) loads into MoCoV3 with strict=True and gives the same loss."""
    torch.manual_seed(2)
    oracle = RefMoCoResNet(tiny_resnet, DIM, MLP_DIM, 1.0).double()
    checkpoint = {
        "epoch": 100,
        "arch": "resnet50",
        "state_dict": {f"module.{k}": v for k, v in oracle.state_dict().items()},
    }
    torch.manual_seed(3)  # different initial weights, all overwritten by the load
    model = MoCoV3(tiny_resnet, dim=DIM, mlp_dim=MLP_DIM).double()
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    assert str(model.load_state_dict(state, strict=True)) == "<All keys matched successfully>"
    x1, x2 = _views(0, 3)
    assert abs(model(x1, x2, 0.99).item() - oracle(x1, x2, 0.99).item()) <= TOL


@pytest.mark.parametrize(
    ("ours", "theirs", "oracle_class"),
    [
        (functools.partial(resnet50, zero_init_residual=True), "resnet50", RefMoCoResNet),
        (vit_small, "vit_small", RefMoCoViT),
    ],
)
def test_full_size_state_dicts_have_the_reference_keys_and_shapes(
    ours: Callable[..., nn.Module], theirs: str, oracle_class: type[RefMoCo]
) -> None:
    """ResNet-50 and ViT-S at the reference's sizes (dim 256, MLP 4096), on the meta
    device (no memory, no init): the keys and shapes of the reference's checkpoints,
    the oracle built on torchvision's resnet50 and on the reference's ViT-S (timm's
    VisionTransformer with vits.py's arguments)."""
    import torchvision
    from timm.models.vision_transformer import VisionTransformer

    reference_encoders: dict[str, Callable[..., nn.Module]] = {
        "resnet50": functools.partial(torchvision.models.resnet50, zero_init_residual=True),
        "vit_small": functools.partial(
            VisionTransformer,
            patch_size=16,
            embed_dim=384,
            depth=12,
            num_heads=12,
            mlp_ratio=4,
            qkv_bias=True,
            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        ),
    }
    with torch.device("meta"):
        model = MoCoV3(ours, dim=256, mlp_dim=4096)
        oracle = oracle_class(reference_encoders[theirs], 256, 4096, 1.0)
    ours_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in oracle.state_dict().items()}
    assert ours_shapes == theirs_shapes
    head = "fc" if theirs == "resnet50" else "head"
    assert ours_shapes[f"base_encoder.{head}.0.weight"][0] == 4096
    assert ours_shapes["predictor.3.weight"] == (256, 4096)


def test_the_base_encoder_of_a_reference_vit_checkpoint_loads_as_a_backbone() -> None:
    """convert_to_deit.py keeps ``base_encoder.*`` less ``head``: that loads strictly into
    the ViT with no head, whose class token is then the pooled feature."""
    torch.manual_seed(4)
    oracle = RefMoCoViT(vit_nano, DIM, MLP_DIM, 0.2).eval()
    state = {f"module.{k}": v for k, v in oracle.state_dict().items()}
    prefix = "module.base_encoder."
    deit = {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix) and not k.startswith(prefix + "head")
    }
    backbone = vit_nano(num_classes=0).eval()
    backbone.load_state_dict(deit, strict=True)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        pooled, _ = backbone.forward_cls_and_patches(x)
        torch.testing.assert_close(oracle.base_encoder.head(pooled), oracle.base_encoder(x))


def test_sync_batchnorm_conversion_keeps_the_checkpoint_keys() -> None:
    """Under DDP on GPUs every BN becomes SyncBatchNorm, as the reference does: the MLPs'
    BatchNorm1d (affine or not) and the encoders' BatchNorm2d, with the same state-dict
    keys, so a checkpoint of a synced run loads into a plain model and the other way."""
    model = MoCoV3(tiny_resnet, dim=DIM, mlp_dim=MLP_DIM)
    state = model.state_dict()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert any(not m.affine for m in norms)  # the projector's and predictor's last BN
    assert list(synced.state_dict()) == list(state)
    fresh = MoCoV3(tiny_resnet, dim=DIM, mlp_dim=MLP_DIM)
    fresh.load_state_dict(synced.state_dict(), strict=True)


# ---------------------------------------------------------------------------
# Schedules and LARS.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("m0", "epochs"), [(0.99, 100), (0.996, 1000), (0.99, 300)])
def test_cosine_momentum_is_the_reference_s_at_chosen_steps(m0: float, epochs: int) -> None:
    steps_per_epoch = 1251  # ImageNet at batch 1024
    for epoch, step in [(0, 0), (0, 1), (1, 600), (epochs // 2, 0), (epochs - 1, 1250)]:
        t = epoch + step / steps_per_epoch
        assert cosine_momentum(m0, t, epochs=epochs) == ref_adjust_moco_momentum(t, m0, epochs)
    assert cosine_momentum(m0, 0, epochs=epochs) == pytest.approx(m0, abs=1e-15)
    assert cosine_momentum(m0, epochs, epochs=epochs) == 1.0
    assert cosine_momentum(m0, epochs / 2, epochs=epochs) == pytest.approx((1 + m0) / 2)


def test_warmup_cosine_lr_is_the_reference_s_at_chosen_steps() -> None:
    lr = 1.5e-4 * 4096 / 256
    for t in (0.0, 0.5, 39.99, 40.0, 41.3, 150.0, 299.999):
        assert warmup_cosine_lr(lr, t, epochs=300, warmup_epochs=40) == ref_adjust_learning_rate(
            t, lr, 40, 300
        )


def _lars_params() -> list[nn.Parameter]:
    torch.manual_seed(5)
    return [
        nn.Parameter(torch.randn(4, 3, 3, 3, dtype=torch.float64)),  # a conv kernel
        nn.Parameter(torch.randn(6, 5, dtype=torch.float64)),  # a linear weight
        nn.Parameter(torch.randn(4, dtype=torch.float64)),  # a bias / BN weight
        nn.Parameter(torch.zeros(3, 2, dtype=torch.float64)),  # a zero matrix: ratio 1
        nn.Parameter(torch.randn(1, dtype=torch.float64)),  # a 1-element parameter
        nn.Parameter(torch.randn(2, 2, dtype=torch.float64)),  # no gradient: untouched
    ]


def test_lars_matches_the_reference_step_by_step() -> None:
    ours, theirs = _lars_params(), _lars_params()
    kwargs = {"lr": 0.7, "weight_decay": 0.05, "momentum": 0.9}
    opt, ref = LARS(ours, **kwargs), RefLARS(theirs, **kwargs)
    start = [p.detach().clone() for p in ours]
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(ours[:-1], theirs[:-1], strict=True):
            a.grad = torch.randn(a.shape, generator=g, dtype=torch.float64)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            torch.testing.assert_close(a, b, atol=1e-15, rtol=1e-14, msg=f"param {i}")
    assert torch.equal(ours[-1].detach(), start[-1])  # no gradient: no step, no state
    assert ours[-1] not in opt.state
    # The state is the reference's ("mu"), so its optimizer state dict loads as it is.
    resumed = LARS(_lars_params(), **kwargs)
    resumed.load_state_dict(ref.state_dict())
    assert torch.equal(resumed.state_dict()["state"][0]["mu"], opt.state_dict()["state"][0]["mu"])


def test_lars_leaves_one_dimensional_parameters_out_of_decay_and_trust_ratio() -> None:
    """One step from zero momentum: a 1-D parameter moves by exactly lr * grad (no weight
    decay, no trust ratio); a matrix by lr * trust * |w| / |g + wd w| * (g + wd w)."""
    vector = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    matrix = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    zero = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = LARS([vector, matrix, zero], lr=0.5, weight_decay=0.1, momentum=0.9)
    vector.grad = torch.tensor([0.2, 0.4, -0.6], dtype=torch.float64)
    matrix.grad = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)
    zero.grad = torch.full((2, 2), 0.25, dtype=torch.float64)
    v0, w0 = vector.detach().clone(), matrix.detach().clone()
    opt.step()
    torch.testing.assert_close(vector.detach(), v0 - 0.5 * vector.grad, atol=0, rtol=0)
    update = matrix.grad + 0.1 * w0
    ratio = 0.001 * w0.norm() / update.norm()
    torch.testing.assert_close(matrix.detach(), w0 - 0.5 * ratio * update, atol=1e-15, rtol=0)
    # |w| = 0: the trust ratio is 1, so the step is the (decayed) gradient itself.
    torch.testing.assert_close(zero.detach(), torch.full((2, 2), -0.125, dtype=torch.float64))


def test_lars_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError, match="momentum in"):
        LARS([nn.Parameter(torch.ones(1))], momentum=1.0)


# ---------------------------------------------------------------------------
# Errors, precision, docstrings.
# ---------------------------------------------------------------------------


def test_bad_inputs_get_one_clear_error() -> None:
    model = MoCoV3(tiny_resnet, dim=DIM, mlp_dim=MLP_DIM)
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(InputError, match="two views differ in shape"):
        model(x, torch.randn(3, 3, 16, 16), 0.99)
    with pytest.raises(ConfigError, match=r"momentum m must lie in \[0, 1\]"):
        model(x, x, 1.5)
    with pytest.raises(ConfigError, match="temperature"):
        MoCoV3(tiny_resnet, T=0)
    with pytest.raises(ConfigError, match=r"`fc` .* or `head`.*neither"):
        MoCoV3(lambda num_classes: nn.Sequential(nn.Linear(3, num_classes)))


def test_the_loss_is_float32_under_bf16_autocast() -> None:
    """Logits / T reach 1/T: the loss stays float32 under autocast (the model's
    features are bf16), and equals the float32 loss of those same features."""
    torch.manual_seed(6)
    model = MoCoV3(vit_nano, dim=DIM, mlp_dim=MLP_DIM, T=0.2)
    x1, x2 = _views(0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x1.float(), x2.float(), 1.0)
    assert loss.dtype == torch.float32
    assert math.isfinite(loss.item())


@pytest.mark.parametrize(
    "name", ["mocohub.training.moco_v3", "mocohub.training.lars", "mocohub.training.schedule"]
)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------
# Two processes (gloo) against one process with the concatenated batch.
# ---------------------------------------------------------------------------

WORLD, LOCAL_BATCH, DDP_STEPS = 2, 4, 3
DDP_MODELS: dict[str, tuple[Callable[..., nn.Module], int, float]] = {
    "resnet": (tiny_resnet, 3, 1.0),
    "vit": (vit_nano, 1, 0.2),
}


def _global_batch(step: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(WORLD * LOCAL_BATCH, channels, 16, 16, generator=g, dtype=torch.float64)
    return x, x.flip(-1) + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)


def _per_rank_batchnorm(model: nn.Module, world: int) -> nn.Module:
    """Make every BatchNorm normalise each of ``world`` contiguous chunks of its batch
    on its own: what DDP ranks without SyncBatchNorm compute, in one process. The
    running statistics are left alone (the loss in training mode never reads them)."""

    def chunked(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
        chunks = [
            F.batch_norm(c, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
            for c in x.chunk(world)
        ]
        return torch.cat(chunks)

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.forward = functools.partial(chunked, module)  # type: ignore[method-assign]
    return model


def _train(
    model: nn.Module,
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    forward: Callable[..., torch.Tensor],
) -> list[torch.Tensor]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5, momentum=0.9)
    losses = []
    for step in range(DDP_STEPS):
        x1, x2 = batches(step)
        loss = forward(x1, x2, cosine_momentum(0.9, step, epochs=DDP_STEPS))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def _share(step: int, *, rank: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s contiguous share of step ``step``'s global batch."""
    x1, x2 = _global_batch(step, channels)
    share = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x1[share], x2[share]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    address = f"tcp://127.0.0.1:{port}"
    # A rank left waiting fails within two minutes instead of gloo's default half hour.
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group(
        "gloo", init_method=address, rank=rank, world_size=WORLD, timeout=timeout
    )
    try:
        results = {}
        for name, (encoder, channels, T) in DDP_MODELS.items():
            torch.manual_seed(0)  # the same initial weights on both ranks
            model = MoCoV3(encoder, dim=DIM, mlp_dim=MLP_DIM, T=T).double().train()
            ddp = wrap_ddp(model, torch.device("cpu"))
            losses = _train(model, functools.partial(_share, rank=rank, channels=channels), ddp)
            mean = torch.stack(losses)
            dist.all_reduce(mean)
            results[name] = {
                "loss": torch.stack(losses),
                "mean_loss": mean / WORLD,
                "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            }
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    out = tmp_path_factory.mktemp("moco_v3_ddp")
    mp.spawn(_ddp_worker, args=(port, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _one_process(name: str, *, per_rank_bn: bool) -> tuple[list[torch.Tensor], nn.Module]:
    encoder, channels, T = DDP_MODELS[name]
    torch.manual_seed(0)
    model = MoCoV3(encoder, dim=DIM, mlp_dim=MLP_DIM, T=T).double().train()
    if per_rank_bn:
        _per_rank_batchnorm(model, WORLD)
    losses = _train(model, lambda step: _global_batch(step, channels), model)
    return losses, model


@pytest.mark.slow  # two new processes import torch and timm
@pytest.mark.parametrize("name", list(DDP_MODELS))
def test_two_ranks_train_as_one_process_on_the_concatenated_batch(
    two_ranks: list[dict[str, Any]], name: str
) -> None:
    """Two gloo ranks, each with half of a global batch, against one process with the
    whole batch. The keys are gathered, query i of rank r is labelled N * r + i, and
    DDP averages the gradients: the mean of the ranks' losses is the one-process loss,
    and the weights agree, for several steps. BatchNorm is the one difference that
    must be matched: without SyncBatchNorm (torch has none for the CPU) each rank
    normalises its own half, so the one-process run normalises each half on its own
    (on GPUs the reference converts every BN to SyncBatchNorm, and then plain BN over
    the whole batch is the match). A rank-1 label without the offset N * r, or keys
    not gathered, would change rank 1's loss and all gradients.

    Tolerances (float64): the ranks run on one thread and this process on several,
    so sums are rounded in other orders, then amplified by BN over 4 samples and
    three SGD steps at lr 0.5. Measured: losses within 2e-12, weights within 3e-13
    (ResNet) and 1.5e-10 on weights that grew to 1.4e3 (ViT: 1e-13 relative); a
    float32 step anywhere would be off by more than 1e-6."""
    rank0, rank1 = (r[name] for r in two_ranks)
    losses, model = _one_process(name, per_rank_bn=True)
    assert not torch.allclose(rank0["loss"], rank1["loss"])  # each rank's own queries
    torch.testing.assert_close(rank0["mean_loss"], torch.stack(losses), atol=1e-10, rtol=0)
    torch.testing.assert_close(rank1["mean_loss"], rank0["mean_loss"], atol=0, rtol=0)
    for key, value in model.named_parameters():
        assert torch.equal(rank0["params"][key], rank1["params"][key]), key
        torch.testing.assert_close(rank0["params"][key], value.detach(), atol=1e-9, rtol=1e-9)


@pytest.mark.slow
def test_the_per_rank_bn_matters_for_that_match(two_ranks: list[dict[str, Any]]) -> None:
    """Negative control: plain BN over the whole batch (SyncBatchNorm's maths) in the
    one-process run does not give the two gloo ranks' losses."""
    losses, _ = _one_process("resnet", per_rank_bn=False)
    assert (two_ranks[0]["resnet"]["mean_loss"] - torch.stack(losses)).abs().max() > 1e-6
