"""``mocohub embed`` end to end against the same model's bare forward pass, in one process.

What it measures, in images per second:

- ``bare forward``: :class:`mocohub.features.TorchEmbedder` (the backend ``mocohub
  embed`` uses, at the precision ``auto`` chooses on this machine) on batches
  that are already decoded and preprocessed tensors in memory: the model alone.
- ``embed end-to-end``: :func:`mocohub.embed.embed_files` on the folder of
  JPEGs, exactly as ``mocohub embed DIR --out feats.npy`` runs it: scan, decode
  and preprocess in DataLoader worker processes, forward, L2-normalise, save the
  parts, assemble ``feats.npy`` + manifest + errors (model loading included).

The ratio end-to-end / bare is the share of the model's speed the pipeline
keeps: 1.0 means decoding is fully hidden behind the forward pass. Rows
alternate (bare, end-to-end, bare, ...) for ``--rounds`` rounds and the
medians are reported, so drifting machine load hits both alike.

Inputs: ``--images N`` synthetic photo-like JPEGs (smooth colour fields plus
noise, quality 90) of ``--size WxH`` written to a temporary folder, or
``--folder DIR`` for your own. The model is a randomly initialised mocohub
ResNet (``--arch``, ImageNet preprocessing at ``--image-size``): speed does not
depend on the weights.

Run (from the repository root)::

    python bench/embed.py                                  # resnet18, 224 px, 192 JPEGs
    python bench/embed.py --arch resnet50 --images 256 --rounds 3
    OMP_NUM_THREADS=1 python bench/embed.py --threads 1 --workers 1   # on a busy machine

Writes every figure as JSON to ``--json`` (default ``bench/results/embed.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mocohub.embed import EmbedSettings, embed_files
from mocohub.features import TorchEmbedder
from mocohub.imageio import decode_image, scan_inputs
from mocohub.models import ModelConfig, build_model, save_pretrained
from mocohub.preprocessing import Preprocessing
from mocohub.sysinfo import cpu_flags, cpu_model


def make_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        low = rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC))
        noise = rng.normal(0, 12, (h, w, 3))
        pixels = np.clip(field + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:05d}.jpg", quality=90)


def bare_forward(embedder: TorchEmbedder, batches: list[torch.Tensor]) -> float:
    started = time.perf_counter()
    for x in batches:
        embedder.embed_batch(x)
    return sum(len(x) for x in batches) / (time.perf_counter() - started)


def end_to_end(
    paths: list[str], model_dir: Path, out: Path, args: argparse.Namespace
) -> tuple[float, dict[str, Any]]:
    settings = EmbedSettings(model=str(model_dir), batch_size=args.batch, device="cpu")

    def opener(precision: str) -> TorchEmbedder:
        from mocohub.features import open_torch_embedder

        return open_torch_embedder(str(model_dir), device="cpu", precision=precision)

    started = time.perf_counter()
    result = embed_files(paths, out, settings, opener, workers=args.workers, restart=True)
    seconds = time.perf_counter() - started
    assert result.rows == len(paths), f"only {result.rows} of {len(paths)} images embedded"
    return len(paths) / seconds, {"pipeline_images_per_s": result.images_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--size", default="640x480", help="JPEG size WxH")
    parser.add_argument("--folder", type=Path, default=None, help="Use these images instead.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench/results/embed.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="mocohub-bench-embed-") as tmp:
        root = Path(tmp)
        folder = args.folder
        if folder is None:
            folder = root / "images"
            folder.mkdir()
            w, h = (int(v) for v in args.size.split("x"))
            make_jpegs(folder, args.images, (w, h))
        paths = scan_inputs([folder])
        torch.manual_seed(0)
        config = ModelConfig(args.arch, preprocessing=Preprocessing.imagenet(args.image_size))
        model_dir = save_pretrained(build_model(config), root / "model")
        embedder = TorchEmbedder(build_model(config), device="cpu")
        prep = config.preprocessing
        transform = prep.transform()
        decoded = [transform(decode_image(p, min_size=prep.resize_size)) for p in paths]
        batches = [
            torch.stack(decoded[i : i + args.batch]) for i in range(0, len(decoded), args.batch)
        ]
        embedder.embed_batch(batches[0])  # warm-up (and the precision check, where one runs)

        bare, e2e, extra = [], [], []
        for r in range(args.rounds):
            bare.append(bare_forward(embedder, batches))
            speed, info = end_to_end(paths, model_dir, root / f"feats{r}.npy", args)
            e2e.append(speed)
            extra.append(info)
            print(f"round {r + 1}: bare {bare[-1]:.1f} img/s, end-to-end {e2e[-1]:.1f} img/s")

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "bf16_matrix_units": sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"}),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "arch": args.arch,
        "image_size": args.image_size,
        "images": len(paths),
        "jpeg_size": None if args.folder else args.size,
        "batch": args.batch,
        "workers": args.workers,
        "precision": embedder.precision,
        "channels_last": embedder.channels_last,
        "bare_images_per_s": bare,
        "end_to_end_images_per_s": e2e,
        "pipeline": extra,
        "ratio_median": statistics.median(e2e) / statistics.median(bare),
    }
    print()
    print(
        f"| {args.arch} {args.image_size} px, batch {args.batch}, {args.workers} workers, "
        f"{result['threads']} threads, precision {embedder.precision} | images/s (median) |"
    )
    print("| --- | ---: |")
    print(f"| bare forward (pre-decoded tensors) | {statistics.median(bare):.1f} |")
    print(
        f"| `mocohub embed` end-to-end ({len(paths)} JPEGs {args.size}) | "
        f"{statistics.median(e2e):.1f} |"
    )
    print(f"| ratio end-to-end / bare | {result['ratio_median']:.2f} |")
    print(f"load average at the end: {result['load_average']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
