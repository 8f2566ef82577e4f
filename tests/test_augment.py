"""MoCo augmentations: the recipe table, the reference per-image recipes and the batched,
per-sample path (speed: bench/augment.py)."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter

from mocohub.errors import ConfigError, InputError
from mocohub.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from mocohub.training.augment import (
    PILGaussianBlur,
    TwoCropsTransform,
    moco_v1_transform,
    moco_v2_transform,
    small_transform,
)
from mocohub.training.batch_augment import (
    AugmentParams,
    BatchAugment,
    batch_moco_v1,
    batch_moco_v2,
    batch_small,
    move_params,
    two_views,
)
from mocohub.training.recipes import RECIPES, AugmentRecipe, recipe


def pil_image(height: int = 50, width: int = 60, seed: int = 0) -> Image.Image:
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(noise)


def pil_to_float(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def uint8_batch(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=generator)


def crop_free(**recipe: object) -> BatchAugment:
    """No crop, no flip, no normalisation: only what ``recipe`` asks for."""
    settings: dict[str, object] = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    settings.update(mean=(0.0,), std=(1.0,), generator=torch.Generator().manual_seed(0))
    settings.update(recipe)
    return BatchAugment(None, **settings)


# --- per image ---------------------------------------------------------------------------------


def test_v1_recipe_is_the_references() -> None:
    steps = moco_v1_transform(96).transforms
    assert [type(t) for t in steps] == [
        v2.RandomResizedCrop,
        v2.RandomGrayscale,
        v2.ColorJitter,
        v2.RandomHorizontalFlip,
        v2.ToImage,
        v2.ToDtype,
        v2.Normalize,
        v2.ToPureTensor,
    ]
    crop, gray, jitter, flip, _, to_float, normalize, _ = steps
    assert crop.size == (96, 96) and crop.scale == (0.2, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert v2.InterpolationMode(crop.interpolation) == v2.InterpolationMode.BILINEAR
    assert gray.p == 0.2 and flip.p == 0.5
    assert jitter.brightness == jitter.contrast == jitter.saturation == pytest.approx((0.6, 1.4))
    assert jitter.hue == pytest.approx((-0.4, 0.4))
    assert to_float.scale and normalize.mean == list(IMAGENET_MEAN)
    assert normalize.std == list(IMAGENET_STD)


def test_v2_recipe_is_the_references() -> None:
    steps = moco_v2_transform(96).transforms
    crop, apply_jitter, gray, apply_blur, flip = steps[:5]
    assert type(crop) is v2.RandomResizedCrop and crop.scale == (0.2, 1.0)
    assert type(apply_jitter) is v2.RandomApply and apply_jitter.p == 0.8
    (jitter,) = apply_jitter.transforms
    assert jitter.brightness == jitter.contrast == jitter.saturation == pytest.approx((0.6, 1.4))
    assert jitter.hue == pytest.approx((-0.1, 0.1))
    assert type(gray) is v2.RandomGrayscale and gray.p == 0.2
    assert type(apply_blur) is v2.RandomApply and apply_blur.p == 0.5
    (blur,) = apply_blur.transforms
    assert type(blur) is PILGaussianBlur and blur.sigma == (0.1, 2.0)
    assert type(flip) is v2.RandomHorizontalFlip and flip.p == 0.5
    assert [type(t) for t in steps[5:]] == [v2.ToImage, v2.ToDtype, v2.Normalize, v2.ToPureTensor]


def reference_pipeline(version: int) -> T.Compose:
    """main_moco.py's pipelines, written with the classic torchvision.transforms."""
    if version == 1:
        augment = [
            T.RandomResizedCrop(32, scale=(0.2, 1.0)),
            T.RandomGrayscale(p=0.2),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
        ]
    else:
        augment = [
            T.RandomResizedCrop(32, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
        ]
    tail = [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(augment + tail)


@pytest.mark.parametrize("version", [1, 2])
def test_pipelines_draw_and_compute_what_the_reference_does(version: int) -> None:
    ours = moco_v1_transform(32) if version == 1 else moco_v2_transform(32)
    reference = reference_pipeline(version)
    image = pil_image()
    for seed in range(25):
        torch.manual_seed(seed)
        expected, expected_next = reference(image), torch.rand(1)
        torch.manual_seed(seed)
        got, got_next = ours(image), torch.rand(1)
        assert type(got) is torch.Tensor and got.dtype == torch.float32
        # ToDtype multiplies by 1/255 where ToTensor divides by 255: float rounding only.
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert got_next == expected_next  # the same random numbers were used up


def test_pil_blur_is_pils_gaussian_blur() -> None:
    image = pil_image()
    for sigma in (0.3, 1.3):
        blurred = PILGaussianBlur((sigma, sigma))(image)
        expected = image.filter(ImageFilter.GaussianBlur(radius=sigma))
        assert np.array_equal(np.asarray(blurred), np.asarray(expected))
    torch.manual_seed(0)
    mild = np.asarray(PILGaussianBlur((0.1, 0.2))(image), dtype=float)
    strong = np.asarray(PILGaussianBlur((1.8, 2.0))(image), dtype=float)
    assert np.abs(np.diff(strong, axis=1)).mean() < 0.5 * np.abs(np.diff(mild, axis=1)).mean()


def test_two_crops_gives_two_views_and_pickles() -> None:
    two = pickle.loads(pickle.dumps(TwoCropsTransform(moco_v2_transform(32))))
    torch.manual_seed(0)
    query, key = two(pil_image())
    assert query.shape == key.shape == (3, 32, 32)
    assert not torch.allclose(query, key)
    gray = Image.fromarray(np.zeros((28, 28), dtype=np.uint8), mode="L")
    assert moco_v1_transform(28, (0.5,), (0.5,))(gray).shape == (1, 28, 28)


def per_image_values(transform: v2.Compose) -> tuple[list[str], dict[str, object]]:
    """The steps of a per-image pipeline and the recipe values it holds, named as
    BatchAugment names them."""
    steps: list[str] = []
    values: dict[str, object] = {}
    for step in transform.transforms:
        p = 1.0
        if isinstance(step, v2.RandomApply):
            p, (step,) = step.p, step.transforms
        if isinstance(step, v2.RandomResizedCrop):
            values.update(size=step.size[0], scale=step.scale, ratio=step.ratio)
            steps.append("crop")
        elif isinstance(step, v2.RandomHorizontalFlip):
            values.update(flip_p=step.p)
            steps.append("flip")
        elif isinstance(step, v2.RandomGrayscale):
            values.update(grayscale_p=step.p)
            steps.append("grayscale")
        elif isinstance(step, v2.ColorJitter):
            for name, identity in (("brightness", (1.0, 1.0)), ("contrast", (1.0, 1.0))):
                values[name] = tuple(getattr(step, name) or identity)
            for name, identity in (("saturation", (1.0, 1.0)), ("hue", (0.0, 0.0))):
                values[name] = tuple(getattr(step, name) or identity)
            values.update(jitter_p=p)
            steps.append("jitter")
        elif isinstance(step, PILGaussianBlur):
            values.update(blur_p=p, blur_sigma=step.sigma)
            steps.append("blur")
        elif isinstance(step, v2.Normalize):
            values.update(mean=tuple(step.mean), std=tuple(step.std))
    return steps, values


def batched_values(augment: BatchAugment, steps: list[str]) -> dict[str, object]:
    names = ["size", "scale", "ratio", "flip_p", "brightness", "contrast", "saturation", "hue"]
    names += ["grayscale_p"]
    values = {name: getattr(augment, name) for name in names}
    values.update(mean=tuple(augment.mean.tolist()), std=tuple(augment.std.tolist()))
    if "jitter" in steps:  # the per-image path has no jitter (or blur) step to compare
        values.update(jitter_p=augment.jitter_p)
        assert augment.grayscale_first == (
            "grayscale" in steps and steps.index("grayscale") < steps.index("jitter")
        )
    if "blur" in steps:
        values.update(blur_p=augment.blur_p, blur_sigma=augment.blur_sigma)
    else:
        assert augment.blur_p == 0.0
    return values


def assert_same_values(per_image: dict[str, object], batched: dict[str, object]) -> None:
    assert per_image.keys() == batched.keys()
    for name, value in batched.items():
        assert per_image[name] == pytest.approx(value), name


PAIRS = {
    "v1": (moco_v1_transform, batch_moco_v1),
    "v2": (moco_v2_transform, batch_moco_v2),
    "small": (small_transform, batch_small),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_per_image_and_batched_recipes_hold_the_tables_values(name: str) -> None:
    per_image_builder, batched_builder = PAIRS[name]
    steps, per_image = per_image_values(per_image_builder(28))
    assert steps == list(RECIPES[name].steps)
    assert_same_values(per_image, batched_values(batched_builder(28), steps))
    assert per_image["mean"] == pytest.approx(RECIPES[name].mean)  # the recipe's by default


@pytest.mark.parametrize("name", list(PAIRS))
def test_a_changed_table_value_reaches_both_paths(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    changed = replace(
        RECIPES[name],
        scale=(0.5, 0.9),
        ratio=(0.8, 1.25),
        flip_p=0.3,
        brightness=0.25,
        contrast=0.15,
        jitter_p=0.6,
        grayscale_p=0.35,
        mean=(0.4,),
        std=(0.2,),
    )
    if "blur" in changed.steps:
        changed = replace(changed, blur_p=0.45, blur_sigma=(0.2, 1.5))
    monkeypatch.setitem(RECIPES, name, changed)
    per_image_builder, batched_builder = PAIRS[name]
    steps, per_image = per_image_values(per_image_builder(24))
    assert per_image["scale"] == (0.5, 0.9) and per_image["grayscale_p"] == 0.35
    assert per_image["jitter_p"] == 0.6 and per_image["mean"] == (0.4,)
    assert_same_values(per_image, batched_values(batched_builder(24), steps))
    views = BatchAugment.from_recipe(recipe(name), 24)
    assert_same_values(per_image, batched_values(views, steps))


def test_recipes_that_contradict_themselves_are_refused() -> None:
    with pytest.raises(ConfigError, match="start with 'crop'"):
        AugmentRecipe(("flip", "crop"), flip_p=0.5)
    with pytest.raises(ConfigError, match="leaves out the step 'blur'"):
        AugmentRecipe(("crop",), blur_p=0.5)
    with pytest.raises(ConfigError, match="lists the step 'grayscale'"):
        AugmentRecipe(("crop", "grayscale"))
    with pytest.raises(ConfigError, match="Unknown augmentation 'v3'; use one of v1, v2, small"):
        recipe("v3")


def test_small_recipe_on_gray_images() -> None:
    jitter = small_transform(28).transforms[2].transforms[0]
    assert jitter.saturation is None and jitter.hue is None  # nothing drawn for them
    image = Image.fromarray(np.full((28, 28), 200, dtype=np.uint8), mode="L")
    out = small_transform(28, (0.286,), (0.353,))(image)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32


# --- per batch ---------------------------------------------------------------------------------


def test_output_shape_dtype_and_normalisation() -> None:
    images = uint8_batch(6, 3, 40)
    out = batch_moco_v2(24)(images)
    assert out.shape == (6, 3, 24, 24) and out.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    low, high = (-mean / std).view(1, 3, 1, 1), ((1 - mean) / std).view(1, 3, 1, 1)
    assert (out >= low - 1e-5).all() and (out <= high + 1e-5).all()
    gray = batch_small(28, (0.286,), (0.353,))(uint8_batch(4, 1, 28))
    assert gray.shape == (4, 1, 28, 28)


def test_uint8_and_float_inputs_agree() -> None:
    images = uint8_batch(8, 3, 36)
    augment = batch_moco_v2(32)
    augment.generator = torch.Generator().manual_seed(3)
    from_uint8 = augment(images)
    augment.generator.manual_seed(3)
    from_float = augment(images.double() / 255)
    torch.testing.assert_close(from_uint8, from_float)


def test_full_crop_is_a_plain_resize_and_normalise() -> None:
    images = torch.rand(3, 3, 20, 20)
    recipe = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    up = BatchAugment(30, **recipe, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    expected = F.interpolate(images, size=30, mode="bilinear", align_corners=False)
    expected = (expected - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.3, 0.4]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(up(images), expected, atol=1e-5, rtol=1e-5)
    # Downscaling by 2 averages 2 x 2 samples (antialiasing): a 2 x 2 mean pool.
    down = BatchAugment(10, **recipe, mean=(0.0,), std=(1.0,))
    torch.testing.assert_close(down(images), F.avg_pool2d(images, 2), atol=1e-5, rtol=1e-5)


def test_flip_only_is_torch_flip() -> None:
    images = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(crop_free(flip_p=1.0)(images), images.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(crop_free()(images), images, atol=1e-5, rtol=0)


def test_every_sample_gets_its_own_crop() -> None:
    generator = torch.Generator().manual_seed(0)
    crop_only = BatchAugment(24, flip_p=0.0, mean=(0.0,), std=(1.0,), generator=generator)
    out = crop_only(uint8_batch(1, 1, 32).expand(16, -1, -1, -1))  # one image, 16 times
    distances = torch.cdist(out.flatten(1), out.flatten(1))
    assert (distances + torch.eye(16) * 1e9).min() > 1e-3  # all 16 views differ
    params = batch_small(24).sample_params(64, 32, 32)
    assert len({tuple(row.tolist()) for row in params.crops}) > 56  # a few may repeat
    assert len(set(params.jitter[:, 0].tolist())) > 40  # brightness, drawn per sample


def test_crop_areas_and_ratios_follow_the_recipe() -> None:
    augment = BatchAugment(32, generator=torch.Generator().manual_seed(0))
    params = augment.sample_params(4000, 100, 100)
    top, left, h, w = params.crops.double().unbind(1)
    area = h * w / 100**2
    assert area.min() >= 0.2 - 0.02 and area.max() <= 1.0
    # Tries that do not fit are redrawn, which favours small areas: compare the
    # distribution with torchvision's own sampler rather than with 0.6.
    torch.manual_seed(0)
    image, scale, ratio = torch.zeros(1, 100, 100), [0.2, 1.0], [3 / 4, 4 / 3]
    boxes = [T.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(2000)]
    torchvision_area = torch.tensor([h * w / 100**2 for _, _, h, w in boxes])
    assert abs(area.mean() - torchvision_area.mean()) < 0.015
    assert abs(area.std() - torchvision_area.std()) < 0.015
    log_ratio = torch.log(w / h)
    assert log_ratio.abs().max() <= math.log(4 / 3) + 0.03
    assert (top >= 0).all() and (top + h <= 100).all() and (left + w <= 100).all()
    assert 0.45 < params.flip.double().mean() < 0.55


def test_when_no_try_fits_the_crop_is_torchvisions_centre_crop() -> None:
    augment = BatchAugment(8, scale=(0.9, 1.0), generator=torch.Generator().manual_seed(0))
    crops = augment.sample_params(5, 10, 200).crops  # far wider than 4/3: nothing fits
    expected = T.RandomResizedCrop.get_params(torch.zeros(1, 10, 200), [0.9, 1.0], [3 / 4, 4 / 3])
    assert crops.tolist() == [list(expected)] * 5


@pytest.mark.parametrize(
    ("setting", "reference"),
    [
        ({"brightness": (1.3, 1.3)}, lambda x: TF.adjust_brightness(x, 1.3)),
        ({"contrast": (0.6, 0.6)}, lambda x: TF.adjust_contrast(x, 0.6)),
        ({"saturation": (1.4, 1.4)}, lambda x: TF.adjust_saturation(x, 1.4)),
        ({"hue": (0.2, 0.2)}, lambda x: TF.adjust_hue(x, 0.2)),
        ({"hue": (-0.35, -0.35)}, lambda x: TF.adjust_hue(x, -0.35)),
    ],
)
def test_jitter_factor_is_torchvisions(
    setting: dict[str, object], reference: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    images = torch.rand(4, 3, 12, 12)
    out = crop_free(**setting)(images)
    torch.testing.assert_close(out, reference(images), atol=1e-5, rtol=0)


def test_jitter_is_applied_with_its_probability_and_skips_the_rest() -> None:
    augment = crop_free(brightness=0.4, hue=0.1, jitter_p=0.5)
    params = augment.sample_params(400, 8, 8)
    untouched = (params.jitter == torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)).all(1)
    assert 0.4 < untouched.double().mean() < 0.6
    images = torch.rand(400, 3, 8, 8)
    out = augment.apply_params(images, params)
    torch.testing.assert_close(out[untouched], images[untouched], atol=1e-5, rtol=0)
    assert not torch.allclose(out[~untouched], images[~untouched], atol=1e-3)


def test_grayscale_gives_equal_channels_and_leaves_one_channel_alone() -> None:
    images = torch.rand(5, 3, 10, 10)
    out = crop_free(grayscale_p=1.0)(images)
    torch.testing.assert_close(out, TF.rgb_to_grayscale(images, 3), atol=1e-5, rtol=0)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    gray = torch.rand(5, 1, 10, 10)
    recipe = dict(grayscale_p=1.0, saturation=0.9, hue=0.5)
    torch.testing.assert_close(crop_free(**recipe)(gray), gray, atol=1e-5, rtol=0)


def high_frequency_energy(x: torch.Tensor) -> float:
    return float(x.diff(dim=-1).square().mean() + x.diff(dim=-2).square().mean())


def test_blur_removes_high_frequencies_and_is_pils_blur() -> None:
    images = torch.rand(6, 3, 24, 24)
    blurred = crop_free(blur_p=1.0, blur_sigma=(1.0, 2.0))(images)
    assert high_frequency_energy(blurred) < 0.25 * high_frequency_energy(images)
    image = pil_image(32, 32)
    for sigma in (0.1, 0.6, 1.0, 2.0):
        ours = crop_free(blur_p=1.0, blur_sigma=(sigma, sigma))(pil_to_float(image)[None])[0]
        pil = pil_to_float(image.filter(ImageFilter.GaussianBlur(radius=sigma)))
        # Pillow rounds to uint8 after each of its 6 box passes; we stay in float.
        assert (ours - pil).abs().max() <= 3.01 / 255
        assert (ours - pil).abs().mean() <= 1.2 / 255


def test_unblurred_samples_pass_unchanged() -> None:
    augment = crop_free(blur_p=0.5)
    images = torch.rand(64, 3, 12, 12)
    params = augment.sample_params(64, 12, 12)
    sharp = params.blur_sigma == 0
    assert 10 < int(sharp.sum()) < 54
    out = augment.apply_params(images, params)
    torch.testing.assert_close(out[sharp], images[sharp], atol=1e-5, rtol=0)
    assert high_frequency_energy(out[~sharp]) < high_frequency_energy(images[~sharp])


def test_a_generator_makes_it_deterministic() -> None:
    images = uint8_batch(8, 3, 32)

    def run(seed: int) -> torch.Tensor:
        return batch_moco_v2(28, generator=torch.Generator().manual_seed(seed))(images)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))
    per_call = batch_moco_v2(28)(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(per_call, run(1))


def test_channels_last_input_gives_the_same_output() -> None:
    images = uint8_batch(6, 3, 32)
    augment = batch_moco_v2(24)
    augment.generator = torch.Generator().manual_seed(0)
    plain = augment(images)
    augment.generator.manual_seed(0)
    channels_last = augment(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, plain, atol=1e-5, rtol=1e-5)


def test_recipes_and_two_views() -> None:
    v1, v2_, small = batch_moco_v1(64), batch_moco_v2(64), batch_small(28)
    assert v1.grayscale_first and v1.jitter_p == 1.0 and v1.hue == (-0.4, 0.4)
    assert v1.blur_p == 0.0 and v1.grayscale_p == 0.2
    assert v2_.jitter_p == 0.8 and v2_.hue == (-0.1, 0.1) and v2_.blur_p == 0.5
    assert v2_.blur_sigma == (0.1, 2.0) and v2_.saturation == pytest.approx((0.6, 1.4))
    assert small.size == 28 and small.scale == (0.2, 1.0) and small.blur_p == 0.0
    assert small.saturation == (1.0, 1.0) and small.contrast == pytest.approx((0.6, 1.4))
    query, key = two_views(small, uint8_batch(4, 1, 28))
    assert query.shape == key.shape == (4, 1, 28, 28)
    assert not torch.allclose(query, key)


@pytest.mark.parametrize(
    "setting",
    [
        {"scale": (0.0, 1.0)},
        {"scale": (0.5, 0.2)},
        {"scale": (0.2, 1.5)},
        {"ratio": (-1.0, 1.0)},
        {"flip_p": 1.5},
        {"brightness": -0.1},
        {"hue": 0.6},
        {"blur_sigma": (0.0, 2.0)},
        {"mean": (0.5, 0.5), "std": (0.5, 0.5)},
        {"std": (0.2, 0.0, 0.2)},
        {"size": 0},
    ],
)
def test_bad_settings_raise_config_error(setting: dict[str, object]) -> None:
    kwargs = {"size": 32, **setting}
    with pytest.raises(ConfigError):
        BatchAugment(**kwargs)


def test_bad_images_raise_input_error() -> None:
    augment = BatchAugment(16)  # ImageNet mean/std: 3 channels
    for images in (
        torch.rand(3, 16, 16),
        torch.rand(2, 2, 16, 16),
        torch.zeros(2, 3, 16, 16, dtype=torch.int32),
        torch.rand(2, 1, 16, 16),
        torch.rand(0, 3, 16, 16),
    ):
        with pytest.raises(InputError):
            augment(images)
    with pytest.raises(InputError):
        augment.apply_params(torch.rand(4, 3, 16, 16), augment.sample_params(3, 16, 16))


def test_views_are_separate_calls_whose_parameters_travel_packed() -> None:
    images = uint8_batch(6, 3, 24)
    augment = batch_moco_v2(16)
    query, key = augment.views(images, 2, generator=torch.Generator().manual_seed(5))
    one_by_one = torch.Generator().manual_seed(5)
    assert torch.equal(query, augment(images, generator=one_by_one))
    assert torch.equal(key, augment(images, generator=one_by_one))
    augment.generator = torch.Generator().manual_seed(5)
    assert all(map(torch.equal, two_views(augment, images), (query, key)))
    # Packing loses nothing: crops are whole pixels, flags 0 or 1.
    params = augment.sample_params(6, 24, 24, torch.Generator().manual_seed(1))
    packed = params.pack()
    assert packed.shape == (6, 11) and packed.dtype == torch.float64
    unpacked = vars(AugmentParams.unpack(packed)).values()
    for before, after in zip(vars(params).values(), unpacked, strict=True):
        assert before.dtype == after.dtype and torch.equal(before, after)
    # Both views' parameters reach the device as one tensor (meta stands in for a GPU).
    moved = move_params([params, params], torch.device("meta"))
    assert [p.crops.device.type for p in moved] == ["meta", "meta"]
    assert moved[0].jitter._base is not None and moved[0].jitter._base is moved[1].jitter._base


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_what_the_cpu_gives() -> None:
    images = uint8_batch(32, 3, 48)
    augment = batch_moco_v2(32)
    on_cpu = augment(images, generator=torch.Generator().manual_seed(0))
    augment = augment.cuda()  # parameters still drawn on the CPU generator: the same ones
    on_cuda = augment(images.cuda(), generator=torch.Generator().manual_seed(0))
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, atol=1e-3, rtol=1e-3)
    cuda_generator = torch.Generator("cuda").manual_seed(0)
    assert augment(images.cuda(), generator=cuda_generator).shape == (32, 3, 32, 32)
