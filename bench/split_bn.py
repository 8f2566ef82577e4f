"""One split BatchNorm layer, forward + backward, against plain BatchNorm.

What it measures: milliseconds per forward + backward of one BN layer in
training mode (``SplitBatchNorm`` with ``--splits`` sub-batches, and
``nn.BatchNorm2d`` over the whole batch as the floor), at the activation shapes
of the ``fashion_mnist`` preset's ResNet-18 (small stem, width 16, batch 256)
and one ``cifar`` layer (width 64, batch 128, 32 px), in three settings: fp32
NCHW (the fp32 path), bf16 autocast + channels_last (``--precision auto`` on a
CPU with bf16 units) and fp32 channels_last. Median of ``--rounds`` rounds; the
rows alternate within each round so that drifting load hits them alike.

``--against FILE`` adds a row for another implementation of the layer, loaded
from a file (for example the previous commit's:
``git show HEAD~1:training/split_batchnorm.py > /tmp/old_split_bn.py``).

Run (from the repository root)::

    python bench/split_bn.py --threads 1
    python bench/split_bn.py --threads 1 --against /tmp/old_split_bn.py
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mocohub.training import SplitBatchNorm

SHAPES = [
    (256, 16, 28, 28),
    (256, 32, 14, 14),
    (256, 64, 7, 7),
    (256, 128, 4, 4),
    (128, 64, 32, 32),
]
SETTINGS = [
    ("fp32 NCHW", torch.float32, torch.contiguous_format),
    ("bf16 channels_last", torch.bfloat16, torch.channels_last),
    ("fp32 channels_last", torch.float32, torch.channels_last),
]


def load_layer(path: Path) -> type[nn.Module]:
    spec = importlib.util.spec_from_file_location("split_bn_against", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--against {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    layer: type[nn.Module] = module.SplitBatchNorm
    return layer


def time_layer(
    layer: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, fmt: torch.memory_format
) -> float:
    """Milliseconds per forward + backward, about 0.2 s of repeats after 2 warm-ups."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)
    x.requires_grad_()
    grad = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=fmt)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = layer(x)
        out.backward(grad)

    for _ in range(2):
        step()
    repeats = max(3, int(2e7 / x.numel()))
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--splits", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", type=Path, help="another SplitBatchNorm, from this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers: dict[str, Callable[[int], nn.Module]] = {
        "plain BN": nn.BatchNorm2d,
        f"split BN x{args.splits}": lambda c: SplitBatchNorm(c, args.splits),
    }
    if args.against is not None:
        other = load_layer(args.against)
        layers[f"--against x{args.splits}"] = lambda c: other(c, args.splits)
    print(f"torch {torch.__version__}, {args.threads} thread(s), ms per forward + backward, "
          f"median of {args.rounds} rounds")  # fmt: skip
    names = list(layers)
    print("| setting | shape (n, c, h, w) | " + " | ".join(names) + " |")
    print("| --- | --- |" + " --- |" * len(names))
    for label, dtype, fmt in SETTINGS:
        for shape in SHAPES:
            times: dict[str, list[float]] = {name: [] for name in names}
            for round_ in range(args.rounds):
                order = names if round_ % 2 == 0 else names[::-1]
                for name in order:
                    times[name].append(time_layer(layers[name](shape[1]), shape, dtype, fmt))
            cells = " | ".join(f"{statistics.median(times[name]):.2f}" for name in names)
            print(f"| {label} | {shape} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
