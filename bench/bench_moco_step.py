"""Benchmark mocohub's MoCo against the reference ``moco/builder.py`` on the CPU.

What it measures (all on this machine, CPU only, medians over repeated runs):

1. ``momentum``: the key encoder's momentum update. Ours is
   ``MoCo._momentum_update_key_encoder`` (one in-place ``torch._foreach_lerp_``
   call; on the CPU torch runs it tensor by tensor in C++, on CUDA as fused
   multi-tensor kernels);
   the reference loops over the parameters doing
   ``param_k.data = param_k.data * m + param_q.data * (1 - m)``. Both run on
   the parameters of a MoCo v2 ResNet-50 and ResNet-18 (torchvision, ``mlp=True``).
2. ``shuffle``: shuffle BN's data movement across 2 processes (gloo on
   127.0.0.1). Ours is ``shuffle_batch`` + ``BatchShuffle.unshuffle`` (one
   ``all_to_all_single`` each way); the reference's ``_batch_shuffle_ddp`` /
   ``_batch_unshuffle_ddp`` are re-implemented here (all_gather the images,
   broadcast a ``randperm`` from rank 0, slice; all_gather the keys to
   unshuffle). The time per step is the slower rank's; the bytes are the tensor
   payload each rank receives from other ranks (counted from tensor sizes).
3. ``step``: a whole single-process training step (forward, cross-entropy,
   backward, SGD step) of our ``MoCo`` against a reference MoCo transcribed
   below (per-tensor momentum loop, ``queue.clone()``, ``int(queue_ptr)``
   enqueue), from the same weights, queue and data. The first step's losses
   must agree (checked; the script fails otherwise).

What it cannot show on a CPU: the device-resident queue pointer
(``index_copy_`` instead of ``int(self.queue_ptr)``) avoids a host-device
synchronisation per step on a GPU; on the CPU there is nothing to synchronise.

The main process uses ``--threads`` torch threads (default 1, so that the
figures stay stable on a small machine shared with other work); each of the two
shuffle processes uses one. Every timed section warms up first, alternates
ours and the reference run by run, and times with ``time.perf_counter``.

Run (from the repository root; about 1 minute with the defaults)::

    python bench/bench_moco_step.py
    python bench/bench_moco_step.py --parts momentum step --step-repeats 40
    python bench/bench_moco_step.py --shuffle-shapes 16x3x224x224 --json /tmp/out.json

It prints a table and writes the figures as JSON (``--json``, default
``bench/results/bench_moco_step.json``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import platform
import socket
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from reference_moco import (  # bench/reference_moco.py
    ReferenceMoCo,
    reference_batch_shuffle_ddp,
    reference_batch_unshuffle_ddp,
    reference_momentum_update,
)
from torch import nn

from mocohub.backbones import resnet18
from mocohub.training import MoCo
from mocohub.training.distributed import shared_generator, shuffle_batch

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "bench_moco_step.json"
WORLD = 2  # processes in the shuffle benchmark


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def median_ms(seconds: Iterable[float]) -> float:
    return statistics.median(seconds) * 1e3


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        n, c, h, w = (int(p) for p in text.lower().split("x"))
    except ValueError:
        n = c = h = w = 0
    if min(n, c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"expected NxCxHxW, e.g. 32x3x224x224; got {text!r}")
    return n, c, h, w


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    raise AssertionError  # unreachable


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print a plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first, *rest = zip(cells, widths, strict=True)
        return "  ".join([first[0].ljust(first[1])] + [c.rjust(w) for c, w in rest])

    print(f"\n{title}")
    print("  " + line(header))
    print("  " + "  ".join("-" * w for w in widths))
    for row in rows:
        print("  " + line(row))


# --------------------------------------------------------------------------
# 1. Momentum update
# --------------------------------------------------------------------------


def bench_momentum(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for name in args.momentum_models:
        builder = getattr(torchvision.models, name)
        torch.manual_seed(0)
        model = MoCo(builder, dim=128, K=256, m=0.999, T=0.2, mlp=True)
        with torch.no_grad():  # a key encoder unlike the query encoder, as after training
            for p in model.encoder_q.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
        # Each method updates its own copy: the reference re-allocates every
        # key tensor per call, and ours should not run on memory laid out by it.
        ref_model = copy.deepcopy(model)
        params = list(model.encoder_k.parameters())
        n_params = sum(p.numel() for p in params)

        methods: dict[str, Callable[[], None]] = {
            "ours": model._momentum_update_key_encoder,
            "reference": functools.partial(
                reference_momentum_update, ref_model.encoder_q, ref_model.encoder_k, ref_model.m
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in methods}
        for i in range(args.warmup + args.momentum_repeats):
            # Alternate the order, so that drifting machine load hits both alike.
            for key in list(methods) if i % 2 == 0 else list(methods)[::-1]:
                t0 = time.perf_counter()
                methods[key]()
                dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times[key].append(dt)
            if i == 0:  # sanity: both compute the same key encoder
                for a, b in zip(params, ref_model.encoder_k.parameters(), strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        ours_ms, ref_ms = median_ms(times["ours"]), median_ms(times["reference"])
        bytes_per_pass = 3 * 4 * n_params  # read k, read q, write k (float32)
        results.append(
            {
                "model": f"MoCo v2 {name} (mlp=True)",
                "param_tensors": len(params),
                "params": n_params,
                "ours_ms": ours_ms,
                "reference_ms": ref_ms,
                "speedup": ref_ms / ours_ms,
                "ours_min_ms": min(times["ours"]) * 1e3,
                "reference_min_ms": min(times["reference"]) * 1e3,
                "ours_GBps_min_traffic": bytes_per_pass / (ours_ms * 1e-3) / 1e9,
                "repeats": args.momentum_repeats,
                "ours_all_ms": [t * 1e3 for t in times["ours"]],
                "reference_all_ms": [t * 1e3 for t in times["reference"]],
            }
        )
        del model, ref_model, params, methods
    return results


# --------------------------------------------------------------------------
# 2. Shuffle / unshuffle across processes
# --------------------------------------------------------------------------


def _fake_keys(images: torch.Tensor, dim: int) -> torch.Tensor:
    """Stand-in for the key encoder: a per-sample function of the image, N x dim."""
    return images.flatten(1)[:, :dim].clone()


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN when the denominator is 0 (nothing to compare)."""
    return numerator / denominator if denominator else float("nan")


def _shuffle_worker(
    rank: int,
    port: int,
    shapes: list[tuple[int, int, int, int]],
    warmup: int,
    repeats: int,
    dim: int,
    out_path: str,
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        generator = shared_generator(torch.device("cpu"))
        torch.manual_seed(1234)  # the reference draws its randperm on rank 0's default generator
        results = []
        for shape in shapes:
            images = torch.randn(shape, generator=torch.Generator().manual_seed(rank))
            expected = _fake_keys(images, dim)

            methods: dict[str, Callable[[], tuple[torch.Tensor, int]]] = {
                "ours": functools.partial(_ours_shuffle_round_trip, images, generator, dim),
                "reference": functools.partial(_reference_shuffle_round_trip, images, dim),
            }
            times: dict[str, list[float]] = {k: [] for k in methods}
            received: dict[str, list[int]] = {k: [] for k in methods}
            for i in range(warmup + repeats):
                for key in list(methods) if i % 2 == 0 else list(methods)[::-1]:
                    dist.barrier()
                    t0 = time.perf_counter()
                    back, nbytes = methods[key]()
                    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slower rank's time
                    if i == 0 and not torch.equal(back, expected):
                        raise AssertionError(f"{key}: unshuffle did not restore the keys")
                    if i >= warmup:
                        times[key].append(float(dt))
                        received[key].append(nbytes)
            # Bytes received, averaged over steps, for each rank.
            per_rank = torch.tensor(
                [statistics.fmean(received[k]) for k in methods], dtype=torch.float64
            )
            gathered = [torch.zeros_like(per_rank) for _ in range(WORLD)]
            dist.all_gather(gathered, per_rank)
            table = torch.stack(gathered)  # rank x method
            entry: dict[str, Any] = {
                "shape_per_rank": list(shape),
                "world_size": WORLD,
                "batch_MiB_per_rank": images.numel() * images.element_size() / 2**20,
                "repeats": repeats,
            }
            for j, key in enumerate(methods):
                entry[f"{key}_ms"] = median_ms(times[key])
                entry[f"{key}_all_ms"] = [t * 1e3 for t in times[key]]
                entry[f"{key}_bytes_received_per_rank"] = table[:, j].tolist()
                entry[f"{key}_bytes_received_mean"] = float(table[:, j].mean())
            # A tiny batch can keep every image on its own rank (0 bytes received) by chance.
            entry["speedup"] = ratio(entry["reference_ms"], entry["ours_ms"])
            entry["bytes_ratio"] = ratio(
                entry["reference_bytes_received_mean"], entry["ours_bytes_received_mean"]
            )
            results.append(entry)
        if rank == 0:
            Path(out_path).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _ours_shuffle_round_trip(
    images: torch.Tensor, generator: torch.Generator, dim: int
) -> tuple[torch.Tensor, int]:
    """Ours: shuffle, "encode", unshuffle; returns the keys and the bytes received."""
    shuffled, shuffle = shuffle_batch(images, generator)
    back = shuffle.unshuffle(_fake_keys(shuffled, dim))
    # Payload from other ranks: the images this rank encodes, then its own keys back.
    rank = dist.get_rank()
    images_in = sum(shuffle.recv_counts) - shuffle.recv_counts[rank]
    keys_back = sum(shuffle.send_counts) - shuffle.send_counts[rank]
    image_bytes = images[0].numel() * images.element_size()
    return back, images_in * image_bytes + keys_back * dim * back.element_size()


def _reference_shuffle_round_trip(images: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """The reference: shuffle, "encode", unshuffle; returns the keys and the bytes received."""
    shuffled, idx_unshuffle = reference_batch_shuffle_ddp(images)
    back = reference_batch_unshuffle_ddp(_fake_keys(shuffled, dim), idx_unshuffle)
    # all_gather of the images and of the keys: everything but this rank's own share.
    world, n = dist.get_world_size(), images.shape[0]
    image_bytes = images[0].numel() * images.element_size()
    received = (world - 1) * n * (image_bytes + dim * back.element_size())
    if dist.get_rank() != 0:  # the randperm broadcast from rank 0 (int64)
        received += world * n * 8
    return back, received


def bench_shuffle(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "shuffle.json")
        mp.spawn(
            _shuffle_worker,
            args=(
                free_port(),
                args.shuffle_shapes,
                args.warmup,
                args.shuffle_repeats,
                args.dim,
                out_path,
            ),
            nprocs=WORLD,
            join=True,
        )
        return json.loads(Path(out_path).read_text())


# --------------------------------------------------------------------------
# 3. A whole training step
# --------------------------------------------------------------------------


def bench_step(args: argparse.Namespace) -> dict[str, Any]:
    def encoder(num_classes: int) -> nn.Module:
        return resnet18(num_classes=num_classes, small_stem=True, width=args.step_width)

    torch.manual_seed(0)
    ours = MoCo(encoder, dim=args.dim, K=args.queue, m=0.999, T=0.2, mlp=True)
    ref = ReferenceMoCo(encoder, dim=args.dim, K=args.queue, m=0.999, T=0.2, mlp=True)
    # Same weights, BN statistics and queue (the reference has no generator state).
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "_extra_state"})
    models = {"ours": ours, "reference": ref}
    # As main_moco.py: SGD over model.parameters() (the key encoder has no grads).
    optimizers = {
        k: torch.optim.SGD(m.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        for k, m in models.items()
    }
    gen = torch.Generator().manual_seed(1)
    shape = (args.step_batch, 3, args.step_size, args.step_size)
    batches = [
        (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(2)
    ]

    def step(key: str, i: int) -> torch.Tensor:
        im_q, im_k = batches[i % len(batches)]
        logits, labels = models[key](im_q, im_k)
        loss = F.cross_entropy(logits, labels)
        optimizers[key].zero_grad()
        loss.backward()
        optimizers[key].step()
        return loss.detach()

    times: dict[str, list[float]] = {k: [] for k in models}
    losses: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.step_warmup + args.step_repeats):
        for key in list(models) if i % 2 == 0 else list(models)[::-1]:
            t0 = time.perf_counter()
            loss = step(key, i)
            dt = time.perf_counter() - t0
            losses[key].append(float(loss))
            if i >= args.step_warmup:
                times[key].append(dt)
        if i == 0:
            # Sanity: the same model from the same weights gives the same loss.
            torch.testing.assert_close(
                torch.tensor(losses["ours"][0]),
                torch.tensor(losses["reference"][0]),
                rtol=1e-5,
                atol=1e-5,
                msg=lambda m: f"first-step losses differ: {m}",
            )
    if int(ours.queue_ptr) != int(ref.queue_ptr):
        raise AssertionError("the queue pointers diverged")
    # The momentum update alone on these models: what the step can gain from it.
    update_ms: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.warmup + args.momentum_repeats):
        for key in list(models) if i % 2 == 0 else list(models)[::-1]:
            t0 = time.perf_counter()
            models[key]._momentum_update_key_encoder()
            if i >= args.warmup:
                update_ms[key].append(time.perf_counter() - t0)
    ours_ms, ref_ms = median_ms(times["ours"]), median_ms(times["reference"])
    return {
        "backbone": f"mocohub resnet18(small_stem=True, width={args.step_width}), mlp=True",
        "params_q": sum(p.numel() for p in ours.encoder_q.parameters()),
        "batch": args.step_batch,
        "image_size": args.step_size,
        "K": args.queue,
        "dim": args.dim,
        "repeats": args.step_repeats,
        "ours_ms": ours_ms,
        "reference_ms": ref_ms,
        "ours_images_per_s": args.step_batch / (ours_ms * 1e-3),
        "reference_images_per_s": args.step_batch / (ref_ms * 1e-3),
        "speedup": ref_ms / ours_ms,
        "ours_min_ms": min(times["ours"]) * 1e3,
        "reference_min_ms": min(times["reference"]) * 1e3,
        "momentum_update_ms": {k: median_ms(v) for k, v in update_ms.items()},
        "first_step_loss": {k: v[0] for k, v in losses.items()},
        "max_abs_loss_diff": max(
            abs(a - b) for a, b in zip(losses["ours"], losses["reference"], strict=True)
        ),
        "ours_all_ms": [t * 1e3 for t in times["ours"]],
        "reference_all_ms": [t * 1e3 for t in times["reference"]],
    }


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--parts",
        nargs="+",
        choices=["momentum", "shuffle", "step"],
        default=["momentum", "shuffle", "step"],
        help="which benchmarks to run (default: all)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in the main process (default 1: this runs on a small shared "
        "machine, where more threads than idle cores makes every figure slower and noisier); "
        "the 2 shuffle processes use 1 thread each",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--momentum-repeats", type=int, default=20, help="timed updates (default 20)")
    p.add_argument(
        "--momentum-models",
        nargs="+",
        choices=["resnet50", "resnet18"],
        default=["resnet50", "resnet18"],
        help="networks whose momentum update is timed (default: both)",
    )
    p.add_argument(
        "--shuffle-shapes",
        type=parse_shape,
        nargs="+",
        default=[(32, 3, 224, 224), (256, 3, 32, 32)],
        metavar="NxCxHxW",
        help="per-rank image batches (default: 32x3x224x224 256x3x32x32)",
    )
    p.add_argument("--shuffle-repeats", type=int, default=10, help="timed shuffles (default 10)")
    p.add_argument("--dim", type=int, default=128, help="key dimension (default 128)")
    p.add_argument("--step-batch", type=int, default=64, help="training batch (default 64)")
    p.add_argument("--step-size", type=int, default=32, help="image side in px (default 32)")
    p.add_argument("--step-width", type=int, default=16, help="ResNet-18 width (default 16)")
    p.add_argument("--queue", type=int, default=4096, help="queue size K (default 4096)")
    p.add_argument("--step-warmup", type=int, default=2, help="untimed steps (default 2)")
    p.add_argument("--step-repeats", type=int, default=20, help="timed steps (default 20)")
    p.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"output (default {DEFAULT_JSON})"
    )
    args = p.parse_args(argv)
    if args.queue % args.step_batch:
        p.error(f"--queue ({args.queue}) must be a multiple of --step-batch ({args.step_batch})")
    if any(c * h * w < args.dim for _, c, h, w in args.shuffle_shapes):
        p.error("each shuffle image must have at least --dim values")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus_usable": default_threads(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {cpu}")

    if "momentum" in args.parts:
        report["momentum"] = res = bench_momentum(args)
        print_table(
            f"1. Key-encoder momentum update (median of {args.momentum_repeats}, ms)",
            ["model", "tensors", "params", "ours", "reference", "speedup"],
            [
                [
                    r["model"],
                    str(r["param_tensors"]),
                    f"{r['params'] / 1e6:.1f}M",
                    f"{r['ours_ms']:.2f}",
                    f"{r['reference_ms']:.2f}",
                    f"{r['speedup']:.2f}x",
                ]
                for r in res
            ],
        )

    if "shuffle" in args.parts:
        report["shuffle"] = res = bench_shuffle(args)
        print_table(
            f"2. Shuffle BN data movement, {WORLD} processes, gloo on 127.0.0.1 "
            f"(median of {args.shuffle_repeats}, slower rank)",
            [
                "batch per rank",
                "ours ms",
                "ref ms",
                "speedup",
                "ours recv/rank",
                "ref recv/rank",
                "bytes ratio",
            ],
            [
                [
                    "x".join(map(str, r["shape_per_rank"])),
                    f"{r['ours_ms']:.2f}",
                    f"{r['reference_ms']:.2f}",
                    f"{r['speedup']:.2f}x",
                    fmt_bytes(r["ours_bytes_received_mean"]),
                    fmt_bytes(r["reference_bytes_received_mean"]),
                    f"{r['bytes_ratio']:.2f}x",
                ]
                for r in res
            ],
        )
        formula = (
            "Bytes each rank receives per step, world size W, n images of S_img bytes and "
            "keys of S_key bytes per rank: reference (W-1)*n*(S_img + S_key) "
            "[+ 8*W*n for the randperm on ranks != 0]; ours, on average, "
            "(W-1)/W*n*(S_img + S_key), i.e. W times less. Measured above for W=2 only."
        )
        report["shuffle_bytes_formula"] = formula
        print(textwrap.fill(formula, width=100, initial_indent="  ", subsequent_indent="  "))

    if "step" in args.parts:
        report["step"] = r = bench_step(args)
        print_table(
            f"3. Training step, 1 process (median of {args.step_repeats}; {r['backbone']}, "
            f"batch {r['batch']} x {r['image_size']}px, K={r['K']})",
            ["", "ms/step", "min ms", "images/s"],
            [
                [
                    "ours",
                    f"{r['ours_ms']:.1f}",
                    f"{r['ours_min_ms']:.1f}",
                    f"{r['ours_images_per_s']:.1f}",
                ],
                [
                    "reference",
                    f"{r['reference_ms']:.1f}",
                    f"{r['reference_min_ms']:.1f}",
                    f"{r['reference_images_per_s']:.1f}",
                ],
                ["speedup", f"{r['speedup']:.3f}x", "", ""],
            ],
        )
        update = r["momentum_update_ms"]
        print(
            f"  of which the momentum update: ours {update['ours']:.2f} ms, reference "
            f"{update['reference']:.2f} ms, so the step can gain about "
            f"{(update['reference'] - update['ours']) / r['reference_ms']:.1%} from it"
        )
        print(
            f"  first-step loss: ours {r['first_step_loss']['ours']:.6f}, reference "
            f"{r['first_step_loss']['reference']:.6f}; max |diff| over all steps "
            f"{r['max_abs_loss_diff']:.2e}"
        )

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
