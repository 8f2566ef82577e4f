"""mocohub models on the Hugging Face Hub: save_pretrained, from_pretrained, push_to_hub.

A Hub repo of a mocohub model holds the same files as a local artifact folder
(:func:`mocohub.models.save_pretrained`): ``model.safetensors``,
``config.json`` (architecture, preprocessing, meta) and ``README.md`` (the
model card, :func:`mocohub.card.model_card`). huggingface_hub's
``PyTorchModelHubMixin`` would need the models to be its subclasses and would
store constructor arguments as the config; these functions instead keep
mocohub's plain torchvision ResNets and ``ModelConfig`` and use the Hub's file
API (``hf_hub_download`` into the HF cache, ``HfApi.upload_folder``).

Offline (``HF_HUB_OFFLINE=1`` or ``MOCOHUB_OFFLINE=1``) only the HF cache
(``HF_HOME``/``HF_HUB_CACHE``) is read.

Example:
    >>> save_pretrained(model, "out/moco-r18")           # config.json, model.safetensors, README.md
    >>> push_to_hub("out/moco-r18", "me/moco-r18")        # needs `hf auth login` or HF_TOKEN
    >>> model = from_pretrained("hf-hub:me/moco-r18@main")
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from mocohub.backbones import ResNet
from mocohub.card import model_card
from mocohub.download import NotAvailableError, offline
from mocohub.errors import InputError, MissingHeadError
from mocohub.fileio import atomic_write_text
from mocohub.models import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelConfig,
    build_model,
    get_config,
    load_pretrained,
    read_config,
)
from mocohub.models import save_pretrained as _save_files

__all__ = [
    "CARD_NAME",
    "HF_PREFIX",
    "download_repo",
    "from_pretrained",
    "parse_repo",
    "push_to_hub",
    "save_pretrained",
]

HF_PREFIX = "hf-hub:"
CARD_NAME = "README.md"
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def parse_repo(source: str) -> tuple[str, str | None]:
    """``(repo_id, revision)`` of ``"hf-hub:org/name[@revision]"`` (the prefix is optional).

    Example:
        >>> parse_repo("hf-hub:org/moco-r50@v1.0")
        ('org/moco-r50', 'v1.0')
    """
    repo, _, revision = source.removeprefix(HF_PREFIX).partition("@")
    if not _REPO_ID.fullmatch(repo) or (revision == "" and "@" in source):
        raise InputError(
            f"{source!r} is not a Hub repo; write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION."
        )
    return repo, revision or None


def _cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def download_repo(source: str, *, weights: bool = True) -> Path:
    """The HF-cache folder holding ``config.json`` (and ``model.safetensors``) of a Hub repo.

    Files already in the cache are not downloaded again; offline, only the
    cache is read. ``weights=False`` fetches the config alone.

    Example:
        >>> download_repo("hf-hub:org/moco-r50")
        PosixPath('/root/.cache/huggingface/hub/models--org--moco-r50/snapshots/3f2a.../')
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from mocohub import __version__

    repo_id, revision = parse_repo(source)
    where = f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")
    switch = offline()
    files = [CONFIG_NAME, WEIGHTS_NAME] if weights else [CONFIG_NAME]
    paths = []
    for name in files:
        try:
            paths.append(
                hf_hub_download(
                    repo_id,
                    name,
                    revision=revision,
                    local_files_only=switch is not None,
                    library_name="mocohub",
                    library_version=__version__,
                )
            )
        except LocalEntryNotFoundError as e:
            if switch:
                raise NotAvailableError(
                    f"{switch} forbids downloads and {name} of {where} is not in the Hugging "
                    f"Face cache ({_cache()}); download it there on a connected machine (or set "
                    f"HF_HOME to a cache that has it), pass a local model folder instead, or "
                    f"unset {switch.split('=')[0]}."
                ) from e
            raise NotAvailableError(
                f"Cannot reach the Hugging Face Hub for {name} of {where} and it is not in "
                f"the cache ({_cache()}); check the network, or pass a local model folder."
            ) from e
        except RepositoryNotFoundError as e:
            raise InputError(
                f"The Hub has no repo {repo_id} (or it is private); check the name, or log in "
                "with `hf auth login` / HF_TOKEN for a private repo."
            ) from e
        except RevisionNotFoundError as e:
            raise InputError(
                f"The Hub repo {repo_id} has no revision {revision!r}; pass a branch, tag or "
                "commit it has."
            ) from e
        except EntryNotFoundError as e:
            raise InputError(
                f"{where} has no {name}, so it is not a mocohub model; publish it with "
                "`mocohub push` (config.json + model.safetensors)."
            ) from e
        except (HfHubHTTPError, HFValidationError) as e:
            reason = str(e).splitlines()[0][:160]
            raise InputError(f"Cannot fetch {name} of {where} ({reason}).") from e
    return Path(paths[0]).parent


def from_pretrained(
    source: str,
    *,
    revision: str | None = None,
    head: bool = False,
    pretrained: bool = True,
) -> ResNet:
    """The mocohub model in a Hub repo (``"org/name"`` or ``"hf-hub:org/name[@rev]"``).

    Args:
        source: the repo, optionally with its revision after ``@``.
        revision: a branch, tag or commit (overrides one given in ``source``).
        head: keep the stored projection head as ``fc``.
        pretrained: False fetches only ``config.json`` and returns random weights.

    Example:
        >>> model = from_pretrained("hf-hub:org/moco-r50")
        >>> model.mocohub_config.preprocessing.image_size
        224
    """
    repo_id, stated = parse_repo(source)
    where = f"{HF_PREFIX}{repo_id}" + (f"@{revision or stated}" if revision or stated else "")
    folder = download_repo(where, weights=pretrained)
    if not pretrained:
        config = read_config(folder)
        if head and config.head is None:
            raise MissingHeadError(f"{where} holds no projection head; load it with head=False.")
        return build_model(config if head else config.without_head())
    model = load_pretrained(folder, head=head)
    config = model.mocohub_config
    model.mocohub_config = replace(config, meta={**config.meta, "hub_repo": where})
    return model


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    config: ModelConfig | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the artifact folder: ``model.safetensors``, ``config.json`` and a ``README.md`` card.

    Every file is written atomically (see :func:`mocohub.models.save_pretrained`).
    ``repo_id`` fills the card's loading example.

    Example:
        >>> save_pretrained(mocohub.load("moco_v2_r50_800ep"), "out/moco-v2-800ep")
        PosixPath('out/moco-v2-800ep')
    """
    config = config or get_config(model)
    params = sum(p.numel() for p in model.parameters())
    card = model_card(config, repo_id=repo_id, num_params=params)
    return _save_files(model, directory, config=config, extra_files={CARD_NAME: card})


def push_to_hub(
    model_or_folder: nn.Module | str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Publish a model (or an artifact folder) as the Hub repo ``repo_id``; return the commit URL.

    The repo is created when missing. Only ``config.json``,
    ``model.safetensors`` and ``README.md`` are uploaded; a folder without a
    card gets one written first. Needs a token: ``hf auth login``, ``HF_TOKEN``
    or ``token``.

    Example:
        >>> push_to_hub("out/moco-v2-800ep", "me/moco-v2-r50-800ep")
        'https://huggingface.co/me/moco-v2-r50-800ep/commit/...'
    """
    import tempfile

    parse_repo(repo_id)
    if isinstance(model_or_folder, nn.Module):
        with tempfile.TemporaryDirectory(prefix="mocohub-push-") as tmp:
            save_pretrained(model_or_folder, tmp, repo_id=repo_id)
            return _upload(Path(tmp), repo_id, private, revision, commit_message, token)
    folder = Path(model_or_folder)
    config = read_config(folder)  # a clear error for anything but an artifact folder
    if not (folder / WEIGHTS_NAME).is_file():
        raise InputError(
            f"{folder} has no {WEIGHTS_NAME}; push a folder written by `mocohub convert` or "
            "save_pretrained."
        )
    if not (folder / CARD_NAME).is_file():
        atomic_write_text(folder / CARD_NAME, model_card(config, repo_id=repo_id))
    return _upload(folder, repo_id, private, revision, commit_message, token)


def _upload(
    folder: Path,
    repo_id: str,
    private: bool | None,
    revision: str | None,
    message: str | None,
    token: str | None,
) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api: Any = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
            commit_message=message or "Upload mocohub model",
            revision=revision,
        )
    except (HfHubHTTPError, LocalTokenNotFoundError, OSError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise InputError(
            f"Cannot push to the Hub repo {repo_id} ({reason}); log in with `hf auth login` or "
            "set HF_TOKEN, and check that you may write to that repo."
        ) from e
    return str(getattr(info, "commit_url", info))
