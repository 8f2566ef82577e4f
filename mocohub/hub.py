"""``mocohub.load``: one call from a source to a ready backbone with its preprocessing.

Sources understood so far:

- a local artifact folder (``config.json`` + ``model.safetensors``);
- a local ``.safetensors`` file with ``config.json`` beside it;
- a mocohub training run folder or checkpoint, or a reference MoCo v1/v2
  ``.pth.tar`` (read with ``torch.load(weights_only=True)``).

Example:
    >>> model = mocohub.load("runs/fmnist")
    >>> prep = model.mocohub_config.preprocessing
    >>> features = model(prep.transform()(image).unsqueeze(0))
"""

from __future__ import annotations

import os
from pathlib import Path

from mocohub.backbones import ResNet
from mocohub.errors import InputError
from mocohub.models import CONFIG_NAME, WEIGHTS_NAME, ModelConfig, build_model, load_pretrained
from mocohub.preprocessing import Preprocessing

__all__ = ["load"]


def load(
    source: str | os.PathLike[str],
    *,
    pretrained: bool = True,
    head: bool = False,
) -> ResNet:
    """A MoCo backbone from ``source``, on the CPU in eval mode.

    Args:
        source: see the module docstring.
        pretrained: False builds the same architecture with random weights.
        head: keep the projection head as ``fc`` (the model then returns the
            MoCo embedding, e.g. 128-d) instead of ``nn.Identity()`` (pooled
            backbone features, 2048-d for ResNet-50).

    The returned model carries its :class:`~mocohub.models.ModelConfig` as
    ``model.mocohub_config``; its ``preprocessing.transform()`` is the matching
    evaluation transform.
    """
    path = Path(source)
    if path.is_dir() and (path / WEIGHTS_NAME).is_file():
        model = load_pretrained(path, head=head)
    elif path.is_file() and path.suffix == ".safetensors":
        if not (path.parent / CONFIG_NAME).is_file():
            raise InputError(
                f"{path} has no {CONFIG_NAME} beside it, so mocohub cannot tell its "
                "architecture; put the config next to it or load its folder."
            )
        model = load_pretrained(path.parent, head=head, weights_file=path)
    elif path.exists():
        model = _from_checkpoint(path, head=head)
    else:
        raise InputError(
            f"{source!s} is not a file or folder mocohub can load; pass a model folder "
            "(config.json + model.safetensors), a .safetensors file, a mocohub run folder "
            "or checkpoint, or a reference MoCo .pth.tar."
        )
    if not pretrained:
        return build_model(model.mocohub_config)
    return model


def _from_checkpoint(path: Path, *, head: bool) -> ResNet:
    from mocohub.convert import backbone_from_checkpoint

    if head:
        raise InputError(
            f"Loading the projection head straight from {path} is not supported yet; "
            "load it with head=False."
        )
    backbone, info = backbone_from_checkpoint(path)
    config = ModelConfig(
        arch=info["arch"],
        small_stem=info["small_stem"],
        in_channels=info["channels"],
        width=info["width"],
        preprocessing=Preprocessing(
            info["image_size"],
            info["resize_size"],
            tuple(info["mean"]),
            tuple(info["std"]),
            channels=info["channels"],
        ),
        meta={"source": info["checkpoint"], "format": info["format"], "epochs": info["epoch"]},
    )
    backbone.mocohub_config = config
    return backbone
