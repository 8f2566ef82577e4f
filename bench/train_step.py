"""MoCo training-step throughput: mocohub against the reference, lightly and a supervised step.

What it measures: the *model step* only, in images per second (median over
repeated steps after a warm-up). One step is forward + cross-entropy + backward
+ optimizer step (+ key-encoder momentum update and queue update for MoCo) on
two augmented views that are already tensors in memory: no data loading, no
augmentation, no logging. Images/s counts images (each image gives one query
view and one key view), as the training loop's ``img_per_s`` does. All rows
run in the same process, on the same backbone, batch, inputs and initial
weights, alternating row by row (the order rotates every round) so that drifting
machine load hits every row alike.

Rows:

- ``ours``: ``mocohub.training`` as ``training/train.py`` runs it in one
  process: ``build_moco(config, in_channels)`` with ``preset(...)``'s config
  (for ``cifar``: split BN with 8 splits and a shuffled key batch),
  ``torch.optim.SGD(encoder_q.parameters(), **sgd_kernel(device))`` (fused on
  the CPU), autocast dtype from ``choose_precision`` and channels_last chosen
  by the loop's rule, the per-step ``set_shuffle_seed``. Shown with the loop's
  automatic settings, with forced bf16 autocast + channels_last (split BN as the
  preset, and plain BN: ``bn_splits=1``), with forced fp32 NCHW and with forced
  fp32 channels_last; plus fp32 NCHW with plain BN, the same maths as the reference.
- ``(a) reference``: a transcription of facebookresearch/moco ``builder.py``
  and ``main_moco.py``'s step in one process (no shuffle, no gather):
  per-tensor momentum loop, ``queue.clone().detach()``, ``int(queue_ptr)``
  enqueue, NCHW, fp32, ``SGD(model.parameters())`` with torch's defaults. Its
  first-step loss must equal ours (plain BN, fp32) from the same weights and
  inputs: the script fails otherwise.
- ``(b) lightly``: lightly's MoCo example recipe (``MoCoProjectionHead``,
  ``NTXentLoss(memory_bank_size=(K, dim))``, ``update_momentum``,
  ``deactivate_requires_grad``, momentum copies by ``copy.deepcopy``) on the same
  backbone (its ``fc`` dropped, as the example does with torchvision's), same
  K, T, m, batch and SGD settings; fp32 NCHW. Skipped, with the reason printed,
  when lightly cannot be imported.
- ``(c) supervised``: the same backbone with a 10-class ``fc``, cross-entropy
  on random labels, the same SGD kernel as ours, plain BN, at each of ours' speed
  settings. MoCo's key encoder adds one forward to the query's forward and
  backward, so MoCo/supervised ~0.75 is the ideal limit.

Run (from the repository root)::

    python bench/train_step.py                      # small images: see below for time
    python bench/train_step.py --batch 64 --repeats 5
    python bench/train_step.py --config large       # ResNet-50, 224 px, batch 32: slow
    python bench/train_step.py --threads 1 --no-bf16 --json /tmp/step.json
    python bench/train_step.py --preset fashion_mnist --width 16 --batch 256

Defaults: ``--config small`` is the ``cifar`` preset (ResNet-18, small stem,
width 64, 3 x 32 x 32 inputs, K=4096, m=0.99, T=0.1, split BN x8) at batch 32:
the preset's batch is 512, but on a 2-core CPU without bf16 matrix units a
forced-bf16 step of batch 32 already takes 20-35 s. The default run took 6.7
minutes on a 2-core AVX2 machine with one core busy with other work (about 3
minutes expected when idle, from single-step timings); ``--no-bf16
--threads 1`` took about 1 minute. ``--config large``
is ``moco_v2`` (ResNet-50, 224 px, MLP head, K=65536, T=0.2, m=0.999) at batch 32.

Caveats:

- Synthetic inputs (standard-normal tensors standing for normalised views);
  the speed of a conv net does not depend on the pixel values.
- On a CPU without bf16 matrix units (AMX, AVX512-BF16) bf16 autocast is
  emulated and far slower than fp32; the loop's ``auto`` settings then choose
  fp32 NCHW and the "auto" row is the same measurement as the fp32 NCHW row.
- On a machine shared with other work, more torch threads than idle cores make
  OpenMP wait for preempted threads: steps get slower and much noisier. The
  script prints the load average it saw; prefer ``--threads 1`` when busy.
- lightly's head is its 2-layer ``MoCoProjectionHead`` (as its example), where
  the ``cifar`` preset uses a linear head: <0.1% of the step's FLOPs.
- The reference's loop also computes top-1/top-5 accuracy and ``loss.item()``
  each step; they are not part of the model step and are left out.

Every table names the CPU model, its bf16/int8 flags (avx2, avx512_bf16,
avx512_vnni, amx) and the threads, and the summary prints the issue's two goal
ratios: ours (auto) over the supervised step with the same settings (>= 0.72 on a
CPU with bf16 units) and ours (auto) over the reference (>= 2.5).

Writes every figure (all step times, losses, load averages, the machine) as
JSON to ``--json`` (default ``bench/results/train_step.json``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from reference_moco import ReferenceMoCo  # bench/reference_moco.py
from torch import nn

import mocohub
from mocohub.backbones import build_backbone
from mocohub.sysinfo import INT8_CPU_FLAGS, SPEED_FLAGS, cpu_flags, cpu_model, package_version
from mocohub.training.config import TrainConfig, preset
from mocohub.training.optim import sgd_kernel
from mocohub.training.train import build_moco, choose_channels_last, choose_precision, lr_at
from mocohub.training.views import step_seed

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "train_step.json"
CPU = torch.device("cpu")
SUPERVISED_CLASSES = 10
CONFIGS: dict[str, dict[str, Any]] = {
    "small": {"preset": "cifar", "arch": None, "size": None, "batch": 32},
    "large": {"preset": "moco_v2", "arch": "resnet50", "size": 224, "batch": 32},
}

Step = Callable[[int], torch.Tensor]


# --------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a way of running the step, and its timings."""

    label: str
    kind: str  # "ours", "reference", "lightly", "supervised"
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    channels_last: bool
    bn_splits: int
    forced_bf16: bool = False  # a forced-bf16 row (--no-bf16 skips it)
    build: Callable[[], Step] | None = None
    skip_reason: str | None = None
    alias_of: Row | None = None  # same settings as another row: measured once
    step: Step | None = None
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    @property
    def settings(self) -> str:
        precision = "bf16 autocast" if self.dtype == torch.bfloat16 else "fp32"
        layout = "channels_last" if self.channels_last else "NCHW"
        text = f"{precision}, {layout}"
        if self.kind in ("ours", "reference", "lightly"):
            bn = f"split BN x{self.bn_splits}" if self.bn_splits > 1 else "plain BN"
            text += f", {bn}"
        return text

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.dtype, self.channels_last, self.bn_splits)

    @property
    def measured(self) -> Row:
        return self.alias_of or self


def loop_settings(config: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """The autocast dtype and channels_last that ``training/train.py``'s ``train`` picks."""
    return choose_precision(config, device), choose_channels_last(config, device)


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def make_ours(
    config: TrainConfig,
    in_channels: int,
    state: dict[str, torch.Tensor],
    batches: list[Any],
    device: torch.device = CPU,
) -> Step:
    """Our MoCo step, as the training loop takes it (one process, epoch 0), on ``device``
    (``batches`` must be there); ``config.compile`` compiles the encoders as the loop does."""
    dtype, channels_last = loop_settings(config, device)
    model = build_moco(config, in_channels).to(device)
    model.load_state_dict(state)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = sgd(model.encoder_q.parameters(), config, fast_on=device)
    if config.compile:
        model.encoder_q.compile()
        model.encoder_k.compile()

    def step(i: int) -> torch.Tensor:
        im_q, im_k = batches[i % len(batches)][:2]
        im_q, im_k = to_layout(im_q, channels_last), to_layout(im_k, channels_last)
        model.set_shuffle_seed(step_seed(config.seed, 0, i))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits, labels = model(im_q, im_k)
        return update(optimizer, F.cross_entropy(logits, labels))

    step.model = model  # type: ignore[attr-defined]
    return step


def make_reference(
    config: TrainConfig,
    in_channels: int,
    state: dict[str, torch.Tensor],
    batches: list[Any],
    device: torch.device = CPU,
) -> Step:
    """The reference step (main_moco.py's ``train`` body without meters), fp32 NCHW."""
    encoder = encoder_builder(config, in_channels)
    model = ReferenceMoCo(
        encoder, dim=config.dim, K=config.K, m=config.m, T=config.T, mlp=config.mlp
    ).to(device)
    model.load_state_dict(state)
    model.train()
    criterion = nn.CrossEntropyLoss()
    optimizer = sgd(model.parameters(), config)

    def step(i: int) -> torch.Tensor:
        im_q, im_k = batches[i % len(batches)][:2]
        output, target = model(im_q=im_q, im_k=im_k)
        return update(optimizer, criterion(output, target))

    step.model = model  # type: ignore[attr-defined]
    return step


def make_lightly(
    config: TrainConfig, in_channels: int, state: dict[str, torch.Tensor], batches: list[Any]
) -> Step:
    """lightly's MoCo example recipe on our backbone, fp32 NCHW."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    class LightlyMoCo(nn.Module):
        def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
            super().__init__()
            self.backbone = backbone
            self.projection_head = MoCoProjectionHead(feature_dim, feature_dim, config.dim)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

        def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
            key = self.backbone_momentum(x).flatten(start_dim=1)
            return self.projection_head_momentum(key).detach()

    resnet = encoder_builder(config, in_channels)(num_classes=config.dim)
    resnet.load_state_dict(encoder_state(state, "encoder_q."), strict=False)  # fc differs
    backbone = nn.Sequential(*list(resnet.children())[:-1])  # as the example: drop fc
    model = LightlyMoCo(backbone, resnet.feature_dim)
    model.train()
    criterion = NTXentLoss(temperature=config.T, memory_bank_size=(config.K, config.dim))
    with torch.no_grad():  # the same negatives as the other rows to start with
        criterion.memory_bank.bank.copy_(state["queue"].T)
    optimizer = sgd(model.parameters(), config)

    def step(i: int) -> torch.Tensor:
        x_query, x_key = batches[i % len(batches)][:2]
        update_momentum(model.backbone, model.backbone_momentum, m=config.m)
        update_momentum(model.projection_head, model.projection_head_momentum, m=config.m)
        query = model(x_query)
        key = model.forward_momentum(x_key)
        loss = criterion(query, key)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step


def make_supervised(
    config: TrainConfig,
    in_channels: int,
    state: dict[str, torch.Tensor],
    batches: list[Any],
    dtype: torch.dtype | None,
    channels_last: bool,
    device: torch.device = CPU,
) -> Step:
    """A supervised step of the same backbone (10 classes) with ours' speed settings
    (``config.compile`` too)."""
    model = encoder_builder(config, in_channels)(num_classes=SUPERVISED_CLASSES)
    model.load_state_dict(encoder_state(state, "encoder_q."), strict=False)  # fc differs
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = sgd(model.parameters(), config, fast_on=device)
    if config.compile:
        model.compile()

    def step(i: int) -> torch.Tensor:
        images, _, labels = batches[i % len(batches)]
        images = to_layout(images, channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            output = model(images)
        return update(optimizer, F.cross_entropy(output.float(), labels))

    return step


def sgd(
    params: Iterable[nn.Parameter], config: TrainConfig, fast_on: torch.device | None = None
) -> torch.optim.SGD:
    """SGD at the run's first learning rate, momentum and weight decay; with ``fast_on``,
    the kernel the training loop uses on that device (``train.sgd_kernel``: fused on
    the CPU and CUDA)."""
    fast = {} if fast_on is None else sgd_kernel(fast_on)
    return torch.optim.SGD(
        params,
        lr=lr_at(config, 0),
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        **fast,
    )


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> torch.Tensor:
    """One update from ``loss`` (gradients zeroed to None first, as main_moco.py's
    ``optimizer.zero_grad()`` does); returns the detached loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def encoder_builder(config: TrainConfig, in_channels: int) -> Callable[..., nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return build_backbone(
            config.arch,
            num_classes=num_classes,
            small_stem=config.small_stem,
            width=config.width,
            in_channels=in_channels,
        )

    return build


def encoder_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One encoder's backbone weights (``fc`` left out) from a MoCo state dict."""
    return {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith("fc.")
    }


# --------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------


# The goals for ours with the loop's automatic settings (issue 13).
GOAL_TO_SUPERVISED = 0.72  # on a CPU with bf16 units; MoCo's limit is 0.75
GOAL_TO_REFERENCE = 2.5


def machine_line(machine: dict[str, Any]) -> str:
    """The CPU, the flags that decide bf16/int8 speed, torch's kernels and the threads,
    in one line (every table carries it). Emulation settings in the environment
    (``MOCOHUB_CPU_FLAGS``, ``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``) are named."""
    flags = machine["cpu_flags_relevant"]
    shown = [f"{name} {'yes' if flags[name] else 'no'}" for name in ("avx2", "avx512_bf16")]
    shown.append(f"avx512_vnni {'yes' if flags['avx512_vnni'] else 'no'}")
    shown.append(f"amx {'yes' if any(flags[f] for f in flags if f.startswith('amx')) else 'no'}")
    emulated = [f"{k}={v}" for k, v in machine.get("emulation", {}).items()]
    return (
        f"{machine['cpu_model']} ({', '.join(shown)}), {machine['usable_cpus']} usable CPUs, "
        f"{machine['threads']} thread(s), torch {machine['torch']} kernels "
        f"{machine['torch_cpu_capability']}"
        + (f"; emulating: {' '.join(emulated)}" if emulated else "")
    )


def goal_ratios(rows: list[Row], img_s: Callable[[Row], float | None]) -> dict[str, dict[str, Any]]:
    """The issue's two goals: ours (auto) over the supervised step with the same
    settings, and ours (auto) over the reference transcription."""
    auto = rows[0]
    supervised = next(r for r in rows if r.kind == "supervised")  # its auto row
    reference = next(r for r in rows if r.kind == "reference")
    out: dict[str, dict[str, Any]] = {}
    for name, other, goal, note in (
        ("to_supervised", supervised, GOAL_TO_SUPERVISED, "on a CPU with bf16 units"),
        ("to_reference", reference, GOAL_TO_REFERENCE, ""),
    ):
        a, b = img_s(auto), img_s(other)
        ratio = a / b if a and b else None
        verdict = "-" if ratio is None else ("met" if ratio >= goal else "not met")
        out[name] = {
            "ratio": ratio,
            "goal": goal,
            "text": f"goal ours(auto)/{other.label.split(':')[0].strip()}: "
            + (f"{ratio:.2f}" if ratio is not None else "-")
            + f" (goal >= {goal}{', ' + note if note else ''}): {verdict}",
        }
    return out


def machine_info(threads: int) -> dict[str, Any]:
    flags = cpu_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_flags_relevant": {flag: flag in flags for flag in SPEED_FLAGS},
        "bf16_matrix_units": sorted(flags & {"amx_bf16", "avx512_bf16"}),
        "int8_matrix_units": sorted(flags & INT8_CPU_FLAGS),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "emulation": {
            k: os.environ[k]
            for k in ("MOCOHUB_CPU_FLAGS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
            if os.environ.get(k)
        },
        "threads": threads,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightly": package_version("lightly"),
        "mocohub": mocohub.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        choices=list(CONFIGS),
        default="small",
        help="small: cifar preset, ResNet-18 small stem, 32 px, batch 32 (default); "
        "large: moco_v2 preset, ResNet-50, 224 px, batch 32 (slow on a CPU)",
    )
    p.add_argument("--preset", help="training preset (overrides --config's)")
    p.add_argument("--arch", help="backbone (overrides the preset's), e.g. resnet50")
    p.add_argument("--size", type=int, help="image side in px (default: the preset's)")
    p.add_argument("--width", type=int, help="backbone width (default: the preset's)")
    p.add_argument("--batch", type=int, help="batch size (default: 32)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per row (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--no-bf16",
        action="store_true",
        help="skip the forced-bf16 rows (without bf16 matrix units they take most of the run)",
    )
    p.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"output (default {DEFAULT_JSON})"
    )
    args = p.parse_args(argv)
    defaults = CONFIGS[args.config]
    for name in ("preset", "arch", "size", "batch"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.repeats < 1 or args.warmup < 1:
        p.error("--repeats and --warmup must be at least 1 (the loss check uses step 0)")
    return args


def build_rows(
    config: TrainConfig, in_channels: int, batches: list[Any], no_bf16: bool
) -> tuple[list[Row], dict[str, torch.Tensor]]:
    torch.manual_seed(config.seed)
    # Weights and buffers only: the reference has no shuffle-generator state (_extra_state).
    state = {
        k: v.clone()
        for k, v in build_moco(config, in_channels).state_dict().items()
        if k != "_extra_state"
    }
    auto_dtype, auto_cl = loop_settings(config, CPU)
    bf16_config = dataclasses.replace(config, precision="bf16", channels_last="on")
    fp32_config = dataclasses.replace(config, precision="fp32", channels_last="off")
    plain_config = dataclasses.replace(fp32_config, bn_splits=1)
    fp32_cl_config = dataclasses.replace(fp32_config, channels_last="on")
    bf16_plain_config = dataclasses.replace(bf16_config, bn_splits=1)
    auto_label = "ours: the loop's auto settings"
    rows = [
        Row(auto_label, "ours", auto_dtype, auto_cl, config.bn_splits),
        Row(
            "ours: bf16 + channels_last (forced)",
            "ours",
            torch.bfloat16,
            True,
            config.bn_splits,
            forced_bf16=True,
        ),
        Row(
            "ours: bf16 + channels_last, plain BN",
            "ours",
            torch.bfloat16,
            True,
            1,
            forced_bf16=True,
        ),
        Row("ours: fp32 NCHW (forced)", "ours", None, False, config.bn_splits),
        Row("ours: fp32 NCHW, plain BN", "ours", None, False, 1),
        Row("ours: fp32 + channels_last (forced)", "ours", None, True, config.bn_splits),
        Row("(a) reference transcription", "reference", None, False, 1),
        Row("(b) lightly MoCo recipe", "lightly", None, False, 1),
        Row("(c) supervised: auto settings", "supervised", auto_dtype, auto_cl, 1),
        Row(
            "(c) supervised: bf16 + channels_last",
            "supervised",
            torch.bfloat16,
            True,
            1,
            forced_bf16=True,
        ),
        Row("(c) supervised: fp32 NCHW", "supervised", None, False, 1),
    ]
    builders: dict[str, Callable[[], Step]] = {
        rows[0].label: lambda: make_ours(config, in_channels, state, batches),
        rows[1].label: lambda: make_ours(bf16_config, in_channels, state, batches),
        rows[2].label: lambda: make_ours(bf16_plain_config, in_channels, state, batches),
        rows[3].label: lambda: make_ours(fp32_config, in_channels, state, batches),
        rows[4].label: lambda: make_ours(plain_config, in_channels, state, batches),
        rows[5].label: lambda: make_ours(fp32_cl_config, in_channels, state, batches),
        rows[6].label: lambda: make_reference(config, in_channels, state, batches),
        rows[7].label: lambda: make_lightly(config, in_channels, state, batches),
    }
    supervised = [row for row in rows if row.kind == "supervised"]
    for row in supervised:
        builders[row.label] = functools.partial(
            make_supervised, config, in_channels, state, batches, row.dtype, row.channels_last
        )
    seen: dict[tuple[Any, ...], Row] = {}
    for row in rows:
        row.build = builders[row.label]
        if no_bf16 and row.forced_bf16:
            row.skip_reason = "--no-bf16"
        elif row.key in seen:
            row.alias_of = seen[row.key]
        else:
            seen[row.key] = row
    rows[0].label = f"{auto_label} -> {rows[0].settings}"
    supervised[0].label = f"(c) supervised: auto -> {supervised[0].settings}"
    return rows, state


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = preset(
        args.preset, arch=args.arch, image_size=args.size, batch_size=args.batch, width=args.width
    )
    in_channels = len(config.mean)
    size = config.image_size
    machine = machine_info(torch.get_num_threads())
    load_start = os.getloadavg()
    print(machine_line(machine))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)}")
    idle = machine["usable_cpus"] - load_start[0]
    if idle < args.threads - 0.5:
        print(
            f"  warning: ~{max(idle, 0):.1f} idle CPUs for {args.threads} thread(s): other work "
            "shares this machine, so the figures are slower and noisier than on an idle one"
            + (
                "; with more threads than idle cores OpenMP waits for preempted threads "
                "(--threads 1 is steadier)"
                if args.threads > 1
                else ""
            )
        )
    print(
        f"preset {config.preset}: {config.arch} (small_stem={config.small_stem}, "
        f"width {config.width}, mlp={config.mlp}), {in_channels}x{size}x{size} inputs, "
        f"batch {config.batch_size}, K={config.K}, m={config.m}, T={config.T}, "
        f"bn_splits={config.bn_splits}; {args.warmup} warm-up + {args.repeats} timed steps per row"
    )

    gen = torch.Generator().manual_seed(1)
    shape = (config.batch_size, in_channels, size, size)
    batches = [
        (
            torch.randn(shape, generator=gen),
            torch.randn(shape, generator=gen),
            torch.randint(0, SUPERVISED_CLASSES, (config.batch_size,), generator=gen),
        )
        for _ in range(2)
    ]
    rows, _ = build_rows(config, in_channels, batches, args.no_bf16)
    for row in rows:
        if row.skip_reason or row.alias_of or row.build is None:
            continue
        try:
            row.step = row.build()
        except Exception as error:  # lightly missing, or broken with this torch
            if row.kind != "lightly":
                raise
            skip(row, f"lightly failed to build: {type(error).__name__}: {error}")

    timed = [r for r in rows if r.step is not None]
    loads: list[list[float]] = []
    started = time.perf_counter()
    for i in range(args.warmup + args.repeats):
        # Rotate the order every round, and reverse it every other round.
        k = i % len(timed)
        order = timed[k:] + timed[:k]
        if i % 2:
            order.reverse()
        for row in order:
            assert row.step is not None
            t0 = time.perf_counter()
            try:
                loss = row.step(i)
            except Exception as error:
                if row.kind != "lightly":
                    raise
                skip(row, f"lightly's step failed: {type(error).__name__}: {error}")
                timed.remove(row)
                continue
            dt = time.perf_counter() - t0
            row.losses.append(float(loss))
            if i >= args.warmup:
                row.times.append(dt)
        loads.append(list(os.getloadavg()))
        phase = "warm-up" if i < args.warmup else "timed"
        print(
            f"  round {i + 1}/{args.warmup + args.repeats} ({phase}) done at "
            f"{time.perf_counter() - started:.0f} s, load {loads[-1][0]:.2f}",
            flush=True,
        )
        if i == 0:
            check_first_step(rows)
    elapsed = time.perf_counter() - started

    report = summarise(rows, config, args, machine, load_start, loads, elapsed)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")


def skip(row: Row, reason: str) -> None:
    row.skip_reason, row.step = reason, None
    row.times.clear()
    row.losses.clear()
    print(f"  skipping {row.label}: {reason}")


def check_first_step(rows: list[Row]) -> None:
    """Ours (fp32, plain BN) and the reference: same weights and inputs, same first loss."""
    ours = next(r for r in rows if r.label.startswith("ours: fp32 NCHW, plain BN")).measured
    reference = next(r for r in rows if r.kind == "reference")
    a, b = ours.losses[0], reference.losses[0]
    torch.testing.assert_close(
        torch.tensor(a),
        torch.tensor(b),
        rtol=1e-5,
        atol=1e-5,
        msg=lambda m: f"first-step losses of ours and the reference differ: {m}",
    )
    print(f"  first-step loss: ours (fp32, plain BN) {a:.6f} = reference {b:.6f}")


def summarise(
    rows: list[Row],
    config: TrainConfig,
    args: argparse.Namespace,
    machine: dict[str, Any],
    load_start: tuple[float, float, float],
    loads: list[list[float]],
    elapsed: float,
) -> dict[str, Any]:
    batch = config.batch_size

    def img_s(row: Row) -> float | None:
        m = row.measured
        return batch / statistics.median(m.times) if m.times else None

    reference = next(r for r in rows if r.kind == "reference")
    supervised = {(r.dtype, r.channels_last): r for r in rows if r.kind == "supervised"}
    ref_speed = img_s(reference)
    table: list[list[str]] = []
    out_rows: list[dict[str, Any]] = []
    for row in rows:
        speed = img_s(row)
        sup = supervised.get((row.dtype, row.channels_last))
        sup_speed = img_s(sup) if sup is not None and row.kind != "supervised" else None
        to_ref = speed / ref_speed if speed and ref_speed else None
        to_sup = speed / sup_speed if speed and sup_speed else None
        m = row.measured
        note = ""
        if row.skip_reason:
            note = f"skipped: {row.skip_reason}"
        elif row.alias_of is not None:
            note = f"same settings as '{row.alias_of.label}': one measurement"
        table.append(
            [
                row.label,
                row.settings,
                f"{speed:.1f}" if speed else "-",
                f"{batch / max(m.times):.1f}-{batch / min(m.times):.1f}" if m.times else "-",
                f"{to_ref:.2f}x" if to_ref else "-",
                f"{to_sup:.2f}" if to_sup else "-",
            ]
        )
        out_rows.append(
            {
                "label": row.label,
                "kind": row.kind,
                "settings": row.settings,
                "autocast": str(row.dtype) if row.dtype else None,
                "channels_last": row.channels_last,
                "bn_splits": row.bn_splits,
                "images_per_s": speed,
                "step_ms_median": statistics.median(m.times) * 1e3 if m.times else None,
                "step_ms_all": [t * 1e3 for t in m.times],
                "losses": m.losses,
                "ratio_to_reference": to_ref,
                "ratio_to_supervised": to_sup,
                "note": note or None,
            }
        )
    print_table(
        f"MoCo training step, images/s (median of {args.repeats} steps after {args.warmup} "
        f"warm-up; preset {config.preset}, {config.arch} width {config.width}, batch {batch} x "
        f"{len(config.mean)}x{config.image_size}x{config.image_size})\n{machine_line(machine)}",
        ["setting", "speed settings", "img/s", "range", "vs ref", "vs sup"],
        table,
    )
    for row, entry in zip(rows, out_rows, strict=True):
        if entry["note"]:
            print(f"  {row.label}: {entry['note']}")
    print(
        "  vs ref: img/s over (a)'s; vs sup: img/s over the supervised step's with the same "
        "precision and layout (0.75 is the limit for MoCo)."
    )
    goals = goal_ratios(rows, img_s)
    for goal in goals.values():
        print(f"  {goal['text']}")
    mean_load = statistics.fmean(x[0] for x in loads)
    print(
        f"  load average (1 min) over the run: {mean_load:.2f} on {machine['usable_cpus']} CPUs; "
        f"run took {elapsed:.0f} s"
    )
    plain = next(r for r in rows if r.label.startswith("ours: fp32 NCHW, plain BN")).measured
    reference_m = reference.measured
    diffs = [abs(a - b) for a, b in zip(plain.losses, reference_m.losses, strict=True)]
    return {
        "what": "MoCo model step (forward + cross-entropy + backward + optimizer step) on "
        "pre-made view tensors; images/s counts images (pairs of views)",
        "machine": machine,
        "config": config.to_dict(),
        "in_channels": len(config.mean),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average_start": list(load_start),
        "load_average_per_round": loads,
        "elapsed_s": elapsed,
        "first_step_loss": {
            "ours_fp32_plain_bn": plain.losses[0],
            "reference": reference_m.losses[0],
        },
        "max_abs_loss_diff_ours_plain_vs_reference": max(diffs),
        "goals": goals,
        "rows": out_rows,
    }


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A plain-text table: the first two columns left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if j < 2 else c.rjust(w)
            for j, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(f"\n{title}")
    print("  " + line(header))
    print("  " + "  ".join("-" * w for w in widths))
    for row in rows:
        print("  " + line(row))


if __name__ == "__main__":
    main()
