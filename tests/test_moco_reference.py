"""MoCo in float64 against the reference ``moco/builder.py``, step by step.

The reference (facebookresearch/moco) is transcribed, independently of
``training/moco.py``, in ``bench/reference_moco.py`` (where the benchmarks use it
as their baseline); in one process it has no batch shuffle and no gather. Both
models start from the same state and train side by side with the same SGD for a
few steps, the queue wrapping around once. In float64 the two differ only by
rounding (a fused lerp against ``k * m + q * (1 - m)``, the order of a few
sums): measured at most 6e-14 on the logits (scaled by 1/T) and 6e-15 on the
rest over these steps, so 1e-12 leaves a margin of 15x and still catches any
float32 step in the computation (float32 rounding is ~6e-8).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocohub.backbones import resnet18
from mocohub.training import MoCo
from mocohub.training import moco as moco_module

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-12
BATCH, DIM, IMAGE, STEPS = 8, 16, 16, 5
tiny = functools.partial(resnet18, small_stem=True, width=8)

# name: (mlp, T, m, K). 5 steps of 8 keys into K = 32: the pointer wraps at step 4.
CONFIGS = {"v1": (False, 0.07, 0.999, 32), "v2-mlp": (True, 0.2, 0.9, 32)}


def _reference_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "reference_moco", ROOT / "bench" / "reference_moco.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _views(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Two "augmentations" of the same images (a flip, independent noise): pure
    # noise pairs make the tiny BatchNorm network badly conditioned.
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64)
    noise = functools.partial(torch.randn, x.shape, generator=g, dtype=torch.float64)
    return x + 0.3 * noise(), x.flip(-1) + 0.3 * noise()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float64, (a.dtype, b.dtype)
    return (a - b).abs().max().item()


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers: the state dict less mocohub's shuffle-generator state,
    which the reference builder does not have."""
    return {k: v for k, v in module.state_dict().items() if k != "_extra_state"}


def _module_diff(a: nn.Module, b: nn.Module) -> float:
    """The largest difference over parameters and float buffers (BN statistics)."""
    sa, sb = _weights(a), _weights(b)
    assert list(sa) == list(sb)
    diffs = [_max_diff(sa[name], sb[name]) for name in sa if sa[name].is_floating_point()]
    for name in sa:
        if not sa[name].is_floating_point():  # num_batches_tracked: exactly equal
            assert torch.equal(sa[name], sb[name]), name
    return max(diffs)


def _run(name: str) -> list[dict[str, float]]:
    """Train MoCo and the reference side by side; per step, the largest differences."""
    mlp, T, m, K = CONFIGS[name]
    torch.manual_seed(0)
    model = MoCo(tiny, dim=DIM, K=K, m=m, T=T, mlp=mlp).double().train()
    reference = _reference_module().ReferenceMoCo(tiny, dim=DIM, K=K, m=m, T=T, mlp=mlp)
    reference = reference.double().train()
    reference.load_state_dict(_weights(model), strict=True)
    assert reference.queue.dtype == torch.float64

    def sgd(module: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            module.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4
        )

    opt_model, opt_reference = sgd(model), sgd(reference)
    initial_k = {k: v.clone() for k, v in model.encoder_k.state_dict().items()}
    diffs = []
    for step in range(STEPS):
        im_q, im_k = _views(step)
        logits, labels = model(im_q, im_k)
        loss = F.cross_entropy(logits, labels)
        opt_model.zero_grad()
        loss.backward()
        opt_model.step()

        ref_logits, ref_labels = reference(im_q.clone(), im_k.clone())
        ref_loss = F.cross_entropy(ref_logits, ref_labels)
        opt_reference.zero_grad()
        ref_loss.backward()
        opt_reference.step()

        assert torch.equal(labels, ref_labels)
        assert model.queue_ptr.tolist() == reference.queue_ptr.tolist()
        diffs.append(
            {
                "logits": _max_diff(logits.detach(), ref_logits.detach()),
                "loss": _max_diff(loss.detach(), ref_loss.detach()),
                "queue": _max_diff(model.queue, reference.queue),
                "encoder_q": _module_diff(model.encoder_q, reference.encoder_q),
                "encoder_k": _module_diff(model.encoder_k, reference.encoder_k),
            }
        )
    assert model.queue_ptr.tolist() == [STEPS * BATCH % K]  # it wrapped around K
    assert STEPS * BATCH > K
    # Both encoders moved far beyond the tolerance, so comparing them means something.
    moved = max(
        (v - initial_k[k]).abs().max().item() for k, v in model.encoder_k.named_parameters()
    )
    assert moved > 1000 * TOL, moved
    return diffs


def _report(diffs: list[dict[str, float]]) -> str:
    return "\n".join(
        f"step {i}: " + ", ".join(f"{key}={value:.2g}" for key, value in d.items())
        for i, d in enumerate(diffs)
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float64_moco_matches_the_reference_for_several_sgd_steps(name: str) -> None:
    diffs = _run(name)
    for step, d in enumerate(diffs):
        for key, value in d.items():
            assert value <= TOL, f"{name}: {key} differs at step {step}\n{_report(diffs)}"


def test_comparison_catches_features_rounded_to_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: features that pass through float32 (what casting a
    float64 model's features down would do) must miss the tolerance by far."""
    monkeypatch.setattr(moco_module, "_at_least_float32", lambda x: x.float().double())
    diffs = _run("v2-mlp")
    assert max(d["logits"] for d in diffs) > 1000 * TOL, _report(diffs)
    assert max(d["encoder_q"] for d in diffs) > 1000 * TOL, _report(diffs)


def test_float64_model_keeps_float64_features_and_queue() -> None:
    model = MoCo(tiny, dim=DIM, K=16, T=0.2).double()
    queue_before = model.queue.clone()
    im_q, im_k = _views(0)
    logits, _ = model(im_q, im_k)
    assert logits.dtype == model.queue.dtype == torch.float64
    # The negatives are exactly q @ queue in float64, not a float32 product.
    with torch.no_grad():
        q = F.normalize(model.encoder_q(im_q), dim=1)
    torch.testing.assert_close(logits[:, 1:], q @ queue_before / 0.2, atol=TOL, rtol=0)
