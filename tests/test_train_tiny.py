"""examples/train_tiny.py runs, trains and writes loadable weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mocohub.backbones import resnet18

ROOT = Path(__file__).resolve().parents[1]


def test_train_tiny_smoke_run(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_tiny.py"),
            "--epochs",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "300 images, 1 x 28 x 28, 10 classes" in run.stdout
    assert "epoch   2  loss" in run.stdout
    assert "k-NN top-1 on the 100 held-out images" in run.stdout
    weights = load_file(tmp_path / "backbone.safetensors")
    net = resnet18(small_stem=True, in_channels=1, width=8)
    net.fc = torch.nn.Identity()
    net.load_state_dict(weights, strict=True)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 64)
