"""``mocohub.load``: one call from a source to a ready backbone with its preprocessing.

``source`` may be:

- a **registry name** (``mocohub list``), e.g. ``"moco_v2_r50_800ep"``: its file
  is downloaded once to the torch hub cache (or read from the HF cache, or from
  inside the package) and verified against the registry hash;
- ``"hf-hub:org/name[@revision]"``: a Hugging Face Hub repo with
  ``config.json`` + ``model.safetensors`` (cached in the HF cache);
- an ``http(s)://`` URL of a checkpoint (cached in the torch hub cache;
  verified when the URL is a registry file);
- a local artifact **folder** (``config.json`` + ``model.safetensors``), a
  ``.safetensors`` file with ``config.json`` beside it, a mocohub training
  run folder or checkpoint, or a **reference MoCo v1/v2** (or v3 ResNet)
  ``.pth.tar`` (with or without the ``module.`` prefix).

A registry weight set under a non-commercial licence (CC-BY-NC: MoCo v1/v2/v3's
published checkpoints) says so once per process, as a
:class:`NonCommercialWeightsWarning`, when its weights are loaded.

Pickled checkpoints are read with ``torch.load(weights_only=True)``; where a
weight set exists as safetensors and as a pickle, safetensors is used. Offline
(``MOCOHUB_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) only cached files are used.
Without a network a download fails at once (a short timeout, no retries) with
one :class:`~mocohub.download.NotAvailableError` that names the cache file and
how to supply it by hand.

Example:
    >>> model = mocohub.load("moco_v2_r50_800ep")
    >>> prep = model.mocohub_config.preprocessing
    >>> features = model(prep.transform()(image).unsqueeze(0))  # 1 x 2048
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import replace
from pathlib import Path

from mocohub.artifact import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Backbone,
    ModelConfig,
    build_model,
    load_pretrained,
)
from mocohub.errors import InputError
from mocohub.registry import HF_PREFIX, Weights, WeightsFile, get_weights, list_models

__all__ = ["NonCommercialWeightsWarning", "load"]


class NonCommercialWeightsWarning(UserWarning):
    """Loaded weights whose licence forbids commercial use (CC-BY-NC), said once per weight set.

    Silence it with ``warnings.simplefilter("ignore", NonCommercialWeightsWarning)``.
    """


_LICENCES_SAID: set[str] = set()


def _say_licence(weights: Weights) -> None:
    """Warn once per process that ``weights`` are for non-commercial use only, if they are."""
    licence = str(weights.meta.get("license", "")).lower()
    if "-nc" not in licence or weights.name in _LICENCES_SAID:
        return
    _LICENCES_SAID.add(weights.name)
    warnings.warn(
        f"{weights.name} is licensed {licence.upper()}: non-commercial use only "
        f"(see `mocohub info {weights.name}`).",
        NonCommercialWeightsWarning,
        stacklevel=4,  # the caller of mocohub.load (load -> _load_registered -> here)
    )


def load(
    source: str | os.PathLike[str],
    *,
    pretrained: bool = True,
    head: bool = False,
    progress: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Backbone:
    """A MoCo backbone from ``source``, on the CPU in eval mode.

    Args:
        source: see the module docstring.
        pretrained: False builds the same architecture with random weights
            (for a registry name, without downloading anything).
        head: keep the projection head as ``fc`` (the model then returns the
            MoCo embedding, e.g. 128-d) instead of ``nn.Identity()`` (pooled
            backbone features, 2048-d for ResNet-50).
        progress: show a progress bar while downloading.
        cache_dir: where URL downloads are kept; ``torch.hub.get_dir()/checkpoints``
            by default (Hub repos always use the Hugging Face cache).

    The returned model carries its :class:`~mocohub.artifact.ModelConfig` as
    ``model.mocohub_config``; its ``preprocessing.transform()`` is the matching
    evaluation transform.

    Example:
        >>> model = mocohub.load("hf-hub:org/moco-r50@v1", head=True)
        >>> model.mocohub_config.embedding_dim
        128
    """
    text = os.fspath(source)
    if text.startswith(HF_PREFIX):
        from mocohub.hf import from_pretrained

        return from_pretrained(text, head=head, pretrained=pretrained)
    if text.startswith(("https://", "http://")):
        model = _load_url(text, head, progress, cache_dir)
    elif Path(text).exists():
        model = _load_path(Path(text), head=head)
    else:
        try:
            weights = get_weights(text)
        except InputError:
            raise _unknown(text) from None
        if not pretrained:
            return build_model(weights.config(head).untrained())
        model = _load_registered(weights, head, progress, cache_dir)
    if not pretrained:
        return build_model(model.mocohub_config.untrained())
    return model


def _unknown(text: str) -> InputError:
    names = [w.name for w in list_models()]
    close = difflib.get_close_matches(text, names, n=2)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return InputError(
        f"{text} is not a file, folder, URL, hf-hub: repo or registered name{hint}; pass a "
        "model folder, a .safetensors or .pth.tar file, hf-hub:ORG/NAME, or a name from "
        "`mocohub list`."
    )


def _load_path(path: Path, *, head: bool, config: ModelConfig | None = None) -> Backbone:
    """The model in a local folder or file (safetensors first, then checkpoints).

    ``config`` (a registry entry's) describes a bare ``.safetensors`` file.
    """
    if path.is_dir() and (path / WEIGHTS_NAME).is_file():
        return load_pretrained(path, head=head)
    if path.is_file() and path.suffix == ".safetensors":
        if not (path.parent / CONFIG_NAME).is_file():
            if config is not None:
                return _load_bare_safetensors(path, config)
            raise InputError(
                f"{path} has no {CONFIG_NAME} beside it, so mocohub cannot tell its "
                "architecture; put the config next to it or load its folder."
            )
        return load_pretrained(path.parent, head=head, weights_file=path)
    from mocohub.convert import model_from_checkpoint

    return model_from_checkpoint(path, head=head)


def _load_bare_safetensors(path: Path, config: ModelConfig) -> Backbone:
    """The weights of a ``.safetensors`` file without config.json, shaped as ``config`` says."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path} is not a readable safetensors file ({e}).") from e
    if config.head is None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    model = build_model(config)
    try:
        model.load_state_dict(state, strict=True)  # copies float16 weights into float32
    except RuntimeError as e:
        detail = (str(e).splitlines()[1:2] or [str(e)])[0].strip()[:160]
        raise InputError(
            f"The weights in {path} do not fit the registered {config.meta.get('name')} "
            f"({detail}); the file or the registry entry is wrong."
        ) from e
    return model


def _load_url(
    url: str, head: bool, progress: bool, cache_dir: str | os.PathLike[str] | None
) -> Backbone:
    """A URL's checkpoint, verified and described by the registry when it is a registry file."""
    from mocohub.download import fetch_url

    for weights in list_models():
        for file in weights.files:
            if file.location == url:
                return _load_registered(weights, head, progress, cache_dir, only=file)
    path = fetch_url(url, directory=cache_dir, progress=progress)
    model = _load_path(path, head=head)
    config = model.mocohub_config
    model.mocohub_config = replace(config, meta={**config.meta, "source": url})
    return model


def _fetch(file: WeightsFile, progress: bool, cache_dir: str | os.PathLike[str] | None) -> Path:
    """The local path of one registered file (downloaded when needed) after its hash check."""
    from mocohub.download import NotAvailableError, check_hash, fetch_url

    if file.kind == "url":
        return fetch_url(file.location, hash=file.hash, directory=cache_dir, progress=progress)
    if file.kind == "hf-hub":
        from mocohub.hf import download_repo

        path = download_repo(file.location)
    else:
        path = file.local_path() or Path(file.location)
        if not path.exists():
            raise NotAvailableError(
                f"The weights at {file.location} are missing ({path} does not exist); "
                "reinstall mocohub or pass the weights' local path."
            )
    if file.hash is not None:
        checked = path / WEIGHTS_NAME if path.is_dir() else path
        check_hash(checked, file.hash, what=str(checked))
    return path


def _load_registered(
    weights: Weights,
    head: bool,
    progress: bool,
    cache_dir: str | os.PathLike[str] | None,
    only: WeightsFile | None = None,
) -> Backbone:
    """Registered weights from the first of their files that is available."""
    from mocohub.download import NotAvailableError

    expected = weights.config(head)  # raises when head=True but the weights have none
    missing: list[NotAvailableError] = []
    for file in [only] if only else weights.files_by_preference():
        try:
            path = _fetch(file, progress, cache_dir)
        except NotAvailableError as e:
            missing.append(e)
            continue
        model = _as_registered(_load_path(path, head=head, config=expected), expected, file)
        _say_licence(weights)
        return model
    if len(missing) == 1:
        raise missing[0]
    raise InputError(
        f"None of the {len(missing)} copies of {weights.name} can be had: "
        + " / ".join(str(e) for e in missing)
    )


def _as_registered(model: Backbone, expected: ModelConfig, file: WeightsFile) -> Backbone:
    """``model`` with the registry's config, after checking that the file is what it says."""
    got: ModelConfig = model.mocohub_config
    if got.network() != expected.network():
        found = ", ".join(f"{k}={v}" for k, v in got.network().items())
        raise InputError(
            f"{file.location} holds a model ({found}) other than the registered "
            f"{expected.meta['name']}; the file or the registry entry is wrong."
        )
    model.mocohub_config = replace(expected, meta={**expected.meta, "file": file.location})
    return model
