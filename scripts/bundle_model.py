"""Turn a Fashion-MNIST pre-training run into the weight set shipped inside mocohub.

Reads the run's newest checkpoint and its measured figures (the k-NN monitor in
``metrics.jsonl`` and, if given, the linear probe's result: ``mocohub lincls``'s
``lincls.json`` or ``bench/quality_fmnist.py``'s JSON), and writes
``mocohub/weights/<name>/`` (``model.safetensors``, ``config.json`` and a model
card with the metrics and the training command). Prints the registry row's
hash. ``--half`` stores float16 weights (half the size; loaded back as float32).

The command is recorded as a user can run it: a folder of the Fashion-MNIST IDX
files (wherever the run read them) is written ``fashion-mnist``, the name the
CLI resolves to Debian's ``dataset-fashion-mnist``; any other path outside the
current folder (``../...`` or absolute) is refused, since no user has it.

Example:
    python scripts/bundle_model.py runs/w16_e12 --quality runs/w16_e12/lincls/lincls.json \\
        --command "python -m mocohub train ../data/fashion-mnist ..." --trained-on "one H200 GPU"
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
from pathlib import Path

import mocohub
from mocohub.artifact import WEIGHTS_NAME, get_config, save_pretrained
from mocohub.card import model_card
from mocohub.registry import WEIGHTS_DIR
from mocohub.training.data import FASHION_MNIST_DIR

#: what the CLI calls Debian's Fashion-MNIST (training/data.py resolves it)
DATASET_NAME = "fashion-mnist"
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


def _is_fashion_mnist(token: str) -> bool:
    folder = Path(token)
    if folder == FASHION_MNIST_DIR:
        return True
    return folder.is_dir() and all(
        (folder / name).is_file() or (folder / f"{name}.gz").is_file() for name in _IDX_FILES
    )


def _portable(word: str) -> str:
    if _is_fashion_mnist(word):
        return DATASET_NAME
    if word.startswith(("../", "/")) or word == "..":
        raise SystemExit(
            f"--command names {word}, a path users do not have; write the command as a "
            f"user runs it (the data as {DATASET_NAME!r}, or a folder under the current one)."
        )
    return word


def portable_command(command: str) -> str:
    """``command`` as a user can run it: Fashion-MNIST folders become ``fashion-mnist``.

    Raises SystemExit for any other path that only this machine has
    (``../...`` or absolute), also as an ``--option=PATH`` value.

    Example:
        >>> portable_command("mocohub train /usr/share/datasets/fashion-mnist --out runs/fm")
        'mocohub train fashion-mnist --out runs/fm'
    """
    words = []
    for word in shlex.split(command):
        option, equals, value = word.partition("=")
        if word.startswith("--") and equals:
            words.append(f"{option}={_portable(value)}")
        else:
            words.append(_portable(word))
    return shlex.join(words)


def linear_result(path: Path) -> tuple[float, str]:
    """The linear probe's top-1 (a fraction) and its protocol, as the model card words it,
    from ``mocohub lincls``'s ``lincls.json`` or ``bench/quality_fmnist.py``'s JSON.

    A probe measured on its own training images (``lincls.json`` with
    ``val_is_train``: the data had no test split) is refused: the card's
    figures are on the 10,000 test images.
    """
    quality = json.loads(path.read_text())
    if "linear_top1" in quality:  # bench/quality_fmnist.py
        return quality["linear_top1"], quality["linear_protocol"]
    if "top1" in quality and "protocol" in quality:  # mocohub lincls
        if quality.get("val_is_train"):
            raise SystemExit(
                f"{path}: this probe was evaluated on its training images (the data had no "
                "test split); run mocohub lincls on the Fashion-MNIST folder with its t10k files."
            )
        protocol = quality["protocol"]
        words = "cached features" if protocol.endswith("+cached-features") else protocol
        return quality["top1"], words
    raise SystemExit(
        f"{path} holds no linear-probe result: give mocohub lincls's lincls.json or "
        "bench/quality_fmnist.py's JSON."
    )


def recipe(run_config: dict) -> str:
    """The run's recipe in words, from its ``config.json``."""
    augment = [
        f"{label} {run_config[key]}"
        for key, label in (("crop_min", "smallest crop"), ("solarize", "solarize p"))
        if run_config.get(key) is not None
    ]
    augmentation = "batched small-image augmentation" + (
        f" ({', '.join(augment)})" if augment else ""
    )
    splits = run_config.get("bn_splits", 1)
    return (
        f"preset {run_config['preset']}: K={run_config['K']}, m={run_config['m']}, "
        f"T={run_config['T']}, batch {run_config['batch_size']}, {run_config['schedule']} lr, "
        f"{augmentation}" + (f", split BN x{splits}" if splits > 1 else "")
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the mocohub run folder")
    parser.add_argument("--name", default="moco_r18_fashion_mnist")
    parser.add_argument(
        "--quality",
        type=Path,
        help="the linear probe's result: mocohub lincls's lincls.json or "
        "bench/quality_fmnist.py's JSON",
    )
    parser.add_argument(
        "--trained-on",
        default="a 2-core CPU",
        help="the hardware the run trained on, for the card (default: %(default)s)",
    )
    parser.add_argument("--command", required=True, help="the command that trained the run")
    parser.add_argument("--half", action="store_true", help="store float16 weights")
    parser.add_argument(
        "--out", type=Path, help="write the weight set here (default: mocohub/weights/NAME)"
    )
    args = parser.parse_args(argv)

    model = mocohub.load(args.run)
    config = get_config(model)
    run_config = json.loads((args.run / "config.json").read_text())
    records = [json.loads(line) for line in (args.run / "metrics.jsonl").open()]
    epochs = [r for r in records if r.get("event") == "epoch"]
    last = epochs[-1]
    meta = {
        "name": args.name,
        "description": (
            f"MoCo ResNet-18 (small stem, width {config.width}) pre-trained by mocohub "
            f"without labels on the 60,000 Fashion-MNIST training images, {last['epoch']} "
            f"epochs on {args.trained_on}. Small enough to ship inside the package; loads offline."
        ),
        "source": "https://github.com/org/mocohub (this repository)",
        "format": "mocohub",
        "epochs": last["epoch"],
        "dataset": "Fashion-MNIST train split (60,000 28x28 gray images; labels unused)",
        "recipe": recipe(run_config),
        "command": portable_command(args.command),
        "knn_top1": round(100 * last["knn_top1"], 2),
        "metrics_protocol": (
            "Measured by mocohub on the 10,000 Fashion-MNIST test images: weighted cosine "
            "k-NN (k=200, T=0.1) with the training split as memory bank"
        ),
        "license": "mit",
        "license_note": "weights trained by mocohub (MIT) on Fashion-MNIST (MIT)",
    }
    if args.quality is not None:
        top1, protocol = linear_result(args.quality)
        meta["linear_top1"] = round(100 * top1, 2)
        meta["metrics_protocol"] += f"; a linear classifier on the frozen features ({protocol})"
    config = dataclasses.replace(config, meta=meta)
    if args.half:
        model = model.half()
    num_params = sum(p.numel() for p in model.parameters())
    out = args.out or WEIGHTS_DIR / args.name
    save_pretrained(
        model,
        out,
        config=config,
        extra_files={"README.md": model_card(config, num_params=num_params)},
    )
    digest = hashlib.sha256((out / WEIGHTS_NAME).read_bytes()).hexdigest()
    size = (out / WEIGHTS_NAME).stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB); registry hash sha256:{digest[:16]}")


if __name__ == "__main__":
    main()
