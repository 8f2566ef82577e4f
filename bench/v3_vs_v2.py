"""MoCo v3 against the v2 recipe on Fashion-MNIST, at the same wall time on this machine.

Issue 15 item 6. Each recipe pre-trains on the Fashion-MNIST train split for about
``--minutes`` of wall time, then its newest checkpoint gets the k-NN (k=200, T=0.1,
cosine; the 60,000 training images as the memory bank, the 10,000 test images as
queries) and a linear probe (frozen backbone, features of un-augmented images
extracted once; ``bench/quality_fmnist.py``'s :func:`evaluate`). A markdown table
gives the planned and actual wall time, epochs, images per second and both
accuracies, with the CPU, its flags, the threads and the command.

Recipes (``--recipes``, in the order given):

- ``v2``: the ``fashion_mnist`` preset (MoCo v2 style: queue K=4096, m=0.99,
  T=0.1, split BN, per-epoch cosine), ResNet-18 with the small stem at ``--width``;
- ``v3``: the ``fashion_mnist_v3`` preset (MoCo v3: no queue, predictor,
  symmetrised loss, LARS, warm-up then a per-step cosine, momentum to 1), the same
  backbone, so that the comparison is of the methods;
- ``v3_vit`` (optional): ``fashion_mnist_v3`` with the small ViT (``vit_mini``,
  4 px patches) and the reference ViT optimisation (AdamW, lr 1.5e-4 per 256,
  weight decay 0.1, warm-up 40/300 of the run).

Every recipe runs at ``--batch-size`` (256), with its preset's learning rate scaled
linearly to it; ``--v2-set``/``--v3-set``/``--vit-set KEY=VALUE`` override any other
setting of one recipe (e.g. ``--v2-set crop_min=0.7``).

The equal-wall-time budget. ``mocohub train`` has no time limit, and a run cut off
by time would end mid-schedule (the learning rate never annealed), so each recipe
gets a complete schedule sized to the budget instead:

1. calibration: the recipe trains for ``--calibration-steps`` steps in a scratch
   folder (the real loop: augmentation, logging, one checkpoint) and the seconds
   per step are read from its ``metrics.jsonl`` (the first 10 steps, warm-up,
   left out); the rest of that call's time is the start-up overhead;
2. plan (:func:`plan_schedule`): ``steps = (budget - overhead) / seconds per step``.
   With ``N`` training images and batch ``B`` an epoch of all images is ``N // B``
   steps; the run gets ``E = ceil(steps / (N // B))`` epochs (at least
   ``--min-epochs``) of ``steps // E`` steps each, that is the same fixed random
   subset of ``steps // E * B`` images every epoch (all ``N`` when the budget is a
   whole number of full epochs). v3's warm-up keeps its preset's share of the run,
   rounded to whole epochs (so 0 for runs under 10 epochs of ResNet);
3. the run itself, timed; its actual wall time is in the table next to the plan, and
   its img/s is ``steps x batch / wall time`` (start-up and checkpoints included).

The linear probe (``--linear-protocol``, default ``moco_v3``: the v3 reference's SGD,
batch 1024, lr 0.1 per 256, cosine, 90 epochs; ``moco``: v1/v2's lr 30, 100 epochs)
trains on features extracted once from the un-augmented 28 px images (the ``small``
recipe with cached features: not the reference's augmented protocol, but the same
for every recipe, and cheap: the extraction costs more than the 90 epochs).

The recipes run one after the other in this process, each with ``--threads`` torch
threads (default 2), each calibrated just before its run, so drifting machine load
shows up as a gap between planned and actual time rather than a wrong plan.

Run (from the repository root)::

    python bench/v3_vs_v2.py --data /work/shared/data/fashion-mnist --minutes 10
    python bench/v3_vs_v2.py --data DATA --minutes 0.5 --max-images 5120 \\
        --calibration-steps 20 --linear-epochs 5 --threads 1   # smoke run

Writes one run folder per recipe under ``--out`` (checkpoints, metrics, probe) and
the results as JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from quality_fmnist import KNN_K, KNN_T, epoch_records, evaluate  # bench/quality_fmnist.py
from train_step import machine_info, machine_line  # bench/train_step.py

from mocohub.errors import ConfigError, MocohubError
from mocohub.training.config import PRESETS, TrainConfig, preset
from mocohub.training.data import TensorImageDataset, resolve_dataset
from mocohub.training.lincls_config import protocol_config, protocol_name
from mocohub.training.train import TrainingInterrupted, choose_precision, train


@dataclass(frozen=True)
class Recipe:
    """A recipe of the comparison: a preset, its own overrides, and the share of the
    run its preset spends warming up (v3; 0 for v2)."""

    preset: str
    overrides: dict[str, Any]
    warmup_share: float
    resnet: bool  # takes --width


RECIPES: dict[str, Recipe] = {
    "v2": Recipe("fashion_mnist", {}, 0.0, True),
    # fashion_mnist_v3: 10 warm-up epochs of 200.
    "v3": Recipe("fashion_mnist_v3", {}, 10 / 200, True),
    # The reference ViT-S recipe's optimisation (CONFIG.md: AdamW, lr 1.5e-4, wd 0.1,
    # 40 warm-up epochs of 300) on the small ViT for 28 px images.
    "v3_vit": Recipe(
        "fashion_mnist_v3",
        {
            "arch": "vit_mini",
            "small_stem": False,
            "optimizer": "adamw",
            "lr": 1.5e-4,
            "weight_decay": 0.1,
        },
        PRESETS["moco_v3_vit_s"]["warmup_epochs"] / PRESETS["moco_v3_vit_s"]["epochs"],
        False,
    ),
}


@dataclass(frozen=True)
class Schedule:
    """A run sized to a time budget: ``epochs`` of ``steps_per_epoch`` steps of ``batch_size``.

    Example:
        >>> Schedule(epochs=3, steps_per_epoch=195, batch_size=256).images_per_epoch
        49920
    """

    epochs: int
    steps_per_epoch: int
    batch_size: int

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def images_per_epoch(self) -> int:
        return self.steps_per_epoch * self.batch_size


def plan_schedule(
    budget_s: float,
    seconds_per_step: float,
    overhead_s: float,
    num_images: int,
    batch_size: int,
    min_epochs: int = 1,
) -> Schedule:
    """The complete schedule that fits ``budget_s`` seconds (see the module docstring).

    As many steps as the budget pays for after ``overhead_s``, in the fewest epochs
    (at least ``min_epochs``) that each fit in ``num_images`` images; every epoch has
    the same number of steps, so up to ``epochs - 1`` steps of the budget go unused.

    Example:
        >>> plan_schedule(600, 1.0, 10, 60000, 256)  # 590 steps; 234 in a full epoch
        Schedule(epochs=3, steps_per_epoch=196, batch_size=256)
    """
    if seconds_per_step <= 0 or min_epochs < 1:
        raise ConfigError("seconds_per_step must be positive and min_epochs at least 1.")
    full_epoch = num_images // batch_size
    if full_epoch < 1:
        raise ConfigError(
            f"{num_images} training images do not make one batch of {batch_size}; "
            "lower --batch-size or use more images."
        )
    steps = math.floor((budget_s - overhead_s) / seconds_per_step)
    if steps < min_epochs:
        raise ConfigError(
            f"A budget of {budget_s:.0f} s pays for {max(steps, 0)} training step(s) of "
            f"{seconds_per_step:.2f} s after {overhead_s:.0f} s of start-up, fewer than the "
            f"{min_epochs} epoch(s) asked for; raise --minutes."
        )
    epochs = max(min_epochs, math.ceil(steps / full_epoch))
    return Schedule(epochs, steps // epochs, batch_size)


def warmup_epochs(share: float, epochs: int) -> int:
    """Whole warm-up epochs for a run of ``epochs``: the preset's ``share``, rounded.

    Example:
        >>> warmup_epochs(10 / 200, 4), warmup_epochs(10 / 200, 40), warmup_epochs(40 / 300, 8)
        (0, 2, 1)
    """
    return min(epochs, round(share * epochs))


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` overrides of a :class:`TrainConfig`, each value read as JSON where it
    parses (numbers, true/false, lists) and as a string otherwise.

    Example:
        >>> parse_settings(["crop_min=0.7", "augmentation=small"])
        {'crop_min': 0.7, 'augmentation': 'small'}
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in known:
            raise ConfigError(
                f"{pair!r} is not KEY=VALUE with a TrainConfig setting as KEY "
                f"(e.g. crop_min=0.7); the settings are: {', '.join(sorted(known))}."
            )
        try:
            settings[key] = json.loads(text)
        except json.JSONDecodeError:
            settings[key] = text
    return settings


def recipe_config(name: str, args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """Recipe ``name``'s configuration at this benchmark's batch, width and precision."""
    recipe = RECIPES[name]
    extra = {"v2": args.v2_set, "v3": args.v3_set, "v3_vit": args.vit_set}[name]
    return preset(
        recipe.preset,
        **{
            "batch_size": args.batch_size,
            "width": args.width if recipe.resnet else None,
            "precision": args.precision,
            "workers": 0,
            "knn_every": 0,
            "seed": args.seed,
            **recipe.overrides,
            **parse_settings(extra),
            **overrides,
        },
    )


def calibrate(config: TrainConfig, data: TensorImageDataset, steps: int) -> tuple[float, float]:
    """``(seconds per step, start-up seconds)`` of ``config``'s training loop, from a run of
    ``steps`` steps in a scratch folder; the first 10 steps (warm-up) count as start-up."""
    with tempfile.TemporaryDirectory(prefix="v3_vs_v2_calibration_") as scratch:
        start = time.perf_counter()
        with contextlib.suppress(TrainingInterrupted):  # stop_after_steps's stop
            train(config, data, scratch, stop_after_steps=steps, progress=False)
        seconds = time.perf_counter() - start
        lines = (Path(scratch) / "metrics.jsonl").read_text().splitlines()
    windows = [r for r in map(json.loads, lines) if "img_per_s" in r][1:]
    if not windows:
        raise ConfigError(f"--calibration-steps {steps} timed nothing; use 20 or more.")
    per_step = statistics.mean(config.batch_size / r["img_per_s"] for r in windows)
    return per_step, max(0.0, seconds - steps * per_step)


def subset(data: TensorImageDataset, size: int, seed: int) -> TensorImageDataset:
    """The first ``size`` images of one seeded permutation of ``data`` (all, in order, when
    ``size`` covers it), so that smaller subsets are nested in larger ones."""
    if size >= len(data):
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:size]
    labels = None if data.labels is None else data.labels[order]
    return TensorImageDataset(data.images[order], labels, classes=data.classes)


def run_recipe(
    name: str, args: argparse.Namespace, data: TensorImageDataset, budget_s: float
) -> dict[str, Any]:
    """Calibrate, plan, train and evaluate one recipe; its row of the results."""
    probe = recipe_config(name, args)
    per_step, overhead = calibrate(probe, data, args.calibration_steps)
    plan = plan_schedule(budget_s, per_step, overhead, len(data), args.batch_size, args.min_epochs)
    warmup = warmup_epochs(RECIPES[name].warmup_share, plan.epochs)
    config = recipe_config(name, args, epochs=plan.epochs, warmup_epochs=warmup)
    planned = overhead + plan.steps * per_step
    print(
        f"{name}: {per_step:.3f} s/step, {overhead:.0f} s start-up -> {plan.epochs} epoch(s) "
        f"x {plan.steps_per_epoch} steps ({plan.images_per_epoch} images), planned {planned:.0f} s",
        flush=True,
    )
    run_dir = args.out / name
    start = time.perf_counter()
    train(
        config,
        subset(data, plan.images_per_epoch, args.seed),
        run_dir,
        restart=args.restart,
        progress=False,
    )
    wall = time.perf_counter() - start
    linear = protocol_config(
        args.linear_protocol,
        preset="small",
        cached_features=True,
        epochs=args.linear_epochs,
        workers=0,
    )
    evaluation = evaluate(run_dir, args.data, linear, resume_linear=False)
    epochs = epoch_records(run_dir)
    dtype = choose_precision(config, torch.device("cpu"))
    return {
        "recipe": name,
        "preset": config.preset,
        "arch": config.arch + (f" w{config.width}" if RECIPES[name].resnet else ""),
        "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
        "epochs": plan.epochs,
        "steps": plan.steps,
        "images_per_epoch": plan.images_per_epoch,
        "warmup_epochs": config.warmup_epochs,
        "calibration": {"seconds_per_step": per_step, "startup_s": overhead},
        "planned_s": planned,
        "wall_s": wall,
        "img_per_s": plan.steps * plan.batch_size / wall,
        "final_loss": epochs[-1]["loss"] if epochs else None,
        "knn_top1": evaluation["knn"]["top1"],
        "linear_top1": evaluation["linear"]["top1"],
        "eval_seconds": evaluation["seconds"],
        "linear_protocol": protocol_name(linear) + f" ({args.linear_protocol} optimisation)",
        "config": config.to_dict(),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table, one row per recipe.

    Example:
        >>> print(markdown([]).splitlines()[0][:37])
        | recipe | preset | backbone | precis
    """
    head = (
        "| recipe | preset | backbone | precision | epochs x images | steps | planned s | wall s "
        "| img/s | k-NN top-1 | linear top-1 |"
    )
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['preset']} | {r['arch']} | {r['precision']} "
            f"| {r['epochs']} x {r['images_per_epoch']:,} | {r['steps']} | {r['planned_s']:.0f} "
            f"| {r['wall_s']:.0f} | {r['img_per_s']:.0f} | {r['knn_top1']:.4f} "
            f"| {r['linear_top1']:.4f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="Fashion-MNIST IDX folder (or 'fashion-mnist')")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time per recipe")
    p.add_argument("--recipes", default="v2,v3", help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--out", type=Path, default=Path("runs/v3_vs_v2"), help="run folders")
    p.add_argument("--restart", action="store_true", help="replace runs already in --out")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 width")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--threads", type=int, default=2, help="torch threads for every recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-steps", type=int, default=40, help="timed steps per recipe")
    p.add_argument("--min-epochs", type=int, default=1)
    p.add_argument("--max-images", type=int, help="train on at most N images (smoke runs)")
    p.add_argument("--linear-protocol", default="moco_v3", choices=("moco_v3", "moco"))
    p.add_argument("--linear-epochs", type=int, help="default: the protocol's (90 / 100)")
    for name in ("v2", "v3", "vit"):
        p.add_argument(f"--{name}-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, default=Path("bench/results/v3_vs_v2.json"))
    args = p.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown or not args.recipes or len(set(args.recipes)) != len(args.recipes):
        p.error(f"--recipes takes distinct names of {', '.join(RECIPES)}; got {unknown or 'none'}")
    if args.minutes <= 0 or args.threads < 1 or args.min_epochs < 1:
        p.error("--minutes must be positive, --threads and --min-epochs at least 1")
    if args.calibration_steps < 20 or args.calibration_steps % 10:
        p.error("--calibration-steps must be a multiple of 10, at least 20 (the loop times 10)")
    if args.max_images is not None and args.max_images < args.batch_size:
        p.error("--max-images must be at least --batch-size")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", *(sys.argv if argv is None else ["bench/v3_vs_v2.py", *argv])])
    machine = machine_info(torch.get_num_threads())
    taken = [args.out / name for name in args.recipes if (args.out / name).is_dir()]
    if taken and not args.restart and any(any(folder.iterdir()) for folder in taken):
        sys.exit(
            f"error: {taken[0]} already holds a run; pass --restart to replace the runs in "
            f"{args.out}, or choose another --out."
        )
    try:
        # One tensor data set for every recipe; a run's subset is taken from it.
        full, _ = resolve_dataset(args.data, "train")
        if not isinstance(full, TensorImageDataset):
            raise ConfigError(f"{args.data} is not an in-memory data set; pass the IDX folder.")
        data = subset(full, args.max_images or len(full), args.seed)
        rows = [run_recipe(name, args, data, args.minutes * 60) for name in args.recipes]
    except MocohubError as error:
        sys.exit(f"error: {error}")
    mode = f"one after the other, {args.threads} thread(s) each"
    lines = [
        f"Fashion-MNIST, MoCo v3 against v2 at the same wall time ({args.minutes:g} min of "
        f"training per recipe, {mode}); training images: {len(data):,} of {len(full):,}.",
        f"Machine: {machine_line(machine)}.",
        f"k-NN: k={KNN_K}, T={KNN_T}, cosine, bank = the {len(full):,} training images, "
        f"queries = the test split. Linear: {rows[0]['linear_protocol']}.",
        f"Command: `{command}`",
        "",
        markdown(rows),
    ]
    print("\n".join(lines))
    result = {"command": command, "mode": mode, "minutes": args.minutes, "machine": machine}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**result, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
