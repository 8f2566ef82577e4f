"""MoCo v3 ResNet checkpoints (facebookresearch/moco-v3 main_moco.py) in, the v3 registry rows,
and the once-per-process notice for weights under a non-commercial licence."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hub_helpers import backbone_features
from torch import nn

import mocohub
from mocohub import loading
from mocohub.backbones import resnet18
from mocohub.errors import InputError
from mocohub.loading import NonCommercialWeightsWarning
from mocohub.preprocessing import Preprocessing
from mocohub.registry import Weights, WeightsFile, get_weights, registered

V3 = {  # name: (release folder, epochs, ImageNet linear top-1), from moco-v3's CONFIG.md
    "moco_v3_r50_100ep": ("r-50-100ep", 100, 68.9),
    "moco_v3_r50_300ep": ("r-50-300ep", 300, 72.8),
    "moco_v3_r50_1000ep": ("r-50-1000ep", 1000, 74.6),
}


def _v3_mlp(num_layers: int, in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """The reference's _build_mlp: Linear(no bias), BN, ReLU ..., last BN without affine."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden, out if last else hidden, bias=False))
        layers.append(nn.BatchNorm1d(out if last else hidden, affine=not last))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def v3_checkpoint(arch: str = "resnet18") -> tuple[dict[str, Any], nn.Module]:
    """What moco-v3's main_moco.py saves for a DDP-wrapped MoCo_ResNet, and its base encoder."""
    torch.manual_seed(0)
    base = resnet18(small_stem=True, width=8, num_classes=16)
    hidden = int(base.fc.weight.shape[1])
    base.fc = _v3_mlp(2, hidden, 32, 16)  # the projector replaces fc, as in the reference
    with torch.no_grad():
        base.train()(torch.rand(4, 3, 32, 32))  # move the BN statistics
    base.eval()
    state = {f"module.base_encoder.{k}": v.clone() for k, v in base.state_dict().items()}
    state |= {f"module.momentum_encoder.{k}": v.clone() for k, v in base.state_dict().items()}
    predictor = _v3_mlp(2, 16, 32, 16)
    state |= {f"module.predictor.{k}": v for k, v in predictor.state_dict().items()}
    return {"epoch": 100, "arch": arch, "state_dict": state, "optimizer": {}, "scaler": {}}, base


def test_a_v3_resnet_checkpoint_loads_as_its_base_encoder(tmp_path: Path) -> None:
    checkpoint, base = v3_checkpoint()
    torch.save(checkpoint, tmp_path / "r-18.pth.tar")
    model = mocohub.load(tmp_path / "r-18.pth.tar")
    config = model.mocohub_config
    assert config.meta["format"] == "reference_v3" and config.meta["epochs"] == 100
    assert (config.arch, config.width, config.small_stem, config.feature_dim) == (
        "resnet18",
        8,
        True,
        64,
    )
    assert config.preprocessing == Preprocessing.imagenet()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), backbone_features(base, images))
    # The momentum encoder and the BN-MLP projector are not the backbone: nothing else loads.
    with pytest.raises(mocohub.MocohubError, match="no projection head"):
        mocohub.load(tmp_path / "r-18.pth.tar", head=True)


def test_a_v3_checkpoint_named_vit_but_holding_a_resnet_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    """ViT checkpoints load (tests/test_vit_library.py); a ResNet labelled vit_small does not."""
    checkpoint, _ = v3_checkpoint(arch="vit_small")
    torch.save(checkpoint, tmp_path / "vit-s.pth.tar")
    with pytest.raises(InputError, match="of a vit_small but its encoder has no patch_embed") as e:
        mocohub.load(tmp_path / "vit-s.pth.tar")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", sorted(V3))
def test_v3_registry_rows(name: str) -> None:
    release, epochs, top1 = V3[name]
    weights = get_weights(name)
    (file,) = weights.files
    assert file.location == f"https://dl.fbaipublicfiles.com/moco-v3/{release}/{release}.pth.tar"
    assert file.hash is None and "not yet pinned" in weights.meta["hash_note"]
    assert (weights.meta["epochs"], weights.meta["imagenet_linear_top1"]) == (epochs, top1)
    assert weights.meta["license"] == "cc-by-nc-4.0" and weights.model.arch == "resnet50"
    assert weights.model.preprocessing == Preprocessing.imagenet() and weights.model.head is None
    assert "MoCo v3" in weights.summary() and f"{top1}%" in weights.summary()


def test_non_commercial_weights_say_so_once_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "_LICENCES_SAID", set())
    checkpoint, _ = v3_checkpoint()
    torch.save(checkpoint, tmp_path / "r-18.pth.tar")
    config = mocohub.load(tmp_path / "r-18.pth.tar").mocohub_config
    rows = [
        Weights(name, config, (WeightsFile(str(tmp_path / "r-18.pth.tar")),), {"license": lic})
        for name, lic in (("nc_r18", "cc-by-nc-4.0"), ("mit_r18", "mit"))
    ]
    with registered(*rows), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            mocohub.load("nc_r18")
            mocohub.load("mit_r18")
        mocohub.load("nc_r18", pretrained=False)  # no weights loaded: nothing to say
    said = [w for w in caught if issubclass(w.category, NonCommercialWeightsWarning)]
    assert len(said) == 1
    assert str(said[0].message).startswith("nc_r18 is licensed CC-BY-NC-4.0: non-commercial use")
    assert said[0].filename == __file__  # points at the caller's line, not mocohub's
