"""Host <-> device traffic inside the training steps: one non-blocking copy a step, no reads.

A CPU cannot show a stream synchronisation, so the steps run with PyTorch's
``meta`` device standing in for the accelerator: a copy between the host and
the device is then a copy between ``cpu`` and ``meta``, which a dispatch mode
sees, and a host read of a device value (``.item()``, ``float(t)``, ``.cpu()``,
``.tolist()``) is an ``aten._local_scalar_dense`` or a copy from ``meta``.
Copies that bypass the dispatcher (``torch.tensor(..., device=...)``,
``Tensor.new_tensor``) are counted by wrapping those two, and a CPU tensor handed
to an op on the device (an implicit copy) is counted too. ``torch.autocast`` has
no meta mode; it moves no data, so it is replaced by a no-op here.

``test_gpu_steps_never_synchronise`` checks the same steps on a real GPU with
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mocohub.preprocessing import Preprocessing
from mocohub.training.config import preset
from mocohub.training.data import resolve_dataset
from mocohub.training.distributed import DistributedEnv
from mocohub.training.eval_data import AugmentedFeatures, EvalBatches, TrainBatches
from mocohub.training.eval_transforms import Recipe
from mocohub.training.lincls import _train_step
from mocohub.training.monitor import MetricsLog
from mocohub.training.progress import SYNC_EVERY, StopSignal, TrainingProgress
from mocohub.training.train import build_moco
from mocohub.training.views import ViewPipeline

_aten = torch.ops.aten


class Traffic(TorchDispatchMode):
    """Records every copy between the host and the device, and every host read of a
    device value, as ``(kind, detail)`` events."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if func == _aten._to_copy.default:
            source, target = args[0].device, kwargs.get("device") or args[0].device
            self._copy(source, target, f"{tuple(args[0].shape)} {args[0].dtype}")
        elif func == _aten.copy_.default:
            self._copy(args[1].device, args[0].device, f"{tuple(args[1].shape)} into place")
        elif func == _aten._local_scalar_dense.default and args[0].device.type != "cpu":
            self.events.append(("read", f"{func} of a {args[0].device.type} tensor"))
        elif len({t.device.type for t in tensors}) > 1 and any(
            t.device.type == "cpu" and t.dim() > 0 for t in tensors
        ):
            # A CPU tensor (not a 0-d scalar, which CUDA kernels read on the host)
            # given to an op on the device, e.g. as an index: an implicit copy.
            self.events.append(("implicit copy", str(func)))
        return func(*args, **kwargs)

    def _copy(self, source: torch.device, target: Any, what: str) -> None:
        source_host, target_host = source.type == "cpu", torch.device(target).type == "cpu"
        if source_host != target_host:
            self.events.append(("to device" if source_host else "to host", what))

    def take(self) -> list[tuple[str, str]]:
        events, self.events = self.events, []
        return events


@pytest.fixture
def traffic(monkeypatch: pytest.MonkeyPatch) -> Iterator[Traffic]:
    """A :class:`Traffic` that also sees ``torch.tensor``/``new_tensor`` made on the device."""
    mode = Traffic()
    tensor, new_tensor = torch.tensor, torch.Tensor.new_tensor

    def made_on(device: Any, data: Any) -> None:
        if device is not None and torch.device(device).type != "cpu":
            mode.events.append(("to device", f"torch.tensor({data!r}) on {device}"))

    def tensor_on(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        made_on(kwargs.get("device"), data)
        return tensor(data, *args, **kwargs)

    def new_tensor_on(self: torch.Tensor, data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        made_on(kwargs.get("device", self.device), data)
        return new_tensor(self, data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor_on)
    monkeypatch.setattr(torch.Tensor, "new_tensor", new_tensor_on)
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: contextlib.nullcontext())
    with mode:
        yield mode


def per_step(traffic: Traffic, steps: Iterator[Any], count: int) -> list[list[tuple[str, str]]]:
    """The events of each of the first ``count`` items of ``steps``: an item's events are
    those of the work done to produce it."""
    events = []
    for _ in range(count):
        item = next(steps)
        events.append(traffic.take())
        del item
    return events


META = DistributedEnv(rank=0, world_size=1, local_rank=0, device=torch.device("meta"))
CPU = DistributedEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def pretraining(env: DistributedEnv, augmentation: str = "v2", channels: int = 3) -> Any:
    """A view pipeline, MoCo, SGD and the progress tracker on ``env``'s device."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (128, channels, 20, 20), dtype=torch.uint8, generator=generator)
    dataset, info = resolve_dataset(images)
    config = preset(
        "fashion_mnist",
        augmentation=augmentation,
        augment_on="device",
        arch="resnet18",
        width=8,
        dim=16,
        K=64,
        batch_size=8,
        bn_splits=1,
        image_size=16,
        precision="fp32",
        mean=(0.5,),
        std=(0.5,),
    )
    pipeline = ViewPipeline(dataset, info, config, env)
    model = build_moco(config, info.channels).to(env.device)
    optimizer = torch.optim.SGD(
        model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4, foreach=True
    )
    log = MetricsLog(Path("unused"), enabled=False)
    tracker = TrainingProgress(config, env, pipeline.steps_per_epoch, log, StopSignal())
    return pipeline, model, optimizer, tracker


def moco_steps(env: DistributedEnv, augmentation: str = "v2", channels: int = 3) -> Iterator[int]:
    """The pre-training loop's step (as in ``train``), one step per item."""
    pipeline, model, optimizer, tracker = pretraining(env, augmentation, channels)
    scaler = torch.amp.GradScaler(env.device.type, enabled=False)
    tracker.begin_epoch(0, 0, lr=0.03)

    def steps() -> Iterator[int]:
        for step, (im_q, im_k) in pipeline.epoch(0):
            with torch.autocast(env.device.type, enabled=False):
                logits, labels = model(im_q, im_k)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            tracker.step_done(step, loss.detach(), len(im_q))
            yield step

    return steps()


@pytest.mark.parametrize(("augmentation", "channels"), [("v2", 3), ("v1", 3), ("small", 1)])
def test_each_pretraining_step_copies_once_and_reads_nothing_back(
    traffic: Traffic, augmentation: str, channels: int
) -> None:
    steps = moco_steps(META, augmentation, channels)
    traffic.take()  # setting up: the images, the model and its buffers move once
    events = per_step(traffic, steps, SYNC_EVERY - 1)
    # The first step also copies the epoch's sample indices (once an epoch).
    packed = ("to device", "(16, 11) torch.float64")
    assert events[0] == [("to device", "(16, 8) torch.int64"), packed]
    # Then only the query's and the key's augmentation parameters, packed into one copy.
    assert all(step == [packed] for step in events[1:])


def test_the_pipeline_alone_copies_the_packed_parameters_once_a_step(traffic: Traffic) -> None:
    pipeline, *_ = pretraining(META)
    traffic.take()  # setting up moves the images: once
    steps = per_step(traffic, pipeline.epoch(0, start_step=2), 4)
    assert [len(events) for events in steps] == [2, 1, 1, 1]
    assert all(kind == "to device" for events in steps for kind, _ in events)


def lincls_steps(env: DistributedEnv, recipe: Recipe) -> Iterator[int]:
    """``mocohub lincls``' step on augmented images' features, one step per item."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 20, 20), dtype=torch.uint8, generator=generator)
    dataset, info = resolve_dataset((images, torch.arange(40) % 4))
    prep = Preprocessing(16, 18, (0.5,), (0.5,), channels=1)
    train = TrainBatches(dataset, info, prep, recipe, env, batch_size=8)
    val = EvalBatches(dataset, info, prep, "small", env, batch_size=8)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone = backbone.to(env.device).eval().requires_grad_(False)
    features = AugmentedFeatures(backbone, train, val, None)
    head = nn.Linear(4, 4).to(env.device)
    optimizer = torch.optim.SGD(head.parameters(), lr=30.0, momentum=0.9, foreach=True)
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)

    def steps() -> Iterator[int]:
        for step, (batch, labels) in enumerate(features.train(0)):
            _train_step(head, optimizer, batch, labels, totals)
            yield step

    return steps()


def test_each_lincls_step_copies_once_and_reads_nothing_back(traffic: Traffic) -> None:
    steps = lincls_steps(META, "reference")
    traffic.take()
    events = per_step(traffic, steps, 5)
    # The epoch's order and, once, the mean and std; then only the packed crop parameters.
    packed = ("to device", "(8, 11) torch.float64")
    statistics = [("to device", "(1,) torch.float32")] * 2
    assert events[0] == [("to device", "(40,) torch.int64"), packed, *statistics]
    assert all(step == [packed] for step in events[1:])


def test_the_lincls_step_keeps_its_sums_on_the_device_with_the_same_values() -> None:
    torch.manual_seed(0)
    head, batch, labels = nn.Linear(4, 3), torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    logits = head(batch).detach()
    expected_loss = F.cross_entropy(logits, labels).double() * 6
    expected_hits = float((logits.argmax(1) == labels).sum())
    totals = torch.zeros(3, dtype=torch.float64)
    _train_step(head, optimizer, batch, labels, totals)
    assert totals.tolist() == [float(expected_loss), expected_hits, 6.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("work", ["pretraining", "lincls-reference", "lincls-small"])
def test_gpu_steps_never_synchronise(work: str) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    env = DistributedEnv(rank=0, world_size=1, local_rank=0, device=device)
    make: Callable[[], Iterator[int]] = {
        "pretraining": lambda: moco_steps(env),
        "lincls-reference": lambda: lincls_steps(env, "reference"),
        "lincls-small": lambda: lincls_steps(env, "small"),
    }[work]
    steps = make()
    next(steps)  # the first step: the epoch's indices, statistics and kernels set up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            next(steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
