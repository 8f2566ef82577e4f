"""``bench/probe_ceiling.py``: a converged logistic regression on frozen features."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "fashion-mnist"  # 300 test images with a labels.csv


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location(
        "probe_ceiling", ROOT / "bench" / "probe_ceiling.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "probe_ceiling", module)  # its dataclass looks it up there
        spec.loader.exec_module(module)
        yield module


def test_the_fit_reaches_the_regularised_optimum(bench: ModuleType) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=generator)
    y = (x @ torch.randn(8, 3, generator=generator)).argmax(1)  # linearly separable classes
    weight, bias, iterations, gradient = bench.fit_logistic(x, y, 3, 1e-3, max_iter=500)
    assert gradient < 1e-4 and 0 < iterations <= 500  # about 0.6 at zero

    # At the optimum of a strictly convex loss no small step lowers it.
    def loss(w: torch.Tensor, b: torch.Tensor) -> float:
        logits = x @ w + b
        return (torch.nn.functional.cross_entropy(logits, y) + 1e-3 * w.pow(2).sum()).item()

    best = loss(weight, bias)
    for _ in range(20):
        step = 1e-2 * torch.randn(weight.shape, generator=generator)
        assert loss(weight + step, bias) >= best - 1e-6
    assert bench.top1(weight, bias, x, y) > 0.95


def test_the_probe_scores_held_out_images_and_the_val_split(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ceiling.json"
    fits = bench.main(
        [
            "--model",
            "moco_r18_fashion_mnist",
            "--data",
            str(SAMPLES),
            "--flip",
            "--holdout",
            "60",
            "--weight-decay",
            "0",
            "1e-4",
            "--json",
            str(out),
        ]
    )
    settings = {(f.normalisation, f.weight_decay, f.flips) for f in fits}
    assert settings == {(n, d, m) for n in ("l2", "standard") for d in (0.0, 1e-4) for m in (0, 1)}
    for fit in fits:
        assert fit.holdout_top1 > 0.5  # ten classes; the bundled model's features separate them
        if not fit.flips:  # a labels.csv folder is the same images for both splits
            assert fit.val_top1 == fit.train_top1
    record = json.loads(out.read_text())
    assert record["holdout"] == 60 and len(record["fits"]) == 8 and "cpu_flags" in record
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith("| features |") and len(table) == 3 + len(fits)
