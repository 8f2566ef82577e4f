"""The MoCo v3 oracle of the tests: a transcription of facebookresearch/moco-v3.

``moco/builder.py`` (``MoCo``, ``_build_mlp``, ``MoCo_ResNet``, ``MoCo_ViT``,
``contrastive_loss``, ``_update_momentum_encoder``), ``moco/optimizer.py``
(``LARS``) and ``main_moco.py``'s two schedules, in one process
(``concat_all_gather`` is the identity, the rank is 0). It follows the
reference line by line on purpose: it is what ``MoCoV3`` is checked against
(``test_moco_v3.py``) and what writes reference-format checkpoints
(``test_v3_reference_resume.py``). It lives in the tests only, never in the
package (the reference is CC-BY-NC 4.0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RefMoCo(nn.Module):
    """builder.py ``MoCo``: encoders built with num_classes=mlp_dim, then the MLPs."""

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int, mlp_dim: int, T: float):
        super().__init__()
        self.T = T
        self.base_encoder = base_encoder(num_classes=mlp_dim)
        self.momentum_encoder = base_encoder(num_classes=mlp_dim)
        self._build_projector_and_predictor_mlps(dim, mlp_dim)
        pairs = zip(self.base_encoder.parameters(), self.momentum_encoder.parameters(), strict=True)
        for pb, pm in pairs:
            pm.data.copy_(pb.data)
            pm.requires_grad = False

    def _build_mlp(
        self, num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True
    ) -> nn.Sequential:
        mlp: list[nn.Module] = []
        for layer in range(num_layers):
            dim1 = input_dim if layer == 0 else mlp_dim
            dim2 = output_dim if layer == num_layers - 1 else mlp_dim
            mlp.append(nn.Linear(dim1, dim2, bias=False))
            if layer < num_layers - 1:
                mlp.append(nn.BatchNorm1d(dim2))
                mlp.append(nn.ReLU(inplace=True))
            elif last_bn:
                mlp.append(nn.BatchNorm1d(dim2, affine=False))
        return nn.Sequential(*mlp)

    def _build_projector_and_predictor_mlps(self, dim: int, mlp_dim: int) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def _update_momentum_encoder(self, m: float) -> None:
        pairs = zip(self.base_encoder.parameters(), self.momentum_encoder.parameters(), strict=True)
        for pb, pm in pairs:
            pm.data = pm.data * m + pb.data * (1.0 - m)

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1)
        # concat_all_gather(k) is k in one process; get_rank() is 0.
        logits = torch.einsum("nc,mc->nm", [q, k]) / self.T
        n = logits.shape[0]
        labels = torch.arange(n, dtype=torch.long) + n * 0
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


class RefMoCoResNet(RefMoCo):
    def _build_projector_and_predictor_mlps(self, dim: int, mlp_dim: int) -> None:
        hidden_dim = self.base_encoder.fc.weight.shape[1]
        del self.base_encoder.fc, self.momentum_encoder.fc
        self.base_encoder.fc = self._build_mlp(2, hidden_dim, mlp_dim, dim)
        self.momentum_encoder.fc = self._build_mlp(2, hidden_dim, mlp_dim, dim)
        self.predictor = self._build_mlp(2, dim, mlp_dim, dim, False)


class RefMoCoViT(RefMoCo):
    def _build_projector_and_predictor_mlps(self, dim: int, mlp_dim: int) -> None:
        hidden_dim = self.base_encoder.head.weight.shape[1]
        del self.base_encoder.head, self.momentum_encoder.head
        self.base_encoder.head = self._build_mlp(3, hidden_dim, mlp_dim, dim)
        self.momentum_encoder.head = self._build_mlp(3, hidden_dim, mlp_dim, dim)
        self.predictor = self._build_mlp(2, dim, mlp_dim, dim)


class RefLARS(torch.optim.Optimizer):
    """optimizer.py ``LARS``: no decay and no trust ratio for parameters of <= 1 dimension."""

    def __init__(
        self,
        params: Any,
        lr: float = 0,
        weight_decay: float = 0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(
                            update_norm > 0,
                            (g["trust_coefficient"] * param_norm / update_norm),
                            one,
                        ),
                        one,
                    )
                    dp = dp.mul(q)
                param_state = self.state[p]
                if "mu" not in param_state:
                    param_state["mu"] = torch.zeros_like(p)
                mu = param_state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def ref_adjust_moco_momentum(epoch: float, moco_m: float, epochs: int) -> float:
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - moco_m)


def ref_adjust_learning_rate(epoch: float, lr: float, warmup_epochs: int, epochs: int) -> float:
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))
