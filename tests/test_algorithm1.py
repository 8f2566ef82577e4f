"""MoCo against an independent transcription of the paper's Algorithm 1.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning"
(CVPR 2020), Algorithm 1::

    f_k.params = f_q.params  # initialize
    for x in loader:
        x_q = aug(x); x_k = aug(x)
        q = f_q.forward(x_q)  # queries: NxC
        k = f_k.forward(x_k)  # keys: NxC
        k = k.detach()  # no gradient to keys
        l_pos = bmm(q.view(N, 1, C), k.view(N, C, 1))  # positive logits: Nx1
        l_neg = mm(q.view(N, C), queue.view(C, K))  # negative logits: NxK
        logits = cat([l_pos, l_neg], dim=1)  # Nx(1+K)
        labels = zeros(N)  # positives are the 0-th
        loss = CrossEntropyLoss(logits / t, labels)
        loss.backward()
        update(f_q.params)  # SGD update: query network
        f_k.params = m * f_k.params + (1 - m) * f_q.params  # momentum update
        enqueue(queue, k)  # enqueue the current minibatch
        dequeue(queue)  # dequeue the earliest minibatch

plus, from the paper's text, L2-normalised q and k. `Algorithm1` below writes
this out literally, with the queue as a real FIFO (oldest column first: new keys
are appended at the end, the earliest N columns dropped) rather than a ring
buffer, so that `mocohub.training.MoCo`'s pointer arithmetic is checked against
something that has no pointer at all. A ring buffer whose next write position is
`ptr` holds the FIFO rotated right by `ptr` columns (the oldest key sits at
column `ptr`), so the comparison uses `torch.roll(fifo, ptr, dims=1)`.

Timing: Algorithm 1 momentum-updates f_k at the end of a step, after the SGD
update; the reference code (and `MoCo`) does the same update at the start of the
next forward, before computing the keys. Either way the keys of step i come from
`m * f_k + (1 - m) * f_q` with f_q as left by the SGD update of step i - 1 (at
step 0 the update is a no-op, since f_k = f_q). So the key encoder is compared at
that point: the transcription's f_k as it enters step i, against `encoder_k`
after `MoCo`'s forward of step i.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from mocohub.backbones import resnet18
from mocohub.training import MoCo

BATCH = 8
DIM = 16
IMAGE = 16
LR = 0.03
SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4

# Tolerances. Both sides run the same float32 operations on the same CPU on the
# same inputs, so they mostly agree bit for bit; what may differ is rounding:
# the no-op momentum update at step 0 (m * w + (1 - m) * w need not round back
# to w), the normalisation and the dot products (bmm vs. whatever `MoCo` uses,
# a norm-divide vs. F.normalize), summed over C = 16 terms. One float32 rounding
# is ~6e-8 relative; after a few SGD steps through a ResNet-18 such differences
# can grow (observed: at most 0.2x the tolerances below, for every quantity and
# step; inputs that are two "views" of the same images keep the tiny BatchNorm
# network well conditioned, whereas pure-noise pairs amplified rounding ~1000x).
# Unit-scale quantities (normalised keys in the queue, weights of O(1), the loss)
# get atol 1e-5; logits are scaled by 1/T (up to 14.3 for T = 0.07), so their
# tolerance is 1e-5 / T. The negative controls below must miss by >= 100x these.
ATOL_UNIT = 1e-5


def _encoder(num_classes: int) -> nn.Module:
    return resnet18(num_classes=num_classes, small_stem=True, width=8)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # The paper's text: "the output vector is normalized by its L2-norm".
    return x / x.norm(p=2, dim=1, keepdim=True)


@dataclass
class StepResult:
    logits: torch.Tensor  # logits / t, columns [l_pos, l_neg over the FIFO]
    labels: torch.Tensor
    loss: torch.Tensor


class Algorithm1:
    """The paper's pseudocode, line by line. `queue` is C x K, oldest column first."""

    def __init__(
        self,
        f_q: nn.Module,
        f_k: nn.Module,
        queue: torch.Tensor,
        *,
        m: float,
        t: float,
        skip_momentum_update: bool = False,
        momentum_update_before_sgd: bool = False,
    ) -> None:
        self.f_q = f_q
        self.f_k = f_k
        self.queue = queue
        self.m = m
        self.t = t
        # Deliberate mistakes, for the negative controls only.
        self.skip_momentum_update = skip_momentum_update
        self.momentum_update_before_sgd = momentum_update_before_sgd
        self.enqueued = 0  # keys enqueued so far; only used to locate MoCo's pointer
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(
            self.f_q.parameters(), lr=LR, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY
        )

    def step(self, x_q: torch.Tensor, x_k: torch.Tensor) -> StepResult:
        q = _l2_normalize(self.f_q(x_q))  # queries: NxC
        k = _l2_normalize(self.f_k(x_k))  # keys: NxC
        k = k.detach()  # no gradient to keys
        n, c = k.shape
        l_pos = torch.bmm(q.view(n, 1, c), k.view(n, c, 1)).view(n, 1)  # Nx1
        l_neg = torch.mm(q.view(n, c), self.queue.view(c, -1))  # NxK
        logits = torch.cat([l_pos, l_neg], dim=1)  # Nx(1+K)
        labels = torch.zeros(n, dtype=torch.long)  # positives are the 0-th
        loss = self.criterion(logits / self.t, labels)

        self.optimizer.zero_grad()
        loss.backward()
        if self.momentum_update_before_sgd:
            self._momentum_update()
        self.optimizer.step()  # SGD update: query network
        if not (self.skip_momentum_update or self.momentum_update_before_sgd):
            self._momentum_update()

        # enqueue the current minibatch, dequeue the earliest one
        self.queue = torch.cat([self.queue, k.t()], dim=1)[:, n:]
        self.enqueued += n
        return StepResult((logits / self.t).detach(), labels, loss.detach())

    @torch.no_grad()
    def _momentum_update(self) -> None:
        # f_k.params = m * f_k.params + (1 - m) * f_q.params
        for p_k, p_q in zip(self.f_k.parameters(), self.f_q.parameters(), strict=True):
            p_k.copy_(self.m * p_k + (1 - self.m) * p_q)


@dataclass(frozen=True)
class Config:
    mlp: bool
    T: float
    m: float
    K: int
    steps: int


CONFIGS = {
    # MoCo v1 defaults; 5 steps of 8 keys into K = 32: the pointer wraps at step 4.
    "v1": Config(mlp=False, T=0.07, m=0.999, K=32, steps=5),
    # MoCo v2 head and temperature, and a momentum small enough to move f_k visibly;
    # 6 steps of 8 keys into K = 40: the pointer wraps at step 5.
    "v2-mlp": Config(mlp=True, T=0.2, m=0.9, K=40, steps=6),
}


def _inputs(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    # Two "augmentations" of the same images: a flip and independent noise.
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)
    x_q = x + 0.3 * torch.randn(x.shape, generator=g)
    x_k = x.flip(-1) + 0.3 * torch.randn(x.shape, generator=g)
    return x_q, x_k


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _params_diff(a: nn.Module, b: nn.Module) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    return max(_max_diff(pa[name], pb[name]) for name in pa)


def _buffers_diff(a: nn.Module, b: nn.Module) -> float:
    # BN running mean/var and num_batches_tracked (an integer: must match exactly).
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert list(ba) == list(bb)
    return max(_max_diff(ba[name].float(), bb[name].float()) for name in ba)


def _build(config: Config) -> MoCo:
    torch.manual_seed(0)
    model = MoCo(_encoder, dim=DIM, K=config.K, m=config.m, T=config.T, mlp=config.mlp)
    model.train()  # BatchNorm in training mode in both encoders, as in main_moco.py
    return model


def _compare(config: Config, **variant: object) -> list[dict[str, float]]:
    """Run MoCo and Algorithm 1 side by side; per step, the largest differences.

    Each entry is already divided by its tolerance, so <= 1 means "equal".
    """
    model = _build(config)

    # Sanity of the initial state that Algorithm 1 assumes.
    assert model.queue.shape == (DIM, config.K)
    assert model.queue_ptr.dtype == torch.long
    assert model.queue_ptr.shape == (1,)
    assert int(model.queue_ptr) == 0
    torch.testing.assert_close(
        model.queue.norm(dim=0), torch.ones(config.K), atol=ATOL_UNIT, rtol=0
    )
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    for p_k, p_q in zip(model.encoder_k.parameters(), model.encoder_q.parameters(), strict=True):
        assert torch.equal(p_k, p_q)  # f_k.params = f_q.params
    if config.mlp:
        for enc in (model.encoder_q, model.encoder_k):
            assert isinstance(enc.fc, nn.Sequential)
            assert [type(layer) for layer in enc.fc] == [nn.Linear, nn.ReLU, nn.Linear]
            assert enc.fc[0].in_features == enc.fc[0].out_features == enc.fc[2].in_features
            assert enc.fc[2].out_features == DIM
    else:
        assert isinstance(model.encoder_q.fc, nn.Linear)
        assert model.encoder_q.fc.out_features == DIM

    algo = Algorithm1(
        copy.deepcopy(model.encoder_q).train(),
        copy.deepcopy(model.encoder_k).train(),
        model.queue.clone(),  # ptr = 0: the FIFO's oldest column is column 0
        m=config.m,
        t=variant.pop("t", config.T),  # type: ignore[arg-type]
        **variant,  # type: ignore[arg-type]
    )
    optimizer = torch.optim.SGD(
        model.encoder_q.parameters(), lr=LR, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    criterion = nn.CrossEntropyLoss()

    diffs: list[dict[str, float]] = []
    for step in range(config.steps):
        x_q, x_k = _inputs(step)
        f_k_used = copy.deepcopy(algo.f_k)  # the key encoder Algorithm 1 uses at this step
        ptr_before = algo.enqueued % config.K

        # mocohub: momentum update + keys + logits + enqueue in forward, then SGD.
        logits, labels = model(x_q.clone(), x_k.clone())
        loss = criterion(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert all(p.grad is None for p in model.encoder_k.parameters())

        # Algorithm 1: the whole iteration.
        result = algo.step(x_q, x_k)

        assert labels.dtype == torch.long
        assert torch.equal(labels, torch.zeros(BATCH, dtype=torch.long))
        assert torch.equal(result.labels, labels)
        assert logits.shape == (BATCH, 1 + config.K)

        # MoCo's negatives are q @ (ring buffer before this step's enqueue), whose
        # columns are the FIFO's rotated by the pointer at that time.
        expected_logits = torch.cat(
            [result.logits[:, :1], torch.roll(result.logits[:, 1:], ptr_before, dims=1)], dim=1
        )
        ptr_after = algo.enqueued % config.K
        diffs.append(
            {
                "logits": _max_diff(logits.detach(), expected_logits) / (ATOL_UNIT / config.T),
                "loss": _max_diff(loss.detach(), result.loss) / ATOL_UNIT,
                "queue": _max_diff(model.queue, torch.roll(algo.queue, ptr_after, dims=1))
                / ATOL_UNIT,
                "queue_ptr": float(int(model.queue_ptr) != ptr_after) * 1e9,
                # The key encoder's parameters as used for this step's keys; its BN
                # running statistics are not momentum-updated but follow its own
                # forward passes, so they are compared after this step's forward.
                "encoder_k": _params_diff(model.encoder_k, f_k_used) / ATOL_UNIT,
                "encoder_k_buffers": _buffers_diff(model.encoder_k, algo.f_k) / ATOL_UNIT,
                # The query encoder after the SGD update: parameters and BN buffers.
                "encoder_q": _params_diff(model.encoder_q, algo.f_q) / ATOL_UNIT,
                "encoder_q_buffers": _buffers_diff(model.encoder_q, algo.f_q) / ATOL_UNIT,
            }
        )
    return diffs


def _report(diffs: list[dict[str, float]]) -> str:
    return "\n".join(
        f"step {i}: " + ", ".join(f"{key}={value:.3g}" for key, value in d.items())
        for i, d in enumerate(diffs)
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_moco_matches_algorithm1(name: str) -> None:
    config = CONFIGS[name]
    diffs = _compare(config)
    assert len(diffs) == config.steps
    assert config.steps * BATCH > config.K  # the pointer wrapped around K
    for step, d in enumerate(diffs):
        for key, value in d.items():
            assert value <= 1.0, f"{name}: {key} differs at step {step}\n{_report(diffs)}"


@pytest.mark.parametrize(
    ("name", "variant", "must_differ"),
    [
        # Wrong temperature: the logits differ from the first step on.
        ("v1", {"t": 0.1}, "logits"),
        # No momentum update: f_k stays at its initial weights while MoCo's moves.
        ("v2-mlp", {"skip_momentum_update": True}, "encoder_k"),
        ("v2-mlp", {"skip_momentum_update": True}, "queue"),
        # Momentum update from f_q as it was before this step's SGD update: the
        # ordering that MoCo's start-of-forward update must not be confused with.
        ("v2-mlp", {"momentum_update_before_sgd": True}, "encoder_k"),
        ("v2-mlp", {"momentum_update_before_sgd": True}, "logits"),
    ],
)
def test_comparison_detects_a_wrong_transcription(
    name: str, variant: dict[str, object], must_differ: str
) -> None:
    """Negative control: a wrong Algorithm 1 must not match, so the test above can't
    pass vacuously."""
    diffs = _compare(CONFIGS[name], **dict(variant))
    worst = max(d[must_differ] for d in diffs)
    assert worst > 100.0, f"{must_differ} should differ but did not\n{_report(diffs)}"
