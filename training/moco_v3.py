"""MoCo v3 (Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision
Transformers", 2021): no queue, a predictor, a symmetrised contrastive loss.

A drop-in for the reference ``moco/builder.py`` (facebookresearch/moco-v3): the
same constructor arguments, the same ``forward(x1, x2, m) -> loss`` and the same
state-dict keys (``base_encoder.*``, ``momentum_encoder.*``, ``predictor.*``, the
projector inside each encoder), so a reference checkpoint's ``state_dict``
(``module.`` prefix stripped) loads as it is, and the parameters come in the
reference's order (so its LARS/AdamW ``optimizer`` state lines up too).

The reference's two subclasses differ only in their MLPs (builder.py lines
99-122); here one class reads which kind of encoder it got from its last layer:

==========  ==================  =========================  ============================
encoder     last layer          projector (replaces it)    predictor
==========  ==================  =========================  ============================
ResNet      ``fc``              2 layers, BN, last BN      2 layers, BN, no last BN
ViT         ``head``            3 layers, BN, last BN      2 layers, BN, last BN
==========  ==================  =========================  ============================

Every BN in the MLPs is ``BatchNorm1d``; the last one has no affine parameters
(builder.py lines 36-52, after SimCLR). The hidden width is ``mlp_dim`` (4096),
the output ``dim`` (256).

What differs from the reference, none of it changing the maths:
- the momentum update is one ``torch._foreach_lerp_`` over all parameters,
  not a Python loop of per-tensor arithmetic (as ``training/moco.py``);
- the loss is computed in float32 also under autocast (float64 for a float64
  model): logits / T reach 1 / T = 5 for the ViT's T = 0.2;
- it runs in one process with no process group (rank 0 of a world of one);
- it refuses a step whose ranks hold different batch sizes (the all-gather
  needs equal shapes) with one clear error instead of a hang.

BatchNorm across ranks: under DDP on GPUs the reference converts every
BatchNorm of the model (encoders' and MLPs') to ``SyncBatchNorm``
(``main_moco.py`` lines 194-196); call
``torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)`` before wrapping it in
DDP to do the same. torch has no CPU ``SyncBatchNorm``, so under gloo each rank
normalises over its own batch (the reference does not run on CPUs at all).

Example:
    >>> from functools import partial
    >>> from mocohub.backbones import resnet18
    >>> model = MoCoV3(partial(resnet18, small_stem=True, width=8), dim=16, mlp_dim=32)
    >>> loss = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), m=0.99)
    >>> loss.shape, sorted({key.split(".")[0] for key in model.state_dict()})
    (torch.Size([]), ['base_encoder', 'momentum_encoder', 'predictor'])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mocohub.errors import ConfigError, InputError

from .distributed import all_gather_no_grad, check_same_batch_size, get_rank

__all__ = ["MoCoV3", "build_mlp"]

#: the encoder's last layer -> (projector layers, predictor's last BN); builder.py lines 99-122
_LAYOUTS = {"fc": (2, False), "head": (3, True)}


def build_mlp(
    num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True
) -> nn.Sequential:
    """MoCo v3's MLP: Linear (no bias) - BN - ReLU per hidden layer, then Linear and
    optionally a BN without affine parameters (builder.py lines 36-52).

    Example:
        >>> mlp = build_mlp(2, 8, 16, 4)
        >>> [type(layer).__name__ for layer in mlp], mlp[4].affine
        (['Linear', 'BatchNorm1d', 'ReLU', 'Linear', 'BatchNorm1d'], False)
    """
    layers: list[nn.Module] = []
    for index in range(num_layers):
        last = index == num_layers - 1
        width_in = input_dim if index == 0 else mlp_dim
        width_out = output_dim if last else mlp_dim
        layers.append(nn.Linear(width_in, width_out, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(width_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(width_out, affine=False))
    return nn.Sequential(*layers)


def _head_name(encoder: nn.Module) -> str:
    names = [name for name in _LAYOUTS if isinstance(getattr(encoder, name, None), nn.Linear)]
    if len(names) != 1:
        raise ConfigError(
            f"MoCo v3 replaces the encoder's last Linear layer, `fc` (a ResNet) or `head` (a "
            f"ViT), by its projector; {type(encoder).__name__} has "
            f"{' and '.join(names) or 'neither'}. Pass a builder such as "
            "mocohub.backbones.resnet50 or mocohub.vit.vit_small."
        )
    return names[0]


class MoCoV3(nn.Module):
    """A base encoder with projector and predictor, and its momentum copy.

    Args:
        base_encoder: builds an encoder when called with ``num_classes=mlp_dim``,
            e.g. ``mocohub.backbones.resnet50`` (last layer ``fc``) or
            ``mocohub.vit.vit_small`` (last layer ``head``).
        dim: output width of the projector and predictor (default 256).
        mlp_dim: hidden width of the MLPs (default 4096).
        T: softmax temperature (default 1.0; the reference's ViT recipes use 0.2).

    The reference builds its ResNets with ``zero_init_residual=True``
    (``main_moco.py`` line 186): pass ``partial(resnet50, zero_init_residual=True)``
    to start as it does.
    """

    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 256,
        mlp_dim: int = 4096,
        T: float = 1.0,
    ) -> None:
        super().__init__()
        if dim < 1 or mlp_dim < 1:
            raise ConfigError(f"dim ({dim}) and mlp_dim ({mlp_dim}) must be positive.")
        if T <= 0:
            raise ConfigError(f"The temperature T must be positive, got {T}.")
        self.T = T
        # Built in the reference's order (encoders, then their projectors, then
        # the predictor), so one seed gives the reference's initial weights.
        self.base_encoder = base_encoder(num_classes=mlp_dim)
        self.momentum_encoder = base_encoder(num_classes=mlp_dim)
        head = _head_name(self.base_encoder)
        projector_layers, predictor_last_bn = _LAYOUTS[head]
        last = self.base_encoder.get_submodule(head)
        assert isinstance(last, nn.Linear)  # _head_name checked it
        hidden = last.in_features
        for encoder in (self.base_encoder, self.momentum_encoder):
            delattr(encoder, head)
            setattr(encoder, head, build_mlp(projector_layers, hidden, mlp_dim, dim))
        self.predictor = build_mlp(2, dim, mlp_dim, dim, predictor_last_bn)
        # The momentum encoder starts as a copy and is never trained by gradient.
        for param_b, param_m in zip(
            self.base_encoder.parameters(), self.momentum_encoder.parameters(), strict=True
        ):
            param_m.data.copy_(param_b.data)
            param_m.requires_grad = False

    @torch.no_grad()
    def _update_momentum_encoder(self, m: float) -> None:
        """momentum <- m * momentum + (1 - m) * base, all parameters in one fused pass."""
        params_m: list[torch.Tensor] = list(self.momentum_encoder.parameters())
        params_b = [p.detach() for p in self.base_encoder.parameters()]
        torch._foreach_lerp_(params_m, params_b, 1.0 - m)

    def _contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE of this rank's queries against the keys of all ranks, times 2T
        (builder.py lines 63-73): query i's positive is key N * rank + i."""
        with torch.autocast(q.device.type, enabled=False):
            dtype = torch.promote_types(q.dtype, torch.float32)
            q = F.normalize(q.to(dtype), dim=1)
            k = F.normalize(k.to(dtype), dim=1)
            k = all_gather_no_grad(k)
            logits = q @ k.T / self.T
            n = logits.shape[0]
            labels = torch.arange(n, device=logits.device) + n * get_rank()
            return F.cross_entropy(logits, labels) * (2 * self.T)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        """The symmetrised loss of one step (builder.py lines 75-96).

        Args:
            x1: first views of the images, N x C x H x W.
            x2: second views of the same images, same shape.
            m: the momentum encoder's momentum for this step (the training loop
                raises it to 1 with :func:`mocohub.training.schedule.cosine_momentum`).

        Returns:
            The loss (a scalar): queries of each view against the keys of the
            other, both directions summed. The momentum encoder has been updated.

        Example:
            >>> from mocohub.vit import vit_nano
            >>> model = MoCoV3(vit_nano, dim=8, mlp_dim=16, T=0.2)
            >>> x1, x2 = torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)
            >>> model(x1, x2, m=0.99).backward()
        """
        if x1.shape != x2.shape:
            raise InputError(
                f"The two views differ in shape ({tuple(x1.shape)} vs {tuple(x2.shape)}); "
                "pass two views of the same images, cropped to the same size."
            )
        if not 0.0 <= m <= 1.0:
            raise ConfigError(f"The momentum m must lie in [0, 1], got {m}.")
        # Every rank, every step: a rank that skipped it while another checked
        # would leave both waiting on different collectives.
        check_same_batch_size(x1.shape[0])
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self._contrastive_loss(q1, k2) + self._contrastive_loss(q2, k1)
