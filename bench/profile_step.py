"""Where one MoCo training step spends its time: ``torch.profiler`` over ``ours``'s step.

The step is ``bench/train_step.py``'s ``ours`` row (the step ``training/train.py``
runs: autocast, channels_last, split BN and SGD by the loop's rules), profiled
with ``record_shapes`` after a warm-up. It prints

- the step's phases (query and key encoders, logits, queue update, momentum
  update, loss, backward, optimizer), each a ``record_function`` region, as a
  share of the step's wall time;
- the backward pass split into the encoders' nodes (convolution, BN, ReLU,
  pooling, ``fc``) and the rest (normalisation of q and k, logits, loss);
- the top operators by self CPU time, grouped by operator and input shapes.

Run (from the repository root)::

    python bench/profile_step.py --preset cifar --batch 128 --threads 2
    python bench/profile_step.py --preset fashion_mnist --width 16 --batch 256
    python bench/profile_step.py --precision fp32 --channels-last off   # the AVX2 path

It prints the CPU model, its bf16/int8 flags and the threads with every table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from train_step import machine_info, machine_line, make_ours  # bench/train_step.py

from mocohub.training.config import preset
from mocohub.training.moco import MoCo
from mocohub.training.train import build_moco

# MoCo methods timed as phases of the step (forward only; backward is split by node).
PHASES = {
    "_momentum_update_key_encoder": "momentum update",
    "_query": "query encoder + normalise (fwd)",
    "_key": "key encoder + shuffle + normalise",
    "_logits": "logits (fwd)",
    "_dequeue_and_enqueue": "enqueue",
}
# Autograd nodes of MoCo's head (normalisation of q, logits, loss); the rest are the
# encoders' (convolution, BN, ReLU, pooling, fc, autocast casts, split BN's views).
HEAD_NODES = frozenset(
    {
        "MmBackward0",
        "MulBackward0",
        "SumBackward1",
        "CatBackward0",
        "DivBackward0",
        "LogSoftmaxBackward0",
        "NllLossBackward0",
        "LinalgVectorNormBackward0",
        "ClampMinBackward0",
        "ExpandBackward0",
    }
)


@contextlib.contextmanager
def phases_recorded() -> Iterator[None]:
    """Wrap MoCo's step methods in ``record_function`` regions (undone on exit)."""
    originals = {name: getattr(MoCo, name) for name in PHASES}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with record_function(f"phase: {PHASES[name]}"):
                return fn(*args, **kwargs)

        return wrapped

    for name, fn in originals.items():
        setattr(MoCo, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(MoCo, name, fn)


class PhaseClock:
    """Self CPU time (``time.process_time``: every thread of the process) per phase of the
    step, unaffected by other processes taking the cores (exact with one thread; with
    several, OpenMP's spinning threads count too). Phases: MoCo's methods, the loss,
    ``backward``, the optimizer's ``step`` and ``zero_grad``; ``forward: rest`` is MoCo's
    forward outside its methods (the queue clone, the labels), ``step: rest`` the
    loop's code around them (layout, shuffle seed, Python)."""

    def __init__(self) -> None:
        self.self_time: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # [start, time of children]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._stack.append([time.process_time(), 0.0])
        try:
            yield
        finally:
            start, children = self._stack.pop()
            elapsed = time.process_time() - start
            self.self_time[name] += elapsed - children
            if self._stack:
                self._stack[-1][1] += elapsed

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        targets: list[tuple[Any, str, str]] = [
            (MoCo, name, label) for name, label in PHASES.items()
        ]
        targets += [
            (MoCo, "forward", "forward: rest (queue clone, checks, labels)"),
            (torch.nn.functional, "cross_entropy", "cross-entropy (fwd)"),
            (torch.Tensor, "backward", "backward (encoders + head)"),
            (torch.optim.SGD, "step", "optimizer step"),
            (torch.optim.Optimizer, "zero_grad", "zero_grad"),
        ]
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]

        def wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
            @functools.wraps(fn)
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                with self.phase(label):
                    return fn(*args, **kwargs)

            return wrapped

        for (owner, name, label), (_, _, fn) in zip(targets, originals, strict=True):
            setattr(owner, name, wrap(fn, label))
        try:
            yield
        finally:
            for owner, name, fn in originals:
                setattr(owner, name, fn)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cifar")
    p.add_argument("--width", type=int, help="backbone width (default: the preset's)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--bn-splits", type=int, help="default: the preset's")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    p.add_argument("--top", type=int, default=25, help="operators listed (default 25)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    config = preset(args.preset, width=args.width, batch_size=args.batch)
    config = dataclasses.replace(
        config,
        precision=args.precision,
        channels_last=args.channels_last,
        bn_splits=args.bn_splits or config.bn_splits,
    )
    in_channels = len(config.mean)
    size = config.image_size
    torch.manual_seed(config.seed)
    state = {
        k: v for k, v in build_moco(config, in_channels).state_dict().items() if k != "_extra_state"
    }
    gen = torch.Generator().manual_seed(1)
    shape = (config.batch_size, in_channels, size, size)
    batches = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))]
    step = make_ours(config, in_channels, state, batches)
    print(f"{machine_line(machine_info(torch.get_num_threads()))}; load {os.getloadavg()[0]:.2f}")
    print(
        f"preset {config.preset}: {config.arch} width {config.width}, {in_channels}x{size}x{size}, "
        f"batch {config.batch_size}, K={config.K}, precision {config.precision}, channels_last "
        f"{config.channels_last}, bn_splits {config.bn_splits}"
    )
    for i in range(2):
        step(i)
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    print(f"unprofiled step: {statistics.median(times) * 1e3:.1f} ms wall (median of 3)")

    clock = PhaseClock()
    with clock.installed():
        for i in range(args.steps):
            with clock.phase("step: rest (layout, shuffle seed, Python)"):
                step(i)
    cpu_total = sum(clock.self_time.values())
    print(
        f"\nCPU time per phase (process_time, mean of {args.steps} steps; "
        f"{cpu_total / args.steps * 1e3:.1f} ms per step)"
    )
    for name, t in sorted(clock.self_time.items(), key=lambda x: -x[1]):
        print(f"  {name:<44} {t / args.steps * 1e3:9.2f} ms  {100 * t / cpu_total:5.1f}%")

    with phases_recorded(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(args.steps):
            with record_function("step"):
                step(i)
    events = prof.key_averages()
    total = next(e for e in events if e.key == "step").cpu_time_total
    print(f"\nphases ({args.steps} profiled steps; % of the step's wall time)")
    for e in sorted(events, key=lambda e: -e.cpu_time_total):
        if e.key.startswith(("phase: ", "Optimizer.", "aten::cross_entropy_loss")):
            ms, share = e.cpu_time_total / args.steps / 1e3, 100 * e.cpu_time_total / total
            print(f"  {e.key.removeprefix('phase: '):<40} {ms:8.2f} ms  {share:5.1f}%")
    backward: dict[str, float] = defaultdict(float)
    for e in events:
        if e.key.startswith("autograd::engine::evaluate_function: "):
            node = e.key.split(": ", 1)[1].removeprefix("torch::autograd::")
            backward[f"{'head' if node in HEAD_NODES else 'encoders'}: {node}"] += e.cpu_time_total
    print("  backward nodes:")
    for group in ("encoders", "head"):
        t = sum(v for k, v in backward.items() if k.startswith(group))
        print(
            f"    {group} (all)                          {t / args.steps / 1e3:8.2f} ms"
            f"  {100 * t / total:5.1f}%"
        )
    for kind, t in sorted(backward.items(), key=lambda x: -x[1])[:16]:
        print(f"    {kind:<38} {t / args.steps / 1e3:8.2f} ms  {100 * t / total:5.1f}%")
    ops = prof.key_averages(group_by_input_shape=True)
    print(f"\ntop {args.top} operators by self CPU time (per step), grouped by input shapes")
    rows = sorted(
        (e for e in ops if not e.key.startswith(("step", "phase", "autograd::"))),
        key=lambda e: -e.self_cpu_time_total,
    )[: args.top]
    for e in rows:
        print(
            f"  {e.key:<36} {e.self_cpu_time_total / args.steps / 1e3:8.2f} ms "
            f"{100 * e.self_cpu_time_total / total:5.1f}%  x{e.count // args.steps:<4} "
            f"{str(e.input_shapes)[:90]}"
        )


if __name__ == "__main__":
    main()
