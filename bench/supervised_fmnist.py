"""A supervised backbone with the same architecture and compute as a MoCo model (Fashion-MNIST).

The supervised baseline of the detection transfer benchmark
(``bench/transfer_det.py``, row "(c) supervised"): the same network as a given
MoCo model (its ``ModelConfig``: arch, small stem, input channels, width,
preprocessing mean/std), trained on the Fashion-MNIST labels with
cross-entropy, SGD (momentum 0.9, weight decay 5e-4, nesterov off), a cosine
learning rate per iteration, and the usual small-image augmentation (random
crop of the image zero-padded by 4 px, horizontal flip), batched on tensors.

Same compute: in the same process the script times one MoCo training step as
``bench/train_step.py`` builds its "ours" row (``make_ours``: ``build_moco``
with the ``--preset`` config at the model's width and ``--batch-size``, the
loop's automatic precision and layout) and one step of this script's
supervised model (same batch, same precision and layout, same SGD kernel),
both the model step only (no data loading or augmentation), alternating
step by step, median over ``--timing-steps`` rounds after one warm-up. The supervised run then gets
``epochs = MoCo epochs x MoCo step time / supervised step time`` (rounded,
at least 1); an epoch is ``N / batch`` steps for both, so this gives both the
same number of model-step seconds. MoCo epochs default to the model's registry
meta ``epochs`` (``--moco-epochs`` overrides); ``--epochs`` overrides the
computed count (quick runs), ``--limit N`` trains on the first N images.

Writes the backbone (``fc`` dropped: ``nn.Identity``) with
``mocohub.artifact.save_pretrained`` to ``--out`` (default
``bench/results/supervised_fmnist``, outside the package) and
``supervised_fmnist.json`` beside it (``--out``'s parent): test accuracy,
timings, epochs, the command and the machine. Load it with
``mocohub.load(OUT)``; ``bench/transfer_det.py --supervised OUT`` uses it.

Run (from the repository root)::

    python bench/supervised_fmnist.py                         # same compute as the bundled model
    python bench/supervised_fmnist.py --epochs 1 --limit 2000 # smoke run
    python bench/supervised_fmnist.py --model runs/fmnist --moco-epochs 50

Reads the IDX files in ``--data`` (default ``/work/shared/data/fashion-mnist``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from train_step import loop_settings, machine_info, machine_line, make_ours, to_layout

import mocohub
from mocohub.artifact import ModelConfig, build_model, save_pretrained
from mocohub.training.config import preset
from mocohub.training.optim import sgd_kernel
from mocohub.training.readers import load_idx_folder
from mocohub.training.train import build_moco

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "supervised_fmnist"
DEFAULT_DATA = "/work/shared/data/fashion-mnist"
CPU = torch.device("cpu")
PAD = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moco_r18_fashion_mnist", help="the MoCo model to match")
    p.add_argument("--data", default=DEFAULT_DATA, help="Fashion-MNIST IDX folder")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="artifact folder to write")
    p.add_argument("--preset", default="fashion_mnist", help="the MoCo model's training preset")
    p.add_argument("--batch-size", type=int, default=256, help="batch of both steps")
    p.add_argument("--moco-epochs", type=int, help="MoCo epochs (default: the model's meta)")
    p.add_argument("--epochs", type=int, help="override the computed supervised epochs")
    p.add_argument("--limit", type=int, help="train on the first N images only")
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate (cosine to 0)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--timing-steps", type=int, default=7, help="timed rounds")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("batch_size", "timing_steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    if args.limit is not None and args.limit < args.batch_size:
        p.error("--limit must be at least --batch-size (one full batch)")
    return args


def classifier(config: ModelConfig, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """``(backbone, backbone + linear classifier)`` for ``config`` at random init."""
    backbone = build_model(dataclasses.replace(config, head=None)).train()
    return backbone, nn.Sequential(backbone, nn.Linear(config.embedding_dim, num_classes))


def crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop of ``x`` zero-padded by ``PAD`` px, and a random horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * PAD)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def interleaved_medians(steps: list[Any], rounds: int) -> list[float]:
    """Median time of each of ``steps`` over ``rounds`` rounds after one warm-up call
    each; the steps alternate (order reversed every round) so that drifting load from
    other work on the machine hits both alike."""
    for step in steps:
        step(0)  # warm-up
    times: list[list[float]] = [[] for _ in steps]
    for i in range(1, rounds + 1):
        order = list(range(len(steps)))
        for k in order if i % 2 else order[::-1]:
            start = time.perf_counter()
            steps[k](i)
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    loaded = mocohub.load(args.model)
    config: ModelConfig = loaded.mocohub_config
    if config.is_vit:
        sys.exit(f"{args.model} is a {config.arch}; this script trains ResNets only.")
    moco_epochs = args.moco_epochs or config.meta.get("epochs")
    if not moco_epochs and args.epochs is None:
        sys.exit(f"{args.model}'s meta has no 'epochs'; pass --moco-epochs or --epochs.")
    machine = machine_info(torch.get_num_threads())
    print(machine_line(machine))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    # ---- same-compute timing: one MoCo step (train_step's "ours") vs one supervised step
    moco_config = preset(
        args.preset, arch=config.arch, batch_size=args.batch_size, width=config.width
    )
    if moco_config.small_stem != config.small_stem:
        print(f"  note: preset {args.preset} small_stem={moco_config.small_stem}, model's differs")
    dtype, channels_last = loop_settings(moco_config, CPU)
    size, c = config.preprocessing.image_size, config.in_channels
    gen = torch.Generator().manual_seed(args.seed)
    views = [
        (torch.randn(args.batch_size, c, size, size, generator=gen),) * 2 + (None,)
        for _ in range(2)
    ]
    state = build_moco(moco_config, c).state_dict()
    moco_step = make_ours(moco_config, c, state, views)

    backbone, model = classifier(config, 10)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=args.lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
        **sgd_kernel(CPU),
    )

    def step(images: torch.Tensor, labels: torch.Tensor) -> float:
        images = to_layout(images, channels_last)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            output = model(images)
        loss = F.cross_entropy(output.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    probe_labels = torch.randint(0, 10, (args.batch_size,), generator=gen)
    # Timed on a throwaway copy of the weights and optimiser: the real run starts fresh.
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    t_moco, t_sup = interleaved_medians(
        [moco_step, lambda i: step(views[i % 2][0], probe_labels)], args.timing_steps
    )
    del moco_step
    model.load_state_dict(initial)
    optimizer.state.clear()
    ratio = t_moco / t_sup
    computed = max(1, round(moco_epochs * ratio)) if moco_epochs else None
    epochs = args.epochs if args.epochs is not None else computed
    assert epochs is not None
    print(
        f"step times at batch {args.batch_size} ({'fp32' if dtype is None else dtype}, "
        f"{'channels_last' if channels_last else 'NCHW'}): MoCo {t_moco * 1e3:.1f} ms, "
        f"supervised {t_sup * 1e3:.1f} ms, ratio {ratio:.3f}; MoCo epochs {moco_epochs} -> "
        f"supervised epochs {computed}"
        + (f" (overridden: --epochs {args.epochs})" if args.epochs is not None else "")
    )

    # ---- data
    train = load_idx_folder(args.data, "train")
    test = load_idx_folder(args.data, "test")
    mean = torch.tensor(config.preprocessing.mean).view(1, -1, 1, 1)
    std = torch.tensor(config.preprocessing.std).view(1, -1, 1, 1)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - mean) / std

    x_train, y_train = train.images, train.labels
    if args.limit:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    if x_train.shape[1] != c:
        sys.exit(f"{args.data} has {x_train.shape[1]}-channel images; {args.model} takes {c}.")
    steps_per_epoch = len(x_train) // args.batch_size  # drop_last, as mocohub train
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    print(
        f"training {epochs} epoch(s) x {steps_per_epoch} steps on {len(x_train)} images, "
        f"batch {args.batch_size}, lr {args.lr} cosine"
    )

    # ---- training
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=gen)
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            images = crop_flip(normalise(x_train[idx]), gen)
            losses.append(step(images, y_train[idx]))
            schedule.step()
        print(
            f"epoch {epoch + 1}/{epochs}: loss {statistics.fmean(losses):.4f}, "
            f"{time.perf_counter() - start:.0f} s"
        )
    train_s = time.perf_counter() - start

    # ---- test accuracy
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 1000):
            images = to_layout(normalise(test.images[i : i + 1000]), channels_last)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                correct += int((model(images).argmax(1) == test.labels[i : i + 1000]).sum())
    accuracy = 100 * correct / len(test)
    print(f"test accuracy {accuracy:.2f}% ({len(test)} images); training {train_s:.0f} s")

    # ---- save
    meta = {
        "name": args.out.name,
        "description": (
            f"Supervised {config.arch} (same network as {args.model}), {epochs} epochs on "
            "Fashion-MNIST labels (cross-entropy), same compute as the MoCo model"
        ),
        "source": "bench/supervised_fmnist.py",
        "epochs": epochs,
        "dataset": f"Fashion-MNIST train ({len(x_train)} images, with labels)",
        "test_top1": round(accuracy, 2),
    }
    artifact_config = dataclasses.replace(config, head=None, meta=meta)
    save_pretrained(backbone.eval(), args.out, config=artifact_config)
    record: dict[str, Any] = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "model": args.model,
        "artifact": str(args.out),
        "test_top1": accuracy,
        "train_images": len(x_train),
        "epochs": epochs,
        "computed_epochs": computed,
        "moco_epochs": moco_epochs,
        "moco_step_s": t_moco,
        "supervised_step_s": t_sup,
        "step_ratio": ratio,
        "batch_size": args.batch_size,
        "precision": "fp32" if dtype is None else str(dtype),
        "channels_last": channels_last,
        "train_s": train_s,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "final_loss": statistics.fmean(losses) if losses else math.nan,
    }
    json_path = args.out.parent / f"{args.out.name}.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} and {json_path}")


if __name__ == "__main__":
    main()
