"""The training loop's SGD: torch's fused kernel where it has one, with the foreach path's
exact results, also after resuming a checkpoint written with another kernel."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import TINY_TRAIN

from mocohub.training import checkpoint as ckpt
from mocohub.training import train as train_module
from mocohub.training.config import preset
from mocohub.training.optim import build_optimizer, sgd_kernel, use_fastest_sgd_kernel
from mocohub.training.train import TrainingInterrupted, build_moco, lr_at, train

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "fashion-mnist"
CPU = torch.device("cpu")


def tiny_config(**overrides: object):
    # Plain BN: what is tested here is the optimizer, whatever the encoders' layers.
    return preset("fashion_mnist", **{**TINY_TRAIN, "bn_splits": 1, **overrides})


def test_the_loop_builds_a_fused_sgd_on_the_cpu_over_the_query_encoder() -> None:
    config = tiny_config()
    model = build_moco(config, in_channels=1)
    optimizer = build_optimizer(config, model, CPU)
    (group,) = optimizer.param_groups
    assert group["fused"] is True and not group["foreach"]
    assert group["params"] == list(model.encoder_q.parameters())
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (
        lr_at(config, 0),
        config.momentum,
        config.weight_decay,
    )


def test_devices_without_a_fused_kernel_keep_the_foreach_path() -> None:
    assert sgd_kernel(torch.device("cuda", 1)) == {"fused": True, "foreach": None}
    assert sgd_kernel(torch.device("meta")) == {"fused": None, "foreach": True}


def _moco_steps(optimizer_for: Any, steps: int = 3) -> tuple[list[torch.Tensor], list[Any]]:
    """``steps`` MoCo steps (fp32) from one seed; the weights and momentum
    buffers after them."""
    config = tiny_config()
    torch.manual_seed(0)
    model = build_moco(config, in_channels=1)
    optimizer = optimizer_for(config, model)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        im_q, im_k = torch.randn(2, 32, 1, 28, 28, generator=generator)
        model.set_shuffle_seed(step)
        logits, labels = model(im_q, im_k)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
    buffers = [optimizer.state[p]["momentum_buffer"] for p in model.encoder_q.parameters()]
    return [t.detach() for t in model.state_dict().values()], buffers


def test_fused_sgd_gives_the_foreach_steps_bit_for_bit() -> None:
    fused = _moco_steps(lambda config, model: build_optimizer(config, model, CPU))
    foreach = _moco_steps(
        lambda config, model: torch.optim.SGD(
            model.encoder_q.parameters(),
            lr=lr_at(config, 0),
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            foreach=True,
        )
    )
    for a, b in zip(fused[0] + fused[1], foreach[0] + foreach[1], strict=True):
        assert torch.equal(a, b)


def test_loading_a_state_dict_then_restoring_the_kernel() -> None:
    config = tiny_config()
    model = build_moco(config, in_channels=1)
    old = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9, foreach=True)
    optimizer = build_optimizer(config, model, CPU)
    optimizer.load_state_dict(old.state_dict())
    assert optimizer.param_groups[0]["foreach"] is True  # torch takes the saved flags
    use_fastest_sgd_kernel(optimizer, CPU)
    assert optimizer.param_groups[0]["fused"] is True and not optimizer.param_groups[0]["foreach"]


def test_resuming_a_foreach_checkpoint_runs_fused_and_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(epochs=2)  # 300 images / 32 = 9 steps per epoch
    train(config, SAMPLES, tmp_path / "straight", progress=False)

    # Epoch 1 as an older mocohub ran it: foreach SGD, saved in the checkpoint's groups.
    def foreach_sgd(config: Any, model: Any, device: torch.device) -> torch.optim.SGD:
        optimizer = build_optimizer(config, model, device)
        for group in optimizer.param_groups:
            group.update(fused=None, foreach=True)
        return optimizer

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "build_optimizer", foreach_sgd)
        with pytest.raises(TrainingInterrupted):
            train(config, SAMPLES, tmp_path / "resumed", progress=False, stop_after_steps=5)
    saved = ckpt.load_checkpoint(ckpt.find_latest_checkpoint(tmp_path / "resumed"))
    assert saved["optimizer"]["param_groups"][0]["foreach"] is True

    kernels: list[tuple[Any, Any]] = []
    sgd_module = importlib.import_module("torch.optim.sgd")  # SGD.step calls its sgd()
    sgd = sgd_module.sgd

    def spy(*args: Any, **kwargs: Any) -> None:
        kernels.append((kwargs["fused"], kwargs["foreach"]))
        sgd(*args, **kwargs)

    monkeypatch.setattr(sgd_module, "sgd", spy)
    train(config, SAMPLES, tmp_path / "resumed", resume="auto", progress=False)
    assert len(kernels) == 9 and set(kernels) == {(True, None)}

    straight = ckpt.load_checkpoint(ckpt.find_latest_checkpoint(tmp_path / "straight"))
    resumed = ckpt.load_checkpoint(ckpt.find_latest_checkpoint(tmp_path / "resumed"))
    assert (straight["epoch"], straight["step"]) == (resumed["epoch"], resumed["step"]) == (2, 0)
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, value in straight["optimizer"]["state"].items():
        assert torch.equal(
            value["momentum_buffer"], resumed["optimizer"]["state"][key]["momentum_buffer"]
        )
