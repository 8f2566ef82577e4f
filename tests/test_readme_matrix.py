"""What the README promises for every kind of input, one tiny run each (issue 11):

- ``mocohub train``: each preset (``moco_v1``, ``moco_v2``, ``cifar``,
  ``fashion_mnist``) on each kind of DATA the README lists: an ImageFolder tree
  with and without ``train/``/``val/``, a folder with ``labels.csv``, a folder of
  IDX files, and images held in memory (a uint8 tensor, through the Python API:
  the command line takes folders); one step of a narrow ResNet-18 each;
- ``--weights ref.pth.tar`` and ``--resume ref.pth.tar`` with a checkpoint
  exactly as the reference ``main_moco.py`` saves it;
- ``mocohub knn`` and ``mocohub lincls`` with each kind of model source that
  ``mocohub.load`` takes: a registry name, an artifact folder, a ``.safetensors``
  file, a reference ``.pth.tar``, a training run folder and its checkpoint file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hub_helpers import reference_checkpoint, reference_encoder
from readme_helpers import UserData, mocohub, ok, user_data, write_reference_checkpoint

PRESETS = ("moco_v1", "moco_v2", "cifar", "fashion_mnist")
DATA_KINDS = ("image-folder-with-splits", "image-folder", "labels-csv", "idx", "tensor")
# A ResNet-18 of width 8, 16-d keys, a queue of 16, one step of 8 crops of 32 px.
SIZES = {"arch": "resnet18", "width": 8, "dim": 16, "K": 16, "batch_size": 8, "image_size": 32}
FLAGS = ["--arch", "resnet18", "--width", "8", "--dim", "16", "--queue-size", "16"]
FLAGS += ["--batch-size", "8", "--image-size", "32", "--epochs", "1", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> UserData:
    return user_data(tmp_path_factory.mktemp("readme-matrix"))


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def last_state(run: Path) -> dict[str, Any]:
    from mocohub.training import checkpoint as ckpt

    latest = ckpt.find_latest_checkpoint(run)
    assert latest is not None, f"no checkpoint in {run}"
    return ckpt.load_checkpoint(latest)


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_trains_on_each_kind_of_data(
    data: UserData, here: Path, preset: str, kind: str
) -> None:
    if kind == "tensor":
        from mocohub.training.config import preset as make_config
        from mocohub.training.train import train

        images = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
        config = make_config(preset, **SIZES, epochs=1, workers=0)
        train(config, images, here / "run", progress=False)
    else:
        folder = {
            "image-folder-with-splits": data.imagenet,
            "image-folder": data.imagenet_flat,
            "labels-csv": data.labels_csv,
            "idx": data.fashion_mnist,
        }[kind]
        ok(mocohub(["mocohub", "train", str(folder), "--out", "run", "--preset", preset, *FLAGS]))
    state = last_state(here / "run")
    assert (state["epoch"], state["step"], state["config"]["preset"]) == (1, 0, preset)
    channels = 1 if kind == "idx" else 3
    assert state["model"]["encoder_q.conv1.weight"].shape[1] == channels


def _key_encoder_close_to_the_reference(run: Path, data: UserData) -> None:
    """After one step the key encoder moved by (1 - m) = 0.001 of the query's step only:
    it still holds the reference run's weights, far from a random start."""
    key = last_state(run)["model"]["encoder_k.conv1.weight"]
    reference = data.reference_encoder.state_dict()["conv1.weight"]
    torch.testing.assert_close(key, reference, atol=1e-4, rtol=0)


def test_train_weights_starts_from_a_reference_checkpoint(data: UserData, here: Path) -> None:
    words = ["mocohub", "train", str(data.labels_csv), "--out", "run"]
    ok(mocohub([*words, "--weights", str(data.reference), *FLAGS]))
    _key_encoder_close_to_the_reference(here / "run", data)
    assert last_state(here / "run")["epoch"] == 1  # a new run, not a continuation


def test_train_resume_continues_a_reference_run(data: UserData, here: Path) -> None:
    """The reference run stopped after epoch 1 (queue of 64); it goes on to epoch 2."""
    write_reference_checkpoint(here / "ref.pth.tar", epoch=1)
    flags = list(FLAGS)
    flags[flags.index("--queue-size") + 1] = "64"
    flags[flags.index("--epochs") + 1] = "2"
    words = ["mocohub", "train", str(data.labels_csv), "--out", "run"]
    ok(mocohub([*words, "--resume", "ref.pth.tar", *flags]))
    log = (here / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log]
    assert [r["epoch"] for r in records if r.get("event") == "epoch"] == [2]
    _key_encoder_close_to_the_reference(here / "run", data)


def test_resuming_a_v1_reference_run_without_its_preset_names_the_flag(
    data: UserData, here: Path
) -> None:
    encoder = reference_encoder("resnet18", mlp=False, dim=16, width=8)  # MoCo v1: one fc
    torch.save(reference_checkpoint(encoder, K=64) | {"epoch": 1}, here / "v1.pth.tar")
    flags = list(FLAGS)
    flags[flags.index("--queue-size") + 1] = "64"
    flags[flags.index("--epochs") + 1] = "2"
    words = ["mocohub", "train", str(data.labels_csv), "--resume", "v1.pth.tar", *flags]
    refused = mocohub([*words, "--out", "run"])  # the default preset is moco_v2 (MLP head)
    assert refused.code != 0 and "add --preset moco_v1 or --no-mlp" in refused.err
    ok(mocohub([*words, "--out", "run_v1", "--no-mlp"]))


@pytest.fixture(scope="module")
def models(data: UserData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """One model of each kind of source, all of the reference checkpoint's network except
    the registry name (the bundled Fashion-MNIST model) and the run (a tiny training)."""
    root = tmp_path_factory.mktemp("models")
    ok(mocohub(["mocohub", "convert", str(data.reference), "--out", str(root / "artifact")]))
    run = root / "run"
    ok(mocohub(["mocohub", "train", str(data.labels_csv), "--out", str(run), *FLAGS]))
    return {
        "registry-name": "moco_r18_fashion_mnist",
        "artifact-folder": root / "artifact",
        "safetensors": root / "artifact" / "model.safetensors",
        "reference-pth-tar": data.reference,
        "run-folder": run,
        "run-checkpoint": run / "checkpoint_last.pt",
    }


SOURCES = ["registry-name", "artifact-folder", "safetensors", "reference-pth-tar"]
SOURCES += ["run-folder", "run-checkpoint"]


@pytest.mark.parametrize("source", SOURCES)
def test_knn_and_lincls_take_every_model_source(
    data: UserData, models: dict[str, Path | str], here: Path, source: str
) -> None:
    """ "Any model mocohub can load", on imagenet/ (8 train/, 8 val/ images)."""
    model = str(models[source])
    knn = ok(mocohub(["mocohub", "knn", "--model", model, "--train", str(data.imagenet)]))
    assert "(8 queries, 8 neighbours)" in knn.out
    words = ["mocohub", "lincls", str(data.imagenet), "--model", model, "--out", "lincls"]
    flags = ["--epochs", "1", "--batch-size", "8", "--image-size", "32", "--workers", "0"]
    ok(mocohub([*words, *flags, "--quiet"]))
    report = json.loads((here / "lincls" / "lincls.json").read_text())
    assert report["val_samples"] == 8 and 0 <= report["top1"] <= 1
