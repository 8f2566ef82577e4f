"""Does the tiny MoCo recipe learn? k-NN top-1 before and after, per seed and CPU kind.

Two tiny recipes train on 200 of the 300 bundled Fashion-MNIST sample images
(no labels) and are judged by weighted k-NN (k=20, t=0.1) on the other 100,
with the 200 as the labelled bank:

- ``test``: ``tests/test_train.py::test_a_short_run_learns_features_that_beat_
  initialisation``, i.e. ``mocohub.training.train`` with the settings in
  ``TEST_RECIPE`` below (keep the two in step), fp32, one torch thread (as the
  test suite runs);
- ``example``: ``examples/train_tiny.py --seed S`` as a user runs it (its own
  hand-written loop), with ``--threads`` torch threads (default 2).

Each (CPU capability, seed) runs in a fresh process, with
``ATEN_CPU_CAPABILITY`` set before Python starts for every capability but
``default`` (e.g. ``avx2`` runs the AVX2 kernels on an AVX-512 CPU). It prints
a table (seed, before, after, gain) per capability with the mean and the
smallest gain, and writes everything as JSON with the machine's CPU and flags.

    python bench/tiny_recipe_seeds.py --recipe test --seeds 0 1 2 3 4
    python bench/tiny_recipe_seeds.py --recipe example --capabilities default avx2
    python bench/tiny_recipe_seeds.py --recipe test --set lr=0.12 --set knn_every=5

``--set key=value`` overrides a setting of the test recipe (exploration only;
with ``knn_every`` the per-epoch k-NN curve is reported too). ``--jobs`` runs
that many processes at once (default 1: the figures are not timings, but the
machine is shared).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "fashion-mnist"

# The learning test's recipe: the fashion_mnist preset (ResNet-18 with the small
# stem, its mean/std) with everything that shapes learning pinned here, so that a
# change to the preset does not change it. Keep it in step with tests/test_train.py::
# test_a_short_run_learns_features_that_beat_initialisation.
TEST_RECIPE: dict[str, Any] = {
    "width": 8,
    "dim": 128,
    "K": 128,
    "batch_size": 16,
    "lr_batch": 16,
    "bn_splits": 1,
    "symmetric": True,
    "T": 0.1,
    "m": 0.99,
    "lr": 0.06,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "augmentation": "small",
    "epochs": 30,
    "knn_k": 20,
    "knn_t": 0.1,
    "workers": 0,
    "precision": "fp32",
}


def run_test_recipe(seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The learning test's body, returning k-NN top-1 before and after (this process)."""
    import torch

    from mocohub.training.config import preset
    from mocohub.training.data import resolve_dataset
    from mocohub.training.distributed import init_from_env
    from mocohub.training.monitor import KnnMonitor
    from mocohub.training.train import build_moco, train

    torch.set_num_threads(1)  # as tests/conftest.py does
    dataset, info = resolve_dataset(SAMPLES)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    bank = (dataset.images[order[:200]], dataset.labels[order[:200]])
    held_out = (dataset.images[order[200:]], dataset.labels[order[200:]])
    config = preset("fashion_mnist", **{**TEST_RECIPE, **overrides, "seed": seed})
    monitor = KnnMonitor((bank, held_out), config, info, init_from_env())
    torch.manual_seed(config.seed)
    before = monitor(build_moco(config, in_channels=1).encoder_q)["knn_top1"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        metrics = train(config, bank[0], Path(run_dir), knn_data=(bank, held_out), progress=False)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").open()]
    curve = {r["epoch"]: r["knn_top1"] for r in records if "knn_top1" in r}
    return {
        "before": before,
        "after": metrics["knn_top1"],
        "final_loss": metrics["loss"],
        "curve": curve,
        "train_s": round(time.perf_counter() - start, 1),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "settings": config.to_dict(),
    }


def run_example(seed: int, threads: int, env: dict[str, str]) -> dict[str, Any]:
    """``examples/train_tiny.py --seed S`` in a subprocess, its figures parsed from its output."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            str(ROOT / "examples" / "train_tiny.py"),
            "--seed",
            str(seed),
            "--out",
            out,
        ]
        start = time.perf_counter()
        run = subprocess.run(
            command, env={**env, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True
        )
    if run.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr[-2000:]}")
    found = re.search(r"(\d\.\d+) at initialisation, (\d\.\d+) after", run.stdout)
    if found is None:
        raise SystemExit(f"No k-NN figures in the output of {' '.join(command)}:\n{run.stdout}")
    return {
        "before": float(found.group(1)),
        "after": float(found.group(2)),
        "train_s": round(time.perf_counter() - start, 1),
        "threads": threads,
        "output": run.stdout,
    }


def child(args: argparse.Namespace) -> None:
    result = run_test_recipe(args.seed, dict(args.set))
    print("RESULT " + json.dumps(result))


def one_run(recipe: str, capability: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != "default":
        env["ATEN_CPU_CAPABILITY"] = capability
    if recipe == "example":
        result = run_example(seed, args.threads, env)
    else:
        command = [sys.executable, __file__, "--child", "--seed", str(seed)]
        for key, value in args.set:
            command += ["--set", f"{key}={value!r}"]
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            raise SystemExit(f"seed {seed} ({capability}) failed:\n{run.stderr[-3000:]}")
        result = json.loads(lines[-1].removeprefix("RESULT "))
    result.update(seed=seed, requested_capability=capability)
    result["gain"] = round(result["after"] - result["before"], 4)
    curve = "".join(f" {epoch}:{top1:.2f}" for epoch, top1 in (result.get("curve") or {}).items())
    print(
        f"  {capability:8s} seed {seed}: {result['before']:.2f} -> {result['after']:.2f} "
        f"({result['gain']:+.2f}), {result['train_s']:.0f} s{curve}",
        flush=True,
    )
    return result


def parse_setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", choices=["test", "example"], default="test")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--capabilities", nargs="+", default=["default", "avx2"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (example only)")
    parser.add_argument("--set", type=parse_setting, action="append", default=[])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.set and args.recipe != "test":
        parser.error("--set applies to the test recipe only")

    from mocohub.sysinfo import cpu_model, speed_flags

    runs = [(cap, seed) for cap in args.capabilities for seed in args.seeds]
    print(f"recipe {args.recipe}, settings {dict(args.set) or 'as written'}, on {cpu_model()}")
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda run: one_run(args.recipe, *run, args), runs))

    summary = {}
    for capability in args.capabilities:
        rows = [r for r in results if r["requested_capability"] == capability]
        gains = [r["gain"] for r in rows]
        summary[capability] = {
            "mean_gain": round(statistics.mean(gains), 4),
            "min_gain": min(gains),
            "actual_capability": rows[0].get("capability", capability),
        }
        print(f"\n{capability} ({summary[capability]['actual_capability']})")
        print("| seed | before | after | gain |\n|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['seed']} | {r['before']:.2f} | {r['after']:.2f} | {r['gain']:+.2f} |")
        print(f"mean gain {statistics.mean(gains):+.3f}, smallest {min(gains):+.2f}")

    flags = speed_flags()
    record = {
        "recipe": args.recipe,
        "overrides": dict(args.set),
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "flags": flags, "python": platform.python_version()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "summary": summary,
        "runs": results,
    }
    path = args.json or ROOT / "bench" / "results" / f"tiny_recipe_seeds_{args.recipe}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
