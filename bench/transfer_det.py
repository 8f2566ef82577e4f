"""Detection transfer: MoCo init vs random init vs supervised init, Mask R-CNN on synthetic data.

The benchmark of the MoCo paper's transfer claim at toy scale. On the seeded
synthetic Fashion-MNIST detection set (``python -m mocohub.detection.synthetic``:
items pasted on 128 px canvases, COCO JSON + PNGs; generated once into
``--work``/data, or ``--data``), the same detector and schedule are fine-tuned
(``mocohub finetune-det``: Mask R-CNN with FPN, the same ``--iters``, batch,
lr, warm-up, min/max size, seeds) from:

- (a) the MoCo model (``--moco``, default the bundled ``moco_r18_fashion_mnist``)
  with each backbone ``--norm`` of ``--norms`` (bn, frozen_bn, gn, sync_bn;
  ``sync_bn`` in one process is plain BN: finetune-det falls back with a
  warning, so that row measures the same thing as bn and is labelled so);
- (b) the same network at random initialisation (``finetune-det --random-init``);
- (c) a supervised backbone of the same architecture (``--supervised``, an
  artifact folder written by ``bench/supervised_fmnist.py``; skipped with the
  reason printed when absent).

One normalisation setting for the FPN and the box/mask heads is used in every
row (``--fpn-norm``, default ``bn``: the paper's recipe adds SyncBN there, which
is BN in one process), and (b) and (c) use ``--baseline-norm`` (default ``bn``,
fine-tuned BN as in the paper's comparisons) in the backbone, so rows differ
only in the backbone's initial weights (and, within (a), its norm). The FPN
and heads have ``--fpn-channels`` channels in every row, default 32:
``build_detector``'s default for a width-16 ResNet-18 is 128, and with a small
stem the finest FPN level is the full 128 px image, so one training step
(batch 4) took 6.4 s at 1 thread against 2.2 s at 64 channels and 1.0 s at 32
(2-core AMD EPYC with AVX512-BF16, fp32, measured beside another job).

``--jobs N`` runs N fine-tunings at a time, each with (usable CPUs / N)
threads (``OMP_NUM_THREADS``), so the CPUs are shared, not oversubscribed.

Every run is a separate ``python -m mocohub finetune-det`` process (isolation:
no state shared between runs); a finished run leaves ``bench_run.json`` in its
folder, and running the benchmark again keeps each run finished with the same
command (so a long benchmark can be split over several sittings; ``--rerun``
runs everything again), evaluated with COCO AP on the val split at its
end (``--eval-every 0``; finetune-det's final evaluation, written to
``RUN/eval.json``, the same one ``mocohub eval-det`` makes). The table gives
bbox and mask AP (x100) as mean +- sample std over ``--seeds`` seeds, AP50 and
the wall time per run; the machine line names the CPU, its flags, the threads
and torch. All figures go to ``--json`` (default
``bench/results/transfer_det.json``).

Run (from the repository root)::

    python bench/supervised_fmnist.py          # first, for row (c)
    python bench/transfer_det.py --jobs 2      # the benchmark
    python bench/transfer_det.py --quick       # smoke run: 16 images, 2 iterations, 1 seed, bn

Source items for the synthetic set: ``--source`` (default the Fashion-MNIST IDX
folder ``/work/shared/data/fashion-mnist`` when it exists, else the package's
samples).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from train_step import machine_info, machine_line

from mocohub.sysinfo import usable_cpus

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_IDX = Path("/work/shared/data/fashion-mnist")
NORMS = ("bn", "frozen_bn", "gn", "sync_bn")
#: A finished run's record (seed, wall time, threads, metrics, command) in its folder.
RUN_RECORD = "bench_run.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moco", default="moco_r18_fashion_mnist", help="MoCo model (mocohub.load)")
    p.add_argument(
        "--supervised",
        default=str(RESULTS / "supervised_fmnist"),
        help="supervised backbone folder (bench/supervised_fmnist.py)",
    )
    p.add_argument("--data", type=Path, help="an existing COCO set (else one is generated)")
    p.add_argument("--work", type=Path, default=RESULTS / "transfer_det_work")
    p.add_argument("--source", help="items for the synthetic set (IDX or PNG folder)")
    p.add_argument("--images", type=int, default=400, help="synthetic training canvases")
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--size", type=int, default=128, help="canvas side")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--norms", default=",".join(NORMS), help="backbone norms of the MoCo rows")
    p.add_argument("--baseline-norm", default="bn", help="backbone norm of rows (b) and (c)")
    p.add_argument("--fpn-norm", default="bn", help="FPN and heads norm, every row")
    p.add_argument("--kind", default="mask_rcnn")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.02, help="for batch 16 (scaled linearly)")
    p.add_argument("--warmup-iters", type=int, default=50)
    p.add_argument("--min-size", type=int, default=128)
    p.add_argument("--max-size", type=int, default=128)
    p.add_argument("--rois-per-image", type=int, default=128, help="torchvision's: 512")
    p.add_argument("--rpn-proposals", type=int, default=300, help="torchvision's: 2000")
    p.add_argument(
        "--fpn-channels",
        type=int,
        default=32,
        help="FPN and head channels, every row (build_detector's default for width 16: 128)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each with (usable CPUs / jobs) threads",
    )
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--json", type=Path, default=RESULTS / "transfer_det.json")
    p.add_argument(
        "--rerun",
        action="store_true",
        help="run every fine-tuning again (default: keep runs finished with the same command)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 16+8 images, 2 iterations, 1 seed, norm bn only",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.val_images, args.iters, args.seeds = 16, 8, 2, 1
        args.warmup_iters, args.norms = 1, "bn"
        if args.work == p.get_default("work"):
            args.work = RESULTS / "transfer_det_quick"
        if args.json == p.get_default("json"):
            args.json = RESULTS / "transfer_det_quick.json"
    args.norms = [n.strip() for n in args.norms.split(",") if n.strip()]
    bad = [n for n in args.norms if n not in NORMS]
    if bad:
        p.error(f"unknown norm(s) {', '.join(bad)}; choose from {', '.join(NORMS)}")
    if args.seeds < 1 or args.iters < 1 or args.jobs < 1:
        p.error("--seeds, --iters and --jobs must be at least 1")
    return args


def dataset(args: argparse.Namespace) -> Path:
    """The COCO set: ``--data``, or the synthetic one in ``--work``/data (made once)."""
    if args.data is not None:
        return args.data
    data = args.work / "data"
    stamp = data / "command.json"
    command = [
        sys.executable,
        "-m",
        "mocohub.detection.synthetic",
        "--out",
        str(data),
        "--images",
        str(args.images),
        "--val-images",
        str(args.val_images),
        "--size",
        str(args.size),
        "--seed",
        str(args.data_seed),
    ]
    source = args.source or (str(SHARED_IDX) if SHARED_IDX.is_dir() else None)
    if source:
        command += ["--source", source]
    if stamp.exists() and json.loads(stamp.read_text()) == command[1:]:
        print(f"data: reusing {data} (same command)")
        return data
    if data.exists():
        sys.exit(f"{data} exists but was made by another command; delete it or pass --work.")
    print("data: " + shlex.join(command))
    subprocess.run(command, check=True)
    stamp.write_text(json.dumps(command[1:]))
    return data


def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The (init, norm, label, model, extra options) of each row to run."""
    out = []
    for norm in args.norms:
        label = "sync_bn (= bn: one process)" if norm == "sync_bn" else norm
        out.append({"init": f"MoCo ({args.moco})", "norm": label, "model": args.moco,
                    "options": ["--norm", norm]})  # fmt: skip
    out.append({"init": "random", "norm": args.baseline_norm, "model": args.moco,
                "options": ["--norm", args.baseline_norm, "--random-init"]})  # fmt: skip
    supervised = Path(args.supervised)
    if (supervised / "config.json").is_file():
        options = ["--norm", args.baseline_norm]
        out.append({"init": f"supervised ({supervised.name})", "norm": args.baseline_norm,
                    "model": str(supervised), "options": options})  # fmt: skip
    else:
        print(
            f"skipping (c) supervised: no artifact at {supervised} (run "
            "bench/supervised_fmnist.py first, or pass --supervised)"
        )
    return out


def run_threads(jobs: int) -> int:
    """Threads of each run when ``jobs`` run at once: the usable CPUs shared out, at least 1."""
    return max(1, usable_cpus() // jobs)


def run_one(args: argparse.Namespace, data: Path, row: dict[str, Any], seed: int) -> dict:
    """One fine-tuning run in its own process; returns its eval.json and wall time.

    The process gets ``run_threads(args.jobs)`` threads (``OMP_NUM_THREADS``),
    so ``--jobs`` runs side by side do not oversubscribe the CPUs. A failed run
    raises ``RuntimeError`` with the end of its stderr.
    """
    name = f"{row['init'].split()[0].lower()}-{row['norm'].split()[0]}-seed{seed}"
    run_dir = args.work / "runs" / name
    command = [
        sys.executable, "-m", "mocohub", "finetune-det", str(data),
        "--model", row["model"], "--out", str(run_dir), "--kind", args.kind,
        *row["options"], "--fpn-norm", args.fpn_norm,
        "--iters", str(args.iters), "--batch-size", str(args.batch_size),
        "--lr", str(args.lr), "--warmup-iters", str(args.warmup_iters),
        "--min-size", str(args.min_size), "--max-size", str(args.max_size),
        "--rois-per-image", str(args.rois_per_image),
        "--rpn-proposals", str(args.rpn_proposals),
        "--fpn-channels", str(args.fpn_channels),
        "--workers", str(args.workers), "--seed", str(seed),
        "--precision", args.precision, "--eval-every", "0", "--quiet", "--restart",
    ]  # fmt: skip
    record_file = run_dir / RUN_RECORD
    if not args.rerun and (run_dir / "eval.json").is_file() and record_file.is_file():
        done_before = json.loads(record_file.read_text())
        if done_before.get("command") == shlex.join(command):
            print(f"  {name}: done before with the same command, {done_before['wall_s']:.0f} s")
            return dict(done_before)
    threads = run_threads(args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"run {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "eval.json").read_text())
    print(f"  {name}: {wall:.0f} s, {done.stdout.strip().splitlines()[-1]}", flush=True)
    result = {"seed": seed, "wall_s": wall, "threads": threads, "run_dir": str(run_dir),
              "metrics": metrics, "command": shlex.join(command)}  # fmt: skip
    record_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def spread(values: list[float | None]) -> str:
    got = [100 * v for v in values if v is not None]
    if not got:
        return "-"
    if len(got) == 1:
        return f"{got[0]:.1f}"
    return f"{statistics.fmean(got):.1f} +- {statistics.stdev(got):.1f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    machine = machine_info(torch.get_num_threads())
    print(machine_line(machine))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    data = dataset(args)
    plan = rows(args)
    print(
        f"{len(plan) * args.seeds} runs, {args.jobs} at a time with "
        f"{run_threads(args.jobs)} thread(s) each"
    )
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [
            [pool.submit(run_one, args, data, row, seed) for seed in range(args.seeds)]
            for row in plan
        ]
        try:
            results = [[f.result() for f in row_futures] for row_futures in futures]
        except RuntimeError as error:
            pool.shutdown(cancel_futures=True)  # runs not started yet never start
            sys.exit(str(error))
    total = time.perf_counter() - started
    table = [
        {**{k: row[k] for k in ("init", "norm", "model")}, "runs": runs}
        for row, runs in zip(plan, results, strict=True)
    ]

    header = ["init", "backbone norm", "bbox AP", "mask AP", "bbox AP50", "mask AP50", "s / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        m = [r["metrics"] for r in entry["runs"]]
        cells = [
            entry["init"],
            entry["norm"],
            spread([x.get("bbox_AP") for x in m]),
            spread([x.get("segm_AP") for x in m]),
            spread([x.get("bbox_AP50") for x in m]),
            spread([x.get("segm_AP50") for x in m]),
            f"{statistics.fmean(r['wall_s'] for r in entry['runs']):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    settings = (
        f"{args.kind}, FPN/heads norm {args.fpn_norm}, {args.iters} iters, batch "
        f"{args.batch_size}, lr {args.lr} (per 16 images), warm-up {args.warmup_iters}, "
        f"size {args.min_size}/{args.max_size}, {args.rois_per_image} RoIs and "
        f"{args.rpn_proposals} proposals per image, FPN/head channels {args.fpn_channels}, "
        f"precision {args.precision}, seeds 0..{args.seeds - 1}, {args.jobs} run(s) at a "
        f"time with {run_threads(args.jobs)} thread(s) each"
    )
    print()
    print(f"COCO AP (x100, mean +- std over {args.seeds} seed(s)) on {data} val; {settings}")
    print("\n".join(lines))
    print(f"\ncommand: {command}\nmachine: {machine_line(machine)}\ntotal {total:.0f} s")
    record = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "data": str(data),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": table,
        "markdown": "\n".join(lines),
        "total_s": total,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
