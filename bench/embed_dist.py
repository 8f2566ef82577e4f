"""``mocohub embed`` in 2 processes under torchrun against 1 process, on the same cores.

Both runs embed the same folder (``--images N`` copies of the repository's
Fashion-MNIST samples, default 512) with the same randomly initialised
mocohub ResNet (``--arch``, 3 channels at ``--image-size``) at
``--precision fp32``:

- ``1 process``: ``mocohub embed DIR --out one.npy ...`` with torch's default
  threads (one per core);
- ``2 processes``: ``mocohub embed DIR --out two.npy ... --nproc-per-node 2``
  (torchrun; ``OMP_NUM_THREADS=1`` per process: the same cores split in two).

For each: ``wall`` (the command from start to exit: Python, torch and model
loading, the rendezvous and the merge included) and ``pipeline`` (the speed
the command prints: from its first batch to the published files). Rounds
alternate the two, with the 1-minute load average recorded beside each, since
other work on a shared machine moves the figures; the ratios are per round,
then the median. The outputs of the two are compared byte for byte.

Run (from the repository root)::

    python bench/embed_dist.py                     # resnet18 at 112 px, 512 images
    python bench/embed_dist.py --rounds 3 --images 1024

Writes every figure as JSON to ``--json`` (default ``bench/results/embed_dist.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mocohub.artifact import ModelConfig, build_model, save_pretrained
from mocohub.embed_outputs import output_files
from mocohub.preprocessing import Preprocessing
from mocohub.sysinfo import cpu_model, speed_flags, usable_cpus

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "fashion-mnist"
SPEED = re.compile(r"\(([\d.]+) images/s")


def make_folder(folder: Path, count: int) -> None:
    samples = sorted(SAMPLES.glob("*.png"))
    for i in range(count):
        shutil.copyfile(samples[i % len(samples)], folder / f"img_{i:05d}.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    match = SPEED.search(done.stdout)
    return {
        "wall_s": wall,
        "pipeline_images_per_s": float(match[1]) if match else None,
        "load1_before": load,
        "output": done.stdout.strip(),
    }


def same_files(a: Path, b: Path) -> bool:
    first, second = output_files(a), output_files(b)
    roles = ("features", "manifest", "errors", "meta")
    return all(first[r].read_bytes() == second[r].read_bytes() for r in roles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "embed_dist.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mocohub-bench-dist-") as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        make_folder(work / "images", args.images)
        torch.manual_seed(0)
        size = args.image_size
        prep = Preprocessing(size, size * 8 // 7, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        save_pretrained(build_model(ModelConfig(args.arch, preprocessing=prep)), work / "model")
        base = [
            sys.executable, "-m", "mocohub", "embed", str(work / "images"), "--model",
            str(work / "model"), "--precision", "fp32", "--batch-size", str(args.batch_size),
            "--quiet", "--restart",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
        rounds = []
        for _ in range(args.rounds):
            one = run([*base, "--out", str(work / "one.npy")], env)
            launch = ["--nproc-per-node", "2", "--master-port", str(free_port())]
            two = run(
                [*base, "--out", str(work / "two.npy"), *launch], env | {"OMP_NUM_THREADS": "1"}
            )
            rounds.append({"one": one, "two": two})
        identical = same_files(work / "one.npy", work / "two.npy")

    def median(key: str, who: str) -> float:
        return statistics.median(r[who][key] for r in rounds)

    wall_ratio = statistics.median(r["one"]["wall_s"] / r["two"]["wall_s"] for r in rounds)
    pipe_ratio = statistics.median(
        r["two"]["pipeline_images_per_s"] / r["one"]["pipeline_images_per_s"] for r in rounds
    )
    flags = speed_flags()
    figures = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_flags": flags,
        "usable_cpus": usable_cpus(),
        "torch": torch.__version__,
        "images": args.images,
        "arch": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": {"one": "torch default (one per core)", "two": "OMP_NUM_THREADS=1 each"},
        "command": " ".join(base[2:]) + " --out X.npy [--nproc-per-node 2]",
        "rounds": rounds,
        "identical_outputs": identical,
        "wall_images_per_s": {
            "one": args.images / median("wall_s", "one"),
            "two": args.images / median("wall_s", "two"),
        },
        "pipeline_images_per_s": {
            "one": median("pipeline_images_per_s", "one"),
            "two": median("pipeline_images_per_s", "two"),
        },
        "ratio_two_over_one": {"wall": wall_ratio, "pipeline": pipe_ratio},
        "load1_after": os.getloadavg()[0],
    }
    print(f"CPU: {figures['cpu']} ({', '.join(flags)}), {usable_cpus()} usable cores")
    print(f"{args.images} images, {args.arch} at {size} px, fp32, batch {args.batch_size}")
    print(f"{'':14} {'wall img/s':>11} {'pipeline img/s':>15} {'load1':>6}")
    for who, name in (("one", "1 process"), ("two", "2 processes")):
        wall = figures["wall_images_per_s"][who]
        pipe = figures["pipeline_images_per_s"][who]
        print(f"{name:14} {wall:11.1f} {pipe:15.1f} {median('load1_before', who):6.2f}")
    print(
        f"2 / 1: wall {wall_ratio:.2f}x, pipeline {pipe_ratio:.2f}x; outputs identical: {identical}"
    )
    print(f"load average after: {figures['load1_after']:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
