"""What MoCo v3 changes in the training loop (:func:`~mocohub.training.train.train`).

The loop itself (data, checkpoints, resume, SIGTERM, logging, launcher) is the
one of v1/v2; ``config.method == "moco_v3"`` swaps in, from here:

- the model, :class:`~mocohub.training.moco_v3.MoCoV3` over a ResNet
  (``zero_init_residual=True``, reference ``main_moco.py`` line 186) or a ViT
  (:func:`mocohub.vit.build_vit`, patch embedding frozen), with every BatchNorm
  turned into ``SyncBatchNorm`` under DDP on GPUs (lines 194-196; torch has no
  CPU SyncBatchNorm, so gloo ranks normalise over their own batch);
- the optimizer, LARS (ResNet) or AdamW (ViT) over ``model.parameters()``, as
  the reference builds them (lines 224-230), so its optimizer state lines up;
- the per-step learning rate and momentum (lines 340-345): warm-up then
  cosine, and the momentum raised to 1 by a half cosine with ``moco_m_cos``;
- the encoder the k-NN monitor embeds with: the base encoder without its
  projector.

Example:
    >>> from mocohub.training.config import preset
    >>> config = preset("fashion_mnist_v3", epochs=2, warmup_epochs=1, batch_size=8)
    >>> model = build_moco_v3(config, in_channels=1)
    >>> step_lr(config, epoch=0, step=2, steps_per_epoch=4), step_momentum(config, 1, 0, 4)
    (0.0046875, 0.995)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mocohub.errors import ConfigError, error_summary

from .checkpoint import (
    check_same_method,
    is_reference_checkpoint,
    moco_state_from_reference,
)
from .config import TrainConfig
from .lars import LARS
from .moco_v3 import MoCoV3
from .schedule import cosine_momentum, warmup_cosine_lr

__all__ = [
    "build_moco_v3",
    "build_v3_optimizer",
    "compile_encoders",
    "knn_encoder",
    "load_v3_weights",
    "step_lr",
    "step_momentum",
]


def build_moco_v3(config: TrainConfig, in_channels: int, sync_bn: bool = False) -> MoCoV3:
    """The MoCo v3 model ``config`` describes, for images with ``in_channels`` channels;
    ``sync_bn`` turns its BatchNorms into ``SyncBatchNorm`` (for DDP on GPUs).

    Example:
        >>> build_moco_v3(preset("moco_v3_vit_s", image_size=32), 3).base_encoder.head[0]
        Linear(in_features=384, out_features=4096, bias=False)
    """
    encoder: Any
    if config.arch.startswith("vit_"):
        from mocohub.vit import build_vit

        encoder = functools.partial(
            build_vit, config.arch, img_size=config.image_size, in_channels=in_channels
        )
    else:
        from mocohub.backbones import build_backbone

        encoder = functools.partial(
            build_backbone,
            config.arch,
            small_stem=config.small_stem,
            width=config.width,
            in_channels=in_channels,
            zero_init_residual=True,
        )
    model = MoCoV3(encoder, dim=config.dim, mlp_dim=config.mlp_dim, T=config.T)
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_v3_optimizer(config: TrainConfig, model: MoCoV3) -> torch.optim.Optimizer:
    """LARS or AdamW (``config.optimizer``) over all of the model's parameters, as the
    reference builds it: the momentum encoder's and the frozen patch embedding's
    never get a gradient, so neither optimizer touches them. The learning rate is
    set at every step (:func:`step_lr`).

    Example:
        >>> type(build_v3_optimizer(config, model)).__name__
        'LARS'
    """
    if config.optimizer == "lars":
        return LARS(
            model.parameters(),
            lr=0.0,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=config.weight_decay)
    raise ConfigError(f"MoCo v3 trains with lars or adamw, not {config.optimizer!r}.")


def step_lr(config: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The learning rate of ``step`` (0-based, within ``epoch``): the reference's
    ``adjust_learning_rate(optimizer, epoch + i / iters_per_epoch)``.

    Example:
        >>> step_lr(preset("moco_v3_r50"), 10, 0, 100)  # warm-up done: 0.6 x 4096 / 256
        9.6
    """
    return warmup_cosine_lr(
        config.scaled_lr(),
        epoch + step / steps_per_epoch,
        epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
    )


def step_momentum(config: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The momentum encoder's momentum at ``step``: ``config.m``, raised to 1 by a half
    cosine over the run when ``config.moco_m_cos`` (``adjust_moco_momentum``).

    Example:
        >>> step_momentum(preset("moco_v3_r50", moco_m_cos=False), 50, 0, 100)
        0.99
    """
    if not config.moco_m_cos:
        return config.m
    return cosine_momentum(config.m, epoch + step / steps_per_epoch, epochs=config.epochs)


def compile_encoders(model: MoCoV3) -> None:
    """``torch.compile`` both encoders (the loop's ``--compile``)."""
    model.base_encoder.compile()
    model.momentum_encoder.compile()


class _PooledViT(nn.Module):
    """A ViT's class token after the final norm, with the head as ``fc``, so that
    :func:`~mocohub.training.monitor.pooled_features` can set it aside as it does a
    ResNet's."""

    def __init__(self, vit: Any) -> None:
        super().__init__()
        self.vit = vit
        self.fc: nn.Module = vit.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        return self.fc(self.vit.forward_head(tokens, pre_logits=True))


def knn_encoder(model: MoCoV3) -> nn.Module:
    """The module the k-NN monitor embeds with: the base encoder, whose projector
    (``fc`` of a ResNet, ``head`` of a ViT) the monitor sets aside.

    Example:
        >>> knn_encoder(model).fc is model.base_encoder.fc
        True
    """
    encoder = model.base_encoder
    return encoder if hasattr(encoder, "fc") else _PooledViT(encoder)


def load_v3_weights(model: MoCoV3, checkpoint: Mapping[str, Any]) -> None:
    """Copy the encoders and the predictor of a MoCo v3 checkpoint (mocohub's ``model``,
    or the reference's ``module.base_encoder.*`` ``state_dict``) into ``model``: ``--weights``.

    A MoCo v1/v2 checkpoint is one :class:`~mocohub.errors.ConfigError`.

    Example:
        >>> load_v3_weights(model, load_checkpoint("r-50-100ep.pth.tar"))
    """
    check_same_method(checkpoint, model)
    held = checkpoint.get("model")
    if is_reference_checkpoint(checkpoint):
        held = moco_state_from_reference(checkpoint)
    state = {
        key: value
        for key, value in (held.items() if isinstance(held, Mapping) else ())
        if key.startswith(("base_encoder.", "momentum_encoder.", "predictor."))
    }
    if not state:
        raise ConfigError(
            "The checkpoint holds no MoCo v3 weights (base_encoder.*, momentum_encoder.*); "
            "pass a MoCo v3 checkpoint, or train MoCo v1/v2 weights with a v1/v2 preset."
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ConfigError(
            "The checkpoint's MoCo v3 weights do not fit this configuration "
            f"({error_summary(error)}); "
            "use the same --arch, --dim and --mlp-dim as it (and, for a ViT, --image-size)."
        ) from None
