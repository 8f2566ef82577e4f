"""``mocohub embed`` end to end against the same model's bare forward pass, per precision.

What it measures, in images per second, for each precision of ``--precisions``
(default ``fp32`` and ``auto``, which is bf16 on CPUs with bf16 units):

- ``bare forward``: :class:`mocohub.features.TorchEmbedder` (the backend ``mocohub
  embed`` uses) at that precision on batches that are already decoded,
  preprocessed tensors in memory, warmed up and past the precision check: the
  model alone.
- ``embed``: :func:`mocohub.embed.embed_files` on the folder of JPEGs, exactly as
  ``mocohub embed DIR --out feats.npy --precision P`` runs it (same batch size,
  threads, layout and decoding workers as the command's defaults): decode,
  resize, crop and normalise (on the model's threads between forward passes
  when the model uses every core, else in worker processes), forward with the
  same dtype conversions as the bare pass, L2-normalise, save the parts,
  assemble ``feats.npy`` + manifest + errors. ``pipeline`` is the speed the
  command prints (from the first batch to the written files: the first call in
  each precision, the bf16 weight copy and the check of ``auto`` included);
  ``wall`` adds loading the model.

The ratio embed / bare is the share of the model's speed the pipeline keeps
(1.0: decoding fully hidden); ``auto / fp32`` compares the two pipelines. Each
round runs every measurement once, alternating, and the load average (1 min) is
recorded beside each, so drifting load from other work hits all alike; ratios
are taken within a round, then the median over rounds is reported.

Inputs: ``--images N`` synthetic photo-like JPEGs (smooth colour fields plus
noise, quality 90) of ``--size WxH`` written to a temporary folder, or
``--folder DIR``. The model is a randomly initialised mocohub ResNet
(``--arch``, ImageNet preprocessing at ``--image-size``): speed does not depend
on the weights.

Run (from the repository root)::

    python bench/embed.py                                       # resnet50, 256 JPEGs 400x300
    python bench/embed.py --threads 1 --images 20               # the small case
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/embed.py   # as an AVX2 CPU

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

from mocohub.artifact import ModelConfig, build_model, save_pretrained
from mocohub.embed import EmbedSettings, default_workers, embed_files
from mocohub.features import TorchEmbedder, open_torch_embedder
from mocohub.imageio import decode_image, scan_inputs
from mocohub.precision import BF16_CPU_FLAGS, resolve_precision
from mocohub.preprocessing import Preprocessing
from mocohub.sysinfo import CPU_FLAGS_ENV, cpu_flags, cpu_model


def make_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        low = rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC))
        noise = rng.normal(0, 12, (h, w, 3))
        pixels = np.clip(field + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:05d}.jpg", quality=90)


def load1() -> float:
    return os.getloadavg()[0]


def bare_forward(embedder: TorchEmbedder, batches: list[torch.Tensor]) -> float:
    started = time.perf_counter()
    for x in batches:
        embedder.embed_batch(x)
    return sum(len(x) for x in batches) / (time.perf_counter() - started)


def end_to_end(
    paths: list[str],
    model_dir: Path,
    out: Path,
    precision: str,
    args: argparse.Namespace,
    device: str = "cpu",
) -> dict[str, Any]:
    """``mocohub embed`` on ``paths`` (``args.batch``, ``args.workers``) on ``device``."""
    settings = EmbedSettings(
        model=str(model_dir), batch_size=args.batch, device=device, precision=precision
    )

    def opener(chosen: str) -> TorchEmbedder:
        return open_torch_embedder(str(model_dir), device=device, precision=chosen)

    started = time.perf_counter()
    result = embed_files(paths, out, settings, opener, workers=args.workers, restart=True)
    seconds = time.perf_counter() - started
    assert result.rows == len(paths), f"only {result.rows} of {len(paths)} images embedded"
    return {
        "pipeline": result.images_per_s,
        "wall": len(paths) / seconds,
        "precision": result.precision,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="400x300", help="JPEG size WxH")
    parser.add_argument("--folder", type=Path, default=None, help="Use these images instead.")
    parser.add_argument("--batch", type=int, default=64, help="as mocohub embed's --batch-size")
    parser.add_argument("--workers", type=int, default=None, help="default: as mocohub embed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench/results/embed.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workers is None:
        args.workers = default_workers("cpu")

    rows: dict[str, dict[str, list[float]]] = {
        p: {"bare": [], "pipeline": [], "wall": [], "load": []} for p in args.precisions
    }
    resolved = {p: resolve_precision(p, "cpu") for p in args.precisions}
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
        model = build_model(config)
        model_dir = save_pretrained(model, root / "model")
        prep = config.preprocessing
        transform = prep.transform()
        decoded = [transform(decode_image(p, min_size=prep.resize_size)) for p in paths]
        batches = [
            torch.stack(decoded[i : i + args.batch]).contiguous(memory_format=torch.channels_last)
            for i in range(0, len(decoded), args.batch)
        ]
        embedders = {}
        for p in args.precisions:
            embedders[p] = TorchEmbedder(model, device="cpu", precision=p)
            embedders[p].embed_batch(batches[0])  # warm-up, and the check of "auto"
            resolved[p] = embedders[p].precision

        for r in range(args.rounds):
            for p in args.precisions:
                rows[p]["load"].append(load1())
                rows[p]["bare"].append(bare_forward(embedders[p], batches))
                e2e = end_to_end(paths, model_dir, root / "feats.npy", p, args)
                rows[p]["pipeline"].append(e2e["pipeline"])
                rows[p]["wall"].append(e2e["wall"])
                print(
                    f"round {r + 1} {p:>4} ({e2e['precision']}): bare {rows[p]['bare'][-1]:6.1f}"
                    f"  embed {e2e['pipeline']:6.1f} (wall {e2e['wall']:6.1f}) img/s"
                    f"  ratio {e2e['pipeline'] / rows[p]['bare'][-1]:.2f}"
                    f"  load {rows[p]['load'][-1]:.2f}",
                    flush=True,
                )

    def ratios(a: list[float], b: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(a, b, strict=True))

    summary = {
        p: {
            "resolved": resolved[p],
            "bare_median": statistics.median(v["bare"]),
            "embed_median": statistics.median(v["pipeline"]),
            "embed_wall_median": statistics.median(v["wall"]),
            "ratio_embed_to_bare": ratios(v["pipeline"], v["bare"]),
            "ratio_wall_to_bare": ratios(v["wall"], v["bare"]),
            **v,
        }
        for p, v in rows.items()
    }
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "bf16_matrix_units": sorted(cpu_flags() & BF16_CPU_FLAGS),
        "cpu_flags_from": CPU_FLAGS_ENV if CPU_FLAGS_ENV in os.environ else "/proc/cpuinfo",
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "arch": args.arch,
        "image_size": args.image_size,
        "images": len(paths),
        "jpeg_size": None if args.folder else args.size,
        "batch": args.batch,
        "workers": args.workers,
        "precisions": summary,
    }
    if "fp32" in rows and "auto" in rows:
        result["auto_over_fp32_embed"] = ratios(rows["auto"]["pipeline"], rows["fp32"]["pipeline"])
    print()
    print(
        f"{result['cpu']} ({result['aten_cpu_capability']}, bf16 units "
        f"{result['bf16_matrix_units'] or 'none'}), {result['threads']} threads, "
        f"{args.workers} decode workers, {args.arch} {args.image_size} px, batch {args.batch}, "
        f"{len(paths)} JPEGs {result['jpeg_size'] or args.folder}, {args.rounds} rounds"
    )
    print("| precision | bare forward | `mocohub embed` | embed / bare | wall / bare | load |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for p, s in summary.items():
        print(
            f"| {p} ({s['resolved']}) | {s['bare_median']:.1f} | {s['embed_median']:.1f} | "
            f"{s['ratio_embed_to_bare']:.2f} | {s['ratio_wall_to_bare']:.2f} | "
            f"{min(s['load']):.1f}-{max(s['load']):.1f} |"
        )
    if "auto_over_fp32_embed" in result:
        print(f"auto / fp32, `mocohub embed`: {result['auto_over_fp32_embed']:.2f}")
    # the goals of issue 11, item 11, on the medians over rounds
    goals = [
        (f"{p} ({s['resolved']}): embed / bare >= 0.90", s["ratio_embed_to_bare"], 0.90)
        for p, s in summary.items()
    ]
    if "auto_over_fp32_embed" in result:
        goals.append(
            (
                "auto never slower than fp32: auto / fp32 >= 1.00",
                result["auto_over_fp32_embed"],
                1.0,
            )
        )
    result["goals"] = {name: {"value": v, "met": v >= goal} for name, v, goal in goals}
    for name, v, goal in goals:
        print(f"goal {name}: {v:.2f} {'met' if v >= goal else 'NOT met'}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
