"""Training runs compared in tests: the sample images, metrics logs and final weights."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mocohub.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "fashion-mnist"
#: Metrics-log fields that depend on the wall clock, left out of comparisons.
WALL_CLOCK = ("time", "img_per_s")


def records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics log without its wall-clock fields, in order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in lines]


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit-identical final weights and optimizer state of the runs in ``a`` and ``b``."""
    state_a = ckpt.load_checkpoint(a / ckpt.LAST_NAME)
    state_b = ckpt.load_checkpoint(b / ckpt.LAST_NAME)
    assert (state_a["epoch"], state_a["step"]) == (state_b["epoch"], state_b["step"])
    for key, value in state_a["model"].items():
        assert torch.equal(value, state_b["model"][key]), key
    for key, value in state_a["optimizer"]["state"].items():
        momentum = state_b["optimizer"]["state"][key]["momentum_buffer"]
        assert torch.equal(value["momentum_buffer"], momentum), key


def image_folder(root: Path, per_class: int) -> Path:
    """A small ImageFolder tree (class subfolders of PNG files) from the samples."""
    with open(SAMPLES / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    counts: dict[str, int] = {}
    for row in rows:
        if counts.get(row["class"], 0) < per_class:
            counts[row["class"]] = counts.get(row["class"], 0) + 1
            (root / row["class"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(SAMPLES / row["file"], root / row["class"] / row["file"])
    return root
