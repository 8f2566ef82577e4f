"""Vision Transformers as MoCo v3 builds them, on timm's ``VisionTransformer``.

Why timm: the MoCo v3 reference (facebookresearch/moco-v3, ``vits.py``)
subclasses timm's ``VisionTransformer``, so building on the same class gives
the reference's module tree and state-dict key names (``patch_embed.proj.*``,
``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv.*``, ``norm.*``, ``head.*``)
with no mapping at all: a reference checkpoint's ``base_encoder.*`` (and the
DeiT file its ``convert_to_deit.py`` writes) loads as it is, and timm keeps the
attention kernels (fused SDPA) up to date. torchvision's ``vit_b_16`` names
everything differently (``encoder.layers.encoder_layer_N...``, a
``class_token``, a separate ``conv_proj``) and would need a key map both ways.

What MoCo v3 changes in timm's model, as the reference's
``VisionTransformerMoCo`` does (``vits.py`` lines 25-69):

- a fixed 2D sin-cos position embedding (not learned; a zero vector for the
  class token), computed exactly as ``build_2d_sincos_position_embedding``;
- the reference's initialisation: Xavier-uniform linear layers, the ``qkv``
  weight treated as three separate matrices, zero biases, class token
  ~N(0, 1e-6), the patch projection Xavier-uniform as one linear map;
- optionally (the reference's ``--stop-grad-conv1``, used by every ViT recipe
  in its CONFIG.md, and this module's default) a frozen random patch
  projection: the "stop-gradient" fix for training instability (paper, 4.2);
- ViT-S with 12 heads (the reference's choice; DeiT-S has 6).

Importing this module imports timm (and torch); the command line imports it
only inside commands that build a ViT, so ``mocohub --help`` stays torch-free.

Example:
    >>> from mocohub.vit import vit_nano
    >>> net = vit_nano(num_classes=0)
    >>> pooled, spatial = net.forward_cls_and_patches(torch.zeros(2, 1, 16, 16))
    >>> pooled.shape, spatial.shape
    (torch.Size([2, 32]), torch.Size([2, 32, 4, 4]))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import PatchEmbed
from timm.models.vision_transformer import VisionTransformer as _TimmVisionTransformer
from torch import nn

from mocohub.errors import ConfigError

__all__ = [
    "VIT_ARCHITECTURES",
    "ViT",
    "build_vit",
    "sincos_position_embedding",
    "vit_base",
    "vit_mini",
    "vit_nano",
    "vit_small",
]


def sincos_position_embedding(
    grid_size: tuple[int, int], embed_dim: int, temperature: float = 10000.0
) -> torch.Tensor:
    """The fixed 2D sin-cos position embedding, 1 x (1 + h*w) x embed_dim (float32).

    The reference's ``build_2d_sincos_position_embedding`` (``vits.py`` lines
    53-69), value for value: a quarter of the channels each for sin and cos of
    the two grid coordinates (the first coordinate runs over ``grid_size[1]``
    and varies slowest, as the reference's ``meshgrid(grid_w, grid_h)``; on the
    square grids it is used with, that is the token's row), frequencies
    ``temperature ** -(i / (embed_dim / 4))``, and a zero row for the class token.

    Example:
        >>> [round(v, 4) for v in sincos_position_embedding((2, 2), 8)[0, 1:, 2].tolist()]
        [1.0, 1.0, 0.5403, 0.5403]
    """
    h, w = grid_size
    if embed_dim % 4:
        raise ConfigError(
            f"A 2D sin-cos position embedding needs a width divisible by 4, got {embed_dim}; "
            "choose embed_dim as a multiple of 4."
        )
    rows, cols = torch.meshgrid(
        torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij"
    )
    quarter = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_rows = rows.flatten()[:, None] * omega[None, :]
    out_cols = cols.flatten()[:, None] * omega[None, :]
    grid = torch.cat([out_rows.sin(), out_rows.cos(), out_cols.sin(), out_cols.cos()], dim=1)
    return torch.cat([torch.zeros(1, embed_dim), grid])[None]


class ViT(_TimmVisionTransformer):
    """timm's ``VisionTransformer`` with MoCo v3's position embedding, init and frozen stem.

    Args:
        img_size: input side in pixels (the model accepts only this size).
        patch_size: side of a patch; ``img_size`` must be a multiple of it.
        in_channels: channels of the input images (1 for grayscale data).
        embed_dim: token width (a multiple of 4 and of ``num_heads``).
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        num_classes: output size of ``head`` (MoCo v3 passes its MLP width and
            then replaces ``head`` by the projector); 0 for no head.
        frozen_patch_embed: do not train the random patch projection (the
            reference's ``--stop-grad-conv1``; default True, as in its recipes).
        **kwargs: passed to timm's ``VisionTransformer`` (e.g. ``drop_path_rate``).
    """

    #: the :class:`~mocohub.artifact.ModelConfig` of a model built by mocohub (build_model, load)
    mocohub_config: Any = None

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        num_classes: int = 1000,
        frozen_patch_embed: bool = True,
        **kwargs: Any,
    ) -> None:
        if min(img_size, patch_size, in_channels, embed_dim, depth, num_heads) < 1:
            raise ConfigError(
                "img_size, patch_size, in_channels, embed_dim, depth and num_heads must all be "
                f"positive, got {img_size}, {patch_size}, {in_channels}, {embed_dim}, {depth}, "
                f"{num_heads}."
            )
        if img_size % patch_size:
            raise ConfigError(
                f"The image side {img_size} is not a multiple of the patch size {patch_size}; "
                "choose an image size that the patches tile."
            )
        if embed_dim % num_heads or embed_dim % 4:
            raise ConfigError(
                f"embed_dim {embed_dim} must be a multiple of num_heads ({num_heads}) and of 4 "
                "(the sin-cos position embedding)."
            )
        # The reference's block settings (vits.py lines 115-127); timm's 'moco'
        # weight init is the reference's linear-layer init (vits.py lines 31-41).
        kwargs.setdefault("mlp_ratio", 4.0)
        kwargs.setdefault("qkv_bias", True)
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_channels,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            num_classes=num_classes,
            weight_init="moco",
            **kwargs,
        )
        self.in_channels = in_channels
        self.feature_dim = embed_dim
        # A fixed embedding, still a parameter named pos_embed (so the state dict
        # has the reference's keys), that no optimizer updates.
        embedding = sincos_position_embedding(self.patch_embed.grid_size, embed_dim)
        self.pos_embed = nn.Parameter(embedding, requires_grad=False)
        if isinstance(self.patch_embed, PatchEmbed):
            proj = self.patch_embed.proj
            assert isinstance(proj, nn.Conv2d)
            # Xavier-uniform for the projection as one linear map from a patch's
            # pixels to a token (vits.py lines 43-47; the reference writes 3 for
            # its RGB input where this takes in_channels).
            fan_in = in_channels * proj.kernel_size[0] * proj.kernel_size[1]
            bound = math.sqrt(6.0 / float(fan_in + embed_dim))
            nn.init.uniform_(proj.weight, -bound, bound)
            assert proj.bias is not None
            nn.init.zeros_(proj.bias)
            if frozen_patch_embed:
                proj.weight.requires_grad = False
                proj.bias.requires_grad = False

    def forward_cls_and_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class token and the patch tokens after the final norm, from one pass.

        Returns ``(pooled, spatial)``: the class token, N x embed_dim (the
        feature that the head and the linear protocol read, as ``avgpool`` of
        :meth:`mocohub.backbones.ResNet.forward_features`), and the patch
        tokens as a map, N x embed_dim x h x w (h = w = img_size / patch_size),
        laid out as a ResNet's feature map. ``forward_features`` keeps timm's
        meaning (all tokens, N x (1 + h*w) x embed_dim), which timm's
        ``forward`` relies on.

        Example:
            >>> net = vit_nano()
            >>> pooled, spatial = net.forward_cls_and_patches(torch.zeros(1, 1, 16, 16))
            >>> torch.equal(net.head(pooled), net(torch.zeros(1, 1, 16, 16)))
            True
        """
        tokens = self.forward_features(x)
        h, w = self.patch_embed.grid_size
        patches = tokens[:, self.num_prefix_tokens :]
        spatial = patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        return tokens[:, 0], spatial


def vit_small(**kwargs: Any) -> ViT:
    """ViT-S/16 as MoCo v3: width 384, 12 blocks, 12 heads (DeiT-S has 6), 224 px.

    ``vits.py`` lines 115-120. Options: see :class:`ViT`.

    Example:
        >>> vit_small(num_classes=0).feature_dim
        384
    """
    return ViT(**{"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 12, **kwargs})


def vit_base(**kwargs: Any) -> ViT:
    """ViT-B/16 as MoCo v3: width 768, 12 blocks, 12 heads, 224 px (``vits.py`` lines 122-127).

    Example:
        >>> vit_base(num_classes=0).feature_dim
        768
    """
    return ViT(**{"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})


def vit_mini(**kwargs: Any) -> ViT:
    """A ViT for 28-32 px images on a CPU (Fashion-MNIST, CIFAR): 4 px patches, width 192,
    6 blocks, 3 heads of 64, 28 px grayscale by default (7 x 7 = 49 patches, 2.7 M weights).

    Not in the reference: its width and heads are DeiT-Tiny's, at half the depth.

    Example:
        >>> vit_mini().patch_embed.grid_size
        (7, 7)
    """
    defaults = {"img_size": 28, "in_channels": 1, "patch_size": 4, "embed_dim": 192}
    return ViT(**{**defaults, "depth": 6, "num_heads": 3, **kwargs})


def vit_nano(**kwargs: Any) -> ViT:
    """A ViT for tests: 16 px grayscale, 4 px patches, width 32, 2 blocks, 2 heads.

    Example:
        >>> sum(p.numel() for p in vit_nano(num_classes=0).parameters()) < 30_000
        True
    """
    defaults = {"img_size": 16, "in_channels": 1, "patch_size": 4, "embed_dim": 32}
    return ViT(**{**defaults, "depth": 2, "num_heads": 2, **kwargs})


VIT_ARCHITECTURES: dict[str, Callable[..., ViT]] = {
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_mini": vit_mini,
    "vit_nano": vit_nano,
}


def build_vit(arch: str, **kwargs: Any) -> ViT:
    """Build a ViT by name (``vit_small``, ``vit_base``, ``vit_mini``, ``vit_nano``).

    Example:
        >>> build_vit("vit_nano", num_classes=10).head.out_features
        10
    """
    try:
        builder = VIT_ARCHITECTURES[arch]
    except KeyError:
        raise ConfigError(
            f"Unknown ViT architecture {arch!r}; choose one of: {', '.join(VIT_ARCHITECTURES)}."
        ) from None
    return builder(**kwargs)
