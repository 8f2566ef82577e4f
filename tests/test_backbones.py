from __future__ import annotations

import pytest
import torch
import torchvision

import mocohub
from mocohub.backbones import (
    ARCHITECTURES,
    ResNet,
    build_backbone,
    feature_dim,
    resnet18,
    resnet34,
    resnet50,
)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (resnet18, torchvision.models.resnet18),
        (resnet34, torchvision.models.resnet34),
        (resnet50, torchvision.models.resnet50),
    ],
)
def test_default_is_torchvision(ours, theirs) -> None:
    torch.manual_seed(0)
    mine = ours()
    torch.manual_seed(0)
    reference = theirs()
    assert isinstance(mine, torchvision.models.ResNet)
    # Same names, shapes and (with the same seed) the same initial values.
    assert list(mine.state_dict()) == list(reference.state_dict())
    for (name, a), b in zip(
        mine.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # Our weights load into torchvision's class strictly, and give its outputs.
    loaded = theirs()
    loaded.load_state_dict(mine.state_dict(), strict=True)
    mine.eval()
    loaded.eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(mine(x), loaded(x))


def test_resnet50_feature_width_and_fc() -> None:
    net = resnet50(num_classes=128)
    assert net.fc.in_features == 2048
    assert net.feature_dim == 2048
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 128)


def test_forward_features_is_the_map_forward_pools() -> None:
    torch.manual_seed(0)
    net = resnet18(num_classes=10, small_stem=True, width=8).eval()
    x = torch.randn(2, 3, 28, 28)
    trunk = torch.nn.Sequential(*list(net.children())[:-2])  # stem + stages, as torchvision
    with torch.no_grad():
        spatial = net.forward_features(x)
        torch.testing.assert_close(spatial, trunk(x), rtol=0, atol=0)
        assert spatial.shape == (2, net.feature_dim, 4, 4)
        pooled = net.fc(torch.flatten(net.avgpool(spatial), 1))
        torch.testing.assert_close(net(x), pooled, rtol=0, atol=0)


@pytest.mark.parametrize(("arch", "width", "dim"), [("resnet18", 16, 128), ("resnet50", 64, 2048)])
def test_feature_dim_without_building(arch: str, width: int, dim: int) -> None:
    assert feature_dim(arch, width) == dim == build_backbone(arch, width=width).feature_dim
    with pytest.raises(mocohub.ConfigError, match="Unknown architecture"):
        feature_dim("vit_b16")


def test_the_torch_free_shape_table_matches_the_networks() -> None:
    """``mocohub.model_config`` knows each ResNet's feature size without importing torch
    (for the registry and the command line); the networks built agree, at any width."""
    from mocohub.model_config import RESNET_EXPANSION

    assert set(RESNET_EXPANSION) == set(ARCHITECTURES)
    for arch in ARCHITECTURES:
        for width in (8, 24):
            assert feature_dim(arch, width) == build_backbone(arch, width=width).feature_dim


def test_small_image_options() -> None:
    net = resnet18(num_classes=10, small_stem=True, in_channels=1, width=16)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.in_channels == 1
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert [net.layer1[0].conv1.out_channels, net.layer4[0].conv1.out_channels] == [16, 128]
    assert net.fc.in_features == 128
    net.eval()
    # 28 px in, a 4x4 map before pooling: no stage collapses to 1x1 too early.
    trunk = torch.nn.Sequential(*list(net.children())[:-2])
    assert trunk(torch.randn(1, 1, 28, 28)).shape == (1, 128, 4, 4)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    # Key names stay torchvision's, so tools that map them keep working.
    assert set(net.state_dict()) == set(torchvision.models.resnet18(num_classes=10).state_dict())


def test_zero_init_residual() -> None:
    net = resnet50(zero_init_residual=True)
    assert all(int(torch.count_nonzero(block.bn3.weight)) == 0 for block in net.layer1)


def test_build_by_name_and_errors() -> None:
    assert isinstance(build_backbone("resnet34", num_classes=5), ResNet)
    assert mocohub.build_backbone is build_backbone
    with pytest.raises(mocohub.ConfigError, match="Unknown architecture 'resnet101'"):
        build_backbone("resnet101")
    with pytest.raises(mocohub.ConfigError, match="positive"):
        resnet18(width=0)


def test_hubconf_entry_points_build_backbones() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "hubconf.py"
    spec = importlib.util.spec_from_file_location("hubconf", path)
    assert spec is not None and spec.loader is not None
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    net = hubconf.resnet18(num_classes=7, small_stem=True)
    assert isinstance(net, ResNet) and net.fc.out_features == 7


def test_torch_hub_load_from_checkout() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    net = torch.hub.load(str(root), "resnet34", source="local", num_classes=3)
    assert isinstance(net, torchvision.models.ResNet) and net.fc.out_features == 3
