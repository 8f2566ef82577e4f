"""``mocohub train``: MoCo pre-training from the command line.

One process: ``mocohub train DATA --out RUN``. Several GPUs or machines:
``--nproc-per-node M`` (and ``--nodes N --node-rank R --master-addr HOST``
on each machine) starts the workers through torch.distributed.run (torchrun,
elastic, ``--max-restarts``), each running this command with the options it
was given, less the launch options. The same command also runs as a worker
started by torchrun or srun directly: it reads their environment and
launches nothing.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from mocohub.errors import ConfigError
from mocohub.launch import (
    elastic_retry,
    inside_launcher,
    launch_options,
    launch_workers,
)
from mocohub.launch import worker_args as worker_args

from .config import PRESETS, TrainConfig
from .resume import run_settings

#: mocohub.vit.VIT_ARCHITECTURES, named here so that the CLI does not import timm.
VIT_ARCHES = ("vit_small", "vit_base", "vit_mini", "vit_nano")

__all__ = ["parse_lr_steps", "train_command", "worker_args"]


def parse_lr_steps(
    ctx: click.Context | None, param: click.Parameter | None, text: str | None
) -> tuple[int, ...] | None:
    """The ``--lr-steps`` callback of ``train`` and ``lincls``: ``"120,160"`` -> ``(120, 160)``,
    positive epochs."""
    if text is None:
        return None
    try:
        steps = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        steps = ()
    if not steps or min(steps) < 1:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of positive epochs.",
            param_hint="'--lr-steps'",
        )
    return steps


@click.command("train")
@click.argument("data")
@click.option(
    "--out",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder: config.json, metrics.jsonl, checkpoints.",
)
@click.option(
    "--preset",
    default="moco_v2",
    show_default=True,
    type=click.Choice(list(PRESETS)),
    help="Reference recipe (moco_v3_*, fashion_mnist_v3: MoCo v3); every value below overrides it.",
)
@click.option(
    "--arch",
    type=click.Choice(["resnet18", "resnet34", "resnet50", *VIT_ARCHES]),
    help="Backbone; the ViTs (vit_small, vit_base; vit_mini, vit_nano for small images) "
    "train with MoCo v3 presets only.",
)
@click.option("--width", type=int, help="Channels of the first ResNet stage (64 standard).")
@click.option("--small-stem/--no-small-stem", default=None, help="3x3 stem, no max-pool.")
@click.option("--dim", type=int, help="Feature dimension of keys and queries.")
@click.option("--queue-size", "K", type=int, help="K: negatives in the queue.")
@click.option("--moco-m", "m", type=float, help="Momentum of the key encoder.")
@click.option(
    "--moco-m-cos/--no-moco-m-cos",
    "moco_m_cos",
    default=None,
    help="MoCo v3: raise the momentum to 1 with a half cosine over the run.",
)
@click.option("--mlp-dim", type=int, help="MoCo v3: hidden width of the projector and predictor.")
@click.option("--temperature", "T", type=float, help="Softmax temperature.")
@click.option("--mlp/--no-mlp", default=None, help="MoCo v2 projection head.")
@click.option("--symmetric/--no-symmetric", default=None, help="Both views as queries.")
@click.option("--bn-splits", type=int, help="Split BN sub-batches (one process only).")
@click.option("--image-size", type=int, help="Crop size of the augmented views.")
@click.option(
    "--crop-min",
    type=float,
    help="Smallest random-crop scale, a fraction of the image area (recipe default 0.2).",
)
@click.option(
    "--solarize",
    type=float,
    help="Probability of solarizing each view (both views; the recipe's by default: 0, and "
    "0.2 for MoCo v3's second view).",
)
@click.option(
    "--augment-on",
    type=click.Choice(["auto", "device", "workers"]),
    help="Augment batches on the device, or per image in workers.",
)
@click.option("--epochs", type=int, help="Length of the run (the preset's, e.g. 200).")
@click.option("--batch-size", type=int, help="Global batch size, over all processes.")
@click.option(
    "--lr",
    type=float,
    help="Learning rate for the preset's reference batch size (scaled linearly to --batch-size).",
)
@click.option("--weight-decay", type=float, help="SGD weight decay (the preset's, e.g. 1e-4).")
@click.option(
    "--optimizer",
    type=click.Choice(["sgd", "lars", "adamw"]),
    help="sgd (MoCo v1/v2); lars or adamw (MoCo v3).",
)
@click.option("--warmup-epochs", type=int, help="MoCo v3: epochs of linear lr warm-up.")
@click.option(
    "--schedule",
    type=click.Choice(["cosine", "steps"]),
    help="Learning rate: half a cosine to 0 (v2), or x0.1 at each of --lr-steps (v1).",
)
@click.option(
    "--lr-steps",
    callback=parse_lr_steps,
    help="Epochs at which the lr drops x0.1 with --schedule steps (the reference's: 120,160).",
)
@click.option("--workers", type=int, help="DataLoader worker processes per GPU/process.")
@click.option(
    "--seed", type=int, help="Seeds the initial weights, data order and augmentations (0)."
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="auto: bf16 on GPUs and on CPUs with bf16 matrix units, else fp32.",
)
@click.option(
    "--compile/--no-compile", "compile_", default=None, help="torch.compile the encoders."
)
@click.option(
    "--channels-last",
    type=click.Choice(["auto", "on", "off"]),
    help="Memory format of the encoders (auto: channels_last on CPUs and GPUs, in every "
    "precision).",
)
@click.option(
    "--checkpoint-every",
    metavar="N|Nm",
    help="Also checkpoint inside epochs, every N optimizer steps (500) or N minutes (30m); "
    "--resume auto continues from such a checkpoint exactly as from an epoch's. Kept: the "
    "last 2 epoch checkpoints and, until the next epoch ends, only the newest mid-epoch one. "
    "Default 0: epoch ends only.",
)
@click.option("--knn-every", type=int, help="Epochs between k-NN checks (0: at the end only).")
@click.option("--knn-train", help="Labelled data for the k-NN memory bank (default: DATA).")
@click.option(
    "--knn-val",
    help="Labelled data to classify with k-NN (enables the monitor): its val split, or, "
    "where it has none, each image by the others (leave-one-out). Kept in config.json, so "
    "--resume auto keeps the monitor; 'none' turns it off.",
)
@click.option(
    "--resume",
    help="'auto' (the newest intact checkpoint in --out; damaged ones are skipped) "
    "or a checkpoint path, also a reference MoCo v1/v2/v3 .pth.tar (main_moco.py).",
)
@click.option(
    "--restart",
    is_flag=True,
    help="Delete the run already in --out and start again (with --resume CHECKPOINT "
    "of that run: delete the checkpoints after it).",
)
@click.option(
    "--weights",
    help="Start from these encoder weights (fine-tuning from epoch 0): a reference MoCo "
    "v1/v2/v3 .pth.tar, a mocohub checkpoint or run folder.",
)
@launch_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def train_command(
    ctx: click.Context,
    data: str,
    run_dir: Path,
    preset: str,
    resume: str | None,
    restart: bool,
    weights: str | None,
    nodes: int,
    nproc_per_node: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    max_restarts: int,
    quiet: bool,
    compile_: bool | None,
    **overrides: Any,
) -> None:
    """Pre-train MoCo on DATA: an image folder (DATA or DATA/train), a folder of
    IDX files, a folder with labels.csv, or 'fashion-mnist'."""
    if nodes < 1 or nproc_per_node < 1:
        raise ConfigError("--nodes and --nproc-per-node must be at least 1.")
    if nodes * nproc_per_node > 1 and not inside_launcher():
        launch_workers(
            worker_args(ctx),
            nodes,
            nproc_per_node,
            node_rank,
            master_addr,
            master_port,
            max_restarts,
        )
        return

    from .checkpoint import find_latest_checkpoint
    from .config import preset as make_config
    from .distributed import get_rank
    from .train import train

    if elastic_retry() and find_latest_checkpoint(run_dir) is not None:
        # torchrun restarted the workers (--max-restarts): continue this run where
        # it stopped, neither refusing its folder nor discarding it (--restart) again.
        resume, restart = "auto", False
    if compile_ is not None:
        overrides["compile"] = compile_
    monitor_off = (overrides["knn_val"] or "").lower() == "none"  # applied once config is built
    for key in ("knn_train", "knn_val"):
        overrides[key] = _recorded_path(overrides[key])
    preset_given = ctx.get_parameter_source("preset") == click.core.ParameterSource.COMMANDLINE
    saved = run_settings(run_dir) if resume == "auto" and not preset_given else None
    if saved is not None:  # the run's own settings, and the flags given now on top
        given = {k: v for k, v in overrides.items() if v is not None}
        config = TrainConfig.from_dict({**saved, **given}).validate()
    else:
        config = make_config(preset, **overrides)
    if monitor_off:
        config = dataclasses.replace(config, knn_train=None, knn_val=None)
    knn_data = (config.knn_train or data, config.knn_val) if config.knn_val else None
    metrics = train(
        config,
        data,
        run_dir,
        resume=resume,
        restart=restart,
        weights=weights,
        knn_data=knn_data,
        progress=not quiet and sys.stderr.isatty(),
    )
    if get_rank() != 0:  # the command group leaves the process group after this returns
        return
    if metrics.get("already_complete"):
        done = metrics["epoch"]
        where = f"epoch {done} of {config.epochs}"
        if done != config.epochs:
            where = f"epoch {done}, past --epochs {config.epochs}"
        # A checkpoint given by path (e.g. a reference .pth.tar) may be all there is:
        # --resume auto would find nothing in run_dir and start from scratch.
        what = run_dir if resume == "auto" else f"The checkpoint {resume}"
        click.echo(
            f"{what} is already complete ({where}): nothing to do. "
            f"To train longer, rerun with --resume {resume} --epochs N (N above {done})."
        )
        return
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    click.echo(f"done: {summary}; run folder {run_dir}")


def _recorded_path(value: str | None) -> str | None:
    """A --knn-train/--knn-val value as config.json keeps it: an existing path made
    absolute (a resume may start in another directory), anything else as given."""
    if value is None or value == "fashion-mnist" or not Path(value).exists():
        return value
    return str(Path(value).absolute())
