"""The weights registry: the published MoCo releases, weight sets shipped in the package
(float16 safetensors included), and `mocohub list` / `mocohub info`."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import run_cli
from hub_helpers import tiny_fmnist_model
from PIL import Image
from project_helpers import pyproject
from safetensors.torch import load_file, save_file
from torch import nn

import mocohub
from mocohub import registry
from mocohub.artifact import HeadConfig, ModelConfig, read_config
from mocohub.backbones import resnet50
from mocohub.errors import ConfigError, InputError
from mocohub.hf import save_pretrained
from mocohub.preprocessing import Preprocessing
from mocohub.registry import Weights, WeightsFile, get_weights, list_models

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "fashion-mnist"
BASE = "https://dl.fbaipublicfiles.com/moco/moco_checkpoints"
FASHION_MNIST = "moco_r18_fashion_mnist"  # shipped inside the package (issue 7)
PUBLISHED = {  # name: (reference file name, md5 prefix, epochs, ImageNet linear top-1, head)
    "moco_v1_r50_200ep": ("moco_v1_200ep", "b251726a", 200, 60.6, "linear"),
    "moco_v2_r50_200ep": ("moco_v2_200ep", "59fd9945", 200, 67.7, "mlp"),
    "moco_v2_r50_800ep": ("moco_v2_800ep", "a04e12f8", 800, 71.1, "mlp"),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_reference_releases(name: str) -> None:
    release, md5, epochs, top1, head = PUBLISHED[name]
    weights = get_weights(name)
    (file,) = weights.files
    assert file.location == f"{BASE}/{release}/{release}_pretrain.pth.tar" == weights.url
    assert file.hash == f"md5:{md5}" and file.kind == "url" and not file.is_safetensors
    assert (weights.model.arch, weights.meta["epochs"], weights.meta["imagenet_linear_top1"]) == (
        "resnet50",
        epochs,
        top1,
    )
    assert weights.model.head == HeadConfig(head, 128)
    assert weights.model.preprocessing == Preprocessing.imagenet()
    for key in ("paper", "license", "source", "num_params", "description"):
        assert weights.meta[key], key
    config = weights.config()
    assert (config.feature_dim, config.head, config.meta["name"]) == (2048, None, name)
    assert weights.config(head=True).embedding_dim == 128


def test_parameter_count_is_that_of_the_backbone() -> None:
    backbone = resnet50()
    backbone.fc = nn.Identity()
    count = sum(p.numel() for p in backbone.parameters())
    assert all(w.meta["num_params"] == count for w in list_models() if w.name in PUBLISHED)


def test_transforms_are_the_entry_preprocessing() -> None:
    weights = get_weights("moco_v2_r50_200ep")
    image = Image.new("RGB", (320, 240), (200, 100, 50))
    out = weights.transforms()(image)
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out, Preprocessing.imagenet().transform()(image))


def test_names_and_registration_errors() -> None:
    v3 = ["moco_v3_r50_100ep", "moco_v3_r50_300ep", "moco_v3_r50_1000ep"]  # numbers by value
    v3 += ["moco_v3_vit_b", "moco_v3_vit_s"]
    names = [*sorted([*PUBLISHED, FASHION_MNIST]), *v3]
    assert [w.name for w in mocohub.list_models()] == names
    with pytest.raises(InputError, match="did you mean moco_v1_r50_200ep"):
        get_weights("moco_v1_r50_200")
    extra = Weights("mine", ModelConfig("resnet18"), (WeightsFile("/models/mine"),))
    try:
        assert mocohub.register_weights(extra) is extra and get_weights("mine") is extra
        with pytest.raises(ConfigError, match="already registered"):
            mocohub.register_weights(extra)
        mocohub.register_weights(extra, replace=True)
    finally:
        assert registry.unregister_weights("mine") is extra
    assert [w.name for w in mocohub.list_models()] == names
    with pytest.raises(InputError, match="No weights named 'mine'"):
        registry.unregister_weights("mine")
    with pytest.raises(ConfigError, match="md5"):
        WeightsFile("https://x/y.pth", "crc:1234")
    with pytest.raises(ConfigError, match="at least one file"):
        Weights("none", ModelConfig("resnet18"), ())
    with pytest.raises(InputError, match="no projection head"):
        extra.config(head=True)


def test_registered_rows_last_for_the_block_and_restore_what_they_replaced() -> None:
    published = get_weights("moco_v2_r50_800ep")
    mine = Weights("mine", ModelConfig("resnet18"), (WeightsFile("/models/mine"),))
    standin = Weights(published.name, ModelConfig("resnet18"), (WeightsFile("/models/x"),))
    with registry.registered(mine, standin, replace=True):
        assert get_weights("mine") is mine and get_weights(published.name) is standin
    assert get_weights(published.name) is published
    with pytest.raises(InputError, match="No weights named"):
        get_weights("mine")
    with pytest.raises(ConfigError, match="already registered"), registry.registered(standin):
        pass  # never reached: without replace=True a registered name is refused
    assert get_weights(published.name) is published  # the refused row left nothing behind
    with pytest.raises(RuntimeError, match="inside"), registry.registered(mine):
        raise RuntimeError("inside")
    assert "mine" not in [w.name for w in list_models()]


def tiny_fmnist(folder: Path, dtype: torch.dtype) -> nn.Module:
    """An artifact folder like the one issue 7 ships: 1-channel 28 px ResNet-18, stored in
    ``dtype``. Returns the model as it should load (weights rounded through ``dtype``)."""
    model = tiny_fmnist_model({"name": "moco_fmnist_tiny"}, batch=8)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).float())
    save_pretrained(model, folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return model


def sample_images(count: int) -> list[Image.Image]:
    with open(SAMPLES / "labels.csv") as f:
        rows = list(csv.DictReader(f))[:count]
    name = next(k for k in rows[0] if k != "label")
    return [Image.open(SAMPLES / row[name]) for row in rows]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_weights_shipped_in_the_package_load_offline(
    dtype: torch.dtype,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry_rows: Callable[..., Any],
) -> None:
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path / "weights")
    expected = tiny_fmnist(tmp_path / "weights" / "moco_fmnist_tiny", dtype)
    digest = hashlib.sha256(
        (tmp_path / "weights" / "moco_fmnist_tiny" / "model.safetensors").read_bytes()
    ).hexdigest()
    prep = expected.mocohub_config.preprocessing
    row = Weights(  # the one table row a bundled weight set needs
        "moco_fmnist_tiny",
        ModelConfig("resnet18", small_stem=True, in_channels=1, width=8, preprocessing=prep),
        (WeightsFile("package:moco_fmnist_tiny", f"sha256:{digest[:16]}"),),
        meta={"epochs": 5, "knn_top1": 80.0},
    )
    registry_rows(row)
    monkeypatch.setenv("MOCOHUB_OFFLINE", "1")
    model = mocohub.load("moco_fmnist_tiny")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.mocohub_config.meta["knn_top1"] == 80.0
    batch = torch.stack([row.transforms()(im) for im in sample_images(6)])
    assert batch.shape == (6, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), expected(batch))

    with open(tmp_path / "weights" / "moco_fmnist_tiny" / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\1\2\3\4")
    with pytest.raises(InputError, match="tampered with"):
        mocohub.load("moco_fmnist_tiny")


@pytest.mark.parametrize(
    "weights",
    [w for w in list_models() if any(f.kind == "package" for f in w.files)],
    ids=lambda w: w.name,
)
def test_shipped_rows_match_their_folders(weights: Weights) -> None:
    """Every bundled weight set's config.json agrees with its registry row."""
    (file,) = [f for f in weights.files if f.kind == "package"]
    folder = file.local_path()
    assert folder is not None
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in folder.iterdir()}
    stored = read_config(folder)
    expected = weights.config()
    assert stored.network() == expected.network()
    assert stored.preprocessing == expected.preprocessing
    mocohub.load(weights.name)


def test_package_data_ships_the_weights_folder() -> None:
    project = pyproject()
    assert "weights/**/*" in project["tool"]["setuptools"]["package-data"]["mocohub"]
    assert registry.WEIGHTS_DIR == ROOT / "mocohub" / "weights"


def test_list_and_info_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    lines = out.splitlines()
    header = ["NAME", "ARCH", "DIM", "EPOCHS", "TOP-1", "K-NN", "PARAMS", "LICENCE", "CACHED"]
    assert lines[0].split() == header
    for name, (_, _, epochs, top1, _) in PUBLISHED.items():
        (row,) = [line.split() for line in lines if line.startswith(name)]
        assert row[:8] == [
            name,
            "resnet50",
            "2048",
            str(epochs),
            str(top1),
            "-",
            "23.5M",
            "cc-by-nc-4.0",
        ]
    (row,) = [line.split() for line in lines if line.startswith("moco_v3_r50_1000ep ")]
    assert row[4:8] == ["74.6", "-", "23.5M", "cc-by-nc-4.0"]
    for name, arch, dim, top1, params in (
        ("moco_v3_vit_s", "vit_small", "384", "73.2", "21.7M"),
        ("moco_v3_vit_b", "vit_base", "768", "76.7", "85.8M"),
    ):
        (row,) = [line.split() for line in lines if line.startswith(f"{name} ")]
        assert row[:8] == [name, arch, dim, "300", top1, "-", params, "cc-by-nc-4.0"]
    assert "non-commercial use only" in out
    (row,) = [line.split() for line in lines if line.startswith(FASHION_MNIST)]
    meta = get_weights(FASHION_MNIST).meta
    assert row[2:] == [
        "256",
        str(meta["epochs"]),
        str(meta["linear_top1"]),  # measured by mocohub on its test split: no ImageNet figure
        str(meta["knn_top1"]),
        "2.8M",
        "mit",
        "yes",
    ]

    code, out, _ = run_cli(["list", "--json"], capsys)
    rows = json.loads(out)
    published = [r["meta"]["imagenet_linear_top1"] for r in rows if r["name"] in PUBLISHED]
    assert published == [60.6, 67.7, 71.1]

    code, out, _ = run_cli(["info", "moco_v2_r50_800ep"], capsys)
    assert code == 0
    for text in (f"{BASE}/moco_v2_800ep/", "md5:a04e12f8", "71.1", "mlp 128-d", "crop 224"):
        assert text in out, text

    code, out, err = run_cli(["info", "moco_v3"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("Error: No weights named 'moco_v3'") and err.count("\n") == 1
