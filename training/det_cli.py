"""``mocohub finetune-det`` and ``mocohub eval-det``: detection transfer from the command line.

``mocohub finetune-det DATA --model M --out RUN`` fine-tunes a Mask R-CNN (or
Faster R-CNN) with M's backbone on the COCO data in DATA
(``DATA/annotations/instances_{train,val}.json``, images in ``DATA/train``
and ``DATA/val``), in one process or, with ``--nproc-per-node``/``--nodes``,
in workers started through torchrun exactly as ``mocohub train`` starts them
(the same command also runs as a worker of torchrun or srun).
``mocohub eval-det RUN --data DATA`` evaluates a run's newest checkpoint.
"""

from __future__ import annotations

import json
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
    worker_args,
)

__all__ = ["eval_det_command", "finetune_det_command"]

_NORMS = ["default", "sync_bn", "bn", "frozen_bn", "gn"]
_PRECISIONS = click.Choice(["auto", "fp32", "bf16", "fp16"])


def _scores(metrics: dict[str, Any]) -> str:
    shown = [
        f"{name} {100 * metrics[key]:.1f}%"
        for key, name in (("bbox_AP", "box AP"), ("bbox_AP50", "AP50"), ("segm_AP", "mask AP"))
        if isinstance(metrics.get(key), float)
    ]
    return ", ".join(shown)


@click.command("finetune-det")
@click.argument("data")
@click.option("--model", required=True, help="The backbone: anything mocohub.load accepts.")
@click.option(
    "--out",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder: config.json, metrics.jsonl, curves.png, checkpoints, eval.json.",
)
@click.option(
    "--kind",
    type=click.Choice(["mask_rcnn", "faster_rcnn"]),
    default="mask_rcnn",
    show_default=True,
)
@click.option(
    "--norm",
    type=click.Choice(_NORMS),
    default="default",
    show_default=True,
    help="Backbone normalisation; default: sync_bn for MoCo weights (the paper's recipe).",
)
@click.option(
    "--fpn-norm",
    type=click.Choice([*_NORMS[:3], "gn", "none"]),
    default="default",
    show_default=True,
    help="Normalisation in the FPN and the box/mask heads; default: sync_bn for MoCo weights.",
)
@click.option(
    "--trainable-layers", type=click.IntRange(0, 5), help="ResNet stages that train (0-5)."
)
@click.option(
    "--random-init",
    is_flag=True,
    help="The same network at random initialisation (defaults then: bn, no FPN norm).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=12,
    show_default=True,
    help="Run length; the lr drops x0.1 at 2/3 and 8/9 of it (Detectron's 1x).",
)
@click.option(
    "--iters", type=click.IntRange(min=1), help="Run length in iterations (instead of --epochs)."
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Global, over all processes.",
)
@click.option(
    "--lr",
    type=float,
    default=0.02,
    show_default=True,
    help="Learning rate for a batch of 16 images, scaled linearly to --batch-size.",
)
@click.option(
    "--warmup-iters",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Linear warm-up from 0.001 x lr over these iterations.",
)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--min-size", type=click.IntRange(min=1), help="Short side images are resized to.")
@click.option("--max-size", type=click.IntRange(min=1), help="Longest side after resizing.")
@click.option(
    "--fpn-channels", type=click.IntRange(min=1), help="FPN and head width (default 256, or less)."
)
@click.option(
    "--rois-per-image",
    type=click.IntRange(min=1),
    help="RoIs sampled per image for the box and mask heads (torchvision's 512).",
)
@click.option(
    "--rpn-proposals",
    type=click.IntRange(min=1),
    help="RPN proposals kept per image in training (torchvision's 2000; small images need far "
    "fewer).",
)
@click.option(
    "--train-ann", help="Training annotations (default DATA/annotations/instances_train.json)."
)
@click.option(
    "--val-ann", help="Validation annotations (default DATA/annotations/instances_val.json)."
)
@click.option(
    "--eval-every",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Epochs between COCO evaluations (0: at the end only).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="DataLoader workers per process.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--precision", type=_PRECISIONS, default="auto", show_default=True)
@click.option(
    "--checkpoint-every",
    default="0",
    metavar="N|Nm",
    help="Also checkpoint inside epochs: every N steps or N minutes.",
)
@click.option(
    "--resume", help="'auto' (the newest intact checkpoint in --out) or a checkpoint path."
)
@click.option("--restart", is_flag=True, help="Delete the run already in --out and start again.")
@launch_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def finetune_det_command(
    ctx: click.Context,
    data: str,
    run_dir: Path,
    train_ann: str | None,
    val_ann: str | None,
    random_init: bool,
    iters: int | None,
    resume: str | None,
    restart: bool,
    nodes: int,
    nproc_per_node: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    max_restarts: int,
    quiet: bool,
    **settings: Any,
) -> None:
    """Fine-tune a detector (Mask R-CNN, FPN) with a MoCo backbone on COCO-format DATA:
    DATA/annotations/instances_train.json and instances_val.json, images in DATA/train
    and DATA/val. Evaluates with COCO AP every --eval-every epochs and at the end."""
    if nodes < 1 or nproc_per_node < 1:
        raise ConfigError("--nodes and --nproc-per-node must be at least 1.")
    if nodes * nproc_per_node > 1 and not inside_launcher():
        args = worker_args(ctx)
        launch_workers(
            args, nodes, nproc_per_node, node_rank, master_addr, master_port, max_restarts
        )
        return

    from .checkpoint import find_latest_checkpoint
    from .det_config import DetConfig
    from .detection import finetune_detector
    from .distributed import get_rank

    config = DetConfig(iters=iters or 0, pretrained=not random_init, **settings)
    if elastic_retry() and find_latest_checkpoint(run_dir) is not None:
        resume, restart = "auto", False  # torchrun restarted the workers: continue the run
    metrics = finetune_detector(
        config,
        data,
        run_dir,
        train_ann=train_ann,
        val_ann=val_ann,
        resume=resume,
        restart=restart,
        progress=not quiet and sys.stderr.isatty(),
    )
    if get_rank() != 0:
        return
    if metrics.get("already_complete"):
        click.echo(
            f"{run_dir} is already complete: nothing to do. To train longer, rerun with "
            "--resume auto and more --epochs or --iters."
        )
        return
    if "bbox_AP" not in metrics:
        click.echo(
            "note: DATA has no val split (annotations/instances_val.json) and no --val-ann was "
            "given, so nothing was evaluated.",
            err=True,
        )
    scores = _scores(metrics)
    click.echo(
        f"done: loss {metrics['loss']:.4g}{', ' + scores if scores else ''}; run folder {run_dir}"
    )


@click.command("eval-det")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--data", required=True, help="COCO data: DATA/annotations/instances_val.json and DATA/val."
)
@click.option(
    "--val-ann", help="Annotations to evaluate on (default DATA/annotations/instances_val.json)."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--precision", type=_PRECISIONS, default="fp32", show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the result here (default RUN_DIR/eval.json).",
)
def eval_det_command(
    run_dir: Path,
    data: str,
    val_ann: str | None,
    batch_size: int,
    workers: int,
    precision: str,
    out: Path | None,
) -> None:
    """COCO box and mask AP of a finetune-det run's newest checkpoint on DATA's val split.
    Prints the result as JSON and writes it to RUN_DIR/eval.json (or --out)."""
    from .det_eval import EVAL_NAME, evaluate_run, write_eval
    from .distributed import get_rank

    result = evaluate_run(
        run_dir, data, val_ann=val_ann, batch_size=batch_size, workers=workers, precision=precision
    )
    if get_rank() != 0:
        return
    path = write_eval(out or run_dir / EVAL_NAME, result)
    click.echo(json.dumps(result, indent=2))
    click.echo(f"wrote {path}", err=True)
