"""Two augmented views of every image, step by step, on the training device.

Two paths, chosen by where the images are:

- **device** (images in memory: IDX files, a ``labels.csv`` folder, tensors):
  each step takes a batch of uint8 images, moves it to the device and augments
  the whole batch there with per-sample random parameters. A GPU is never
  waiting on a 2-core CPU, and small images need no worker processes at all.
- **workers** (ImageFolder trees of JPEG/PNG files): DataLoader worker
  processes decode each image (:func:`~mocohub.training.data.decode_file`) and
  apply the reference's per-sample transforms to the PIL image, twice, as the
  reference ``main_moco.py`` does (``--augment-on workers`` takes in-memory
  images this way too, as PIL images).

Either way the randomness derives from (seed, epoch, step or sample), never
from a generator's history: the batch order is one permutation per epoch, and
each step's (or sample's) augmentation has its own seed. A run resumed at any
step therefore sees exactly the batches and views it would have seen.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms.v2.functional import to_pil_image

from mocohub.errors import ConfigError, InputError
from mocohub.preprocessing import per_channel
from mocohub.sysinfo import loader_workers

from .config import TrainConfig
from .data import TensorImageDataset
from .distributed import DistributedEnv
from .progress import ignore_stop_signals, saved_phrase
from .recipes import AugmentRecipe, view_recipes

__all__ = [
    "UnreadableSample",
    "ViewPipeline",
    "batch_augment",
    "channel_stats",
    "epoch_batches",
    "per_sample_transform",
    "per_sample_transforms",
    "saving_before_bad_data",
    "step_seed",
    "train_recipes",
]

logger = logging.getLogger(__name__)

Views = tuple[torch.Tensor, torch.Tensor]


class UnreadableSample(InputError):
    """A training image that could not be decoded, found when its batch was due."""


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """A seed for one (epoch, step, rank), or (epoch, sample) with ``step=index``."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + step) * 1009 + rank & (2**63 - 1)


def epoch_batches(
    num_samples: int, epoch: int, seed: int, global_batch: int, env: DistributedEnv
) -> torch.Tensor:
    """This rank's sample indices for every step of ``epoch``: steps x local batch.

    One permutation per epoch, the same on every rank; step ``s`` takes the
    global batch ``perm[s*B:(s+1)*B]`` and rank ``r`` its ``r``-th slice. The
    last incomplete global batch is dropped (every rank needs the same size).
    """
    generator = torch.Generator().manual_seed(step_seed(seed, epoch, 0, -1))
    permutation = torch.randperm(num_samples, generator=generator)
    steps = num_samples // global_batch
    local = global_batch // env.world_size
    return permutation[: steps * global_batch].view(steps, env.world_size, local)[:, env.rank]


def channel_stats(
    config: TrainConfig, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The config's mean/std for ``channels`` channels (see :func:`per_channel`)."""
    return per_channel(config.mean, channels), per_channel(config.std, channels)


def train_recipes(config: TrainConfig) -> tuple[AugmentRecipe, AugmentRecipe]:
    """``config.augmentation``'s recipes of view 1 and view 2 (one recipe twice unless the
    views differ, as MoCo v3's do), with ``config.crop_min`` as the crop's smallest scale
    and ``config.solarize`` as each view's solarize probability, where they are set.

    Example:
        >>> train_recipes(TrainConfig(augmentation="small", crop_min=0.5))[1].scale
        (0.5, 1.0)
    """
    pair = view_recipes(config.augmentation)
    if config.crop_min is None and config.solarize is None:
        return pair
    changed = []
    for r in pair:
        if config.crop_min is not None:
            r = dataclasses.replace(r, scale=(config.crop_min, 1.0))
        if config.solarize is not None:
            r = r.with_solarize(config.solarize)
        changed.append(r)
    first, second = changed
    return (first, first) if pair[0] is pair[1] else (first, second)


def train_recipe(config: TrainConfig) -> AugmentRecipe:
    """``config.augmentation``'s recipe of view 1 (see :func:`train_recipes`).

    Example:
        >>> train_recipe(TrainConfig(augmentation="small", crop_min=0.5)).scale
        (0.5, 1.0)
    """
    return train_recipes(config)[0]


def batch_augment(config: TrainConfig, channels: int, generator: torch.Generator) -> Any:
    """The batched (on-device) augmentation of ``config.augmentation``'s recipe: a
    ``BatchAugment``, or a ``PairAugment`` when the two views have their own recipes."""
    from .batch_augment import BatchAugment, PairAugment

    mean, std = channel_stats(config, channels)
    first, second = train_recipes(config)
    if first is not second:
        return PairAugment.from_recipes(
            (first, second), config.image_size, mean, std, generator=generator
        )
    return BatchAugment.from_recipe(first, config.image_size, mean, std, generator=generator)


def per_sample_transform(config: TrainConfig, channels: int) -> Any:
    """The per-image (worker process) augmentation of view 1 (:func:`per_sample_transforms`)."""
    return per_sample_transforms(config, channels)[0]


def per_sample_transforms(config: TrainConfig, channels: int) -> tuple[Any, Any]:
    """The per-image (worker process) augmentations of view 1 and view 2: one
    transform twice unless the recipe's views differ.

    Example:
        >>> first, second = per_sample_transforms(TrainConfig(augmentation="v3"), 3)
        >>> first is second
        False
    """
    from .augment import recipe_transform

    mean, std = channel_stats(config, channels)
    first, second = train_recipes(config)
    transform = recipe_transform(first, config.image_size, mean, std)
    if first is second:
        return transform, transform
    return transform, recipe_transform(second, config.image_size, mean, std)


class _SeededTwoViews(Dataset[Views | str]):
    """Two per-sample views of PIL images, with the RNG seeded from (seed, epoch, index).

    Items are addressed by ``(epoch, index)`` so that worker processes, which
    keep their own RNG, still draw exactly what a resumed run would; the
    process's own RNG state is left untouched. A file
    that cannot be decoded gives its error message instead of views: raised in
    a worker, the error would reach the main process wrapped in a traceback.
    """

    def __init__(self, dataset: Any, transforms: tuple[Any, Any], seed: int) -> None:
        self.transforms, self.seed = transforms, seed
        self.images: torch.Tensor | None = None
        if isinstance(dataset, TensorImageDataset):
            self.images = dataset.images
        else:  # an ImageFolder: items as its loader decodes them (PIL), untransformed
            self.dataset = copy.copy(dataset)
            self.dataset.transform = None
        self.length = len(dataset)

    def __len__(self) -> int:
        return self.length

    def _image(self, index: int) -> Image.Image:
        if self.images is not None:
            return to_pil_image(self.images[index])
        image, _ = self.dataset[index]
        return image

    def __getitem__(self, key: tuple[int, int]) -> Views | str:
        epoch, index = key
        try:
            image = self._image(index)
        except InputError as error:
            return str(error)
        # torchvision's transforms draw from torch's default (CPU) generator and
        # take no other: seed it for this sample, then give the caller's state
        # back, so that drawing samples in the main process (workers=0) leaves
        # its random numbers as they were.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(step_seed(self.seed, epoch, index, -2))
            first, second = self.transforms
            return first(image), second(image)


def _collate(items: list[Views | str]) -> list[torch.Tensor] | str:
    """Stack the views of a batch, or pass on the first decoding error in it."""
    for item in items:
        if isinstance(item, str):
            return item
    return default_collate(items)


class _Plan:
    """A batch sampler whose batches are replaced before each epoch (so the
    DataLoader can keep its workers between epochs)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ViewPipeline:
    """Yields ``(step, (view_q, view_k))`` for each step of an epoch, on ``env.device``."""

    def __init__(self, dataset: Any, info: Any, config: TrainConfig, env: DistributedEnv) -> None:
        self.config, self.env = config, env
        self.num_samples = len(dataset)
        self.steps_per_epoch = self.num_samples // config.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"The data set has {self.num_samples} images, fewer than one global batch "
                f"of {config.batch_size}; lower --batch-size."
            )
        self.on_device = config.augment_on == "device" or (
            config.augment_on == "auto" and info.in_memory
        )
        if self.on_device and not info.in_memory:
            raise ConfigError(
                "--augment-on device needs images in memory (IDX files, a labels.csv "
                "folder or tensors); use --augment-on workers for image folders."
            )
        if self.on_device:
            self.images = dataset.images.to(env.device)
            # The parameters are drawn on the CPU and copied once per step, packed and
            # without blocking (BatchAugment.views), rather than drawn by a generator on
            # the device: the CPU numbers stay bit for bit those of earlier versions
            # (resumed runs match), and the sizes of the work (supersampling, blur
            # reach) are read from the parameters on the host with no device sync.
            self.generator = torch.Generator()
            self.augment = batch_augment(config, info.channels, self.generator).to(env.device)
        else:
            self.plan = _Plan()
            cuda = env.device.type == "cuda"
            workers = loader_workers(config.workers)  # the views are seeded per sample
            self.loader = DataLoader(
                _SeededTwoViews(dataset, per_sample_transforms(config, info.channels), config.seed),
                batch_sampler=self.plan,
                collate_fn=_collate,
                num_workers=workers,
                pin_memory=cuda,
                persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
                worker_init_fn=ignore_stop_signals,  # the main process stops them
                # Its own generator for the workers' base seed: every epoch's
                # iterator would otherwise draw one number from the global RNG.
                generator=torch.Generator(),
            )

    def warn_if_resized(self, loop: dict[str, Any] | None, epoch: int) -> None:
        """Warn when a mid-epoch checkpoint's ``loop`` state began ``epoch`` on a
        data set of another size: the rest of the epoch draws a new order."""
        began_with = (loop or {}).get("samples", self.num_samples)
        if began_with != self.num_samples:
            logger.warning(
                "mocohub: the data set has %d images, %d when epoch %d began: the rest of "
                "the epoch follows a new order, so some images may come twice in it and "
                "others not.",
                self.num_samples,
                began_with,
                epoch + 1,
            )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, Views]]:
        """The views of each step of ``epoch``, from ``start_step`` on."""
        seed, env = self.config.seed, self.env
        plan = epoch_batches(self.num_samples, epoch, seed, self.config.batch_size, env)
        if self.on_device:
            # The epoch's sample indices go to the device in one copy, not one per step.
            plan = _to_device(plan[start_step:], self.images.device)
            for offset, indices in enumerate(plan):
                step = start_step + offset
                images = self.images[indices]
                self.generator.manual_seed(step_seed(seed, epoch, step, env.rank))
                view_q, view_k = self.augment.views(images, 2)  # their parameters: one copy
                yield step, (view_q, view_k)
            return
        self.plan.batches = _keys(epoch, plan[start_step:].tolist())
        for offset, batch in enumerate(self.loader):
            if isinstance(batch, str):
                raise UnreadableSample(batch)
            view_q, view_k = batch
            yield (
                start_step + offset,
                (
                    view_q.to(env.device, non_blocking=True),
                    view_k.to(env.device, non_blocking=True),
                ),
            )


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``: pinned and copied without blocking for a GPU."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _keys(epoch: int, rows: Sequence[Sequence[int]]) -> list[list[tuple[int, int]]]:
    return [[(epoch, index) for index in row] for row in rows]


def saving_before_bad_data(
    batches: Iterator[tuple[int, Views]],
    epoch: int,
    start_step: int,
    save: Callable[[int, int], Path | None],
) -> Iterator[tuple[int, Views]]:
    """``batches``; an image that cannot be decoded first saves the steps before it.

    A damaged file shows only when its batch is due, maybe hours into a run.
    The steps done since the last checkpoint are saved (at the step whose batch
    failed: every rank's model and optimizer are still as that step found
    them), and the error says how to go on once the file is replaced or removed.
    """
    due = start_step
    try:
        for step, views in batches:
            yield step, views
            due = step + 1  # the consumer is back: that step is done
    except UnreadableSample as error:
        where = f"Its batch was due in epoch {epoch + 1} at step {due}"
        if due > start_step:
            raise UnreadableSample(
                f"{error} {where}; the steps before it are saved in "
                f"{saved_phrase(epoch, due, save(epoch, due))}: once the file is replaced "
                "or removed, run the same command with --resume auto to continue from there."
            ) from None
        if epoch > 0 or start_step > 0:  # that point has its checkpoint already
            raise UnreadableSample(
                f"{error} {where}, the point of the last checkpoint: once the file is "
                "replaced or removed, run the same command with --resume auto to continue."
            ) from None
        raise
