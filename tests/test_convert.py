"""Models from MoCo checkpoints: mocohub runs and reference .pth.tar files, head optional."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from mocohub.artifact import HeadConfig, ModelConfig
from mocohub.backbones import resnet18, resnet50
from mocohub.convert import (
    IMAGENET_MEAN,
    backbone_state_from_moco,
    find_checkpoint_file,
    head_from_state,
    model_from_checkpoint,
)
from mocohub.errors import InputError
from mocohub.training.checkpoint import save_checkpoint, training_state
from mocohub.training.config import preset
from mocohub.training.moco import MoCo


def tiny_moco(mlp: bool = True, **encoder: object) -> MoCo:
    torch.manual_seed(0)
    options = {"small_stem": True, "width": 8, "in_channels": 1, **encoder}
    return MoCo(functools.partial(resnet18, **options), dim=16, K=32, mlp=mlp)


def query_features(model: MoCo, images: torch.Tensor) -> torch.Tensor:
    """The pooled features of MoCo's query encoder: everything but its fc head."""
    encoder = model.encoder_q.eval()
    head, encoder.fc = encoder.fc, nn.Identity()
    try:
        with torch.no_grad():
            return encoder(images)
    finally:
        encoder.fc = head


def loaded(path: Path) -> tuple[nn.Module, ModelConfig]:
    """The backbone in a checkpoint (or run folder), and its config."""
    backbone = model_from_checkpoint(path)
    return backbone, backbone.mocohub_config


def save_run(model: MoCo, run_dir: Path, epoch: int, **config: object) -> Path:
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
    values = preset("fashion_mnist", width=8, dim=16, K=32, batch_size=32, **config).to_dict()
    state = training_state(model, optimizer, None, None, epoch, 0, values)
    return save_checkpoint(run_dir, state, epoch=epoch, step=0)


def test_mocohub_run_folder_gives_the_query_encoder(tmp_path: Path) -> None:
    model = tiny_moco()
    # BN statistics that differ from initialisation, so that they must be loaded.
    with torch.no_grad():
        model.encoder_q.train()(torch.rand(8, 1, 28, 28))
    older = save_run(tiny_moco(), tmp_path, epoch=1)
    newest = save_run(model, tmp_path, epoch=2)
    assert find_checkpoint_file(tmp_path) == newest != older

    backbone, config = loaded(tmp_path)
    assert isinstance(backbone.fc, nn.Identity) and not backbone.training
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        features = backbone(images)
    torch.testing.assert_close(features, query_features(model, images))
    assert config.arch == "resnet18" and config.feature_dim == 64 == features.shape[1]
    assert (config.in_channels, config.small_stem, config.width) == (1, True, 8)
    prep = config.preprocessing
    assert (prep.image_size, prep.resize_size) == (28, 32)
    assert prep.mean == (0.2860,) and prep.std == (0.3530,)
    meta = config.meta
    assert (meta["format"], meta["epochs"], meta["source"]) == ("mocohub", 2, str(newest))
    # The file itself, and a folder holding only checkpoint_last.pt, work too.
    assert loaded(older)[1].meta["epochs"] == 1
    only_last = tmp_path / "last"
    only_last.mkdir()
    (only_last / "checkpoint_last.pt").write_bytes(newest.read_bytes())
    assert loaded(only_last)[1].meta["epochs"] == 2


def test_colour_model_gets_one_mean_per_channel(tmp_path: Path) -> None:
    model = tiny_moco(in_channels=3)
    save_run(model, tmp_path, epoch=1, mean=(0.5,), std=(0.25,))
    config = loaded(tmp_path)[1]
    assert config.in_channels == config.preprocessing.channels == 3
    assert config.preprocessing.mean == (0.5,) * 3 and config.preprocessing.std == (0.25,) * 3


def reference_checkpoint(model: MoCo, **extra: object) -> dict:
    """What the reference main_moco.py saves: a DDP model's state dict, 'module.' keys."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    return {"epoch": 200, "state_dict": state, "optimizer": {}, **extra}


def test_reference_checkpoint_with_arch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MoCo(functools.partial(resnet18, width=8), dim=16, K=32, mlp=False)
    path = tmp_path / "moco_v1.pth.tar"
    torch.save(reference_checkpoint(model, arch="resnet18"), path)
    backbone, config = loaded(path)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), query_features(model, images))
    assert (config.meta["format"], config.arch, config.meta["epochs"]) == (
        "reference",
        "resnet18",
        200,
    )
    assert (config.in_channels, config.small_stem, config.width) == (3, False, 8)
    assert (config.preprocessing.image_size, config.preprocessing.resize_size) == (224, 256)
    assert config.preprocessing.mean == IMAGENET_MEAN


def test_reference_checkpoint_defaults_to_resnet50(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MoCo(functools.partial(resnet50, width=8), dim=16, K=32, mlp=True)
    path = tmp_path / "moco_v2.pth.tar"
    torch.save(reference_checkpoint(model), path)  # no 'arch' key
    backbone, config = loaded(path)
    assert config.arch == "resnet50" and config.feature_dim == 8 * 8 * 4
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), query_features(model, images))
    # A resnet18's weights under a resnet50 label do not fit: a clear error.
    small = reference_checkpoint(tiny_moco(in_channels=3), arch="resnet50")
    torch.save(small, path)
    with pytest.raises(InputError, match="does not fit a resnet50"):
        model_from_checkpoint(path)


def test_key_map_takes_the_query_encoder_without_its_head() -> None:
    state = {
        "module.encoder_q.conv1.weight": torch.zeros(1),
        "module.encoder_q.fc.0.weight": torch.zeros(1),
        "module.encoder_q.fc.2.bias": torch.zeros(1),
        "module.encoder_k.conv1.weight": torch.zeros(1),
        "module.queue": torch.zeros(1),
        "module.queue_ptr": torch.zeros(1),
    }
    assert list(backbone_state_from_moco(state, prefix="module.")) == ["conv1.weight"]


class Opaque:
    pass


def test_unusable_checkpoints_are_clear_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="No model at"):
        model_from_checkpoint(tmp_path / "missing")
    with pytest.raises(InputError, match=r"holds no checkpoint_\*\.pt and no model"):
        model_from_checkpoint(tmp_path)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(InputError, match="Cannot read"):
        model_from_checkpoint(tmp_path / "text.pt")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, tmp_path / "plain.pt")
    with pytest.raises(InputError, match="neither a mocohub training checkpoint"):
        model_from_checkpoint(tmp_path / "plain.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(InputError, match="not a checkpoint dict"):
        model_from_checkpoint(tmp_path / "list.pt")
    torch.save({"model": Opaque()}, tmp_path / "object.pt")
    with pytest.raises(InputError, match="Opaque object, which safe"):
        model_from_checkpoint(tmp_path / "object.pt")
    torch.save(reference_checkpoint(tiny_moco(), arch="vit_huge"), tmp_path / "vit.pth.tar")
    with pytest.raises(InputError, match="'vit_huge' encoder"):
        model_from_checkpoint(tmp_path / "vit.pth.tar")
    # a ViT arch mocohub builds, over a ResNet's weights (tests/test_vit_library.py: real ones)
    torch.save(reference_checkpoint(tiny_moco(), arch="vit_base"), tmp_path / "vit.pth.tar")
    with pytest.raises(InputError, match="of a vit_base but its encoder has no patch_embed"):
        model_from_checkpoint(tmp_path / "vit.pth.tar")


def test_head_from_state_tells_v1_from_v2() -> None:
    assert head_from_state({"fc.weight": torch.zeros(128, 512)}) == HeadConfig("linear", 128)
    mlp = {"fc.0.weight": torch.zeros(512, 512), "fc.2.weight": torch.zeros(64, 512)}
    assert head_from_state(mlp) == HeadConfig("mlp", 64)
    assert head_from_state({"conv1.weight": torch.zeros(1)}) is None


def test_mocohub_run_keeps_its_head_and_preprocessing_on_request(tmp_path: Path) -> None:
    model = tiny_moco(mlp=True)
    save_run(model, tmp_path, epoch=3)
    loaded = model_from_checkpoint(tmp_path, head=True)
    config = loaded.mocohub_config
    assert config.head == HeadConfig("mlp", 16) and config.embedding_dim == 16
    assert config.preprocessing.image_size == 28 and config.preprocessing.channels == 1
    assert (config.meta["format"], config.meta["epochs"]) == ("mocohub", 3)
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.encoder_q.eval()(images))
    # A checkpoint without a head (e.g. only fc removed) says so for head=True.
    state = reference_checkpoint(model, arch="resnet18")
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if ".fc." not in k}
    torch.save(state, tmp_path / "headless.pth.tar")
    with pytest.raises(InputError, match="holds no projection head"):
        model_from_checkpoint(tmp_path / "headless.pth.tar", head=True)
    assert model_from_checkpoint(tmp_path / "headless.pth.tar").mocohub_config.head is None


def test_a_checkpoint_with_damaged_bytes_is_refused_not_loaded(tmp_path: Path) -> None:
    """torch.load does not check the zip CRCs: 4 KiB zeroed inside a checkpoint loaded silently."""
    run = tmp_path / "run"
    path = save_run(tiny_moco(), run, epoch=1)
    model_from_checkpoint(run)  # intact: loads
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    for source in (run, path):
        with pytest.raises(InputError, match=r"is damaged: the entry .* fails its CRC check"):
            model_from_checkpoint(source)
