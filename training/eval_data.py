"""Feeding a frozen backbone for evaluation: batches of a data set, and their features.

Shared by ``mocohub knn`` and ``mocohub lincls``. The batches apply a
backbone's preprocessing (:mod:`~mocohub.training.eval_transforms`) to any
data set :func:`~mocohub.training.data.resolve_dataset` accepts, on two paths:

- **in memory** (IDX files, a ``labels.csv`` folder, tensors): whole uint8
  batches are moved to the device and transformed there, in a few batched ops;
- **image folders**: torchvision transforms per image, in DataLoader workers.

Under DDP each rank takes its share: training batches as
``DistributedSampler`` deals them (shuffled per epoch), evaluation batches as
equal contiguous blocks (the last sample repeated to pad), so that
:func:`extract_features` gathers them back in order.

A linear classifier trains on a :data:`FeatureSource`: :class:`AugmentedFeatures`
(the reference protocol: augmented images through the backbone every epoch)
or :class:`CachedFeatures` (un-augmented features extracted once).

The backbone comes from :func:`load_backbone`, i.e. from :func:`mocohub.load`
(any source it accepts), and carries its :class:`~mocohub.artifact.ModelConfig`
(preprocessing included) as ``backbone.mocohub_config``.

Example:
    >>> backbone = load_backbone("moco_r18_fashion_mnist")
    >>> dataset, data_info = resolve_dataset("samples/fashion-mnist", "val")
    >>> env = init_from_env()
    >>> prep = backbone.mocohub_config.preprocessing
    >>> batches = EvalBatches(dataset, data_info, prep, "auto", env)
    >>> features, labels = extract_features(freeze_backbone(backbone), batches, env)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from mocohub.artifact import ModelConfig, get_config
from mocohub.errors import ConfigError, InputError
from mocohub.precision import prefers_channels_last
from mocohub.sysinfo import loader_workers, usable_cpus

from .data import DatasetInfo, TensorImageDataset
from .distributed import DistributedEnv, all_gather_no_grad
from .eval_transforms import (
    BatchEvalTransform,
    EvalResize,
    Preprocessing,
    Recipe,
    batch_train_transform,
    per_image_transform,
)
from .views import step_seed

__all__ = [
    "AugmentedFeatures",
    "CachedFeatures",
    "EvalBatches",
    "FeatureSource",
    "ModelSource",
    "TrainBatches",
    "autocast_dtype",
    "backbone_features",
    "default_workers",
    "describe_model",
    "extract_features",
    "freeze_backbone",
    "load_backbone",
    "model_record",
    "place_backbone",
    "same_images",
]

Batch = tuple[torch.Tensor, torch.Tensor]
ModelSource = str | os.PathLike[str] | nn.Module
"""What evaluation takes as its model: anything :func:`mocohub.load` accepts (a registry
name, an artifact folder or ``.safetensors`` file, ``hf-hub:org/name``, a URL, a mocohub
run folder or checkpoint, a reference MoCo ``.pth.tar``), or a model it returned."""


def default_workers() -> int:
    """DataLoader workers per process when none are asked for: up to 8, one per usable CPU."""
    return min(8, usable_cpus())


def load_backbone(model: ModelSource) -> nn.Module:
    """The backbone (pooled features, ``fc`` is ``Identity``) with its ``mocohub_config``.

    A source goes through :func:`mocohub.load`; a module must be one it (or
    :func:`mocohub.artifact.build_model`) returned.

    Example:
        >>> load_backbone("moco_r18_fashion_mnist").mocohub_config.preprocessing.image_size
        28
    """
    if isinstance(model, nn.Module):
        get_config(model)  # a clear error for a module without a mocohub config
        return model
    from mocohub.loading import load

    return load(model)


def describe_model(model: ModelSource) -> str:
    """What was evaluated, for reports: the source as given, or an in-memory model's origin."""
    if not isinstance(model, nn.Module):
        return os.fspath(model)
    meta = get_config(model).meta
    origin = meta.get("hub_repo") or meta.get("name") or meta.get("source")
    return str(origin) if origin else "in-memory backbone"


def model_record(config: ModelConfig) -> dict[str, Any]:
    """The model's config as JSON-ready values (``ModelConfig.to_dict``), for result files."""
    return cast(dict[str, Any], json.loads(json.dumps(config.to_dict(), default=str)))


def freeze_backbone(backbone: nn.Module) -> nn.Module:
    """Freeze ``backbone`` for evaluation: no gradients, eval mode (BN uses its running stats).

    Example:
        >>> freeze_backbone(backbone).training
        False
    """
    backbone.requires_grad_(False)
    return backbone.eval()


def place_backbone(backbone: nn.Module, device: torch.device) -> nn.Module:
    """``backbone`` on ``device``, in channels_last where convolutions are faster in it (CPUs
    and GPUs: :func:`mocohub.precision.prefers_channels_last`)."""
    backbone = backbone.to(device)
    if prefers_channels_last(device):
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` (None: float32), by mocohub's one policy."""
    from mocohub import precision as policy

    return policy.autocast_dtype(precision, choices=("fp32", "bf16"))


def same_images(train: Any, train_info: DatasetInfo, val: Any, val_info: DatasetInfo) -> bool:
    """True when the train and val splits resolved to the same images (no val split exists)."""
    if train_info.kind != val_info.kind:
        return False
    if train_info.kind == "image-folder":
        return bool(getattr(train, "root", None) == getattr(val, "root", 1))
    if train_info.kind == "tensor":  # every tensor's source is "tensor": compare the storage
        a, b = train.images, val.images
        return bool(a.data_ptr() == b.data_ptr() and a.shape == b.shape)
    if train_info.kind == "labels-csv":
        return train_info.source == val_info.source
    return False


# --- batches -------------------------------------------------------------------------------------


def _loader(dataset: Any, env: DistributedEnv, batch_size: int, workers: int, **kw: Any) -> Any:
    workers = loader_workers(workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=workers > 0,
        **kw,
    )


class _SeededSamples(Dataset[Batch]):
    """Items ``(epoch, index)``: sample ``index`` augmented from a random stream of its own.

    torchvision's transforms draw from torch's default generator; seeding it per
    (seed, epoch, sample), as the pre-training views do, makes an epoch's images
    the same however many workers load them and wherever an interrupted
    evaluation resumes. The caller's generator state is given back.
    """

    def __init__(self, dataset: Any, transform: Any, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        epoch, index = key
        image, label = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(step_seed(self.seed, epoch, index, -3))
            return self.transform(image), label


class _EpochKeys(Sampler[tuple[int, int]]):
    """``(epoch, index)`` for each index a :class:`DistributedSampler` deals in an epoch."""

    def __init__(self, sampler: DistributedSampler[int]) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        return ((epoch, index) for index in self.sampler)


class TrainBatches:
    """Shuffled, augmented ``(images, labels)`` batches of this rank's share, per epoch.

    Samples are dealt as ``DistributedSampler(shuffle=True, seed=seed)`` deals
    them (the last batch may be smaller; no sample is dropped). ``batch_size``
    is global: each rank takes ``batch_size // world_size``.

    Example:
        >>> batches = TrainBatches(dataset, info, prep, "reference", env, batch_size=256)
        >>> for images, labels in batches.epoch(0): ...
    """

    def __init__(
        self,
        dataset: Any,
        info: DatasetInfo,
        prep: Preprocessing,
        recipe: Recipe,
        env: DistributedEnv,
        *,
        batch_size: int = 256,
        workers: int = 0,
        seed: int = 0,
    ) -> None:
        if batch_size < 1 or batch_size % env.world_size:
            raise ConfigError(
                f"The batch size {batch_size} must be positive and divide evenly over "
                f"{env.world_size} processes; change --batch-size."
            )
        self.env, self.seed, self.local_batch = env, seed, batch_size // env.world_size
        # Only the length of what it samples matters to the sampler: it deals indices.
        indices = cast(Any, range(len(dataset)))
        self.sampler: DistributedSampler[int] = DistributedSampler(
            indices, env.world_size, env.rank, shuffle=True, seed=seed
        )
        self.images: torch.Tensor | None = None
        if isinstance(dataset, TensorImageDataset):
            if dataset.labels is None:
                raise InputError("Linear evaluation needs labelled images; pass labels.")
            self.images = dataset.images.to(env.device)
            self.labels = dataset.labels.to(env.device)
            # The reference recipe's BatchAugment reads the sizes of its work from its
            # parameters on the host, so it draws them there and copies them once a
            # batch without blocking; pad-crop-flip reads nothing back and draws on the
            # device. (On the CPU both are the CPU generator: results are unchanged.)
            on_host = recipe == "reference"
            self.generator = torch.Generator() if on_host else torch.Generator(env.device)
            self.augment = batch_train_transform(prep, recipe, self.generator)
        else:
            seeded = _SeededSamples(dataset, per_image_transform(prep, recipe, "reference"), seed)
            sampler = _EpochKeys(self.sampler)
            self.loader = _loader(seeded, env, self.local_batch, workers, sampler=sampler)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.local_batch)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches of ``epoch``, on the device."""
        self.sampler.set_epoch(epoch)
        device = self.env.device
        if self.images is None:
            for images, labels in self.loader:
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            return
        order = torch.tensor(list(self.sampler))  # the epoch's indices: one copy
        if device.type == "cuda":
            order = order.pin_memory()
        order = order.to(device, non_blocking=True)
        # Each (seed, epoch, rank) has its own augmentation stream.
        self.generator.manual_seed((self.seed * 1_000_003 + epoch) * 1009 + self.env.rank)
        for start in range(0, len(order), self.local_batch):
            index = order[start : start + self.local_batch]
            yield self.augment(self.images[index]), self.labels[index]


class EvalBatches:
    """Preprocessed ``(images, labels)`` batches of this rank's share of a data set, in order.

    Every rank gets ``ceil(N / world_size)`` samples (contiguous; the last
    sample repeats to pad), so ``all_gather`` then ``[:num_samples]`` gives
    every sample once, in data-set order (:func:`extract_features` does that).

    Example:
        >>> batches = EvalBatches(dataset, info, prep, "auto", env, batch_size=512)
        >>> images, labels = next(iter(batches))
    """

    def __init__(
        self,
        dataset: Any,
        info: DatasetInfo,
        prep: Preprocessing,
        resize: EvalResize,
        env: DistributedEnv,
        *,
        batch_size: int = 256,
        workers: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"The batch size must be positive, got {batch_size}.")
        self.env, self.batch_size = env, batch_size
        self.num_samples = len(dataset)
        share = -(-self.num_samples // env.world_size)
        indices = torch.arange(env.rank * share, (env.rank + 1) * share)
        indices = indices.clamp(max=self.num_samples - 1)
        self.images: torch.Tensor | None = None
        if isinstance(dataset, TensorImageDataset):
            self.images, self.labels = dataset.batch(indices)
            if env.device.type == "cuda":  # so that each batch's copy does not block
                self.images, self.labels = _pinned(self.images), _pinned(self.labels)
            self.transform = BatchEvalTransform(prep, resize)
        else:
            dataset.transform = per_image_transform(prep, None, resize)
            self.loader = _loader(Subset(dataset, indices.tolist()), env, batch_size, workers)

    def __iter__(self) -> Iterator[Batch]:
        device = self.env.device
        if self.images is None:
            for images, labels in self.loader:
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            return
        for start in range(0, len(self.images), self.batch_size):
            images = self.images[start : start + self.batch_size].to(device, non_blocking=True)
            labels = self.labels[start : start + self.batch_size].to(device, non_blocking=True)
            yield self.transform(images), labels


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in pinned memory if it is on the CPU (a GPU copies from it without blocking)."""
    return tensor.pin_memory() if tensor.device.type == "cpu" else tensor


def backbone_features(
    backbone: nn.Module, images: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Pooled float32 features of a frozen backbone (no gradient; autocast when ``dtype``)."""
    if prefers_channels_last(images.device):
        images = images.contiguous(memory_format=torch.channels_last)
    with (
        torch.no_grad(),
        torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None),
    ):
        return backbone(images).float()


def extract_features(
    backbone: nn.Module,
    batches: EvalBatches,
    env: DistributedEnv,
    *,
    dtype: torch.dtype | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (L2-normalised unless ``normalize=False``) and labels of every sample.

    Each rank embeds its share; the result, gathered from all ranks, is the
    same on every rank and in data-set order.

    Example:
        >>> features, labels = extract_features(backbone, batches, env)
        >>> features.shape  # N x feature_dim
    """
    features, labels = [], []
    for images, targets in batches:
        batch_features = backbone_features(backbone, images, dtype)
        features.append(F.normalize(batch_features, dim=1) if normalize else batch_features)
        labels.append(targets)
    gathered = all_gather_no_grad(torch.cat(features))[: batches.num_samples]
    return gathered, all_gather_no_grad(torch.cat(labels))[: batches.num_samples]


class AugmentedFeatures:
    """Features for training a classifier the reference way: each epoch's augmented
    images through the frozen backbone (``sharded``: batches are this rank's share).

    Example:
        >>> features = AugmentedFeatures(backbone, train_batches, val_batches, None)
        >>> for batch, labels in features.train(epoch=0): ...
    """

    sharded = True

    def __init__(
        self, backbone: nn.Module, train: TrainBatches, val: EvalBatches, dtype: torch.dtype | None
    ) -> None:
        self.backbone, self.dtype = backbone, dtype
        self.train_batches, self.val_batches, self.val_size = train, val, val.num_samples

    def __len__(self) -> int:
        return len(self.train_batches)

    def train(self, epoch: int) -> Iterator[Batch]:
        for images, labels in self.train_batches.epoch(epoch):
            yield backbone_features(self.backbone, images, self.dtype), labels

    def val(self) -> Iterator[Batch]:
        for images, labels in self.val_batches:
            yield backbone_features(self.backbone, images, self.dtype), labels


class CachedFeatures:
    """Features of un-augmented images, extracted once (faster; not the reference protocol).

    Every rank holds all of them (not ``sharded``), shuffled anew each epoch.

    Example:
        >>> features = CachedFeatures(backbone, train_plain, val_batches, env, 256, 0, None)
    """

    sharded = False

    def __init__(
        self,
        backbone: nn.Module,
        train: EvalBatches,
        val: EvalBatches,
        env: DistributedEnv,
        batch_size: int,
        seed: int,
        dtype: torch.dtype | None,
    ) -> None:
        self.train_x, self.train_y = extract_features(
            backbone, train, env, dtype=dtype, normalize=False
        )
        self.val_x, self.val_y = extract_features(backbone, val, env, dtype=dtype, normalize=False)
        self.batch_size, self.seed, self.val_size = batch_size, seed, len(self.val_y)

    def __len__(self) -> int:
        return -(-len(self.train_y) // self.batch_size)

    def train(self, epoch: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_y), generator=generator).to(self.train_y.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.train_x[index], self.train_y[index]

    def val(self) -> Iterator[Batch]:
        for start in range(0, self.val_size, self.batch_size):
            end = start + self.batch_size
            yield self.val_x[start:end], self.val_y[start:end]


FeatureSource = AugmentedFeatures | CachedFeatures
