"""Write the bundled Fashion-MNIST sample set (PNG files + labels.csv).

Takes the first N images of each class from the Fashion-MNIST *test* split
(MIT licence, Zalando Research) in IDX format, e.g. Debian's
``dataset-fashion-mnist`` package:

    python scripts/make_samples.py /usr/share/datasets/fashion-mnist samples/fashion-mnist
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from mocohub.training.data import FASHION_MNIST_CLASSES as CLASSES
from mocohub.training.data import read_idx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path, help="folder with t10k-*-ubyte(.gz) files")
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=30)
    args = parser.parse_args()
    images = read_idx(next(args.source.glob("t10k-images-idx3-ubyte*")))
    labels = read_idx(next(args.source.glob("t10k-labels-idx1-ubyte*")))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in range(len(CLASSES)):
        for index in np.flatnonzero(labels == label)[: args.per_class]:
            name = f"{index:05d}_{CLASSES[label]}.png"
            Image.fromarray(images[index], mode="L").save(args.out / name, optimize=True)
            rows.append((name, int(label), CLASSES[label], int(index)))
    rows.sort()
    with open(args.out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label", "class", "test_index"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} images to {args.out}")


if __name__ == "__main__":
    main()
