"""The main job, offline: embed the bundled samples, index them, search, and draw the result.

With the Fashion-MNIST MoCo that ships inside mocohub (``moco_r18_fashion_mnist``):

1. ``mocohub embed`` the 300 sample images (``samples/fashion-mnist/``);
2. ``mocohub index`` the embeddings;
3. classify every sample by weighted k-NN over the others (leave-one-out, k=20,
   using the labels in ``labels.csv``), against the same network at random
   initialisation;
4. ``mocohub search`` the index with three sample images and draw the query
   and its neighbours in a PNG grid.

Every step is the real command line, run as a subprocess and printed first.

    python examples/quickstart.py                  # writes runs/quickstart/
    python examples/quickstart.py --out /tmp/qs
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mocohub
from mocohub.features import FeatureExtractor
from mocohub.knn import knn_accuracy

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "fashion-mnist"
MODEL = "moco_r18_fashion_mnist"
QUERIES = ("00000_ankle-boot.png", "00002_trouser.png", "00008_sandal.png")


def mocohub_cli(*args: str) -> None:
    """Run ``mocohub ARGS`` (as ``python -m mocohub``), showing the command."""
    print(f"\n$ mocohub {shlex.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "mocohub", *args], check=True)


def knn_top1(features: np.ndarray, labels: torch.Tensor) -> float:
    """Leave-one-out weighted k-NN top-1: each sample classified by all the others."""
    f = torch.from_numpy(features.astype(np.float32))
    return knn_accuracy(f, labels, f, labels, k=20, t=0.1, leave_one_out=True)["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--model", default=MODEL, help="anything mocohub.load takes")
    args = parser.parse_args()
    started = time.perf_counter()
    feats, index, grid = args.out / "feats.npy", args.out / "index", args.out / "grid.png"

    mocohub_cli("embed", str(SAMPLES), "--model", args.model, "--out", str(feats), "--quiet")
    mocohub_cli("index", str(feats), "--out", str(index))

    # Row i of feats.npy is the image on line i of the manifest.
    paths = feats.with_suffix(".manifest.txt").read_text().splitlines()
    rows = csv.DictReader((SAMPLES / "labels.csv").read_text().splitlines())
    label_of = {row["file"]: int(row["label"]) for row in rows}
    labels = torch.tensor([label_of[Path(p).name] for p in paths])
    trained = knn_top1(np.load(feats), labels)
    torch.manual_seed(0)
    untrained_model = mocohub.load(args.model, pretrained=False)
    untrained = knn_top1(FeatureExtractor(untrained_model, device="cpu")(paths), labels)
    print(
        f"\nk-NN top-1 on the {len(paths)} samples (leave-one-out, k=20): "
        f"{trained:.3f} with {args.model}, {untrained:.3f} with the same network at "
        f"random initialisation ({trained - untrained:+.3f})"
    )

    queries = [arg for name in QUERIES for arg in ("--query", str(SAMPLES / name))]
    mocohub_cli("search", str(index), *queries, "--k", "5", "--grid", str(grid))
    print(f"\nDone in {time.perf_counter() - started:.0f} s; the retrieval grid is {grid}")


if __name__ == "__main__":
    main()
