"""``bench/v3_vs_v2.py``'s equal-wall-time budget: the schedule it plans from a calibration,
the calibration's reading of the loop's metrics, and the recipes' configurations.

No training runs here: the calibration test gives it a fake training call and a fake clock.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from mocohub.errors import ConfigError
from mocohub.training.data import TensorImageDataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    # The script imports its neighbours (quality_fmnist, train_step) as a script would.
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "bench"))
        spec = importlib.util.spec_from_file_location("v3_vs_v2", ROOT / "bench" / "v3_vs_v2.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, "v3_vs_v2", module)  # its dataclasses look it up there
        spec.loader.exec_module(module)
        yield module
    for name in ("quality_fmnist", "train_step", "reference_moco"):
        sys.modules.pop(name, None)


def test_whole_epochs_when_the_budget_pays_for_them(bench: ModuleType) -> None:
    # 60,000 images at batch 256: 234 steps an epoch; 2 s of start-up + 468 steps of 1 s.
    plan = bench.plan_schedule(470.0, 1.0, 2.0, 60000, 256)
    assert (plan.epochs, plan.steps_per_epoch, plan.images_per_epoch) == (2, 234, 59904)


@pytest.mark.parametrize("per_step", [0.37, 1.0, 2.9])
@pytest.mark.parametrize("budget", [30.0, 300.0, 600.0, 1800.0])
def test_the_plan_fills_the_budget_in_the_fewest_epochs(
    bench: ModuleType, budget: float, per_step: float
) -> None:
    overhead, images, batch = 5.0, 60000, 256
    plan = bench.plan_schedule(budget, per_step, overhead, images, batch)
    affordable = math.floor((budget - overhead) / per_step)
    assert plan.steps <= affordable  # never over the budget
    assert affordable - plan.steps < plan.epochs  # only the rounding to equal epochs is lost
    assert plan.images_per_epoch <= images and plan.batch_size == batch
    assert (plan.epochs - 1) * (images // batch) < affordable  # one epoch fewer would not hold it


def test_min_epochs_spreads_the_steps_over_a_smaller_subset(bench: ModuleType) -> None:
    plan = bench.plan_schedule(600.0, 1.0, 0.0, 60000, 256, min_epochs=10)
    assert (plan.epochs, plan.steps_per_epoch) == (10, 60)


def test_a_budget_too_small_for_one_step_is_refused(bench: ModuleType) -> None:
    with pytest.raises(ConfigError, match="raise --minutes"):
        bench.plan_schedule(30.0, 2.0, 29.0, 60000, 256)
    with pytest.raises(ConfigError, match="one batch"):
        bench.plan_schedule(600.0, 1.0, 0.0, 100, 256)


@pytest.mark.parametrize("name", ["v2", "v3", "v3_vit"])
@pytest.mark.parametrize("epochs", [1, 3, 12, 45])
def test_every_recipe_is_a_valid_short_run(bench: ModuleType, name: str, epochs: int) -> None:
    args = bench.parse_args(["--data", "unused", "--v2-set", "crop_min=0.7"])
    warmup = bench.warmup_epochs(bench.RECIPES[name].warmup_share, epochs)
    config = bench.recipe_config(name, args, epochs=epochs, warmup_epochs=warmup)
    assert config.epochs == epochs and config.batch_size == 256
    assert config.warmup_epochs == warmup <= epochs
    if name == "v2":
        assert (config.method, config.crop_min, config.width) == ("moco", 0.7, 16)
    else:
        assert config.method == "moco_v3"
        assert config.width == (16 if name == "v3" else 64)  # the ViT keeps its own size


def test_v3_warm_up_keeps_its_presets_share_of_the_run(bench: ModuleType) -> None:
    # fashion_mnist_v3: 10 of 200 epochs (ResNet); the reference ViT recipe: 40 of 300.
    share = {name: recipe.warmup_share for name, recipe in bench.RECIPES.items()}
    assert [bench.warmup_epochs(share["v3"], e) for e in (4, 10, 40, 200)] == [0, 0, 2, 10]
    assert [bench.warmup_epochs(share["v3_vit"], e) for e in (3, 4, 45, 300)] == [0, 1, 6, 40]
    assert bench.warmup_epochs(share["v2"], 100) == 0


def test_overrides_are_typed_and_checked(bench: ModuleType) -> None:
    assert bench.parse_settings(["crop_min=0.5", "symmetric=true", "augmentation=small"]) == {
        "crop_min": 0.5,
        "symmetric": True,
        "augmentation": "small",
    }
    with pytest.raises(ConfigError, match=r"e\.g\. crop_min=0\.7"):
        bench.parse_settings(["cropmin=0.7"])


def test_subsets_are_nested_and_seeded(bench: ModuleType) -> None:
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 2, 2)
    data = TensorImageDataset(images.contiguous(), torch.arange(50) % 5)
    small, large = bench.subset(data, 10, 3), bench.subset(data, 30, 3)
    assert torch.equal(small.images, large.images[:10])
    assert torch.equal(small.labels, small.images[:, 0, 0, 0].long() % 5)  # labels follow
    assert len(set(small.images[:, 0, 0, 0].tolist())) == 10
    assert not torch.equal(bench.subset(data, 10, 4).images, small.images)
    assert bench.subset(data, 50, 3) is data


def test_calibration_reads_the_loops_timing_and_skips_warm_up(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def fake_train(config: Any, data: Any, run_dir: str, **kwargs: Any) -> None:
        assert kwargs["stop_after_steps"] == 30
        # Three logged windows of 10 steps at batch 256: a slow warm-up, then 128 and 256 img/s.
        records = [{"step": 10 * (i + 1), "img_per_s": r} for i, r in enumerate((32, 128, 256))]
        lines = [json.dumps({"event": "start"})] + [json.dumps(r) for r in records]
        (Path(run_dir) / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        clock[0] += 70.0
        raise bench.TrainingInterrupted("stopped", 15)

    monkeypatch.setattr(bench, "train", fake_train)
    config = bench.recipe_config("v2", bench.parse_args(["--data", "unused"]))
    per_step, overhead = bench.calibrate(config, None, 30)
    assert per_step == pytest.approx((2.0 + 1.0) / 2)  # the warm-up window left out
    assert overhead == pytest.approx(70.0 - 30 * 1.5)
