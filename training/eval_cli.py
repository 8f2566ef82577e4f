"""``mocohub knn`` and ``mocohub lincls``: evaluate a pre-trained backbone from the command line.

MODEL (``--model``) is anything ``mocohub.load`` accepts: a registry name
(``mocohub list``), an artifact folder or ``.safetensors`` file, ``hf-hub:org/name``,
a URL, a mocohub run folder or checkpoint, or a reference MoCo v1/v2/v3 ``.pth.tar``.
Both commands run in one process, or in every process of
a ``torchrun``/``srun`` launch (only rank 0 prints and writes), e.g.
``torchrun --nproc-per-node 8 -m mocohub lincls imagenet --model M --out DIR``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .cli import parse_lr_steps
from .schedule import late_milestones_note

__all__ = ["knn_command", "lincls_command"]

_MODEL_HELP = (
    "Any model mocohub.load accepts: a name from `mocohub list`, an artifact folder or "
    ".safetensors file, hf-hub:ORG/NAME, a URL, a mocohub run folder or checkpoint, or a "
    "reference MoCo v1/v2/v3 .pth.tar."
)
_DATA_HELP = "an image folder (DATA/train and DATA/val, or one tree), a folder of IDX files, "
_DATA_HELP += "a folder with labels.csv, or 'fashion-mnist'."


def _is_main() -> bool:
    from .distributed import get_rank

    return get_rank() == 0


def _echo_err(line: str) -> None:
    click.echo(line, err=True)


def _count(number: int, noun: str, plural: str | None = None) -> str:
    """``"1 epoch"``, ``"2 epochs"``."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def _same_data_note(what: str, val_given: bool) -> str:
    why = (
        "--val names the training images"
        if val_given
        else "the data has no separate validation split"
    )
    return (
        f"note: {why}, so {what} is measured on the training images; pass --val for "
        "held-out images."
    )


@click.command("knn")
@click.option("--model", required=True, help=_MODEL_HELP)
@click.option("--train", "train_data", required=True, help="Labelled neighbours: " + _DATA_HELP)
@click.option(
    "--val",
    "val_data",
    help="Labelled queries (default: the val split of --train, e.g. DATA/val).",
)
@click.option("--k", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--t", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader workers (image folders).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Write the result as JSON: to this file if it ends in .json, else to OUT/knn.json.",
)
def knn_command(
    model: str,
    train_data: str,
    val_data: str | None,
    k: int,
    t: float,
    batch_size: int,
    workers: int | None,
    precision: str,
    out: Path | None,
) -> None:
    """Weighted k-NN accuracy of MODEL's features: --train images vote for --val images."""
    from mocohub.fileio import atomic_write_text

    from .knn_eval import knn_evaluate

    result = knn_evaluate(
        model,
        train_data,
        val_data,
        k=k,
        t=t,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
    )
    if not _is_main():
        return
    if result["val_is_train"]:
        _echo_err(
            _same_data_note(
                "k-NN accuracy (leave-one-out: each classified by the others)", val_data is not None
            )
        )
    if result["k"] < k:
        voters = "every other training image" if result["val_is_train"] else "every training image"
        _echo_err(
            f"note: --k {k} is more than the {_count(result['train_samples'], 'training image')}, "
            f"so k={result['k']}: {voters} votes."
        )
    click.echo(
        f"k-NN (k={result['k']}, t={t}): top-1 {100 * result['top1']:.2f}%, "
        f"top-5 {100 * result['top5']:.2f}% ({_count(result['val_samples'], 'query', 'queries')}, "
        f"{_count(result['train_samples'], 'neighbour')})"
    )
    if out is not None:
        path = out if out.suffix == ".json" else out / "knn.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {path}")


@click.command("lincls")
@click.argument("data")
@click.option("--model", required=True, help=_MODEL_HELP)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for lincls.json, lincls_epochs.jsonl and linear_head.pt.",
)
@click.option("--val", "val_data", help="Validate on this data's val split instead of DATA's.")
@click.option(
    "--preset",
    type=click.Choice(["reference", "small"]),
    default="reference",
    show_default=True,
    help="reference: RandomResizedCrop + flip, val Resize + CenterCrop. "
    "small (28-32 px images): RandomCrop with padding 4 + flip, val unchanged.",
)
@click.option(
    "--protocol",
    type=click.Choice(["moco", "moco_v3"]),
    default="moco",
    show_default=True,
    help="The optimisation settings below: moco (v1/v2 main_lincls.py: 100 epochs, batch "
    "256, lr 30, lr x0.1 at 60 and 80) or moco_v3 (v3 main_lincls.py: 90 epochs, batch "
    "1024, lr 0.1 per 256 images scaled to the batch, cosine); each option overrides it.",
)
@click.option("--epochs", type=click.IntRange(min=1), help="[protocol: 100 / 90]")
@click.option(
    "--lr",
    type=float,
    help="moco: as given (30); moco_v3: per 256 images (0.1), scaled by --batch-size / 256.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Global, over all processes. [protocol: 256 / 1024]",
)
@click.option("--momentum", type=float, help="[protocol: 0.9]")
@click.option("--weight-decay", type=float, help="[protocol: 0]")
@click.option(
    "--schedule", type=click.Choice(["steps", "cosine"]), help="[protocol: steps / cosine]"
)
@click.option(
    "--lr-steps",
    callback=parse_lr_steps,
    help="Epochs at which the lr drops x0.1 (--schedule steps). [protocol: 60,80]",
)
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader workers (image folders).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=click.IntRange(min=1), help="Crop size (default: the model's).")
@click.option(
    "--cached-features",
    is_flag=True,
    help="Faster, NOT the reference protocol: embed un-augmented images once, "
    "then train the classifier on those features.",
)
@click.option(
    "--eval-every",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Epochs between validations (the last epoch is always validated).",
)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option(
    "--restart",
    is_flag=True,
    help="Discard an earlier evaluation's state in --out instead of resuming it "
    "(an interrupted evaluation resumes by default).",
)
@click.option("--quiet", is_flag=True, help="No per-epoch lines.")
def lincls_command(
    data: str,
    model: str,
    out: Path,
    val_data: str | None,
    preset: str,
    protocol: str,
    lr_steps: tuple[int, ...] | None,
    workers: int | None,
    image_size: int | None,
    restart: bool,
    quiet: bool,
    **settings: object,
) -> None:
    """Linear evaluation of MODEL on DATA (the reference MoCo protocol): a linear
    classifier trained on the frozen backbone's features, 100 epochs of SGD with
    lr 30 (--protocol moco_v3: MoCo v3's, 90 epochs, batch 1024, lr 0.4, cosine). MODEL is
    anything mocohub.load accepts. DATA is an image folder (DATA/train and DATA/val, or
    one tree), a folder of IDX files, a folder with labels.csv, or 'fashion-mnist'.
    State is saved in --out after every epoch; rerunning an interrupted command resumes
    it.
    """
    from mocohub.cli import hint_on_interrupt

    from .eval_data import default_workers
    from .lincls import linear_eval
    from .lincls_config import protocol_changes, protocol_config

    config = protocol_config(
        protocol,
        preset=preset,
        lr_steps=lr_steps,
        workers=default_workers() if workers is None else workers,
        image_size=image_size,
        **settings,
    )
    late = late_milestones_note(config.schedule, config.lr_steps, config.epochs)
    if late and _is_main():
        _echo_err(f"note: {late}")
    started = time.time()
    with hint_on_interrupt(lambda: _lincls_kept(out, restart, started)):
        result = linear_eval(
            model,
            data,
            out,
            config,
            val=val_data,
            log=None if quiet else _echo_err,
            progress=not quiet and sys.stderr.isatty(),
            resume=not restart,
        )
    if not _is_main():
        return
    if result["val_is_train"]:
        _echo_err(_same_data_note("the accuracy", val_data is not None))
    described = f"{config.preset} protocol"
    if protocol != "moco":
        described += f", {protocol} settings"
    if config.cached_features:
        described += ", cached features"
    described += f", {_count(config.epochs, 'epoch')}"
    changes = protocol_changes(protocol, config)
    if changes:
        described += ", changed: " + " ".join(changes)
    click.echo(
        f"linear evaluation ({described}): "
        f"top-1 {100 * result['top1']:.2f}%, top-5 {100 * result['top5']:.2f}% "
        f"({_count(result['val_samples'], 'image')}); wrote {out / 'lincls.json'}"
    )


def _lincls_kept(out: Path, restart: bool, started: float) -> str | None:
    """What an interrupted ``mocohub lincls`` kept in ``out``, for the Ctrl-C line."""
    import torch

    from .lincls_config import STATE_NAME

    path = out / STATE_NAME
    if not _is_main() or not path.is_file():
        return None
    if restart and path.stat().st_mtime < started:
        return None  # an earlier evaluation's, which --restart is replacing
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True)["epoch"]
    except Exception:  # unreadable (cut short while written?): nothing to promise
        return None
    again = "the same command without --restart" if restart else "the same command"
    return f"the classifier after epoch {epoch} is kept in {path}; rerun {again} to resume."
