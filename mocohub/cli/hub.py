"""``mocohub list``, ``info``, ``convert`` and ``push``: the weights hub on the command line.

Example:
    $ mocohub list
    $ mocohub info moco_v2_r50_800ep
    $ mocohub convert moco_v2_800ep_pretrain.pth.tar --out moco-v2-r50-800ep
    $ mocohub convert moco_v2_r50_800ep --to detectron2 --out r50_moco.pkl
    $ mocohub convert moco_v3_vit_b --to deit --out vit-b-deit.pth
    $ mocohub push moco-v2-r50-800ep me/moco-v2-r50-800ep
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mocohub.registry import Weights, WeightsFile, get_weights, list_models

__all__ = ["convert_command", "info_command", "list_command", "push_command"]


def _cached(file: WeightsFile) -> Path | None:
    """The local copy of a registered file, if this machine has one (no network)."""
    if file.kind == "url":
        from mocohub.download import cache_dir

        path = cache_dir() / file.location.rsplit("/", 1)[-1]
        return path if path.is_file() else None
    if file.kind == "hf-hub":
        from huggingface_hub import try_to_load_from_cache

        from mocohub.artifact import WEIGHTS_NAME
        from mocohub.hf import parse_repo

        repo_id, revision = parse_repo(file.location)
        found = try_to_load_from_cache(repo_id, WEIGHTS_NAME, revision=revision)
        return Path(found) if isinstance(found, str) else None
    local = file.local_path()
    return local if local is not None and local.exists() else None


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def _summary(weights: Weights) -> dict[str, Any]:
    config, head = weights.config(), weights.model.head
    copies = [c for c in (_cached(f) for f in weights.files) if c is not None]
    return {
        "name": weights.name,
        "arch": config.arch,
        "feature_dim": config.feature_dim,
        "head": None if head is None else f"{head.type} {head.dim}-d",
        "preprocessing": config.preprocessing.to_dict(),
        "files": [{"location": f.location, "hash": f.hash} for f in weights.files],
        "cached": str(copies[0]) if copies else None,
        "file_size": _size(copies[0]) if copies else None,
        "meta": dict(weights.meta),
    }


def _megabytes(size: int | None) -> str:
    return "unknown until downloaded" if size is None else f"{size / 1e6:.1f} MB"


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_command(as_json: bool) -> None:
    """List the named MoCo weight sets with their published metrics."""
    rows = [_summary(w) for w in list_models()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("NAME", "ARCH", "DIM", "EPOCHS", "TOP-1", "K-NN", "PARAMS", "LICENCE", "CACHED")
    table = [header] + [
        (
            r["name"],
            r["arch"],
            str(r["feature_dim"]),
            str(r["meta"].get("epochs", "")),
            str(r["meta"].get("imagenet_linear_top1", r["meta"].get("linear_top1", "-"))),
            str(r["meta"].get("knn_top1", "-")),
            f"{r['meta']['num_params'] / 1e6:.1f}M" if r["meta"].get("num_params") else "-",
            str(r["meta"].get("license", "-")),
            "yes" if r["cached"] else "no",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    click.echo(
        "\nTOP-1: linear-classification top-1 (%), published for ImageNet weights, else "
        "measured by mocohub. TOP-1 and K-NN (k-NN top-1, %) are on the val/test split of "
        "the data the weights were trained on. LICENCE: cc-by-nc-* "
        "weights are for non-commercial use only.\n`mocohub info NAME` shows one weight set."
    )


@click.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_command(name: str, as_json: bool) -> None:
    """Show everything about one named weight set."""
    info = _summary(get_weights(name))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    prep = info["preprocessing"]
    meta = dict(info["meta"])
    rows = [
        ("architecture", f"{info['arch']}, {info['feature_dim']}-d features"),
        (
            "head",
            f"{info['head']} (mocohub.load(..., head=True) keeps it)" if info["head"] else "none",
        ),
        (
            "preprocessing",
            f"resize {prep['resize_size']} ({prep['interpolation']}), centre crop "
            f"{prep['image_size']}, mean {tuple(prep['mean'])}, std {tuple(prep['std'])}",
        ),
    ]
    for file in info["files"]:
        rows += [("file", file["location"]), ("hash", file["hash"] or "-")]
    rows += [("cached", info["cached"] or "no"), ("file size", _megabytes(info["file_size"]))]
    description = meta.pop("description", "")
    rows += [(key, str(value)) for key, value in meta.items()]
    width = max(len(key) for key, _ in rows)
    lines = [f"{info['name']}: {description}"]
    lines += [f"  {key:<{width}}  {value}" for key, value in rows]
    click.echo("\n".join(lines))


@click.command("convert")
@click.argument("source")
@click.option(
    "--out", "-o", required=True, type=click.Path(path_type=Path), help="Folder (or file) to write."
)
@click.option(
    "--to",
    "target",
    type=click.Choice(["mocohub", "torchvision", "timm", "detectron2", "deit"]),
    default="mocohub",
    show_default=True,
    help="mocohub: artifact folder (model.safetensors, config.json, README.md); torchvision: "
    "a resnet state dict (.pth); timm: a timm state dict (ViT or ResNet, .pth); "
    "detectron2: the .pkl MODEL.WEIGHTS takes (ResNets); deit: a ViT as moco-v3's "
    "convert_to_deit.py writes it (.pth).",
)
@click.option("--head", is_flag=True, help="Keep the projection head (mocohub folders only).")
@click.option("--name", default=None, help="The model's name in its config and card.")
@click.option("--no-progress", is_flag=True, help="No download progress bar.")
def convert_command(
    source: str, out: Path, target: str, head: bool, name: str | None, no_progress: bool
) -> None:
    """Convert SOURCE (a checkpoint, folder, URL, hf-hub: repo or name) for publishing.

    A reference MoCo .pth.tar becomes a mocohub artifact folder, a torchvision
    or timm state dict, a detectron2 .pkl (ResNets) or a DeiT checkpoint (ViTs).
    """
    from mocohub.errors import InputError
    from mocohub.loading import load

    if head and target != "mocohub":
        raise InputError(
            f"--to {target} writes the backbone only; drop --head, or convert to a mocohub "
            "folder to keep the head."
        )
    from mocohub.hf import for_publishing

    model = for_publishing(load(source, head=head, progress=not no_progress), source, name)
    config = model.mocohub_config
    if target == "torchvision":
        from mocohub.foreign import save_torchvision

        written = save_torchvision(model, out)
        click.echo(f"Wrote {written}: a torchvision {config.arch} state dict (no fc).")
    elif target == "timm":
        from mocohub.foreign import save_timm

        written = save_timm(model, out)
        click.echo(f"Wrote {written}: a timm {config.arch} state dict (no classifier head).")
        if config.is_vit:
            # Every head count gives the same key shapes, so a wrong one loads strictly and
            # silently computes other features: name the shape to build.
            vit: Any = model
            click.echo(
                "Load it into timm.models.vision_transformer.VisionTransformer("
                f"img_size={config.image_size}, patch_size={config.patch_size}, "
                f"in_chans={config.in_channels}, embed_dim={config.feature_dim}, "
                f"depth={len(vit.blocks)}, num_heads={vit.blocks[0].attn.num_heads}, "
                "num_classes=0)"
                + (
                    "; not timm's vit_small_patch16_224, which has 6 heads (MoCo v3's ViT-S has "
                    "12)."
                    if config.arch == "vit_small"
                    else "."
                )
            )
    elif target == "deit":
        from mocohub.foreign import save_deit

        written = save_deit(model, out)
        click.echo(
            f"Wrote {written}: a DeiT checkpoint ({{'model': ...}}, no head) of {config.arch}."
        )
    elif target == "detectron2":
        from mocohub.foreign import save_detectron2

        written = save_detectron2(model, out)
        click.echo(f"Wrote {written}: detectron2 weights (MODEL.WEIGHTS {written}).")
    else:
        from mocohub.hf import save_pretrained

        save_pretrained(model, out)
        click.echo(
            f"Wrote {out}/ (model.safetensors, config.json, README.md): {config.arch}, "
            f"{config.embedding_dim}-d output. Load it with mocohub.load({str(out)!r})."
        )


@click.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, default=None, help="Create the repo as private.")
@click.option("--revision", default=None, help="Branch to push to (created when missing).")
@click.option("--message", "-m", default=None, help="Commit message.")
def push_command(
    folder: Path, repo_id: str, private: bool | None, revision: str | None, message: str | None
) -> None:
    """Publish an artifact FOLDER (from `mocohub convert`) as the Hub repo REPO_ID.

    A `mocohub train` run folder or checkpoint, or a reference MoCo .pth.tar,
    is converted on the fly (the backbone; `mocohub convert --head` first to
    publish the projection head too).
    """
    from mocohub.hf import is_artifact_folder, push_to_hub

    if folder.exists() and not is_artifact_folder(folder):
        click.echo(f"{folder} is not an artifact folder: converting it to one first.", err=True)
    url = push_to_hub(folder, repo_id, private=private, revision=revision, commit_message=message)
    click.echo(f"Pushed {folder} to https://huggingface.co/{repo_id} ({url}).")
