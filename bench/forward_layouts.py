"""The bare forward pass of ``mocohub.features.TorchEmbedder`` in each precision and layout.

Rows: fp32 NCHW; fp32 channels_last; fp32 channels_last with BatchNorm folded
into the convolutions (the default fp32); bf16 with channels_last and folding,
as ``torch.autocast`` runs it (every weight cast on every batch) and as
``TorchEmbedder`` runs it (a copy of the weights stored in bf16: the same
numbers). Images per second, median of ``--repeats`` timed passes over
``--batches`` batches after a warm-up, and each row's worst cosine to the fp32
NCHW features. Random weights: speed does not depend on them. The last line
says what ``precision="auto"`` picks here (:mod:`mocohub.precision`).

    OMP_NUM_THREADS=1 python bench/forward_layouts.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mocohub.artifact import ModelConfig, build_model
from mocohub.features import TorchEmbedder
from mocohub.precision import BF16_CPU_FLAGS, resolve_precision
from mocohub.preprocessing import Preprocessing
from mocohub.sysinfo import cpu_flags, cpu_model

ROWS = {  # name: (precision, channels_last, fuse)
    "fp32 NCHW": ("fp32", False, False),
    "fp32 channels_last": ("fp32", True, False),
    "fp32 channels_last + BN folded": ("fp32", True, True),
    "bf16 autocast, channels_last + BN folded": ("autocast", True, True),
    "bf16 channels_last + BN folded": ("bf16", True, True),
}


class AutocastEmbedder(TorchEmbedder):
    """The fp32 model under ``torch.autocast``: what TorchEmbedder ran before storing bf16."""

    def embed_batch(self, images: torch.Tensor) -> np.ndarray:
        x = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench/results/forward_layouts.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [torch.randn(args.batch, 3, 224, 224) for _ in range(args.batches)]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for arch in args.archs:
        config = ModelConfig(arch, preprocessing=Preprocessing.imagenet())
        model = build_model(config)
        reference = None
        results[arch] = {}
        for name, (precision, channels_last, fuse) in ROWS.items():
            kind = AutocastEmbedder if precision == "autocast" else TorchEmbedder
            embedder = kind(
                model,
                device="cpu",
                precision="fp32" if precision == "autocast" else precision,
                channels_last=channels_last,
                fuse=fuse,
            )
            features = embedder.embed_batch(batches[0])  # warm-up
            if reference is None:
                reference = features
            rows = (features * reference).sum(1)
            norms = np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1)
            cosine = float((rows / norms).min())
            speeds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                for x in batches:
                    embedder.embed_batch(x)
                speeds.append(args.batch * args.batches / (time.perf_counter() - started))
            results[arch][name] = {"images_per_s": statistics.median(speeds), "cosine": cosine}
            print(f"{arch:9s} {name:42s} {statistics.median(speeds):7.1f} img/s  cos {cosine:.6f}")
    print(
        f"\n{cpu_model()}, bf16 units: {sorted(cpu_flags() & BF16_CPU_FLAGS)}, "
        f"{torch.get_num_threads()} threads, batch {args.batch}, load {os.getloadavg()[0]:.1f}; "
        f"precision auto -> {resolve_precision('auto', 'cpu')}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
