"""Pre-train MoCo v2 for a minute on the bundled Fashion-MNIST samples.

The whole Python API in one screen: build a backbone, wrap it in
``mocohub.training.MoCo``, train with the InfoNCE loss, and check with a
k-NN classifier that the features got better than at random initialisation.
The trained backbone is saved as safetensors in torchvision's key names.

    python examples/quickstart.py            # ~200 steps, about a minute on 2 CPU cores
    python examples/quickstart.py --steps 20 # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import v2

from mocohub.backbones import resnet18
from mocohub.training import MoCo

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "fashion-mnist"


def load_samples(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(folder / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    images = np.stack([np.asarray(Image.open(folder / row["file"]).convert("L")) for row in rows])
    labels = torch.tensor([int(row["label"]) for row in rows])
    return torch.from_numpy(images).unsqueeze(1), labels  # N x 1 x 28 x 28 uint8


@torch.no_grad()
def knn_accuracy(backbone: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out k-NN (k=10, cosine, weights exp(s/0.1)) on pooled features."""
    backbone.eval()
    features = F.normalize(backbone(normalise(images)), dim=1)
    similarity = features @ features.T
    similarity.fill_diagonal_(-math.inf)  # leave each image out of its own vote
    scores, neighbours = similarity.topk(10, dim=1)
    votes = torch.zeros(len(labels), 10).scatter_add_(1, labels[neighbours], (scores / 0.1).exp())
    backbone.train()
    return float((votes.argmax(1) == labels).float().mean())


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0 - 0.286) / 0.353  # Fashion-MNIST mean / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--queue", type=int, default=60, help="K, a multiple of the batch")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.06)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    images, labels = load_samples(SAMPLES)
    print(f"{len(images)} Fashion-MNIST sample images from {SAMPLES}")
    encoder = functools.partial(resnet18, small_stem=True, in_channels=1, width=16)
    # K must be a multiple of the batch and, with 300 images, well under the
    # data set, or an image's own older keys would be its negatives.
    model = MoCo(encoder, dim=64, K=args.queue, m=0.99, T=args.temperature, mlp=True, bn_splits=4)
    augment = v2.Compose(
        [
            v2.RandomResizedCrop(28, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4)], p=0.8),
        ]
    )

    def two_views(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torchvision draws one set of random parameters per call: call per image.
        def view() -> torch.Tensor:
            return normalise(torch.stack([augment(image) for image in batch]))

        return view(), view()

    backbone = model.encoder_q
    head, backbone.fc = backbone.fc, torch.nn.Identity()
    before = knn_accuracy(backbone, images, labels)
    backbone.fc = head

    optimizer = torch.optim.SGD(
        model.encoder_q.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    start = time.perf_counter()
    order: list[torch.Tensor] = []
    for step in range(1, args.steps + 1):
        # Epochs of disjoint batches: the queue then holds other images' keys.
        if not order:
            full_batches = len(images) // args.batch_size
            order = list(torch.randperm(len(images)).split(args.batch_size)[:full_batches])
        batch = images[order.pop()]
        logits, targets = model(*two_views(batch))
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == args.steps:
            accuracy = (logits.argmax(1) == 0).float().mean()
            print(
                f"step {step:4d}  loss {loss.item():.3f}  positive ranked first "
                f"{accuracy:.2f}  ({time.perf_counter() - start:.0f} s)"
            )

    backbone.fc = torch.nn.Identity()
    after = knn_accuracy(backbone, images, labels)
    print(
        f"leave-one-out 10-NN accuracy on the samples: {before:.3f} at random "
        f"initialisation, {after:.3f} after {args.steps} MoCo steps"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    save_file(weights, str(args.out / "backbone.safetensors"))
    print(f"backbone weights (torchvision key names, no fc): {args.out / 'backbone.safetensors'}")


if __name__ == "__main__":
    main()
