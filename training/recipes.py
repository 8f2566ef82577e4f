"""MoCo's augmentation recipes as values: the one table both augmentation paths read.

A recipe says what to draw (crop scale and ratio, flip, colour jitter,
grayscale, blur: strengths and probabilities), the order the per-image
pipeline draws it in, and the default normalisation. The per-image pipelines
(:func:`~mocohub.training.augment.recipe_transform`) and the batched ones
(:meth:`~mocohub.training.batch_augment.BatchAugment.from_recipe`) are both
built from :data:`RECIPES`, so a value changed here changes both.

Example:
    >>> recipe("v2").jitter_p, recipe("v2").blur_sigma
    (0.8, (0.1, 2.0))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from mocohub.errors import ConfigError
from mocohub.preprocessing import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["RECIPES", "VIEW_PAIRS", "AugmentRecipe", "Step", "recipe", "view_recipes"]

Step = Literal["crop", "flip", "jitter", "grayscale", "blur", "solarize"]


@dataclass(frozen=True)
class AugmentRecipe:
    """One augmentation recipe: the random choices and their order.

    ``steps`` is the order in which the per-image pipeline applies (and draws
    the random numbers of) each transform, ``"crop"`` first; a transform
    missing from it is not applied. The batched path draws every parameter at
    once, so only one order matters to it: grayscale before or after jitter
    (:attr:`grayscale_first`). Jitter strengths follow torchvision's
    ``ColorJitter`` (a factor in [max(0, 1 - s), 1 + s]; hue a shift in
    [-h, h]); ``mean``/``std`` are the normalisation used when a builder is
    not given the data's own.

    Example:
        >>> AugmentRecipe(("crop", "flip"), flip_p=0.5).grayscale_first
        False
    """

    steps: tuple[Step, ...]
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0  # PIL's ImageOps.solarize: pixels >= 128 of 255 inverted
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        known = ("crop", "flip", "jitter", "grayscale", "blur", "solarize")
        if (
            not self.steps
            or self.steps[0] != "crop"
            or len(set(self.steps)) != len(self.steps)
            or not set(self.steps) <= set(known)
        ):
            raise ConfigError(
                f"a recipe's steps start with 'crop' and name each of {known} at most once, "
                f"got {self.steps}."
            )
        jitters = any((self.brightness, self.contrast, self.saturation, self.hue))
        used = {
            "flip": self.flip_p > 0,
            "jitter": self.jitter_p > 0 and jitters,
            "grayscale": self.grayscale_p > 0,
            "blur": self.blur_p > 0,
            "solarize": self.solarize_p > 0,
        }
        for step, on in used.items():
            if on != (step in self.steps):
                raise ConfigError(
                    f"the recipe {'lists' if step in self.steps else 'leaves out'} the step "
                    f"{step!r} but its probability or strength says the opposite; make them agree."
                )

    def with_solarize(self, p: float) -> AugmentRecipe:
        """This recipe solarizing with probability ``p``: a step appended if it had none,
        dropped for ``p == 0``, kept in its place otherwise.

        Example:
            >>> RECIPES["small"].with_solarize(0.2).steps
            ('crop', 'flip', 'jitter', 'grayscale', 'solarize')
        """
        p = check_probability("the solarize probability", p)
        steps = tuple(s for s in self.steps if s != "solarize" or p > 0)
        if p > 0 and "solarize" not in steps:
            steps = (*steps, "solarize")
        return dataclasses.replace(self, steps=steps, solarize_p=p)

    @property
    def grayscale_first(self) -> bool:
        """Whether grayscale comes before colour jitter (MoCo v1's order)."""
        steps = self.steps
        return (
            "grayscale" in steps
            and "jitter" in steps
            and (steps.index("grayscale") < steps.index("jitter"))
        )


#: The recipes by the name ``TrainConfig.augmentation`` uses.
RECIPES: dict[str, AugmentRecipe] = {
    # MoCo v1: reference main_moco.py without --aug-plus.
    "v1": AugmentRecipe(
        ("crop", "grayscale", "jitter", "flip"),
        flip_p=0.5,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.4,
        jitter_p=1.0,
        grayscale_p=0.2,
    ),
    # MoCo v2: reference main_moco.py --aug-plus.
    "v2": AugmentRecipe(
        ("crop", "jitter", "grayscale", "blur", "flip"),
        flip_p=0.5,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        jitter_p=0.8,
        grayscale_p=0.2,
        blur_p=0.5,
        blur_sigma=(0.1, 2.0),
    ),
    # 28-32 px images (Fashion-MNIST, CIFAR); not a reference recipe: no blur,
    # which would wipe out such small images, and [0, 1] mapped to [-1, 1].
    "small": AugmentRecipe(
        ("crop", "flip", "jitter", "grayscale"),
        flip_p=0.5,
        brightness=0.4,
        contrast=0.4,
        jitter_p=0.8,
        grayscale_p=0.2,
        mean=(0.5,),
        std=(0.5,),
    ),
}


# MoCo v3 (reference main_moco.py, lines 261-290, "BYOL's augmentation recipe"): the
# two views differ. Both: crop, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8 ("not
# strengthened"), grayscale p 0.2, then blur, then flip; view 1 is always blurred and
# never solarized, view 2 blurred with p 0.1 and solarized with p 0.2. The crop's
# smallest scale is the run's --crop-min (0.08 ViT, 0.2 ResNet in the reference).
_V3_VIEW = AugmentRecipe(
    ("crop", "jitter", "grayscale", "blur", "flip"),
    scale=(0.08, 1.0),
    flip_p=0.5,
    brightness=0.4,
    contrast=0.4,
    saturation=0.2,
    hue=0.1,
    jitter_p=0.8,
    grayscale_p=0.2,
    blur_p=1.0,
    blur_sigma=(0.1, 2.0),
)
_SMALL_VIEW = RECIPES["small"]

#: Recipes whose two views differ, by name: (view 1, view 2).
VIEW_PAIRS: dict[str, tuple[AugmentRecipe, AugmentRecipe]] = {
    "v3": (
        _V3_VIEW,
        dataclasses.replace(
            _V3_VIEW, steps=(*_V3_VIEW.steps[:-1], "solarize", "flip"), blur_p=0.1, solarize_p=0.2
        ),
    ),
    # 28-32 px images with MoCo v3: "small" for both views, and v3's asymmetric
    # solarize (view 2, p 0.2); not a reference recipe. Blur stays out, as in
    # "small": it wipes out such small images.
    "small_v3": (
        _SMALL_VIEW,
        dataclasses.replace(_SMALL_VIEW, steps=(*_SMALL_VIEW.steps, "solarize"), solarize_p=0.2),
    ),
}


def recipe(name: str) -> AugmentRecipe:
    """The recipe called ``name`` in :data:`RECIPES` (the same for both views).

    Example:
        >>> recipe("v1").grayscale_first
        True
    """
    try:
        return RECIPES[name]
    except KeyError:
        hint = ""
        if name in VIEW_PAIRS:
            hint = f" (its views differ: view_recipes({name!r}) gives one recipe per view)"
        raise ConfigError(
            f"Unknown augmentation {name!r}; use one of {', '.join(RECIPES)}{hint}."
        ) from None


def view_recipes(name: str) -> tuple[AugmentRecipe, AugmentRecipe]:
    """The recipes of the first and second view of augmentation ``name``: a pair of
    :data:`VIEW_PAIRS`, or one recipe of :data:`RECIPES` twice.

    Example:
        >>> first, second = view_recipes("v3")
        >>> (first.blur_p, first.solarize_p), (second.blur_p, second.solarize_p)
        ((1.0, 0.0), (0.1, 0.2))
    """
    if name in VIEW_PAIRS:
        return VIEW_PAIRS[name]
    if name in RECIPES:
        return RECIPES[name], RECIPES[name]
    raise ConfigError(
        f"Unknown augmentation {name!r}; use one of {', '.join([*RECIPES, *VIEW_PAIRS])}."
    )


# --- argument checks shared by both paths ------------------------------------------------------


def check_probability(name: str, p: float) -> float:
    """``p`` as a float, or :class:`ConfigError` unless it is in [0, 1]."""
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{name} is a probability and must be in [0, 1], got {p}.")
    return float(p)


def check_range(
    name: str,
    bounds: Sequence[float],
    low: float = -math.inf,
    high: float = math.inf,
    open_low: bool = False,
) -> tuple[float, float]:
    """``bounds`` as a (min, max) pair of floats inside [low, high] (``(low`` if ``open_low``)."""
    lo, hi = (float(bounds[0]), float(bounds[1])) if len(bounds) == 2 else (math.nan, math.nan)
    too_low = lo <= low if open_low else lo < low
    if not (lo <= hi) or too_low or hi > high:
        where = f"{'(' if open_low else '['}{low}, {high}]"
        raise ConfigError(
            f"{name} must be a (min, max) pair with min <= max inside {where}, got {tuple(bounds)}."
        )
    return lo, hi


def factor_range(name: str, strength: float | tuple[float, float]) -> tuple[float, float]:
    """A jitter strength ``s`` as the factor range [max(0, 1 - s), 1 + s] (a pair as is)."""
    if isinstance(strength, (int, float)):
        if strength < 0:
            raise ConfigError(f"{name} must be a non-negative strength, got {strength}.")
        strength = (max(0.0, 1.0 - strength), 1.0 + strength)
    return check_range(name, strength, low=0.0)


def check_stats(
    mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel normalisation as float tuples: 1 or 3 values each, std > 0."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != len(std) or len(mean) not in (1, 3) or min(std) <= 0:
        raise ConfigError(
            f"mean and std need 1 or 3 values each, with std > 0, got mean={mean}, std={std}; "
            "use your data's per-channel statistics."
        )
    return mean, std
