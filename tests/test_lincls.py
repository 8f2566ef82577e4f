"""`mocohub lincls` and `mocohub knn`: linear and k-NN evaluation of a frozen backbone."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cli_helpers import run_cli
from hub_helpers import reference_checkpoint, reference_encoder

import mocohub
from mocohub.backbones import resnet18
from mocohub.errors import InputError
from mocohub.training import lincls
from mocohub.training.checkpoint import save_checkpoint, training_state
from mocohub.training.config import preset
from mocohub.training.data import TensorImageDataset, load_labelled_folder, resolve_dataset
from mocohub.training.datasets import align_classes
from mocohub.training.distributed import init_from_env
from mocohub.training.eval_transforms import (
    BatchEvalTransform,
    BatchPadCropFlip,
    BatchRandomResizedCrop,
    Preprocessing,
)
from mocohub.training.knn_eval import knn_evaluate
from mocohub.training.lincls import (
    BackboneChangedError,
    LinclsConfig,
    check_backbone_unchanged,
    linear_eval,
    lr_at,
)
from mocohub.training.moco import MoCo

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "fashion-mnist"
EPOCHS = "lincls_epochs.jsonl"
# A short run that learns with the tiny random backbone's (badly conditioned)
# features: the reference lr of 30 is for real MoCo features.
SHORT = {"epochs": 8, "lr": 0.5, "lr_steps": (6,), "batch_size": 64, "workers": 0}


def save_tiny_run(run_dir: Path) -> Path:
    """A mocohub checkpoint of an (untrained) tiny MoCo for 28 px grayscale images."""
    torch.manual_seed(0)
    encoder = functools.partial(resnet18, small_stem=True, width=8, in_channels=1)
    model = MoCo(encoder, dim=16, K=64, m=0.99, T=0.1, mlp=True)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
    config = preset("fashion_mnist", width=8, dim=16, K=64, batch_size=32).to_dict()
    state = training_state(model, optimizer, None, None, 1, 0, config)
    return save_checkpoint(run_dir, state, epoch=1, step=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    save_tiny_run(folder)
    return folder


def test_lincls_learns_and_writes_its_results(run_dir: Path, tmp_path: Path) -> None:
    config = LinclsConfig(preset="small", **SHORT)
    lines: list[str] = []
    result = linear_eval(run_dir, SAMPLES, tmp_path, config, log=lines.append)
    assert result["top1"] > 0.2  # 10 balanced classes: chance is 0.1
    assert result["top5"] > result["top1"]
    assert result["protocol"] == "small" and result["val_is_train"]
    assert (result["num_classes"], result["val_samples"]) == (10, 300)
    assert [r["lr"] for r in result["epochs"]] == [0.5] * 6 + [pytest.approx(0.05)] * 2
    assert len(lines) == 8 and lines[-1].startswith("epoch 8/8")
    # no val split: the accuracy each epoch is on the training images, and says so
    assert "eval on train images: top-1 " in lines[-1] and "val top-1" not in lines[-1]

    saved = json.loads((tmp_path / "lincls.json").read_text())
    assert saved["top1"] == result["top1"] and saved["config"]["preset"] == "small"
    assert saved["model_config"]["arch"] == "resnet18"
    assert saved["model_config"]["preprocessing"]["image_size"] == 28
    per_epoch = [json.loads(line) for line in (tmp_path / "lincls_epochs.jsonl").open()]
    assert per_epoch == saved["epochs"] and len(per_epoch) == 8
    assert per_epoch[-1]["val_top1"] == result["top1"]
    head = torch.load(tmp_path / "linear_head.pt", weights_only=True)
    assert head["fc"]["weight"].shape == (10, 64) and head["classes"][9] == "ankle-boot"


def test_cached_features_is_a_named_faster_mode(run_dir: Path, tmp_path: Path) -> None:
    config = LinclsConfig(preset="small", cached_features=True, eval_every=4, **SHORT)
    result = linear_eval(run_dir, SAMPLES, None, config)
    assert result["protocol"] == "small+cached-features"
    assert result["top1"] > 0.3
    assert [("val_top1" in r) for r in result["epochs"]] == [False] * 3 + [True] + [False] * 3 + [
        True
    ]
    assert not any(tmp_path.iterdir())  # out_dir None: nothing written


class _Stop(Exception):
    pass


def _stop_after(epoch: int):  # type: ignore[no-untyped-def]
    def log(line: str) -> None:
        if line.startswith(f"epoch {epoch}/"):
            raise _Stop

    return log


def _without_times(records: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_an_interrupted_evaluation_resumes_to_the_same_result(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = LinclsConfig(preset="small", **{**SHORT, "epochs": 3, "lr_steps": (2,)})
    whole = linear_eval(run_dir, SAMPLES, tmp_path / "whole", config)

    with pytest.raises(_Stop):  # interrupted after epoch 2's state was saved
        linear_eval(run_dir, SAMPLES, tmp_path / "cut", config, log=_stop_after(2))
    lines: list[str] = []
    resumed = linear_eval(run_dir, SAMPLES, tmp_path / "cut", config, log=lines.append)
    assert lines[0].startswith("resuming from") and "after epoch 2" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("epoch 3/3")
    assert _without_times(resumed["epochs"]) == _without_times(whole["epochs"])
    heads = [
        torch.load(tmp_path / d / "linear_head.pt", weights_only=True) for d in ("whole", "cut")
    ]
    assert torch.equal(heads[0]["fc"]["weight"], heads[1]["fc"]["weight"])
    per_epoch = [json.loads(line) for line in (tmp_path / "cut" / "lincls_epochs.jsonl").open()]
    assert [r["epoch"] for r in per_epoch] == [1, 2, 3]

    # Other settings in the same folder are refused, not mixed; resume=False starts afresh.
    other = LinclsConfig(preset="small", **{**SHORT, "epochs": 3, "lr_steps": (2,), "lr": 0.1})
    with pytest.raises(InputError, match=r"with other settings \(lr\).*--restart"):
        linear_eval(run_dir, SAMPLES, tmp_path / "cut", other)
    fresh = linear_eval(run_dir, SAMPLES, tmp_path / "cut", other, resume=False, log=lines.append)
    assert len(fresh["epochs"]) == 3 and not lines[-3].startswith("resuming")

    # The run folder holding other weights since (the run trained on) is another model.
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    linear_eval(moved, SAMPLES, tmp_path / "later", config)
    from mocohub.training.checkpoint import find_latest_checkpoint, load_checkpoint

    state = load_checkpoint(find_latest_checkpoint(moved))
    name = next(k for k in state["model"] if k.startswith("encoder_q.conv1."))
    state["model"][name] = state["model"][name] + 0.01
    state["epoch"] += 1  # one epoch on, as a run trained on would save
    save_checkpoint(moved, state, epoch=state["epoch"], step=0)
    with pytest.raises(InputError, match=r"of other weights \(.*moved has changed since"):
        linear_eval(moved, SAMPLES, tmp_path / "later", config)

    # A fresh start that fails in its first epoch leaves the finished run's files as they were.
    kept = {name: (tmp_path / "cut" / name).read_text() for name in ("lincls.json", EPOCHS)}

    def fail(*args: object) -> None:
        raise _Stop

    monkeypatch.setattr(lincls, "_train_step", fail)
    with pytest.raises(_Stop):
        linear_eval(run_dir, SAMPLES, tmp_path / "cut", other, resume=False)
    assert {name: (tmp_path / "cut" / name).read_text() for name in kept} == kept


def test_reference_schedule() -> None:
    assert [lr_at(LinclsConfig(), e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx(
        [30, 30, 3, 3, 0.3, 0.3]
    )
    cosine = LinclsConfig(schedule="cosine", epochs=10)
    assert lr_at(cosine, 0) == 30 and lr_at(cosine, 5) == pytest.approx(15)


@pytest.mark.parametrize("schedule", ["steps", "cosine"])
def test_pretraining_and_linear_evaluation_share_one_schedule(schedule: str) -> None:
    from mocohub.training.config import TrainConfig
    from mocohub.training.schedule import epoch_lr
    from mocohub.training.train import lr_at as pretraining_lr_at

    pretraining = TrainConfig(
        epochs=12, lr=0.06, batch_size=128, schedule=schedule, lr_steps=(4, 9)
    )
    linear = LinclsConfig(epochs=12, lr=0.03, schedule=schedule, lr_steps=(4, 9))
    assert pretraining.scaled_lr() == linear.lr
    got = [lr_at(linear, e) for e in range(12)]
    assert got == [pretraining_lr_at(pretraining, e) for e in range(12)]
    kwargs = {"epochs": 12, "schedule": schedule, "milestones": (4, 9)}
    assert got == [epoch_lr(0.03, e, **kwargs) for e in range(12)]
    if schedule == "steps":
        assert got == pytest.approx([0.03] * 4 + [0.003] * 5 + [0.0003] * 3)
    else:
        assert got[0] == 0.03 and got[6] == pytest.approx(0.015) and got[-1] < got[-2]


def test_frozen_backbone_check(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A bug that leaves the backbone in train mode: its BN statistics drift.
    def forgets_eval_mode(backbone: torch.nn.Module) -> torch.nn.Module:
        return backbone.requires_grad_(False).train()

    monkeypatch.setattr(lincls, "freeze_backbone", forgets_eval_mode)
    config = LinclsConfig(preset="small", **{**SHORT, "epochs": 1})
    with pytest.raises(
        BackboneChangedError, match=r"changed during linear evaluation \(\d+ tensors"
    ):
        linear_eval(run_dir, SAMPLES, None, config)

    backbone = resnet18(width=8)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    check_backbone_unchanged(backbone, before)
    with torch.no_grad():
        backbone.layer2[0].conv1.weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(BackboneChangedError, match=r"1 tensors, e\.g\. layer2\.0\.conv1\.weight"):
        check_backbone_unchanged(backbone, before)


def _window(image: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    window = image[:, top : top + 28, left : left + 28]
    return window.flip(-1) if flip else window


def test_batched_transforms() -> None:
    prep = Preprocessing(28, 32, (0.5,), (0.25,), channels=1)
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    as_floats = (images.float() / 255 - 0.5) / 0.25
    # Evaluation: nothing but normalisation at the stored size ("auto", "small").
    for resize in ("auto", "small"):
        torch.testing.assert_close(BatchEvalTransform(prep, resize)(images), as_floats)
    assert BatchEvalTransform(prep, "reference")(images).shape == (6, 1, 28, 28)
    # RGB data for a grayscale model becomes luma; gray data for an RGB model is repeated.
    rgb = images.expand(-1, 3, -1, -1)
    luma = BatchEvalTransform(prep, "auto")(rgb)
    torch.testing.assert_close(luma, as_floats, atol=2e-3, rtol=0)  # weights sum to 0.9999
    rgb_prep = Preprocessing(28, 32, (0.5,) * 3, (0.25,) * 3, channels=3)
    assert BatchEvalTransform(rgb_prep, "auto")(images).shape == (6, 3, 28, 28)

    # Small training recipe: every output is a (maybe flipped) window of the
    # image zero-padded by 4, as torchvision's RandomCrop(28, padding=4) + flip.
    generator = torch.Generator().manual_seed(0)
    out = BatchPadCropFlip(prep, generator)(images) * 0.25 + 0.5
    padded = torch.nn.functional.pad(images.float() / 255, (4, 4, 4, 4))
    offsets = set()
    for sample, padded_image in zip(out, padded, strict=True):
        windows = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.allclose(sample, _window(padded_image, top, left, flip), atol=1e-6)
        ]
        assert windows, "an output is not a crop of the padded image"
        offsets.add(windows[0])
    assert len(offsets) > 1  # random per sample

    reference = BatchRandomResizedCrop(prep, generator)(images)
    assert reference.shape == (6, 1, 28, 28) and reference.dtype == torch.float32


def _split_tree(root: Path, train_labels: set[int], val_labels: set[int]) -> Path:
    """root/train and root/val ImageFolder trees of the sample images of these classes."""
    table = [line.split(",") for line in (SAMPLES / "labels.csv").read_text().splitlines()[1:]]
    for split, rows, wanted in (("train", slice(0, 200), train_labels),
                                ("val", slice(200, 300), val_labels)):  # fmt: skip
        for name, label, class_name, _ in table[rows]:
            if int(label) in wanted:
                (root / split / class_name).mkdir(parents=True, exist_ok=True)
                shutil.copy(SAMPLES / name, root / split / class_name / name)
    return root


def _image_folder(root: Path) -> Path:
    """train/ and val/ ImageFolder trees of two classes of the sample images."""
    return _split_tree(root, {1, 8}, {1, 8})  # trouser, bag


def test_an_evaluation_on_image_folders_resumes_exactly_with_any_number_of_workers(
    run_dir: Path, tmp_path: Path
) -> None:
    """Per-image augmentations draw per (seed, epoch, sample): no history, no worker count."""
    data = _image_folder(tmp_path / "data")
    config = LinclsConfig(**{**SHORT, "epochs": 3, "lr_steps": (2,), "batch_size": 16})
    whole = linear_eval(run_dir, data, tmp_path / "whole", config)
    with pytest.raises(_Stop):  # interrupted after epoch 2's state was saved
        linear_eval(run_dir, data, tmp_path / "cut", config, log=_stop_after(2))
    torch.rand(7)  # a caller's use of the global generator changes nothing
    resumed = linear_eval(run_dir, data, tmp_path / "cut", config)
    two = linear_eval(run_dir, data, tmp_path / "two", dataclasses.replace(config, workers=2))
    for other in (resumed, two):
        assert _without_times(other["epochs"]) == _without_times(whole["epochs"])
    heads = [
        torch.load(tmp_path / d / "linear_head.pt", weights_only=True)
        for d in ("whole", "cut", "two")
    ]
    assert all(torch.equal(heads[0]["fc"]["weight"], h["fc"]["weight"]) for h in heads[1:])


def test_image_folders_use_per_image_transforms(run_dir: Path, tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "data")
    config = LinclsConfig(**{**SHORT, "epochs": 2, "batch_size": 16})
    result = linear_eval(run_dir, data, tmp_path / "out", config)
    assert result["classes"] == ["bag", "trouser"] and not result["val_is_train"]
    assert result["train_samples"] > result["val_samples"] > 0
    assert 0 <= result["top1"] <= result["top5"] == 1.0  # top-5 of 2 classes
    # k-NN on the folders sees what k-NN on the same images in memory sees.
    knn = knn_evaluate(run_dir, data, k=5, workers=0)
    in_memory = load_labelled_folder(SAMPLES)
    chosen = (in_memory.labels == 1) | (in_memory.labels == 8)
    splits = [chosen & (torch.arange(300) < 200), chosen & (torch.arange(300) >= 200)]
    train, val = (
        TensorImageDataset(in_memory.images[s], (in_memory.labels[s] == 1).long()) for s in splits
    )
    assert knn["top1"] == knn_evaluate(run_dir, train, val, k=5)["top1"] > 0.5
    assert (knn["train_samples"], knn["val_samples"]) == (
        result["train_samples"],
        result["val_samples"],
    )


def test_a_val_folder_without_some_training_classes_is_scored_by_class_name(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """torchvision numbers each split's own sorted class folders: a val/ without sandal/
    (index 1 in train/) numbered sneaker/ 1 too, so k-NN scored sneakers against sandals and
    gave a wrong figure without a word, and lincls refused the splits with two identical-
    looking class lists. Val labels now follow the training split's class names."""
    # train: bag 0, sandal 1, sneaker 2, trouser 3; val holds bags and sneakers only.
    tree = _split_tree(tmp_path / "tree", {1, 5, 7, 8}, {7, 8})
    val, val_info = resolve_dataset(tree, "val")
    train, train_info = resolve_dataset(tree, "train")
    val, val_info = align_classes(train_info, val, val_info, task="k-NN")
    assert [train.classes[t] for t in val.targets] == [Path(p).parent.name for p, _ in val.samples]
    assert {train.classes[t] for t in val.targets} == {"bag", "sneaker"}

    # End to end, the folders score what the same images in memory, rightly labelled, score.
    knn = knn_evaluate(run_dir, tree, k=5, workers=0)
    data = load_labelled_folder(SAMPLES)
    index = {1: 3, 5: 1, 7: 2, 8: 0}  # Fashion-MNIST label -> the train/ folder's index
    first = torch.arange(300) < 200
    splits = [first & sum(data.labels == c for c in index).bool(),  # type: ignore[union-attr]
              ~first & ((data.labels == 7) | (data.labels == 8))]  # fmt: skip
    memory = [
        TensorImageDataset(data.images[s], torch.tensor([index[int(v)] for v in data.labels[s]]))
        for s in splits
    ]
    assert knn["top1"] == knn_evaluate(run_dir, *memory, k=5)["top1"]
    assert (knn["train_samples"], knn["val_samples"]) == tuple(int(s.sum()) for s in splits)
    config = LinclsConfig(**{**SHORT, "epochs": 1, "batch_size": 16})
    result = linear_eval(run_dir, tree, tmp_path / "out", config)
    assert result["classes"] == ["bag", "sandal", "sneaker", "trouser"]

    # A val class with no training images is refused, by name, with a way out.
    (tree / "val" / "shirt").mkdir()
    shutil.copy(SAMPLES / "00007_shirt.png", tree / "val" / "shirt")
    code, _, err = run_cli(["knn", "--model", run_dir, "--train", tree, "--k", 5], capsys)
    assert code != 0 and "1 class(es) that the training images" in err and "shirt" in err
    assert "leave them out of the validation split" in err


def test_class_folders_named_by_numbers_are_matched_by_name_too(tmp_path: Path) -> None:
    """An MNIST-style tree (folders 0-3) whose val/ lacks 0/: folder "1" is val's index 0;
    that its names look like indices must not make them be taken for indices."""
    sample = SAMPLES / "00000_ankle-boot.png"
    for split, names in (("train", "0123"), ("val", "123")):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            shutil.copy(sample, tmp_path / split / name / "a.png")
    train_info = resolve_dataset(tmp_path, "train")[1]
    val, val_info = align_classes(train_info, *resolve_dataset(tmp_path, "val"), task="k-NN")
    assert val.targets == [1, 2, 3] and val_info.classes == ("0", "1", "2", "3")
    # Labels without names (tensors) keep their indices, whatever the other split's names.
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    unnamed = TensorImageDataset(images, torch.tensor([0, 1, 1]))
    unnamed_info = resolve_dataset(unnamed, "val")[1]
    same, _ = align_classes(train_info, unnamed, unnamed_info, task="k-NN")
    assert same.labels.tolist() == [0, 1, 1]  # type: ignore[union-attr]


def test_knn_evaluate_on_held_out_images(run_dir: Path) -> None:
    data = load_labelled_folder(SAMPLES)
    train = TensorImageDataset(data.images[:200], data.labels[:200])
    val = TensorImageDataset(data.images[200:], data.labels[200:])
    result = knn_evaluate(run_dir, train, val, k=20, t=0.1)
    assert result["top1"] > 0.3 and not result["val_is_train"]
    assert (result["train_samples"], result["val_samples"], result["k"]) == (200, 100, 20)


def test_knn_and_lincls_run_the_backbone_in_channels_last_on_the_cpu(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one layout rule (``mocohub.precision.prefers_channels_last``) reaches evaluation:
    a k-NN evaluation ran 1.40x faster in channels_last, in fp32 on an AVX2-only CPU
    (BENCHMARKS.md). Every convolution sees channels_last input and weights."""
    from mocohub.training import eval_data

    seen: list[tuple[bool, bool]] = []
    original = eval_data.backbone_features

    def recording(backbone: torch.nn.Module, images: torch.Tensor, dtype: object = None) -> object:
        def record(conv: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            layout = torch.channels_last
            seen.append((args[0].is_contiguous(memory_format=layout),
                         conv.weight.is_contiguous(memory_format=layout)))  # fmt: skip

        convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
        hooks = [conv.register_forward_pre_hook(record) for conv in convs if conv.in_channels > 1]
        try:
            return original(backbone, images, dtype)  # type: ignore[arg-type]
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(eval_data, "backbone_features", recording)
    data = load_labelled_folder(SAMPLES)
    train = TensorImageDataset(data.images[:64], data.labels[:64])
    val = TensorImageDataset(data.images[64:96], data.labels[64:96])
    knn_evaluate(run_dir, train, val, k=5)
    after_knn = len(seen)
    for cached in (True, False):
        config = LinclsConfig(**{**SHORT, "epochs": 1, "cached_features": cached})
        linear_eval(run_dir, train, tmp_path / f"out{cached}", config, val=val)
    assert 0 < after_knn < len(seen)
    assert set(seen) == {(True, True)}


def test_unlabelled_or_mismatched_data_is_refused(run_dir: Path) -> None:
    data = load_labelled_folder(SAMPLES)
    unlabelled = TensorImageDataset(data.images[:20])
    with pytest.raises(InputError, match="has no labels"):
        knn_evaluate(run_dir, unlabelled)
    config = LinclsConfig(**{**SHORT, "epochs": 1})
    with pytest.raises(InputError, match="needs labelled training images"):
        linear_eval(run_dir, unlabelled, None, config, val=data)
    with pytest.raises(InputError, match="validation needs labelled images"):
        linear_eval(run_dir, data, None, config, val=unlabelled)
    renamed = TensorImageDataset(data.images, data.labels, classes=[f"c{i}" for i in range(10)])
    with pytest.raises(InputError, match=r"hold 10 class\(es\) that the training images"):
        linear_eval(run_dir, data, None, config, val=renamed)


# --- the command line ---------------------------------------------------------------------------


def test_lincls_and_knn_commands(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["lincls", SAMPLES, "--model", run_dir, "--out", tmp_path / "lin", "--epochs", 2]
    args += ["--lr", 0.5, "--lr-steps", "1", "--batch-size", 100, "--workers", 0]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    # the settings that depart from the protocol are named beside its name
    changed = "changed: --batch-size 100 --lr 0.5 --lr-steps 1"
    assert f"linear evaluation (reference protocol, 2 epochs, {changed}): top-1" in out
    assert "epoch 2/2" in err and "no separate validation split" in err
    saved = json.loads((tmp_path / "lin" / "lincls.json").read_text())
    assert saved["config"]["lr_steps"] == [1] and saved["epochs"][1]["lr"] == pytest.approx(0.05)

    code, out, err = run_cli(
        ["knn", "--model", run_dir, "--train", SAMPLES, "--k", 20, "--out", tmp_path / "k.json"],
        capsys,
    )
    assert code == 0, err
    assert out.startswith("k-NN (k=20, t=0.1): top-1 ")
    assert json.loads((tmp_path / "k.json").read_text())["val_samples"] == 300


def test_ctrl_c_says_what_lincls_kept_and_the_rerun_resumes(
    run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mocohub.training import eval_cli

    def press_ctrl_c_after_epoch_2(line: str) -> None:
        print(line, file=sys.stderr)
        if line.startswith("epoch 2/"):  # its state is saved before its line is printed
            raise KeyboardInterrupt

    out = tmp_path / "lin"
    args = ["lincls", SAMPLES, "--model", run_dir, "--out", out, "--epochs", 3, "--lr", 0.5]
    args += ["--preset", "small", "--cached-features", "--batch-size", 100, "--workers", 0]
    monkeypatch.setattr(eval_cli, "_echo_err", press_ctrl_c_after_epoch_2)
    code, _, err = run_cli([*args, "--restart"], capsys)
    assert code == 130 and "Traceback" not in err
    state = out / "lincls_state.pt"
    assert f"Interrupted: the classifier after epoch 2 is kept in {state}; rerun the same " in err
    assert "without --restart to resume." in err  # --restart again would start over

    monkeypatch.undo()
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert "after epoch 2" in err and "epoch 3/3" in err and "epoch 1/3" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["lincls", SAMPLES, "--model", "{tmp}/none", "--out", "{tmp}/o"],
            "Error: {tmp}/none is not",
        ),
        (["lincls", "{tmp}/none", "--model", "{run}", "--out", "{tmp}/o"], "does not exist"),
        (["lincls", SAMPLES, "--model", "{run}", "--out", "{tmp}/o", "--lr", "-1"], "--lr must"),
        (["lincls", SAMPLES, "--model", "{run}", "--out", "{tmp}/o", "--lr-steps", "x"], "x"),
        (["lincls", SAMPLES, "--model", "{run}"], "Missing option '--out'"),
        (["knn", "--model", "{run}", "--train", "{tmp}"], "is empty"),
        (["knn", "--model", "{tmp}", "--train", SAMPLES], "holds no checkpoint_*.pt and no model"),
        (["knn", "--model", "{run}", "--train", SAMPLES, "--k", "0"], "--k"),
    ],
)
def test_bad_input_exits_with_one_clear_line(
    args: list[object],
    message: str,
    run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    filled = [str(a).format(tmp=tmp_path, run=run_dir) for a in args]
    code, _, err = run_cli(filled, capsys)
    assert code == 2
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err


# --- every model source mocohub.load accepts ---------------------------------------------------


@pytest.fixture(scope="module")
def few_samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labels.csv folder of the first 60 sample images (tiny data for quick runs)."""
    folder = tmp_path_factory.mktemp("few")
    lines = (SAMPLES / "labels.csv").read_text().splitlines()
    for line in lines[1:61]:
        shutil.copy(SAMPLES / line.split(",")[0], folder)
    (folder / "labels.csv").write_text("\n".join(lines[:61]) + "\n")
    return folder


def _model_source(kind: str, run: Path, tmp: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The --model argument of each kind; the first four hold the run's backbone."""
    if kind == "run folder":
        return str(run)
    if kind == "run checkpoint":
        return str(next(run.glob("checkpoint_*.pt")))
    if kind in ("artifact folder", "safetensors file"):
        code, _, err = run_cli(["convert", run, "--out", tmp / "artifact"], capsys)
        assert code == 0, err
        folder = tmp / "artifact"
        return str(folder if kind == "artifact folder" else folder / "model.safetensors")
    if kind == "reference .pth.tar":
        encoder = reference_encoder("resnet18", width=8, in_channels=1)
        torch.save(reference_checkpoint(encoder), tmp / "moco_v2.pth.tar")
        return str(tmp / "moco_v2.pth.tar")
    assert kind == "registry name"
    return "moco_r18_fashion_mnist"  # ships in the package


SOURCES = [
    "run folder",
    "run checkpoint",
    "artifact folder",
    "safetensors file",
    "reference .pth.tar",
    "registry name",
]


@pytest.mark.parametrize("kind", SOURCES)
def test_knn_and_lincls_evaluate_every_model_source(
    kind: str,
    run_dir: Path,
    few_samples: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOCOHUB_OFFLINE", "1")  # nothing here needs the network
    model = _model_source(kind, run_dir, tmp_path, capsys)
    knn_args = ["knn", "--model", model, "--train", few_samples, "--k", 5]
    code, _, err = run_cli([*knn_args, "--out", tmp_path / "knn.json"], capsys)
    assert code == 0, err
    knn = json.loads((tmp_path / "knn.json").read_text())
    args = ["lincls", few_samples, "--model", model, "--out", tmp_path / "lin", "--epochs", 1]
    code, _, err = run_cli([*args, "--preset", "small", "--lr", 0.5, "--workers", 0], capsys)
    assert code == 0, err
    lin = json.loads((tmp_path / "lin" / "lincls.json").read_text())
    assert knn["model"] == lin["model"] == model
    assert knn["model_config"] == lin["model_config"]
    config = knn["model_config"]
    assert (config["arch"], config["in_channels"]) == ("resnet18", 1)
    if kind == "registry name":
        assert config["width"] == 32 and config["meta"]["name"] == "moco_r18_fashion_mnist"
    elif kind == "reference .pth.tar":
        assert config["width"] == 8 and config["meta"]["format"] == "reference"
        assert config["preprocessing"]["image_size"] == 224  # ImageNet's, as the reference
        assert not config["small_stem"]
    else:  # the run's backbone, whatever holds it: the same features, the same scores
        assert config["width"] == 8 and config["preprocessing"]["image_size"] == 28
        assert config["small_stem"]
        expected = knn_evaluate(run_dir, few_samples, k=5, workers=0)
        assert (knn["top1"], knn["top5"]) == (expected["top1"], expected["top5"])


def test_knn_says_when_k_is_capped_at_the_training_images(
    run_dir: Path, few_samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["knn", "--model", run_dir, "--train", few_samples, "--out", tmp_path]
    code, out, err = run_cli(args, capsys)  # the default k, 200
    assert code == 0, err
    # no val split: leave-one-out, so each image has 59 others to vote
    assert "note: --k 200 is more than the 60 training images, so k=59: every other" in err
    assert out.startswith("k-NN (k=59, t=0.1): top-1 ") and "(60 queries, 60 neighbours)" in out
    saved = json.loads((tmp_path / "knn.json").read_text())
    assert (saved["k"], saved["k_requested"]) == (59, 200)
    code, out, err = run_cli([*args[:-2], "--k", 59], capsys)
    assert code == 0 and "note: --k" not in err and out.startswith("k-NN (k=59,")


def test_knn_on_the_training_images_never_lets_an_image_vote_for_itself(
    run_dir: Path, few_samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a val split, and with the training images named as --val too (as the
    training loop's k-NN monitor does): leave-one-out, never 100% by self-votes."""
    alone = knn_evaluate(run_dir, few_samples, k=1, workers=0)  # leave-one-out
    named = knn_evaluate(run_dir, few_samples, few_samples, k=1, workers=0)
    assert alone["val_is_train"] and named["val_is_train"]
    assert alone["top1"] == named["top1"] < 1.0  # its nearest other image is not always its class
    code, _, err = run_cli(
        ["knn", "--model", run_dir, "--train", few_samples, "--val", few_samples, "--k", 1], capsys
    )
    assert code == 0 and "note: --val names the training images, so k-NN accuracy" in err
    code, _, err = run_cli(
        ["lincls", few_samples, "--val", few_samples, "--model", run_dir, "--preset", "small",
         "--epochs", 1, "--cached-features", "--workers", 0, "--out", tmp_path], capsys
    )  # fmt: skip
    assert code == 0, err
    assert "note: --val names the training images, so the accuracy" in err


def test_lincls_records_and_prints_the_protocol_it_followed(
    run_dir: Path, few_samples: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["lincls", few_samples, "--model", run_dir, "--lr", 0.5, "--workers", 0]
    runs = {
        "small": (
            ["--preset", "small", "--epochs", 1],
            "(small protocol, 1 epoch, changed: --lr 0.5)",
        ),
        "small+cached-features": (
            ["--preset", "small", "--epochs", 2, "--cached-features"],
            "(small protocol, cached features, 2 epochs, changed: --lr 0.5)",
        ),
        "reference": (
            ["--epochs", 1, "--image-size", 24],
            "(reference protocol, 1 epoch, changed: --lr 0.5)",
        ),
    }
    for protocol, (options, printed) in runs.items():
        out_dir = tmp_path / protocol
        code, out, err = run_cli([*base, "--out", out_dir, *options], capsys)
        assert code == 0, err
        assert f"linear evaluation {printed}: top-1 " in out and "(60 images)" in out
        epochs = options[options.index("--epochs") + 1]
        late = f"drop at epochs 60, 80, after the run's {epochs} epoch"  # the reference steps
        assert late in " ".join(err.split())
        assert json.loads((out_dir / "lincls.json").read_text())["protocol"] == protocol


def test_an_in_memory_model_needs_its_mocohub_config(few_samples: Path) -> None:
    model = mocohub.load("moco_r18_fashion_mnist")
    result = knn_evaluate(model, few_samples, k=5, workers=0)
    assert result["model"] == "moco_r18_fashion_mnist" and result["feature_dim"] == 256
    with pytest.raises(InputError, match="has no mocohub config"):
        knn_evaluate(resnet18(width=8), few_samples, k=5)


# --- two processes -------------------------------------------------------------------------------


DDP_RUN = {**SHORT, "epochs": 2}


def _no_augmentation(self: BatchPadCropFlip, images: torch.Tensor) -> torch.Tensor:
    return BatchEvalTransform(self.prep, "small")(images)


def _ddp_worker(rank: int, port: int, run: Path, out: Path) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    # Without random augmentation, two ranks must train what one process trains.
    BatchPadCropFlip.__call__ = _no_augmentation  # type: ignore[method-assign]
    try:
        result = linear_eval(run, SAMPLES, out, LinclsConfig(preset="small", **DDP_RUN))
        (out / f"rank{rank}.json").write_text(json.dumps(result))
        assert init_from_env().world_size == 2
    finally:
        dist.destroy_process_group()


def test_two_processes_train_what_one_trains(
    run_dir: Path, tmp_path: Path, free_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Forked workers start at once: torch and mocohub are already imported.
    mp.start_processes(
        _ddp_worker, args=(free_port, run_dir, tmp_path), nprocs=2, start_method="fork"
    )
    monkeypatch.setattr(BatchPadCropFlip, "__call__", _no_augmentation)
    single = linear_eval(
        run_dir, SAMPLES, tmp_path / "one", LinclsConfig(preset="small", **DDP_RUN)
    )

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["val_samples"] == 300
    for key in ("loss", "train_top1", "val_top1", "val_top5"):
        expected = [e[key] for e in single["epochs"]]
        for result in ranks:
            assert [e[key] for e in result["epochs"]] == pytest.approx(expected, abs=1e-4), key
    head = torch.load(tmp_path / "linear_head.pt", weights_only=True)["fc"]
    head_one = torch.load(tmp_path / "one" / "linear_head.pt", weights_only=True)["fc"]
    for key, value in head.items():
        torch.testing.assert_close(value, head_one[key], atol=1e-5, rtol=1e-4)


def test_sigterm_says_what_lincls_kept_and_exits_143(run_dir: Path, tmp_path: Path) -> None:
    """As `timeout` or Slurm stop it: the same line as Ctrl-C, and the usual exit code."""
    out = tmp_path / "lin"
    args = ["lincls", SAMPLES, "--model", run_dir, "--out", out, "--epochs", 100000]
    args += ["--lr", 0.5, "--preset", "small", "--cached-features", "--workers", 0, "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mocohub", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not (out / "lincls_state.pt").is_file():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no epoch finished within 2 minutes"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    said = "Stopped by SIGTERM: the classifier after epoch "
    assert said in err and f"is kept in {out / 'lincls_state.pt'}; rerun the same" in err


def test_a_corrupt_image_read_by_a_loader_worker_is_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PyTorch raises a worker's error again with the worker's whole traceback in
    its message; the command line shows only the error's own message."""
    from train_helpers import image_folder

    photos = image_folder(tmp_path / "photos", per_class=3)
    (photos / "ankle-boot" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = ["knn", "--model", run_dir, "--train", photos, "--workers", 1, "--batch-size", 4]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("Error: ") and "corrupt.png" in err and "Traceback" not in err
