"""MoCo v3 ViTs through the library as ResNets go: reference checkpoints in (mocohub.load,
a registry row over HTTP, torch.hub), artifact folders, FeatureExtractor, `mocohub embed`,
and `mocohub convert --to timm/deit` (detectron2 refused)."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from hub_helpers import serve
from PIL import Image
from test_moco_v3_checkpoints import _v3_mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import mocohub
from mocohub.artifact import (
    VIT_SHAPES,
    HeadConfig,
    ModelConfig,
    build_model,
    load_pretrained,
    read_config,
)
from mocohub.errors import ConfigError, InputError, MissingHeadError
from mocohub.features import FeatureExtractor, TorchEmbedder
from mocohub.fusion import fuse_batchnorm
from mocohub.hf import save_pretrained
from mocohub.preprocessing import Preprocessing
from mocohub.registry import WeightsFile, get_weights, registered
from mocohub.vit import VIT_ARCHITECTURES, vit_nano

ROOT = Path(__file__).resolve().parents[1]
NANO = {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2}


def timm_nano(**kwargs: Any) -> VisionTransformer:
    """timm's own VisionTransformer in vit_nano's shape, built without mocohub."""
    layer_norm = partial(nn.LayerNorm, eps=1e-6)
    return VisionTransformer(**NANO, num_heads=2, norm_layer=layer_norm, **kwargs)


def v3_vit_checkpoint(arch: str = "vit_nano") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What moco-v3's main_moco.py saves for a DDP-wrapped MoCo_ViT (a vit_nano here), and
    the base encoder's state without its projector ``head.*`` (mapped by hand)."""
    torch.manual_seed(0)
    base = vit_nano(num_classes=48)
    base.head = _v3_mlp(3, 32, 48, 16)  # the reference's 3-layer BN-MLP projector
    with torch.no_grad():  # weights away from their init (LN at 1/0, zero biases)
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
        base.train()(torch.rand(4, 1, 16, 16))  # the projector's BN statistics move
    state = {f"module.base_encoder.{k}": v.clone() for k, v in base.state_dict().items()}
    state |= {f"module.momentum_encoder.{k}": v.clone() for k, v in base.state_dict().items()}
    state |= {f"module.predictor.{k}": v for k, v in _v3_mlp(2, 16, 48, 16).state_dict().items()}
    encoder = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    return {"epoch": 300, "arch": arch, "state_dict": state, "optimizer": {}}, encoder


def hand_mapped(encoder: dict[str, torch.Tensor]) -> VisionTransformer:
    net = timm_nano(num_classes=0)
    net.load_state_dict(encoder, strict=True)
    return net.eval()


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, VisionTransformer]:
    ckpt, encoder = v3_vit_checkpoint()
    path = tmp_path / "vit-nano.pth.tar"
    torch.save(ckpt, path)
    return path, hand_mapped(encoder)


def images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def nano_config(**kwargs: Any) -> ModelConfig:
    prep = Preprocessing(16, 18, (0.5,), (0.25,), channels=1)
    return ModelConfig("vit_nano", in_channels=1, preprocessing=prep, **kwargs)


def test_vit_shapes_are_those_the_builders_make() -> None:
    assert set(VIT_SHAPES) == set(VIT_ARCHITECTURES)
    for arch, (width, patch, size, channels) in VIT_SHAPES.items():
        net = VIT_ARCHITECTURES[arch](num_classes=0)
        assert (net.feature_dim, net.patch_embed.patch_size[0]) == (width, patch)
        assert (net.patch_embed.img_size[0], net.in_channels) == (size, channels)


def test_model_config_of_a_vit_and_its_config_json() -> None:
    config = nano_config()
    assert (config.is_vit, config.image_size, config.patch_size, config.feature_dim) == (
        True,
        16,
        4,
        32,
    )
    data = config.to_dict()
    assert (data["image_size"], data["patch_size"], data["in_channels"]) == (16, 4, 1)
    assert "width" not in data and "small_stem" not in data
    assert ModelConfig.from_dict(data) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(data))).network() == config.network()
    # a ResNet's config.json has the keys it always had, and one without the new keys reads
    resnet = ModelConfig("resnet18").to_dict()
    assert "image_size" not in resnet and "patch_size" not in resnet
    assert ModelConfig.from_dict(resnet).image_size is None
    with pytest.raises(ConfigError, match="takes 32 px images but its preprocessing crops 16"):
        nano_config(image_size=32)
    with pytest.raises(ConfigError, match="not a positive multiple of the patch size 5"):
        nano_config(patch_size=5)
    with pytest.raises(ConfigError, match="small_stem and width are ResNet options"):
        nano_config(width=32)
    with pytest.raises(ConfigError, match="keeps no projection head"):
        nano_config(head=HeadConfig("mlp", 16))
    with pytest.raises(ConfigError, match="image_size and patch_size are ViT options"):
        ModelConfig("resnet18", patch_size=16)
    with pytest.raises(InputError, match="says feature_dim 64 but vit_nano has 32"):
        ModelConfig.from_dict({**data, "feature_dim": 64})


def test_build_model_makes_the_vit_the_config_describes() -> None:
    model = build_model(nano_config(patch_size=8))
    assert model.patch_embed.grid_size == (2, 2) and model.num_classes == 0
    assert model(images()).shape == (3, 32)
    # a loaded backbone fine-tunes whole, as a ResNet does (pre-training froze the projection)
    assert all(p.requires_grad for p in model.patch_embed.parameters())
    assert not model.pos_embed.requires_grad  # the fixed sin-cos embedding


def test_a_v3_vit_checkpoint_loads_as_its_base_encoder(
    checkpoint: tuple[Path, VisionTransformer],
) -> None:
    path, timm_model = checkpoint
    model = mocohub.load(path)
    config = model.mocohub_config
    assert (config.arch, config.image_size, config.patch_size, config.in_channels) == (
        "vit_nano",
        16,
        4,
        1,
    )
    assert config.meta["format"] == "reference_v3" and config.meta["epochs"] == 300
    assert config.preprocessing.image_size == 16 and config.preprocessing.resize_size == 18
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), rtol=0, atol=1e-6)
    with pytest.raises(MissingHeadError, match="keeps no projection head on a ViT"):
        mocohub.load(path, head=True)


def test_a_truncated_v3_vit_encoder_is_refused_in_one_line(tmp_path: Path) -> None:
    ckpt, _ = v3_vit_checkpoint()
    del ckpt["state_dict"]["module.base_encoder.blocks.1.mlp.fc2.weight"]
    torch.save(ckpt, tmp_path / "broken.pth.tar")
    with pytest.raises(InputError, match=r"does not fit a vit_nano \(Missing key") as info:
        mocohub.load(tmp_path / "broken.pth.tar")
    assert "\n" not in str(info.value)


def test_a_registry_vit_row_downloads_and_loads(
    checkpoint: tuple[Path, VisionTransformer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """moco_v3_vit_s pointed at a served vit_nano stand-in (its shape and preprocessing)."""
    path, timm_model = checkpoint
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("MOCOHUB_OFFLINE", raising=False)
    entry = get_weights("moco_v3_vit_s")
    small = mocohub.load(path).mocohub_config
    small = replace(small, meta={})
    with serve(path.parent) as (base, requests):
        row = replace(entry, model=small, files=(WeightsFile(f"{base}/{path.name}"),))
        with registered(row, replace=True), warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            model = mocohub.load("moco_v3_vit_s", progress=False)
            again = mocohub.load("moco_v3_vit_s", progress=False)
        assert requests == [f"/{path.name}"]  # downloaded once, then from the cache
    assert any("non-commercial" in str(w.message) for w in said)
    assert model.mocohub_config.meta["imagenet_linear_top1"] == 73.2
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(again(x), timm_model(x), rtol=0, atol=1e-6)
    # a file holding another network than the row's is refused
    other = replace(row, model=replace(small, patch_size=8))
    with (
        registered(other, replace=True),
        pytest.raises(InputError, match="other than the registered moco_v3_vit_s"),
    ):
        mocohub.load("moco_v3_vit_s", progress=False)


def test_the_torch_hub_entry_loads_a_vit(
    checkpoint: tuple[Path, VisionTransformer], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, timm_model = checkpoint
    monkeypatch.setenv("MOCOHUB_OFFLINE", "1")
    entry = get_weights("moco_v3_vit_b")
    small = replace(mocohub.load(path).mocohub_config, meta={})
    row = replace(entry, model=small, files=(WeightsFile(str(path)),))
    with registered(row, replace=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.hub.load(str(ROOT), "moco_v3_vit_b", source="local", trust_repo=True)
        random = torch.hub.load(str(ROOT), "moco_v3_vit_b", source="local", pretrained=False)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), rtol=0, atol=1e-6)
        assert not torch.allclose(random(x), timm_model(x))
    assert model.mocohub_config.meta["name"] == "moco_v3_vit_b"
    assert random.mocohub_config.network() == small.network()


def test_artifact_folder_round_trip(
    checkpoint: tuple[Path, VisionTransformer], tmp_path: Path
) -> None:
    path, _ = checkpoint
    model = mocohub.load(path)
    folder = save_pretrained(model, tmp_path / "vit")
    assert read_config(folder) == model.mocohub_config
    card = (folder / "README.md").read_text()
    assert "timm VisionTransformer key names" in card
    loaded = load_pretrained(folder)
    again = mocohub.load(folder)
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and torch.equal(again(x), model(x))
    with pytest.raises(MissingHeadError, match="holds no projection head"):
        load_pretrained(folder, head=True)


def test_feature_extractor_gives_the_class_token_and_the_patch_map(
    checkpoint: tuple[Path, VisionTransformer],
) -> None:
    path, timm_model = checkpoint
    model = mocohub.load(path)
    pil = [
        Image.fromarray(np.uint8(np.random.default_rng(i).integers(0, 255, (20, 24))))
        for i in (0, 1)
    ]
    fx = FeatureExtractor(model, device="cpu", precision="fp32", normalize=False)
    batch = fx.prepare(pil)
    with torch.no_grad():
        tokens = timm_model.forward_features(batch)
    np.testing.assert_allclose(fx(pil), tokens[:, 0].numpy(), atol=1e-5)
    maps = FeatureExtractor(model, device="cpu", precision="fp32", output="spatial")(pil)
    assert maps.shape == (2, 32, 4, 4)
    expected = tokens[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
    np.testing.assert_allclose(maps, expected.numpy(), atol=1e-5)
    # uint8 crops (the embed pipeline's path) give what float input gives
    embedder = TorchEmbedder(model, device="cpu", precision="fp32")
    crops = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    floats = model.mocohub_config.preprocessing.batch()(crops)
    np.testing.assert_allclose(embedder.embed_batch(crops), embedder.embed_batch(floats), atol=1e-5)
    with pytest.raises(InputError, match="keeps none on a vit_nano"):
        FeatureExtractor(model, device="cpu", output="head")


def test_batchnorm_folding_leaves_a_vit_as_it_is() -> None:
    model = build_model(nano_config())
    x = images()
    with torch.no_grad():
        assert torch.equal(fuse_batchnorm(model)(x), model(x))


@pytest.mark.precision
def test_embed_cli_with_a_vit(
    checkpoint: tuple[Path, VisionTransformer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, timm_model = checkpoint
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        pixels = np.random.default_rng(i).integers(0, 255, (16, 16), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "feats.npy"
    args = ["embed", folder, "--model", path, "--out", out, "--precision", "fp32", "--quiet"]
    code, _, err = run_cli([*args, "--workers", "0"], capsys)
    assert code == 0, err
    feats = np.load(out)
    fx = FeatureExtractor(path, device="cpu", precision="fp32")
    order = sorted(folder.iterdir())
    assert feats.shape == (5, 32)
    np.testing.assert_allclose(feats, fx([str(p) for p in order]), atol=1e-5)
    with torch.no_grad():
        raw = timm_model(fx.prepare([str(p) for p in order]))
    np.testing.assert_allclose(feats, torch.nn.functional.normalize(raw).numpy(), atol=1e-5)


def test_convert_to_timm_and_deit(
    checkpoint: tuple[Path, VisionTransformer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, timm_model = checkpoint
    code, out, err = run_cli(["convert", path, "--to", "timm", "--out", tmp_path / "t"], capsys)
    assert code == 0, err
    assert "timm vit_nano state dict" in out
    timm_state = torch.load(tmp_path / "t" / "model.pth", weights_only=True)
    fresh = timm_nano(num_classes=0)
    fresh.load_state_dict(timm_state, strict=True)
    code, out, err = run_cli(["convert", path, "--to", "deit", "--out", tmp_path / "d.pth"], capsys)
    assert code == 0, err
    deit = torch.load(tmp_path / "d.pth", weights_only=True)
    assert list(deit) == ["model"] and not any(k.startswith("head.") for k in deit["model"])
    # what the reference convert_to_deit.py writes from this checkpoint, key for key
    reference = {
        k[len("module.base_encoder.") :]: v
        for k, v in torch.load(path, weights_only=True)["state_dict"].items()
        if k.startswith("module.base_encoder") and not k.startswith("module.base_encoder.head")
    }
    assert deit["model"].keys() == reference.keys()
    assert all(torch.equal(deit["model"][k], reference[k]) for k in reference)
    classifier = timm_nano(num_classes=10)  # DeiT's fine-tuning: its own new head
    missing = classifier.load_state_dict(deit["model"], strict=False)
    assert sorted(missing.missing_keys) == ["head.bias", "head.weight"]
    assert not missing.unexpected_keys
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), timm_model(x), rtol=0, atol=0)
    code, out, err = run_cli(
        ["convert", path, "--to", "detectron2", "--out", tmp_path / "x"], capsys
    )
    assert code == 2 and err.count("\n") == 1
    assert "detectron2 has no layout for a Vision Transformer (vit_nano)" in err
    assert not (tmp_path / "x").exists()


def test_deit_of_a_resnet_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_moco_v3_checkpoints import v3_checkpoint

    ckpt, _ = v3_checkpoint()
    torch.save(ckpt, tmp_path / "r.pth.tar")
    code, _, err = run_cli(
        ["convert", tmp_path / "r.pth.tar", "--to", "deit", "--out", tmp_path / "d"], capsys
    )
    assert code == 2 and "holds a Vision Transformer, not a resnet18" in err
