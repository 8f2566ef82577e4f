"""``mocohub embed --engine ray`` against the local engine: what Ray costs on one machine.

Every engine embeds the same generated ImageFolder (``--images`` copies of the
repository's Fashion-MNIST samples in 10 class folders; each size given is a
run of its own) with the same randomly initialised mocohub ResNet (``--arch``,
3 channels at ``--image-size``) at ``--precision fp32``, each command a fresh
process:

- ``local``: ``mocohub embed DIR --out local.npy ...`` (torch's default
  threads: one per core; decoding on those threads between batches);
- ``ray, joined``: the same plus ``--engine ray --concurrency C --address A``,
  joining a Ray instance this script started (with every core) before the
  rounds, as on a cluster that is already up: ``C`` model actors of one CPU
  (one thread) each; on CPUs alone Ray Data runs the decoding in those actors;
- ``ray, fresh``: the same without ``--address``: the command starts its own
  local Ray instance and stops it (what a laptop user sees).

``wall`` is the command from start to exit (Python, torch, the model, Ray's
start, the published files). Rounds alternate the engines, with the 1-minute
load average recorded before each, since other work on a shared machine moves
the figures; ratios are per round, then the median. From two sizes, the cost
per 1000 more images (the slope) separates the fixed costs from the
per-image ones. The outputs of the engines are compared byte for byte.

Run (from the repository root)::

    python bench/embed_ray.py                       # 512 and 2048 images, resnet18 at 64 px
    python bench/embed_ray.py --images 512 --rounds 3 --modes joined

Writes every figure as JSON to ``--json`` (default ``bench/results/embed_ray.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
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


def make_folder(folder: Path, count: int) -> None:
    """An ImageFolder of ``count`` PNGs in 10 class folders."""
    samples = sorted(SAMPLES.glob("*.png"))
    for i in range(count):
        target = folder / f"class{i % 10}" / f"img_{i:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(samples[i % len(samples)], target)


def run(command: list[str], env: dict[str, str], may_fail: bool = False) -> dict[str, Any]:
    """The command's wall time; with ``may_fail``, a failure is recorded (wall: NaN) instead."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        if not may_fail:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
        said = done.stderr.strip().splitlines()
        return {"wall_s": math.nan, "load1_before": load, "error": said[-1] if said else ""}
    return {"wall_s": wall, "load1_before": load, "output": done.stdout.strip()}


def same_files(a: Path, b: Path) -> bool:
    first, second = output_files(a), output_files(b)
    roles = ("features", "manifest", "errors", "meta")
    return all(first[r].read_bytes() == second[r].read_bytes() for r in roles)


def start_ray(tries: int = 3) -> Any:
    """A local Ray instance of every core, kept by this process; its address for the commands.

    Ray gives a node 30 s to start: on a busy machine that can fail, so it is tried again.
    """
    import ray

    for attempt in range(tries):
        try:
            ray.init(num_cpus=usable_cpus(), include_dashboard=False, log_to_driver=False)
            return ray
        except Exception as e:  # Ray raises a plain Exception when its node times out
            if attempt == tries - 1:
                raise SystemExit(f"Ray did not start in {tries} tries: {e}") from e
            ray.shutdown()
    raise AssertionError("unreachable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default="512,2048", help="comma-separated folder sizes")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=usable_cpus())
    parser.add_argument("--modes", default="joined,fresh", help="ray modes: joined, fresh")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "embed_ray.json")
    args = parser.parse_args()
    sizes = [int(n) for n in args.images.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    engines = ["local", *(f"ray_{m}" for m in modes)]

    ray = start_ray() if "joined" in modes else None
    # after Ray's start: it sets RAY_AUTH_MODE for the processes that join its instance
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    address = ray.get_runtime_context().gcs_address if ray is not None else ""
    results: dict[int, dict[str, Any]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="mocohub-bench-ray-") as tmp:
            work = Path(tmp)
            torch.manual_seed(0)
            size = args.image_size
            prep = Preprocessing(size, size * 8 // 7, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
            save_pretrained(build_model(ModelConfig(args.arch, preprocessing=prep)), work / "model")
            on_ray = ["--engine", "ray", "--concurrency", str(args.concurrency)]
            extra = {
                "local": [],
                "ray_joined": [*on_ray, "--address", address],
                "ray_fresh": on_ray,
            }
            for count in sizes:
                images = work / f"images{count}"
                make_folder(images, count)
                base = [
                    sys.executable, "-m", "mocohub", "embed", str(images), "--model",
                    str(work / "model"), "--precision", "fp32", "--batch-size",
                    str(args.batch_size), "--quiet", "--restart",
                ]  # fmt: skip
                rounds = [
                    {
                        # a fresh Ray instance gets 30 s to start: on a busy machine it may not
                        who: run(
                            [*base, "--out", str(work / f"{who}.npy"), *extra[who]],
                            env,
                            may_fail=who == "ray_fresh",
                        )
                        for who in engines
                    }
                    for _ in range(args.rounds)
                ]
                figures: dict[str, Any] = {"rounds": rounds}
                for who in engines:
                    figures[f"{who}_wall_s"] = statistics.median(r[who]["wall_s"] for r in rounds)
                    figures[f"{who}_load1"] = statistics.median(
                        r[who]["load1_before"] for r in rounds
                    )
                    figures[f"{who}_over_local"] = statistics.median(
                        r[who]["wall_s"] / r["local"]["wall_s"] for r in rounds
                    )
                    ran = any("error" not in r[who] for r in rounds)
                    figures[f"{who}_same_files"] = ran and same_files(
                        work / "local.npy", work / f"{who}.npy"
                    )
                results[count] = figures
            shown = [
                "DIR" if a == str(images) else "MODEL" if a == str(work / "model") else a
                for a in base[3:]
            ]
            command = " ".join(["mocohub", *shown, "--out", "X.npy"])
    finally:
        if ray is not None:
            ray.shutdown()

    import ray as ray_module

    flags = speed_flags()
    slope = None
    if len(sizes) >= 2:
        low, high = min(sizes), max(sizes)
        slope = {
            who: (results[high][f"{who}_wall_s"] - results[low][f"{who}_wall_s"])
            * 1000
            / (high - low)
            for who in engines
        }
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_flags": flags,
        "usable_cpus": usable_cpus(),
        "torch": torch.__version__,
        "ray": ray_module.__version__,
        "arch": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": {
            "local": "torch default (one per core)",
            "ray": f"{args.concurrency} actors of 1 CPU, 1 thread each",
        },
        "command": f"{command} [--engine ray --concurrency {args.concurrency} [--address A]]",
        "sizes": {str(k): v for k, v in results.items()},
        "slope_s_per_1000_images": slope,
        "load1_after": os.getloadavg()[0],
    }
    names = {"local": "local", "ray_joined": "ray, joined", "ray_fresh": "ray, fresh"}
    print(
        f"CPU: {report['cpu']} ({', '.join(flags)}), {usable_cpus()} usable cores; "
        f"torch {torch.__version__}, ray {ray_module.__version__}"
    )
    print(
        f"{args.arch} at {size} px, fp32, batch {args.batch_size}; local: torch's default "
        f"threads; ray: --concurrency {args.concurrency} actors of 1 thread"
    )
    print(f"command: {report['command']}\n")
    print("| images | engine | wall (s) | / local | load1 before | same files as local |")
    print("| ---: | --- | ---: | ---: | ---: | --- |")
    for count, r in results.items():
        for who in engines:
            failed = [x[who]["error"] for x in r["rounds"] if "error" in x[who]]
            if failed:
                print(f"| {count} | {names[who]} | failed {len(failed)}x: {failed[0]} | | | |")
            if len(failed) == len(r["rounds"]):
                continue
            same = "yes" if r[f"{who}_same_files"] else "NO"
            print(
                f"| {count} | {names[who]} | {r[f'{who}_wall_s']:.1f} | "
                f"{r[f'{who}_over_local']:.2f}x | {r[f'{who}_load1']:.1f} | {same} |"
            )
    if slope is not None:
        for who in engines:
            print(
                f"| per 1000 more | {names[who]} | {slope[who]:.1f} | "
                f"{slope[who] / slope['local']:.2f}x | | |"
            )
    print(f"\nload average after: {report['load1_after']:.2f} ({args.rounds} round(s))")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
