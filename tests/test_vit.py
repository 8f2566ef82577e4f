"""The ViT backbones: the reference's (facebookresearch/moco-v3 ``vits.py``) position
embedding, initialisation, frozen patch projection, sizes and key names on timm."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch import nn

import mocohub.vit
from mocohub.errors import ConfigError
from mocohub.vit import (
    ViT,
    build_vit,
    sincos_position_embedding,
    vit_base,
    vit_mini,
    vit_nano,
    vit_small,
)


def reference_sincos(h: int, w: int, embed_dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """A transcription of vits.py ``build_2d_sincos_position_embedding`` (lines 53-68);
    ``torch.meshgrid``'s default indexing there is "ij"."""
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    pos_dim = embed_dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1.0 / (temperature**omega)
    out_w = torch.einsum("m,d->md", [grid_w.flatten(), omega])
    out_h = torch.einsum("m,d->md", [grid_h.flatten(), omega])
    pos_emb = torch.cat(
        [torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1
    )[None, :, :]
    pe_token = torch.zeros([1, 1, embed_dim], dtype=torch.float32)
    return torch.cat([pe_token, pos_emb], dim=1)


@pytest.mark.parametrize(("h", "w", "dim"), [(14, 14, 384), (14, 14, 768), (7, 7, 192), (2, 3, 8)])
def test_the_position_embedding_is_the_reference_s(h: int, w: int, dim: int) -> None:
    ours = sincos_position_embedding((h, w), dim)
    reference = reference_sincos(h, w, dim)
    assert ours.shape == (1, 1 + h * w, dim)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_a_model_s_position_embedding_is_fixed_and_the_reference_s() -> None:
    net = vit_mini()
    assert net.pos_embed.requires_grad is False
    torch.testing.assert_close(net.pos_embed.data, reference_sincos(7, 7, 192), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("builder", "dim", "heads"), [(vit_small, 384, 12), (vit_base, 768, 12)])
def test_vit_s_has_the_reference_s_12_heads_and_vit_b_its_sizes(
    builder: object, dim: int, heads: int
) -> None:
    with torch.device("meta"):  # the structure only: no memory, no init
        net = builder()  # type: ignore[operator]
    assert (net.embed_dim, len(net.blocks), net.patch_embed.patch_size) == (dim, 12, (16, 16))
    assert all(block.attn.num_heads == heads for block in net.blocks)
    assert net.patch_embed.img_size == (224, 224) and net.in_channels == 3
    assert isinstance(net.norm, nn.LayerNorm) and net.norm.eps == 1e-6
    assert net.blocks[0].mlp.fc1.out_features == 4 * dim
    assert net.blocks[0].attn.qkv.bias is not None


def test_the_state_dict_has_the_reference_s_key_names() -> None:
    """The keys of the timm 0.4.9 model that the reference checkpoints were saved from,
    written out by hand: a checkpoint's ``base_encoder.*`` maps onto ours one to one."""
    net = ViT(img_size=16, patch_size=4, in_channels=3, embed_dim=32, depth=2, num_heads=2)
    block = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias",
    ]  # fmt: skip
    expected = [
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
        *[f"blocks.{i}.{name}" for i in range(2) for name in block],
        "norm.weight", "norm.bias", "head.weight", "head.bias",
    ]  # fmt: skip
    assert sorted(net.state_dict()) == sorted(expected)


def test_the_initialisation_is_the_reference_s() -> None:
    torch.manual_seed(0)
    net = ViT(img_size=32, patch_size=8, in_channels=3, embed_dim=64, depth=2, num_heads=4)
    dim = 64
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            rows, cols = module.weight.shape
            fan_out = rows // 3 if "qkv" in name else rows  # q, k, v as three matrices
            bound = math.sqrt(6.0 / (fan_out + cols))
            assert module.weight.abs().max() <= bound, name
            assert module.weight.abs().max() > 0.9 * bound, name  # uniform over the bound
            assert module.bias is not None and not module.bias.any(), name
    proj = net.patch_embed.proj
    bound = math.sqrt(6.0 / (3 * 8 * 8 + dim))  # vits.py line 45
    assert bound * 0.9 < proj.weight.abs().max() <= bound
    assert not proj.bias.any()
    assert 0 < net.cls_token.abs().max() < 1e-5  # N(0, 1e-6)


def test_the_patch_projection_is_frozen_unless_asked_otherwise() -> None:
    torch.manual_seed(0)
    frozen, trained = vit_nano(), vit_nano(frozen_patch_embed=False)
    for net in (frozen, trained):
        net(torch.randn(4, 1, 16, 16)).sum().backward()
    assert frozen.patch_embed.proj.weight.grad is None
    assert frozen.patch_embed.proj.bias.grad is None
    assert frozen.pos_embed.grad is None and trained.pos_embed.grad is None
    assert trained.patch_embed.proj.weight.grad is not None
    assert frozen.blocks[0].attn.qkv.weight.grad is not None
    trainable = {n for n, p in frozen.named_parameters() if not p.requires_grad}
    assert trainable == {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}


def test_cls_and_patches_are_the_pooled_and_spatial_features() -> None:
    torch.manual_seed(0)
    net = vit_nano(num_classes=5).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        pooled, spatial = net.forward_cls_and_patches(x)
        tokens = net.forward_features(x)
        logits = net(x)
    assert pooled.shape == (3, 32) and spatial.shape == (3, 32, 4, 4)
    torch.testing.assert_close(pooled, net.forward_head(tokens, pre_logits=True))
    torch.testing.assert_close(net.head(pooled), logits)
    for row, col in [(0, 0), (0, 3), (2, 1), (3, 3)]:  # patch tokens in row-major order
        torch.testing.assert_close(spatial[:, :, row, col], tokens[:, 1 + row * 4 + col])


def test_vit_mini_fits_fashion_mnist() -> None:
    net = vit_mini(num_classes=0)
    assert net.patch_embed.grid_size == (7, 7) and net.feature_dim == 192
    assert 2.5e6 < sum(p.numel() for p in net.parameters()) < 3e6
    pooled, spatial = net.forward_cls_and_patches(torch.randn(2, 1, 28, 28))
    assert pooled.shape == (2, 192) and spatial.shape == (2, 192, 7, 7)


def test_bad_settings_get_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="not a multiple of the patch size"):
        vit_nano(img_size=18)
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        vit_nano(embed_dim=36, num_heads=8)
    with pytest.raises(ConfigError, match="divisible by 4"):
        sincos_position_embedding((2, 2), 6)
    with pytest.raises(ConfigError, match="Unknown ViT architecture 'vit_huge'"):
        build_vit("vit_huge")
    assert isinstance(build_vit("vit_nano"), ViT)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(mocohub.vit, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
