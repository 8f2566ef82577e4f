"""LARS, the optimizer MoCo v3 trains ResNets with (You et al., 2017).

The reference's variant (facebookresearch/moco-v3, ``moco/optimizer.py``): SGD
with momentum whose step for each weight matrix or kernel (more than one
dimension) is the gradient plus weight decay, rescaled by the trust ratio
``trust_coefficient * ||w|| / ||g + wd * w||`` (1 where either norm is 0).
Parameters of one dimension or none (biases, BatchNorm/LayerNorm weights and
biases) get neither weight decay nor the rescaling: their step is the plain
gradient. The momentum buffer is ``mu <- momentum * mu + step`` and the update
``w <- w - lr * mu`` (no dampening, no Nesterov). The state of each parameter is
stored under the reference's name, ``mu``, so a reference checkpoint's
``optimizer`` state loads into this class as it is.

The arithmetic is the reference's, in the same order, done for all parameters
of a group at once (``torch._foreach_*``: one fused kernel per operation on a
GPU instead of a Python loop of small ones).

Example:
    >>> w = torch.nn.Parameter(torch.ones(2, 2))
    >>> opt = LARS([w], lr=1.0, weight_decay=0.0, momentum=0.9)
    >>> w.grad = torch.full((2, 2), 4.0)
    >>> opt.step()
    >>> w.detach()[0].tolist()  # trust ratio 0.001 * 2 / 8: a step of 0.001 each
    [0.9990000128746033, 0.9990000128746033]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from mocohub.errors import ConfigError

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    """LARS with the MoCo v3 reference's exclusion of 1-D parameters.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: learning rate (the training loop sets it at every step).
        weight_decay: L2 penalty, for parameters of more than one dimension only.
        momentum: momentum factor (default 0.9, the reference's).
        trust_coefficient: the trust ratio's scale (default 0.001, the reference's).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ConfigError(
                f"LARS needs lr >= 0 ({lr}), weight_decay >= 0 ({weight_decay}), momentum in "
                f"[0, 1) ({momentum}) and trust_coefficient > 0 ({trust_coefficient})."
            )
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient (``closure``: as in torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            steps = [p.grad for p in params]
            adapted = [i for i, p in enumerate(params) if p.ndim > 1]
            if adapted:
                weights = [params[i] for i in adapted]
                # moco/optimizer.py lines 27-36: decay, then the trust ratio.
                decayed = torch._foreach_add(
                    [steps[i] for i in adapted], weights, alpha=group["weight_decay"]
                )
                ratios = [
                    torch.where(
                        (w_norm > 0) & (d_norm > 0),
                        group["trust_coefficient"] * w_norm / d_norm,
                        torch.ones_like(w_norm),
                    )
                    for w_norm, d_norm in zip(
                        torch._foreach_norm(weights), torch._foreach_norm(decayed), strict=True
                    )
                ]
                torch._foreach_mul_(decayed, ratios)
                for i, step in zip(adapted, decayed, strict=True):
                    steps[i] = step
            buffers = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(state["mu"])
            # lines 38-43: mu <- momentum * mu + step; w <- w - lr * mu.
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, steps)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
        return loss
