"""The training views: seeded per (seed, epoch, step or sample), never by the caller's RNG."""

from __future__ import annotations

import random

import pytest
import torch

from mocohub.errors import ConfigError
from mocohub.training.config import preset
from mocohub.training.data import resolve_dataset
from mocohub.training.distributed import init_from_env
from mocohub.training.views import ViewPipeline, batch_augment, per_sample_transform


def pipeline(augment_on: str, augmentation: str = "v2", seed: int = 3) -> ViewPipeline:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 20, 20), dtype=torch.uint8, generator=generator)
    dataset, info = resolve_dataset(images)
    config = preset(
        "fashion_mnist",
        augmentation=augmentation,
        augment_on=augment_on,
        batch_size=16,
        workers=0,
        image_size=16,
        seed=seed,
        mean=(0.5,),
        std=(0.5,),
    )
    return ViewPipeline(dataset, info, config, init_from_env())


def views(pipe: ViewPipeline, epoch: int, start_step: int = 0) -> list[torch.Tensor]:
    return [torch.stack(pair) for _, pair in pipe.epoch(epoch, start_step)]


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_drawing_views_leaves_the_callers_random_state_alone(augment_on: str) -> None:
    pipe = pipeline(augment_on)
    torch.manual_seed(11)
    random.seed(11)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    assert len(views(pipe, 0)) == 3 and len(views(pipe, 1)) == 3
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_views_depend_on_seed_epoch_and_step_only(augment_on: str) -> None:
    pipe = pipeline(augment_on)
    torch.manual_seed(0)
    full = views(pipe, 2)
    torch.manual_seed(1)  # another caller state: the same views
    assert all(torch.equal(a, b) for a, b in zip(views(pipe, 2), full, strict=True))
    resumed = views(pipeline(augment_on), 2, start_step=1)  # a fresh pipeline, mid-epoch
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[1:], strict=True))
    assert not torch.equal(views(pipe, 3)[0], full[0])
    assert not torch.equal(views(pipeline(augment_on, seed=4), 2)[0], full[0])


def test_both_paths_build_the_configs_recipe_and_refuse_unknown_ones() -> None:
    config = preset("fashion_mnist", augmentation="v1", image_size=16)
    per_image = per_sample_transform(config, 3)
    batched = batch_augment(config, 3, torch.Generator())
    assert batched.grayscale_first and batched.hue == (-0.4, 0.4) and batched.size == 16
    assert per_image.transforms[0].size == (16, 16)
    assert per_image.transforms[2].hue == pytest.approx((-0.4, 0.4))
    config.augmentation = "v9"  # an unknown name, as from a hand-edited config file
    with pytest.raises(ConfigError, match="Unknown augmentation 'v9'; use one of v1, v2, small"):
        per_sample_transform(config, 3)
    with pytest.raises(ConfigError, match="Unknown augmentation 'v9'"):
        batch_augment(config, 3, torch.Generator())


def test_crop_min_sets_the_smallest_crop_scale_on_both_paths() -> None:
    config = preset("fashion_mnist", crop_min=0.5)
    assert batch_augment(config, 1, torch.Generator()).scale == (0.5, 1.0)
    assert per_sample_transform(config, 1).transforms[0].scale == (0.5, 1.0)
    # Unset: the recipe's own scale, as before the option existed.
    assert batch_augment(preset("fashion_mnist"), 1, torch.Generator()).scale == (0.2, 1.0)
    with pytest.raises(ConfigError, match=r"--crop-min must be in \(0, 1\], got 1.5"):
        preset("fashion_mnist", crop_min=1.5)


def test_solarize_sets_each_views_probability_on_both_paths() -> None:
    config = preset("fashion_mnist", solarize=0.3)
    batched = batch_augment(config, 1, torch.Generator())
    per_image = per_sample_transform(config, 1)
    assert batched.solarize_p == 0.3
    names = [type(t).__name__ for t in per_image.transforms]
    solarize = names.index("RandomSolarize")  # after the crop, flip, jitter and grayscale
    assert names[solarize - 1] == "RandomGrayscale" and per_image.transforms[solarize].p == 0.3
    assert batch_augment(preset("fashion_mnist"), 1, torch.Generator()).solarize_p == 0.0
    # MoCo v3's views differ: both get the probability, view 2's step stays in its place.
    v3 = preset("fashion_mnist_v3", augmentation="v3", solarize=0.5)
    pair = batch_augment(v3, 3, torch.Generator())
    assert (pair.first.solarize_p, pair.second.solarize_p) == (0.5, 0.5)
    off = batch_augment(preset("fashion_mnist_v3", solarize=0.0), 1, torch.Generator())
    assert (off.first.solarize_p, off.second.solarize_p) == (0.0, 0.0)
    with pytest.raises(ConfigError, match=r"--solarize is a probability in \[0, 1\], got 1.5"):
        preset("fashion_mnist", solarize=1.5)


def test_with_solarize_keeps_the_steps_in_agreement() -> None:
    from mocohub.training.recipes import RECIPES, view_recipes

    small = RECIPES["small"].with_solarize(0.2)
    assert small.steps[-1] == "solarize" and small.solarize_p == 0.2
    assert small.with_solarize(0.0) == RECIPES["small"]
    second = view_recipes("v3")[1]
    assert second.with_solarize(0.7).steps == second.steps  # already there: kept in place
    assert "solarize" not in second.with_solarize(0.0).steps
