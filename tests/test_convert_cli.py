"""`mocohub convert`: reference MoCo checkpoints become mocohub folders, torchvision state
dicts and detectron2 .pkl files that give the same features as torchvision's ResNet."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from cli_helpers import run_cli
from hub_helpers import backbone_features, reference_checkpoint, reference_encoder
from torch import nn

import mocohub


@pytest.fixture(scope="module")
def resnet50_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A MoCo v2 ResNet-50 checkpoint in the reference's exact format, random weights."""
    encoder = reference_encoder("resnet50", mlp=True, dim=128)
    path = tmp_path_factory.mktemp("ref") / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(reference_checkpoint(encoder, arch="resnet50", K=256), path)
    return path, encoder


def torchvision_resnet50(state: dict[str, torch.Tensor]) -> nn.Module:
    """torchvision's own ResNet-50 holding ``state`` (no fc), giving pooled features."""
    net = torchvision.models.resnet50()
    result = net.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    net.fc = nn.Identity()
    return net.eval()


def test_reference_resnet50_converts_and_loads_with_torchvision_features(
    resnet50_reference: tuple[Path, nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, encoder = resnet50_reference
    code, out, err = run_cli(["convert", str(path), "--out", str(tmp_path / "art")], capsys)
    assert code == 0, err
    assert "model.safetensors, config.json, README.md" in out
    assert {p.name for p in (tmp_path / "art").iterdir()} == {
        "model.safetensors",
        "config.json",
        "README.md",
    }
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    assert (config["arch"], config["feature_dim"], config["head"]) == ("resnet50", 2048, None)
    assert config["preprocessing"]["image_size"] == 224
    assert config["preprocessing"]["resize_size"] == 256
    assert config["meta"]["source"] == path.name  # no local path in a published artifact

    query = {k: v for k, v in encoder.state_dict().items() if not k.startswith("fc.")}
    reference_net = torchvision_resnet50(query)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference_net(images)
        from_folder = mocohub.load(tmp_path / "art")(images)
        from_checkpoint = mocohub.load(path)(images)
    assert expected.shape == (2, 2048)
    torch.testing.assert_close(from_folder, expected)
    torch.testing.assert_close(from_checkpoint, expected)

    # --to torchvision: a state dict torchvision's resnet50 loads strictly apart from fc.
    code, out, err = run_cli(
        ["convert", str(path), "--to", "torchvision", "--out", str(tmp_path / "r50.pth")], capsys
    )
    assert code == 0, err
    state = torch.load(tmp_path / "r50.pth", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(torchvision_resnet50(state)(images), expected)


def reference_detectron2_names(checkpoint: dict) -> dict[str, np.ndarray]:
    """The reference convert-pretrain-to-detectron2.py renaming, transcribed for comparison
    (minus the projection head, which mocohub leaves out)."""
    renamed = {}
    for key, value in checkpoint["state_dict"].items():
        name = key.removeprefix("module.encoder_q.")
        if name == key or name.startswith("fc."):
            continue
        name = name if "layer" in name else f"stem.{name}"
        for stage in range(1, 5):
            name = name.replace(f"layer{stage}", f"res{stage + 1}")
        for conv in range(1, 4):
            name = name.replace(f"bn{conv}", f"conv{conv}.norm")
        name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        renamed[name] = value.numpy()
    return renamed


def test_detectron2_pkl_has_the_reference_layout(
    resnet50_reference: tuple[Path, nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = resnet50_reference
    code, out, err = run_cli(
        ["convert", str(path), "--to", "detectron2", "--out", str(tmp_path)], capsys
    )
    assert f"MODEL.WEIGHTS {tmp_path / 'model.pkl'}" in out
    assert code == 0, err
    with open(tmp_path / "model.pkl", "rb") as f:
        converted = pickle.load(f, encoding="latin1")  # as detectron2 reads it
    assert converted["matching_heuristics"] is True
    assert "__author__" in converted
    weights = converted["model"]
    for key in (
        "stem.conv1.weight",
        "stem.conv1.norm.weight",
        "stem.conv1.norm.running_var",
        "res2.0.conv1.weight",
        "res2.0.conv1.norm.bias",
        "res2.0.shortcut.weight",
        "res2.0.shortcut.norm.running_mean",
        "res3.3.conv3.norm.weight",
        "res5.2.conv3.weight",
    ):
        assert isinstance(weights[key], np.ndarray), key
    assert weights["res5.2.conv3.norm.weight"].shape == (2048,)
    assert not any("layer" in k or "bn" in k or "downsample" in k or "fc" in k for k in weights)
    expected = reference_detectron2_names(torch.load(path, weights_only=True))
    assert set(weights) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(weights[key], value)


def test_head_is_kept_on_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for mlp, kind in ((False, "linear"), (True, "mlp")):
        encoder = reference_encoder("resnet18", mlp=mlp, dim=16, width=8)
        path = tmp_path / f"{kind}.pth.tar"
        torch.save(reference_checkpoint(encoder, prefix=""), path)  # no "module." prefix
        out_dir = tmp_path / kind
        code, _, err = run_cli(["convert", str(path), "--out", str(out_dir), "--head"], capsys)
        assert code == 0, err
        config = json.loads((out_dir / "config.json").read_text())
        assert config["head"] == {"type": kind, "dim": 16}
        images = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(mocohub.load(out_dir, head=True)(images), encoder(images))
            torch.testing.assert_close(
                mocohub.load(out_dir)(images), backbone_features(encoder, images)
            )
        assert "head=True" in (out_dir / "README.md").read_text()


def test_convert_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    encoder = reference_encoder("resnet18", mlp=True, dim=16, width=8, small_stem=True)
    path = tmp_path / "small.pth.tar"
    torch.save(reference_checkpoint(encoder), path)
    cases = [
        (
            ["convert", str(tmp_path / "missing.pth.tar"), "--out", str(tmp_path / "o")],
            "not a file",
        ),
        (["convert", str(path), "--to", "detectron2", "--out", str(tmp_path / "d")], "standard"),
        (["convert", str(path), "--to", "torchvision", "--head", "--out", "x"], "backbone only"),
    ]
    for args, words in cases:
        code, _, err = run_cli(args, capsys)
        assert code == 2, (args, err)
        assert err.startswith("Error: ") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
