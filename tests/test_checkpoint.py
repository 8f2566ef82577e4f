"""Training checkpoints: atomic writes, pruning, finding, safe loading and exact resume."""

# The checkpoint saves NumPy's legacy global generator, so the tests must use it.
# ruff: noqa: NPY002

from __future__ import annotations

import functools
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mocohub.backbones import resnet18
from mocohub.errors import ConfigError, InputError
from mocohub.training.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    LAST_NAME,
    atomic_save,
    find_latest_checkpoint,
    is_reference_checkpoint,
    load_checkpoint,
    moco_state_from_reference,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from mocohub.training.moco import MoCo
from mocohub.training.rng import capture_rng_state, restore_rng_state

BATCH, K = 4, 16


def tiny_moco(seed: int, bn_splits: int = 2, dim: int = 16) -> MoCo:
    torch.manual_seed(seed)
    encoder = functools.partial(resnet18, small_stem=True, width=8)
    return MoCo(encoder, dim=dim, K=K, m=0.99, T=0.2, mlp=True, bn_splits=bn_splits)


def run_objects(
    model: MoCo,
) -> tuple[torch.optim.SGD, torch.amp.GradScaler, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    return optimizer, scaler, scheduler


def train_step(
    model: MoCo,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> torch.Tensor:
    """One step whose inputs come from all three global generators."""
    noise = float(np.random.rand()) * random.random()
    im_q = torch.randn(BATCH, 3, 16, 16)
    im_k = im_q + noise * torch.randn(BATCH, 3, 16, 16)
    logits, labels = model(im_q, im_k)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach().clone()


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- atomic writes ---------------------------------------------------------


def test_atomic_save_keeps_old_file_when_save_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.pt"
    atomic_save({"v": torch.tensor(1)}, target)

    def fail_midway(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"PK\x03\x04 half a zip archive")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"v": torch.tensor(2)}, target)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"v": torch.tensor(3)}, tmp_path / "new.pt")
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    assert int(torch.load(target, weights_only=True)["v"]) == 1
    atomic_save({"v": torch.tensor(4)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    assert int(torch.load(target, weights_only=True)["v"]) == 4


def test_atomic_save_into_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="create that folder"):
        atomic_save({}, tmp_path / "absent" / "state.pt")


# --- naming, pruning, finding -----------------------------------------------


def numbered(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name != LAST_NAME)


def test_keep_last_prunes_older_and_points_last_at_newest(tmp_path: Path) -> None:
    for i, (epoch, step) in enumerate([(0, 10), (0, 20), (1, 30), (1, 40), (2, 50)]):
        path = save_checkpoint(tmp_path, {"i": torch.tensor(i)}, epoch=epoch, step=step)
        assert path.name == f"checkpoint_{epoch:04d}_{step:08d}.pt"
    assert numbered(tmp_path) == ["checkpoint_0001_00000040.pt", "checkpoint_0002_00000050.pt"]
    last = tmp_path / LAST_NAME
    assert int(torch.load(last, weights_only=True)["i"]) == 4
    assert os.path.samefile(last, tmp_path / "checkpoint_0002_00000050.pt")  # a link, no copy

    save_checkpoint(tmp_path, {"i": torch.tensor(5)}, epoch=3, step=60, keep_last=1)
    assert numbered(tmp_path) == ["checkpoint_0003_00000060.pt"]
    with pytest.raises(ConfigError, match="keep_last"):
        save_checkpoint(tmp_path, {}, epoch=4, step=70, keep_last=0)


def test_saving_before_later_checkpoints_is_refused_and_deletes_nothing(tmp_path: Path) -> None:
    for epoch in range(4):
        save_checkpoint(tmp_path, {"i": torch.tensor(epoch)}, epoch=epoch, step=0, keep_last=4)
    before = numbered(tmp_path)
    # Epochs 2 and 3 belong to another history: never deleted behind the user's back.
    with pytest.raises(ConfigError, match=r"checkpoints after epoch 1 step 5 \(checkpoint_0002"):
        save_checkpoint(tmp_path, {"i": torch.tensor(9)}, epoch=1, step=5, keep_last=3)
    assert numbered(tmp_path) == before
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_0003_00000000.pt"
    assert int(torch.load(tmp_path / LAST_NAME, weights_only=True)["i"]) == 3


def test_last_is_a_copy_where_hard_links_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: Any) -> None:
        raise OSError("links not supported")

    monkeypatch.setattr(os, "link", no_links)
    path = save_checkpoint(tmp_path, {"i": torch.tensor(7)}, epoch=0, step=1)
    last = tmp_path / LAST_NAME
    assert not os.path.samefile(last, path)
    assert last.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, LAST_NAME]


def test_find_latest_ignores_temp_files_and_orders_numerically(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path / "absent") is None
    assert find_latest_checkpoint(tmp_path) is None
    for epoch, step in [(9999, 5), (10000, 1), (10000, 2)]:
        save_checkpoint(tmp_path, {}, epoch=epoch, step=step, keep_last=5)
    # What a crash mid-write leaves behind, numbered after the real ones.
    (tmp_path / ".checkpoint_10001_00000000.pt.1a2b3c4d.tmp").write_bytes(b"PK\x03\x04half")
    (tmp_path / "checkpoint_10001_00000000.pt.tmp").write_bytes(b"half")
    (tmp_path / f".{LAST_NAME}.5e6f7a8b.tmp").write_bytes(b"half")
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_10000_00000002.pt"

    only_last = tmp_path / "only_last"
    only_last.mkdir()
    (tmp_path / LAST_NAME).rename(only_last / LAST_NAME)
    assert find_latest_checkpoint(only_last) == only_last / LAST_NAME
    with pytest.raises(InputError, match="not a run folder"):
        find_latest_checkpoint(only_last / LAST_NAME)


# --- random generators ------------------------------------------------------


def draw() -> tuple[float, float, float, float, torch.Tensor]:
    return (
        random.random(),
        random.gauss(0, 1),
        float(np.random.rand()),
        float(np.random.standard_normal()),
        torch.rand(3),
    )


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path: Path) -> None:
    random.gauss(0, 1)  # leave cached normals in Python's and NumPy's state
    np.random.standard_normal()
    atomic_save(capture_rng_state(), tmp_path / "rng.pt")
    expected = draw()
    draw()
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = draw()
    assert got[:4] == expected[:4]
    assert torch.equal(got[4], expected[4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_state_round_trips() -> None:
    torch.cuda.init()
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = torch.rand(4, device="cuda")
    restore_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


# --- resume -----------------------------------------------------------------


def as_version_1(path: Path) -> None:
    """Rewrite a checkpoint as format version 1 wrote it: the shuffle-BN generator's
    state beside the model (``shuffle_rng``, None before its first use)."""
    state = torch.load(path, weights_only=True)
    generator = state["model"].pop("_extra_state")
    state["shuffle_rng"] = generator if generator.numel() else None
    state["format_version"] = 1
    atomic_save(state, path)


@pytest.mark.parametrize("version", [FORMAT_VERSION, 1])
def test_resume_continues_bit_for_bit(tmp_path: Path, version: int) -> None:
    model = tiny_moco(seed=0)
    optimizer, scaler, scheduler = run_objects(model)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    for _ in range(2):
        train_step(model, optimizer, scaler, scheduler)
    state = training_state(model, optimizer, scaler, scheduler, 0, 2, {"lr": 0.1, "arch": "r18"})
    saved = save_checkpoint(tmp_path, state, epoch=0, step=2)
    del state  # it shares tensors with the live model
    assert model.get_extra_state().numel() > 0  # bn_splits=2: the shuffle generator is in use
    if version == 1:
        as_version_1(saved)
    losses = [train_step(model, optimizer, scaler, scheduler) for _ in range(2)]

    # A new process: other weights, other generator states, fresh optimizer.
    random.seed(2)
    np.random.seed(2)
    resumed = tiny_moco(seed=2)
    optimizer2, scaler2, scheduler2 = run_objects(resumed)
    path = find_latest_checkpoint(tmp_path)
    assert path is not None
    checkpoint = load_checkpoint(path)
    assert checkpoint["config"] == {"lr": 0.1, "arch": "r18"}
    assert restore_training_state(checkpoint, resumed, optimizer2, scaler2, scheduler2) == (0, 2)
    losses2 = [train_step(resumed, optimizer2, scaler2, scheduler2) for _ in range(2)]

    assert torch.equal(torch.stack(losses), torch.stack(losses2))
    assert int(resumed.queue_ptr) == int(model.queue_ptr) == 4 * BATCH % K
    assert_same_state(model.state_dict(), resumed.state_dict())
    for p, p2 in zip(model.parameters(), resumed.parameters(), strict=True):
        buffers = (
            optimizer.state[p].get("momentum_buffer"),
            optimizer2.state[p2].get("momentum_buffer"),
        )
        assert (buffers[0] is None and buffers[1] is None) or torch.equal(*buffers)
    assert scaler.state_dict() == scaler2.state_dict()
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()


def test_checkpoint_loads_weights_only_with_the_documented_keys(tmp_path: Path) -> None:
    model = tiny_moco(seed=0, bn_splits=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = training_state(model, optimizer, None, None, epoch=1, step=7, config={"a": (1, 2)})
    path = save_checkpoint(tmp_path, state, epoch=1, step=7)
    for file in (path, tmp_path / LAST_NAME):
        raw = torch.load(file, weights_only=True)
        assert set(raw) == {
            "format", "format_version", "mocohub_version", "epoch", "step", "model",
            "optimizer", "scaler", "scheduler", "rng", "config",
        }  # fmt: skip
        assert (raw["format"], raw["format_version"]) == (FORMAT, FORMAT_VERSION)
        assert (raw["epoch"], raw["step"], raw["config"]) == (1, 7, {"a": [1, 2]})
        assert {"queue", "queue_ptr", "_extra_state"} <= set(raw["model"])
        assert not is_reference_checkpoint(raw)


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    model = tiny_moco(seed=0, bn_splits=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="JSON"):
        training_state(model, optimizer, None, None, 0, 0, {"data": tmp_path})
    state = training_state(model, optimizer, None, None, 0, 3, {})
    with pytest.raises(ConfigError, match="same numbers"):
        save_checkpoint(tmp_path, state, epoch=0, step=4)
    save_checkpoint(tmp_path, state, epoch=0, step=3)
    other = tiny_moco(seed=0, bn_splits=1, dim=8)
    with pytest.raises(ConfigError, match="size mismatch") as info:
        restore_training_state(load_checkpoint(tmp_path / LAST_NAME), other)
    assert_one_sentence(str(info.value))


# --- the reference code's checkpoints -----------------------------------------


def test_reference_checkpoint_resumes_model_and_optimizer(tmp_path: Path) -> None:
    model = tiny_moco(seed=0, bn_splits=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    logits, labels = model(torch.randn(BATCH, 3, 16, 16), torch.randn(BATCH, 3, 16, 16))
    F.cross_entropy(logits, labels).backward()
    optimizer.step()
    reference = {
        "epoch": 3,
        "arch": "resnet18",
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    torch.save(reference, tmp_path / "checkpoint_0002.pth.tar")
    checkpoint = load_checkpoint(tmp_path / "checkpoint_0002.pth.tar")
    assert is_reference_checkpoint(checkpoint)
    assert not is_reference_checkpoint({"state_dict": {"module.base_encoder.fc.weight": 0}})

    fresh = tiny_moco(seed=5, bn_splits=1)
    fresh.load_state_dict(moco_state_from_reference(checkpoint), strict=True)
    assert_same_state(model.state_dict(), fresh.state_dict())

    # The reference optimizes model.parameters(); mocohub may optimize encoder_q only.
    for params in (lambda m: m.parameters(), lambda m: m.encoder_q.parameters()):
        resumed = tiny_moco(seed=6, bn_splits=1)
        optimizer2 = torch.optim.SGD(params(resumed), lr=0.5, momentum=0.9, weight_decay=1e-4)
        assert restore_training_state(checkpoint, resumed, optimizer2) == (3, 0)
        assert_same_state(model.state_dict(), resumed.state_dict())
        assert optimizer2.param_groups[0]["lr"] == 0.03
        for p, p2 in zip(model.encoder_q.parameters(), resumed.encoder_q.parameters(), strict=True):
            assert torch.equal(
                optimizer.state[p]["momentum_buffer"], optimizer2.state[p2]["momentum_buffer"]
            )

    with pytest.raises(InputError, match="not a reference"):
        moco_state_from_reference({"epoch": 1, "state_dict": {"fc.weight": torch.zeros(1)}})


# --- unusable files -----------------------------------------------------------


def write_truncated(path: Path) -> None:
    model = tiny_moco(seed=0, bn_splits=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    atomic_save(training_state(model, optimizer, None, None, 0, 0, {}), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "No checkpoint at"),
        (lambda p: p.mkdir(), "is a folder"),
        (write_truncated, "is damaged \\(it is truncated"),
        (lambda p: p.write_bytes(bytes(range(256))), "Cannot read"),
        (lambda p: torch.save({"weights": np.zeros(3)}, p), "holds a numpy"),
        (lambda p: torch.save({"fc.weight": torch.zeros(2)}, p), "neither"),
        (lambda p: torch.save(torch.zeros(2), p), "neither"),
        (lambda p: torch.save({"format": FORMAT, "format_version": 99}, p), "upgrade mocohub"),
        (lambda p: torch.save({"format": FORMAT, "format_version": "2"}, p), "no valid"),
        (lambda p: torch.save({"format": FORMAT, "format_version": 1, "epoch": 0}, p), "lacks"),
    ],
    ids=[
        "missing",
        "folder",
        "truncated",
        "garbage",
        "unsafe",
        "foreign",
        "tensor",
        "newer",
        "no-version",
        "incomplete",
    ],
)
def test_unusable_files_are_one_sentence_input_errors(
    tmp_path: Path, make: Any, message: str
) -> None:
    path = tmp_path / "checkpoint.pt"
    make(path)
    with pytest.raises(InputError, match=message) as info:
        load_checkpoint(path)
    assert_one_sentence(str(info.value))


def assert_one_sentence(text: str) -> None:
    assert "\n" not in text and "\x1b" not in text, text
    assert text.endswith(".") and text.count(". ") == 0 and len(text) < 400, text
