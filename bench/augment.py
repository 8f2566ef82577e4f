"""The batched augmentation (``BatchAugment``) on one batch, per recipe, on the CPU.

Rows: each named recipe on a batch of uint8 images of its usual size
(``small`` on Fashion-MNIST-sized 1 x 28 x 28 images, ``v1``/``v2`` on
3 x 64 x 64 images cropped to 56). Milliseconds per call and images per
second, median of ``--repeats`` timed calls after a warm-up call; the
parameters are drawn from a seeded generator, so every run times the same
work. The first line names the CPU, its flags and the threads.

    OMP_NUM_THREADS=1 python bench/augment.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mocohub.sysinfo import cpu_model, speed_flags
from mocohub.training.batch_augment import BatchAugment
from mocohub.training.recipes import recipe

ROWS = {  # recipe: (channels, input size, output size, mean, std)
    "small": (1, 28, 28, (0.286,), (0.353,)),
    "v1": (3, 64, 56, None, None),
    "v2": (3, 64, 56, None, None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench/results/augment.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = speed_flags()
    print(f"{cpu_model()}, {' '.join(flags)}; {torch.get_num_threads()} torch thread(s)")
    print(f"{'recipe':<8} {'batch':<22} {'ms/call':>9} {'images/s':>10}")
    results: dict[str, dict[str, float | str]] = {}
    for name, (channels, size, out, mean, std) in ROWS.items():
        generator = torch.Generator().manual_seed(0)
        augment = BatchAugment.from_recipe(recipe(name), out, mean, std, generator=generator)
        images = torch.randint(
            0, 256, (args.batch, channels, size, size), dtype=torch.uint8, generator=generator
        )
        augment(images)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            augment(images)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        shape = f"{args.batch} x {channels} x {size} x {size}"
        print(f"{name:<8} {shape:<22} {1000 * seconds:>9.1f} {args.batch / seconds:>10.0f}")
        results[name] = {"input": shape, "output": out, "ms": 1000 * seconds}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"cpu": cpu_model(), "flags": flags, "threads": torch.get_num_threads()}
    args.json.write_text(json.dumps({**report, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
