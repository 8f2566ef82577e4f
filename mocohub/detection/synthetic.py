"""A small, exact detection set: Fashion-MNIST items pasted on larger canvases, as COCO files.

Each canvas (``size`` x ``size`` gray, black like Fashion-MNIST's background)
receives 1-``max_objects`` items, each scaled by a random factor in
[0.75, 2.0] (21-56 px from 28 px) and pasted at a random position that keeps
it whole on the canvas; later items cover earlier ones where they overlap.
An item's pixels are those of its resized image that are at least
``INK`` (8 of 255): they, and only they, are drawn, so every drawn pixel
belongs to exactly one object, and an object's mask is what stays visible of
its pixels after the later items are drawn. Boxes are the masks' tight
bounds; an object that later items hide completely is left out. Masks are
stored as COCO RLE (``pycocotools.mask.encode``), ``iscrowd`` is 0, the
categories are the 10 Fashion-MNIST classes (ids 1-10).

Layout of the output folder (what :mod:`mocohub.detection.coco` reads)::

    OUT/annotations/instances_train.json   OUT/train/000001.png ...
    OUT/annotations/instances_val.json     OUT/val/000001.png ...
    OUT/README.md                          how the folder was made

The source items are split before pasting: every fifth item of each class
goes to the validation canvases only, the others to the training canvases, so the
validation set asks about items the detector never saw. Every canvas draws
from its own generator, seeded with ``(seed, split, index)``: the same command
writes byte-identical files, and asking for more images keeps the first ones.

Command line::

    python -m mocohub.detection.synthetic --out data/fmnist-det --images 400 --seed 0
    python -m mocohub.detection.synthetic --out DIR --source ../shared/data/fashion-mnist

Example:
    >>> generate("data/fmnist-det", images=40, val_images=10, seed=0)
    PosixPath('data/fmnist-det')
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mocohub.errors import InputError, MocohubError
from mocohub.fileio import atomic_write_bytes, atomic_write_text, disk_errors, fsync_dir

__all__ = ["INK", "SCALES", "Items", "generate", "load_items", "main", "make_canvas"]

#: the lowest pixel value (of 255) that counts as part of an item
INK = 8
#: the range of the random scale factor of a pasted item
SCALES = (0.75, 2.0)
_SPLITS = {"train": 0, "val": 1}
#: the samples that come with the repository (first 30 test images of each class)
_SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "fashion-mnist"


@dataclass(frozen=True)
class Items:
    """Source items: ``images`` N x H x W uint8, ``labels`` N ints in 0-9, what they came from."""

    images: np.ndarray
    labels: np.ndarray
    description: str


def load_items(source: str | os.PathLike[str] | None = None) -> Items:
    """The Fashion-MNIST items to paste: a samples folder (PNGs + ``labels.csv``), an IDX
    folder (its test split ``t10k-*`` when present, else ``train-*``), or, for None, the
    samples that come with the repository (``samples/fashion-mnist``).

    Example:
        >>> load_items("/usr/share/datasets/fashion-mnist").images.shape
        (10000, 28, 28)
    """
    # The readers live in mocohub.training (IDX, labels.csv); importing them only here
    # keeps `import mocohub.detection` free of training code, as the CLI does.
    from mocohub.training.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
    from mocohub.training.readers import load_idx_folder, load_labelled_folder

    if source is None and (_SAMPLES / "labels.csv").is_file():
        folder, description = _SAMPLES, "samples/fashion-mnist (in the mocohub repository)"
    elif source is None and any(FASHION_MNIST_DIR.glob("t10k-images*")):
        # an installed package has no samples/: Debian's dataset-fashion-mnist instead
        folder, description = FASHION_MNIST_DIR, str(FASHION_MNIST_DIR)
    elif source is None:
        raise InputError(
            f"The Fashion-MNIST samples ({_SAMPLES}) are not in this installation (they "
            f"come with the repository), nor is {FASHION_MNIST_DIR} (apt-get install "
            "dataset-fashion-mnist); pass --source with a folder of Fashion-MNIST IDX "
            "files (t10k-images-idx3-ubyte.gz ...) or of PNGs with labels.csv."
        )
    else:
        folder, description = Path(source), str(source)
    if not folder.is_dir():
        raise InputError(
            f"{folder} is not a folder; pass --source with a folder of Fashion-MNIST IDX "
            "files or of PNGs with labels.csv."
        )
    if (folder / "labels.csv").is_file():
        data = load_labelled_folder(folder)
    else:
        test = any(folder.glob("t10k-images*")) or any(folder.glob("test-images*"))
        split = "test" if test else "train"
        data = load_idx_folder(folder, split, classes=FASHION_MNIST_CLASSES)
        description += f" ({split} split)"
    images = data.images.numpy()
    labels = data.labels.numpy().astype(np.int64)
    if images.ndim != 4 or images.shape[1] != 1:
        raise InputError(
            f"{folder} holds images of shape {tuple(images.shape[1:])}; Fashion-MNIST items "
            "are gray (1 channel)."
        )
    classes = len(FASHION_MNIST_CLASSES)
    if len(labels) < 2 or labels.min() < 0 or labels.max() >= classes:
        raise InputError(
            f"{folder} needs at least 2 items labelled 0-{classes - 1} (the Fashion-MNIST "
            f"classes); it has {len(labels)} with labels {sorted(set(labels.tolist()))[:12]}."
        )
    return Items(images[:, 0], labels, description)


def make_canvas(
    items: Items, pool: np.ndarray, rng: np.random.Generator, size: int, max_objects: int
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One canvas (``size`` x ``size`` uint8) and its objects as ``(label, mask)``, the masks
    boolean ``size`` x ``size``, what stays visible of each item (hidden items left out).

    Example:
        >>> canvas, objects = make_canvas(items, np.arange(10), np.random.default_rng(0), 128, 6)
        >>> canvas.shape, 1 <= len(objects) <= 6
        ((128, 128), True)
    """
    canvas = np.zeros((size, size), np.uint8)
    owner = np.full((size, size), -1, np.int64)  # which object each pixel shows
    labels = []
    for k in range(int(rng.integers(1, max_objects + 1))):
        index = int(pool[rng.integers(len(pool))])
        item = items.images[index]
        scale = rng.uniform(*SCALES)
        h = min(size, max(1, round(item.shape[0] * scale)))
        w = min(size, max(1, round(item.shape[1] * scale)))
        pixels = np.asarray(Image.fromarray(item).resize((w, h), Image.Resampling.BILINEAR))
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        ink = pixels >= INK
        canvas[y : y + h, x : x + w][ink] = pixels[ink]
        owner[y : y + h, x : x + w][ink] = k
        labels.append(int(items.labels[index]))
    objects = [(label, owner == k) for k, label in enumerate(labels)]
    return canvas, [(label, mask) for label, mask in objects if mask.any()]


def _annotation(mask: np.ndarray, label: int, image_id: int, ann_id: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": label + 1,
        "bbox": [x, y, w, h],
        "area": int(mask_utils.area(rle)),
        "iscrowd": 0,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()},
    }


def _png(canvas: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(
    out: Path, split: str, n: int, items: Items, pool: np.ndarray, options: dict[str, int]
) -> dict[str, Any]:
    """Write one split's PNGs and instances JSON; its counts for the README."""
    from mocohub.training.data import FASHION_MNIST_CLASSES

    (out / split).mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    per_class = [0] * len(FASHION_MNIST_CLASSES)
    for i in range(1, n + 1):
        rng = np.random.default_rng([options["seed"], _SPLITS[split], i])
        canvas, objects = make_canvas(items, pool, rng, options["size"], options["max_objects"])
        name = f"{i:06d}.png"
        atomic_write_bytes(out / split / name, _png(canvas))
        height, width = canvas.shape
        images.append({"id": i, "file_name": name, "height": height, "width": width})
        for label, mask in objects:
            annotations.append(_annotation(mask, label, i, len(annotations) + 1))
            per_class[label] += 1
    coco = {
        "info": {
            "description": f"Synthetic Fashion-MNIST detection set, {split} split "
            "(mocohub.detection.synthetic)",
            "seed": options["seed"],
        },
        "licenses": [{"id": 1, "name": "MIT (Fashion-MNIST, Zalando Research)"}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c + 1, "name": name, "supercategory": "fashion"}
            for c, name in enumerate(FASHION_MNIST_CLASSES)
        ],
    }
    atomic_write_text(out / "annotations" / f"instances_{split}.json", json.dumps(coco) + "\n")
    return {"images": n, "objects": len(annotations), "per_class": per_class}


def generate(
    out: str | os.PathLike[str],
    *,
    images: int = 400,
    val_images: int | None = None,
    size: int = 128,
    seed: int = 0,
    max_objects: int = 6,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the synthetic detection set into the new or empty folder ``out``.

    Args:
        out: the folder to write (absent, or an empty folder); it is built beside,
            as ``.NAME.PID.building``, and renamed onto ``out`` when complete.
        images: training canvases; ``val_images`` validation canvases (``images // 4``, at least 1).
        size: the canvases' side in pixels (at least 56, the largest pasted item).
        seed: the seed of every random choice.
        max_objects: objects pasted per canvas, 1 to this (some may end fully hidden).
        source: where the items come from (see :func:`load_items`).

    Example:
        >>> generate("data/fmnist-det", images=40, seed=1, source="data/fashion-mnist")
        PosixPath('data/fmnist-det')
    """
    out = Path(out)
    val_images = max(1, images // 4) if val_images is None else val_images
    largest = round(28 * SCALES[1])
    if images < 1 or val_images < 1 or max_objects < 1 or size < largest:
        raise InputError(
            f"Need --images >= 1, --val-images >= 1, --max-objects >= 1 and --size >= "
            f"{largest}; got {images}, {val_images}, {max_objects} and {size}."
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not an empty folder; choose a new --out.")
    items = load_items(source)
    val_pool = np.sort(np.concatenate([np.flatnonzero(items.labels == c)[::5] for c in range(10)]))
    train_pool = np.setdiff1d(np.arange(len(items.labels)), val_pool)
    options = {"seed": seed, "size": size, "max_objects": max_objects}
    command = (
        f"python -m mocohub.detection.synthetic --out DIR --images {images} "
        f"--val-images {val_images} --size {size} --seed {seed} --max-objects {max_objects}"
    )
    if source is not None:
        command += f" --source {source}"
    # Built beside `out` and renamed onto it at the end: `out` is complete or absent.
    building = out.parent / f".{out.name}.{os.getpid()}.building"
    try:
        with disk_errors(out):
            (building / "annotations").mkdir(parents=True)
            counts = {
                "train": _write_split(building, "train", images, items, train_pool, options),
                "val": _write_split(building, "val", val_images, items, val_pool, options),
            }
            readme = _readme(command, items, counts, len(val_pool))
            atomic_write_text(building / "README.md", readme)
            os.replace(building, out)  # onto an empty folder too (POSIX)
            fsync_dir(out.parent)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out


def _readme(command: str, items: Items, counts: dict[str, Any], val_items: int) -> str:
    from mocohub import __version__
    from mocohub.training.data import FASHION_MNIST_CLASSES

    rows = "\n".join(
        f"| {name} | {counts['train']['per_class'][c]} | {counts['val']['per_class'][c]} |"
        for c, name in enumerate(FASHION_MNIST_CLASSES)
    )
    train_items = len(items.labels) - val_items
    side = f"{items.images.shape[1]}x{items.images.shape[2]}"
    return f"""# Synthetic Fashion-MNIST detection set

Made by mocohub {__version__} with

    {command}

(`DIR` is this folder). The same command writes byte-identical files.

- Source items: {items.description}: {len(items.labels)} items of {side} px.
  Every fifth item of each class ({val_items} in all) is pasted on validation
  canvases only, the other {train_items} on training canvases only.
- Each canvas gets 1 to `--max-objects` items, each scaled by a random factor
  in [{SCALES[0]}, {SCALES[1]}] and pasted whole at a random position; later items
  cover earlier ones. Only an item's pixels of value >= {INK}/255 are drawn, so
  every drawn pixel belongs to one object. An object's mask is what stays
  visible of its pixels; its box is the mask's tight bounds; an object hidden
  completely is left out.
- COCO instances files: `annotations/instances_train.json` (images in
  `train/`) and `annotations/instances_val.json` (images in `val/`), masks as
  RLE, `iscrowd` 0, categories 1-10 = the Fashion-MNIST classes.

| split | images | objects |
| --- | --- | --- |
| train | {counts["train"]["images"]} | {counts["train"]["objects"]} |
| val | {counts["val"]["images"]} | {counts["val"]["objects"]} |

| class | train objects | val objects |
| --- | --- | --- |
{rows}

Licence: Fashion-MNIST is MIT-licensed (Zalando Research); so is this derived set.
"""


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mocohub.detection.synthetic``: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m mocohub.detection.synthetic",
        description="Write a synthetic Fashion-MNIST detection set (COCO JSON + PNGs).",
    )
    parser.add_argument("--out", required=True, type=Path, help="new or empty folder to fill")
    parser.add_argument("--images", type=int, default=400, help="training canvases (400)")
    parser.add_argument(
        "--val-images", type=int, default=None, help="validation canvases (images // 4, at least 1)"
    )
    parser.add_argument("--size", type=int, default=128, help="canvas side in pixels (128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-objects", type=int, default=6, help="objects per canvas (6)")
    parser.add_argument(
        "--source",
        default=None,
        help="Fashion-MNIST IDX folder or PNG folder with labels.csv "
        "(default: the repository's samples/fashion-mnist)",
    )
    args = parser.parse_args(argv)
    try:
        out = generate(
            args.out,
            images=args.images,
            val_images=args.val_images,
            size=args.size,
            seed=args.seed,
            max_objects=args.max_objects,
            source=args.source,
        )
    except MocohubError as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
