"""MoCo pre-training checkpoints in: each format is a small key map onto a mocohub model.

This is the one place that knows the layout of MoCo checkpoints:

- a **mocohub run folder** (its newest ``checkpoint_*.pt``, else
  ``checkpoint_last.pt``) or one **mocohub training checkpoint** file: the
  ``model`` entry holds MoCo's state (``encoder_q.*``, ``encoder_k.*``,
  ``queue``, ``queue_ptr``) and ``config`` the run's settings (arch, image
  size, mean/std ...);
- a **reference MoCo v1/v2 checkpoint** (facebookresearch/moco
  ``main_moco.py``'s ``.pth.tar``): ``epoch``, ``arch`` (ResNet-50 when
  absent), ``state_dict`` with ``module.encoder_q.*``, ``module.encoder_k.*``,
  ``module.queue``, ``module.queue_ptr`` (the ``module.`` prefix may be
  missing) and ``optimizer``; trained with ImageNet's preprocessing (224 px
  crops of images resized to 256, ImageNet mean/std);
- a **reference MoCo v3 checkpoint** (facebookresearch/moco-v3
  ``main_moco.py``): ``epoch``, ``arch`` (``resnet50``, ``vit_small``,
  ``vit_base``), ``state_dict`` with ``module.base_encoder.*``,
  ``module.momentum_encoder.*`` and ``module.predictor.*``, ``optimizer``
  (LARS or AdamW over all of the model's parameters) and ``scaler`` (its
  GradScaler's state); the backbone is ``base_encoder.*`` minus its
  projector (a BN MLP, not kept): ``fc.*`` for a ResNet, ``head.*`` for a ViT
  (the keys that the reference's ``main_lincls.py`` and ``convert_to_deit.py``
  drop too). A ViT's keys are timm's, loaded strictly into
  :class:`~mocohub.vit.ViT` with ``num_classes=0``; its patch size, channels
  and image size are read from ``patch_embed.proj.weight`` and ``pos_embed``.
  Both with ImageNet's preprocessing (``main_lincls.py`` validates ViTs and
  ResNets with the same transform: resize 256, centre crop 224).

In the v1/v2 formats, the backbone is the query encoder, ``encoder_q.*`` minus its
projection head ``fc.*``: one Linear in v1 (``fc.weight``), an MLP in v2
(``fc.0.*``, ``fc.2.*``), which :func:`model_from_checkpoint` keeps on request.
Files are read with ``torch.load(weights_only=True)``, so reading one never
runs its code. Writing other libraries' layouts is :mod:`mocohub.foreign`'s job.

mocohub's own format (its keys, version and file names) is defined in
:mod:`mocohub.checkpoint_format`; this module, like ``mocohub.training``, reads
it from there. It must not import ``mocohub.training`` (``training/`` imports
from ``mocohub``, never the other way round).

Example:
    >>> model = model_from_checkpoint("moco_v2_800ep_pretrain.pth.tar")
    >>> model.mocohub_config.feature_dim, model.mocohub_config.preprocessing.image_size
    (2048, 224)
    >>> features = model(torch.randn(2, 3, 224, 224))  # 2 x 2048
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mocohub.artifact import VIT_SHAPES, Backbone, HeadConfig, ModelConfig, build_model
from mocohub.backbones import ARCHITECTURES
from mocohub.checkpoint_format import (
    check_format_version,
    find_latest_checkpoint,
    is_native_checkpoint,
    verify_checkpoint,
)
from mocohub.errors import InputError, MissingHeadError
from mocohub.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    eval_resize_size,
    per_channel,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "backbone_state_from_moco",
    "checkpoint_method",
    "find_checkpoint_file",
    "head_from_state",
    "is_reference_checkpoint",
    "moco_state_from_reference",
    "model_from_checkpoint",
    "optimizer_state_from_reference",
    "read_checkpoint",
]

_MOCO_KEYS = ("encoder_q.", "encoder_k.", "queue", "queue_ptr")
_QUERY_ENCODER = "encoder_q."
# MoCo v3 (facebookresearch/moco-v3 moco/builder.py): the trained network is base_encoder.
_V3_BASE_ENCODER = "base_encoder."
_V3_KEYS = (_V3_BASE_ENCODER, "momentum_encoder.", "predictor.")
_HEAD = "fc."
_VIT_HEAD = "head."


def find_checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file ``path`` names: itself, or a run folder's newest checkpoint.

    In a folder the newest ``checkpoint_{epoch}_{step}.pt`` wins (highest
    epoch, then step); without one, ``checkpoint_last.pt``.

    Example:
        >>> find_checkpoint_file("runs/fmnist")
        PosixPath('runs/fmnist/checkpoint_0200_00000000.pt')
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise InputError(f"No model at {path}; pass a mocohub run folder or a checkpoint file.")
    latest = find_latest_checkpoint(path)
    if latest is not None:
        return latest
    raise InputError(
        f"The folder {path} holds no checkpoint_*.pt and no model (config.json + "
        "model.safetensors); pass the run folder of a `mocohub train` run, a checkpoint "
        "file, or an artifact folder."
    )


def read_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """The object in a PyTorch checkpoint file, read safely (``weights_only=True``).

    A pickle that names any class or function beyond tensors and plain values
    (and so could run code) is refused with an :class:`~mocohub.errors.InputError`,
    and so is a zip checkpoint whose bytes fail their CRCs or are truncated
    (``torch.load`` alone would load damaged weights silently).

    Example:
        >>> read_checkpoint("moco_v2_800ep_pretrain.pth.tar")["arch"]
        'resnet50'
    """
    problem = verify_checkpoint(path)
    if problem is not None:
        raise InputError(
            f"{path} is damaged: {problem}; pass an earlier checkpoint of the run "
            "(or the run folder to `mocohub train --resume auto`, which skips damaged ones)."
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and unsafe:
            raise InputError(
                f"{path} holds a {unsafe[1]} object, which safe (weights_only) loading "
                "refuses because unpickling it could run code; use a checkpoint saved with "
                "tensors and plain values only."
            ) from e
        raise InputError(
            f"Cannot read {path} as a PyTorch checkpoint ({type(e).__name__}); "
            "it is truncated, corrupt or not a checkpoint, so pass another file."
        ) from e


def _state_method(state: Mapping[Any, Any]) -> str | None:
    """``"moco"`` (v1/v2) or ``"moco_v3"``: which MoCo a model state dict holds, by its keys
    (``module.`` stripped); None for anything else."""
    keys = [k.removeprefix("module.") for k in state if isinstance(k, str)]
    for method, prefixes in (("moco", _MOCO_KEYS), ("moco_v3", _V3_KEYS)):
        if all(any(k.startswith(p) for k in keys) for p in prefixes):
            return method
    return None


def checkpoint_method(ckpt: Any) -> str | None:
    """The MoCo a checkpoint trains, as ``TrainConfig.method`` names it, or None.

    ``"moco"`` for MoCo v1/v2 (``encoder_q``, ``encoder_k``, ``queue``,
    ``queue_ptr``), ``"moco_v3"`` for MoCo v3 (``base_encoder``,
    ``momentum_encoder``, ``predictor``), read from the keys of a mocohub
    checkpoint's ``model`` or a reference checkpoint's ``state_dict``; None for
    any other checkpoint (a detector's, say).

    Example:
        >>> checkpoint_method(read_checkpoint("r-50-100ep.pth.tar"))
        'moco_v3'
    """
    if not isinstance(ckpt, Mapping):
        return None
    state = ckpt.get("model") if is_native_checkpoint(ckpt) else ckpt.get("state_dict")
    return _state_method(state) if isinstance(state, Mapping) else None


def is_reference_checkpoint(ckpt: Any) -> bool:
    """True for a facebookresearch/moco or moco-v3 ``main_moco.py`` checkpoint.

    MoCo v1/v2: ``{'epoch', 'arch', 'state_dict', 'optimizer'}`` whose
    ``state_dict`` keys are ``module.encoder_q.*``, ``module.encoder_k.*``,
    ``module.queue`` and ``module.queue_ptr``. MoCo v3: ``{'epoch', 'arch',
    'state_dict', 'optimizer', 'scaler'}`` with ``module.base_encoder.*``,
    ``module.momentum_encoder.*`` and ``module.predictor.*``. The ``module.``
    prefix (a DDP model) may also be absent.

    Example:
        >>> is_reference_checkpoint(read_checkpoint("moco_v2_800ep_pretrain.pth.tar"))
        True
    """
    if not isinstance(ckpt, Mapping) or is_native_checkpoint(ckpt):
        return False
    state = ckpt.get("state_dict")
    return isinstance(state, Mapping) and _state_method(state) is not None


def moco_state_from_reference(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A reference checkpoint's model state_dict, ``module.`` stripped, for ``load_state_dict``.

    Build ``MoCo`` (v1/v2) with the reference run's ``arch``, ``dim``, ``K``
    and ``mlp``, or ``MoCoV3`` with its ``arch``, ``dim`` and ``mlp_dim``, and
    it loads strictly.

    Example:
        >>> model = MoCo(torchvision.models.resnet50, dim=128, K=65536, mlp=True)
        >>> model.load_state_dict(moco_state_from_reference(ckpt))
        <All keys matched successfully>
    """
    if not is_reference_checkpoint(ckpt):
        raise InputError(
            "This is not a reference MoCo checkpoint (its state_dict lacks encoder_q, "
            "encoder_k, queue and queue_ptr, or base_encoder, momentum_encoder and "
            "predictor); pass a main_moco.py checkpoint."
        )
    return {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}


def optimizer_state_from_reference(ckpt: Mapping[str, Any], num_params: int | None) -> Any:
    """A reference checkpoint's optimizer state, cut to ``encoder_q`` when the optimizer holds it.

    The reference optimizes ``model.parameters()``: in v1/v2 encoder_q's P
    tensors, then encoder_k's P, which never get a gradient and so have no
    state. An optimizer with one parameter group of ``num_params`` = P
    tensors (over ``encoder_q.parameters()``) takes the first P entries; any
    other shape (``num_params`` None: several groups) gets the state as it
    is. So does a v3 optimizer (LARS's ``mu``, AdamW's moments), which
    mocohub builds over ``model.parameters()`` as the reference does.

    Example:
        >>> optimizer.load_state_dict(optimizer_state_from_reference(ckpt, 62))
    """
    state = ckpt["optimizer"]
    try:
        (group,) = state["param_groups"]
        cut = num_params is not None and len(group["params"]) == 2 * num_params
        cut = cut and all(int(i) < num_params for i in state["state"])  # type: ignore[operator]
    except (KeyError, TypeError, ValueError):
        return state  # not the reference's shape: load_state_dict says what does not fit
    if not cut:
        return state
    kept = group["params"][:num_params]
    return {
        "state": {i: s for i, s in state["state"].items() if i in kept},
        "param_groups": [{**group, "params": kept}],
    }


def _query_encoder(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    encoder = {}
    for key, value in state.items():
        key = key.removeprefix(prefix)
        if key.startswith(_QUERY_ENCODER):
            encoder[key[len(_QUERY_ENCODER) :]] = value
    return encoder


def backbone_state_from_moco(
    state: Mapping[str, torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The backbone's state dict from a MoCo state dict: ``encoder_q.*`` minus ``fc.*``.

    ``prefix`` is stripped from every key first (``"module."`` for the
    reference code's DDP-wrapped model).

    Example:
        >>> state = {"module.encoder_q.conv1.weight": w, "module.encoder_q.fc.0.weight": h,
        ...          "module.encoder_k.conv1.weight": w, "module.queue": q}
        >>> list(backbone_state_from_moco(state, prefix="module."))
        ['conv1.weight']
    """
    return {k: v for k, v in _query_encoder(state, prefix).items() if not k.startswith(_HEAD)}


def head_from_state(state: Mapping[str, torch.Tensor]) -> HeadConfig | None:
    """The projection head an encoder's state dict holds: v1 Linear, v2 MLP, or None.

    Example:
        >>> head_from_state({"fc.0.weight": torch.zeros(2048, 2048),
        ...                  "fc.2.weight": torch.zeros(128, 2048)})
        HeadConfig(type='mlp', dim=128)
    """
    linear, last = state.get("fc.weight"), state.get("fc.2.weight")
    if isinstance(last, torch.Tensor) and "fc.0.weight" in state:
        return HeadConfig("mlp", int(last.shape[0]))
    if isinstance(linear, torch.Tensor) and linear.ndim == 2:
        return HeadConfig("linear", int(linear.shape[0]))
    return None


def _per_channel(values: Any, channels: int, what: str, path: Path) -> tuple[float, ...]:
    """The run's ``values`` (mean or std) for ``channels`` (see :func:`per_channel`)."""
    try:
        return per_channel(values, channels)
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise InputError(f"The config in {path} has no usable {what}; it is damaged.") from e


def _config_of(
    arch: str, encoder: Mapping[str, torch.Tensor], run: Mapping[str, Any], path: Path, what: str
) -> ModelConfig:
    """The ModelConfig of an encoder state dict: its shape from ``conv1`` (a ViT's from
    its patch projection and position embedding), its preprocessing from the run's
    settings (ImageNet's for reference checkpoints)."""
    if arch in VIT_SHAPES:
        return _vit_config_of(arch, encoder, run, path, what)
    if arch not in ARCHITECTURES:
        raise InputError(
            f"{path} holds a {arch!r} encoder, which mocohub cannot build; "
            f"it builds {', '.join([*ARCHITECTURES, *VIT_SHAPES])}."
        )
    conv1 = encoder.get("conv1.weight")
    if not isinstance(conv1, torch.Tensor) or conv1.ndim != 4:
        raise InputError(
            f"{path} is a {what} but its query encoder has no conv1.weight; "
            "it is not a ResNet MoCo checkpoint, so pass another file."
        )
    width, channels, kernel = int(conv1.shape[0]), int(conv1.shape[1]), int(conv1.shape[2])
    size = int(run.get("image_size", 224))
    mean = _per_channel(run.get("mean", IMAGENET_MEAN), channels, "mean", path)
    std = _per_channel(run.get("std", IMAGENET_STD), channels, "std", path)
    prep = Preprocessing(size, eval_resize_size(size), mean, std, channels=channels)
    return ModelConfig(arch, kernel == 3, channels, width, preprocessing=prep)


def _vit_config_of(
    arch: str, encoder: Mapping[str, torch.Tensor], run: Mapping[str, Any], path: Path, what: str
) -> ModelConfig:
    """A ViT's ModelConfig: patch size and channels from ``patch_embed.proj.weight``
    (width x channels x patch x patch), image size from ``pos_embed`` (1 + (S/patch)^2 tokens)."""
    proj, pos = encoder.get("patch_embed.proj.weight"), encoder.get("pos_embed")
    if not isinstance(proj, torch.Tensor) or proj.ndim != 4 or not isinstance(pos, torch.Tensor):
        raise InputError(
            f"{path} is a {what} of a {arch} but its encoder has no patch_embed.proj.weight "
            "or pos_embed; it is not a ViT checkpoint, so pass another file."
        )
    channels, patch = int(proj.shape[1]), int(proj.shape[2])
    side = round((pos.shape[1] - 1) ** 0.5)
    if pos.ndim != 3 or side * side != pos.shape[1] - 1:
        raise InputError(
            f"{path}: the position embedding of its {arch} has shape {tuple(pos.shape)}, not "
            "1 x (1 + n*n) x width for an n x n patch grid; the file is damaged."
        )
    size = side * patch
    mean = _per_channel(run.get("mean", IMAGENET_MEAN), channels, "mean", path)
    std = _per_channel(run.get("std", IMAGENET_STD), channels, "std", path)
    prep = Preprocessing(size, eval_resize_size(size), mean, std, channels=channels)
    return ModelConfig(
        arch, in_channels=channels, preprocessing=prep, image_size=size, patch_size=patch
    )


def _encoder_of(
    ckpt: Mapping[str, Any], file: Path
) -> tuple[str, dict[str, torch.Tensor], Mapping[str, Any], str]:
    """``(arch, query encoder state, run settings, format)`` of a checkpoint dict."""
    if is_native_checkpoint(ckpt):
        check_format_version(ckpt, file)
        state, run = ckpt.get("model"), ckpt.get("config")
        if not isinstance(state, Mapping) or not isinstance(run, Mapping):
            raise InputError(f"{file} lacks its model or config entry; it is damaged.")
        arch = str(run.get("arch", "resnet50"))
        if _is_v3_state(state):  # a MoCo v3 run: its base encoder, less the projector
            projector = _V3_BASE_ENCODER + (_VIT_HEAD if arch in VIT_SHAPES else _HEAD)
            backbone = {
                k[len(_V3_BASE_ENCODER) :]: v
                for k, v in state.items()
                if k.startswith(_V3_BASE_ENCODER) and not k.startswith(projector)
            }
            return arch, backbone, run, "mocohub"
        return arch, _query_encoder(state, ""), run, "mocohub"
    state = ckpt.get("state_dict")
    if isinstance(state, Mapping) and _is_v3_state(state):
        arch = str(ckpt.get("arch", "resnet50"))
        encoder = {
            k.removeprefix("module.")[len(_V3_BASE_ENCODER) :]: v
            for k, v in state.items()
            if k.removeprefix("module.").startswith(_V3_BASE_ENCODER)
        }
        # The v3 projector (a BN MLP: fc.* on a ResNet, head.* on a ViT, as main_lincls.py
        # and convert_to_deit.py drop it) is not a head mocohub builds: dropped.
        projector = _VIT_HEAD if arch in VIT_SHAPES else _HEAD
        encoder = {k: v for k, v in encoder.items() if not k.startswith(projector)}
        return arch, encoder, {}, "reference_v3"
    if not isinstance(state, Mapping) or not any(
        isinstance(k, str) and k.removeprefix("module.").startswith(_QUERY_ENCODER) for k in state
    ):
        raise InputError(
            f"{file} is neither a mocohub training checkpoint nor a reference MoCo "
            "checkpoint (no encoder_q or base_encoder weights); pass a file written by "
            "`mocohub train` or by the reference main_moco.py (MoCo v1/v2/v3)."
        )
    arch = str(ckpt.get("arch", "resnet50"))
    return arch, _query_encoder(state, "module."), {}, "reference"


def _is_v3_state(state: Mapping[Any, Any]) -> bool:
    """True for a MoCo v3 model's state (``base_encoder.*`` and ``momentum_encoder.*``)."""
    keys = [k.removeprefix("module.") for k in state if isinstance(k, str)]
    return any(k.startswith(_V3_BASE_ENCODER) for k in keys) and any(
        k.startswith("momentum_encoder.") for k in keys
    )


def _load_into(model: Backbone, state: Mapping[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = str(e).splitlines()[1:2] or [str(e)]
        arch = model.mocohub_config.arch
        raise InputError(
            f"The encoder in {path} does not fit a {arch} ({detail[0].strip()[:160]}); "
            "the checkpoint's arch is wrong or the file is damaged."
        ) from e


def model_from_checkpoint(path: str | os.PathLike[str], *, head: bool = False) -> Backbone:
    """The pre-trained query encoder of a MoCo checkpoint, config attached, in eval mode.

    ``path`` is a mocohub run folder, a mocohub training checkpoint, or a
    reference MoCo v1/v2 (or v3: ResNet or ViT) ``.pth.tar``. The model is a
    :class:`~mocohub.backbones.ResNet` on the CPU whose ``fc`` is
    ``nn.Identity()`` (pooled ``feature_dim`` features) or, with
    ``head=True``, the checkpoint's projection head; or, for a v3 ViT, a
    :class:`~mocohub.vit.ViT` without head (its class token). ``model.mocohub_config``
    holds the preprocessing it was trained with and, in ``meta``, ``format``
    (``"mocohub"``, ``"reference"`` or ``"reference_v3"``), ``source`` (the
    file read) and ``epochs``.

    Example:
        >>> model = model_from_checkpoint("runs/fmnist", head=True)
        >>> model.mocohub_config.head
        HeadConfig(type='mlp', dim=128)
    """
    file = find_checkpoint_file(path)
    ckpt = read_checkpoint(file)
    if not isinstance(ckpt, Mapping):
        raise InputError(
            f"{file} holds a {type(ckpt).__name__}, not a checkpoint dict; pass a mocohub "
            "training checkpoint or a reference MoCo .pth.tar."
        )
    arch, encoder, run, source = _encoder_of(ckpt, file)
    what = "mocohub checkpoint" if source == "mocohub" else "reference MoCo checkpoint"
    config = _config_of(arch, encoder, run, file, what)
    stored_head = None if config.is_vit else head_from_state(encoder)
    if head and config.is_vit:
        raise MissingHeadError(
            f"{file} is a {config.arch}: mocohub keeps no projection head on a ViT (MoCo v3's "
            "BN-MLP projector is dropped); load it with head=False for its class token."
        )
    if head and stored_head is None:
        raise MissingHeadError(
            f"{file} holds no projection head (fc.weight or fc.0/fc.2) in its query encoder; "
            "load it with head=False."
        )
    if not head:
        encoder = {k: v for k, v in encoder.items() if not k.startswith(_HEAD)}
    epoch = ckpt.get("epoch")
    meta = {
        "format": source,
        "source": str(file),
        "epochs": int(epoch) if isinstance(epoch, int) else None,
    }
    config = replace(config, head=stored_head if head else None, meta=meta)
    model = build_model(config)
    _load_into(model, encoder, file)
    return model
