"""Tiny MoCo v3 runs for the tests: a config that trains in about a second, the sample
images, and a run folder's newest checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mocohub.training import checkpoint as ckpt
from mocohub.training.config import TrainConfig, preset
from mocohub.training.data import resolve_dataset

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "fashion-mnist"


def tiny_v3(arch: str, **overrides: Any) -> TrainConfig:
    """A 16 px, 1-channel MoCo v3 run of ``arch`` (``resnet18`` at width 8: LARS, views on
    the device; ``vit_nano``: AdamW), 2 epochs of 32-image batches, fp32."""
    if arch.startswith("vit"):
        base = {"arch": arch, "augmentation": "small_v3", "crop_min": 0.2}
        name = "moco_v3_vit_s"
    else:
        base = {"arch": arch, "width": 8}
        name = "fashion_mnist_v3"
    values = dict(
        image_size=16, dim=16, mlp_dim=32, batch_size=32, epochs=2, warmup_epochs=1,
        workers=0, precision="fp32", mean=(0.286,), std=(0.353,),
    )  # fmt: skip
    return preset(name, **{**base, **values, **overrides})


def newest_state(run_dir: Path) -> dict[str, Any]:
    """The newest checkpoint of a run folder, loaded."""
    latest = ckpt.find_latest_checkpoint(run_dir)
    assert latest is not None, f"no checkpoint in {run_dir}"
    return ckpt.load_checkpoint(latest)


def sample_images(count: int = 96) -> torch.Tensor:
    """The first ``count`` images of the bundled Fashion-MNIST sample (96: 3 steps of 32)."""
    dataset, _ = resolve_dataset(SAMPLES)
    return dataset.images[:count]
