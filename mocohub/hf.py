"""mocohub models on the Hugging Face Hub: save_pretrained, from_pretrained, push_to_hub.

A Hub repo of a mocohub model holds the same files as a local artifact folder
(:func:`mocohub.artifact.save_pretrained`): ``model.safetensors``,
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
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from mocohub.artifact import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Backbone,
    ModelConfig,
    build_model,
    get_config,
    load_pretrained,
    read_config,
)
from mocohub.artifact import save_pretrained as _save_files
from mocohub.card import model_card
from mocohub.download import NotAvailableError, offline
from mocohub.errors import InputError, MissingHeadError
from mocohub.fileio import atomic_write_text
from mocohub.registry import HF_PREFIX

__all__ = [
    "CARD_NAME",
    "CONNECT_TIMEOUT",
    "HF_PREFIX",
    "download_repo",
    "for_publishing",
    "from_pretrained",
    "is_artifact_folder",
    "network_errors",
    "parse_repo",
    "push_to_hub",
    "save_pretrained",
]

CARD_NAME = "README.md"
#: seconds to wait for the Hub to answer before it counts as unreachable
CONNECT_TIMEOUT = 10.0
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
# (module, class) of the transport errors of the HTTP clients huggingface_hub has used
_CLIENT_ERRORS = (
    ("httpx2", "TransportError"),
    ("httpx", "TransportError"),
    ("requests", "ConnectionError"),
    ("requests", "Timeout"),
)


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


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the Hub cannot be reached at all.

    Its HTTP client's transport errors (``httpx2`` in huggingface_hub 2.x,
    ``httpx`` in 1.x, ``requests`` in 0.x: whichever it imported) and the
    built-in connection and timeout errors; not the Hub's HTTP answers.

    Example:
        >>> try:
        ...     download_repo("hf-hub:org/moco-r50")
        ... except network_errors():
        ...     print("no network")
    """
    import huggingface_hub  # noqa: F401  (imports its HTTP client)

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in _CLIENT_ERRORS:
        found = getattr(sys.modules.get(module), name, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            errors.append(found)
    return tuple(errors)


def _reason(error: BaseException) -> str:
    """The first line of an error's message (its type when it has none), shortened."""
    text = str(error).strip().splitlines()
    return text[0][:160] if text else type(error).__name__


def _unreachable(repo_id: str, name: str, revision: str | None) -> str | None:
    """Why the Hub cannot serve ``name`` of ``repo_id`` now, or None when it answers.

    One HEAD request with a short timeout and no retry: huggingface_hub itself
    retries a failed connection five times with back-off (about 25 s) before it
    falls back to its cache. Answers other than a server error (a missing repo,
    say) are left for ``hf_hub_download`` to report.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    url = hf_hub_url(repo_id, name, revision=revision)
    try:
        get_hf_file_metadata(url, timeout=CONNECT_TIMEOUT)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return f"{_endpoint()} answered {status}"
        return None
    except network_errors() as e:
        return f"{_endpoint()}: {_reason(e)}"
    return None


def download_repo(source: str, *, weights: bool = True) -> Path:
    """The HF-cache folder holding ``config.json`` (and ``model.safetensors``) of a Hub repo.

    Files already in the cache are not downloaded again; offline, only the
    cache is read. When the Hub cannot be reached (checked once, with a
    ``CONNECT_TIMEOUT`` and no retries) the cache is used, and a file missing
    from it is one :class:`~mocohub.download.NotAvailableError` saying what to
    do. ``weights=False`` fetches the config alone.

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
    unreachable = None if switch else _unreachable(repo_id, files[0], revision)
    paths = []
    for name in files:
        try:
            paths.append(
                hf_hub_download(
                    repo_id,
                    name,
                    revision=revision,
                    local_files_only=bool(switch or unreachable),
                    library_name="mocohub",
                    library_version=__version__,
                )
            )
        except LocalEntryNotFoundError:
            if switch:
                raise NotAvailableError(
                    f"{switch} forbids downloads and {name} of {where} is not in the Hugging "
                    f"Face cache ({_cache()}); download it there on a connected machine (or set "
                    f"HF_HOME to a cache that has it), pass a local model folder instead, or "
                    f"unset {switch.split('=')[0]}."
                ) from None
            raise NotAvailableError(
                f"Cannot reach the Hugging Face Hub ({unreachable or 'the connection failed'}) "
                f"and {name} of {where} is not in its cache ({_cache()}). Check the network "
                f"(and HF_ENDPOINT); or download the repo on a connected machine (`hf download "
                f"{repo_id}`) and copy its cache here or set HF_HOME to it, or pass a local model "
                "folder (config.json + model.safetensors). HF_HUB_OFFLINE=1 (or "
                "MOCOHUB_OFFLINE=1) reads the cache only, without trying the network."
            ) from None
        except RepositoryNotFoundError:
            raise InputError(
                f"The Hub has no repo {repo_id} (or it is private); check the name, or log in "
                "with `hf auth login` / HF_TOKEN for a private repo."
            ) from None
        except RevisionNotFoundError:
            raise InputError(
                f"The Hub repo {repo_id} has no revision {revision!r}; pass a branch, tag or "
                "commit it has."
            ) from None
        except EntryNotFoundError:
            raise InputError(
                f"{where} has no {name}, so it is not a mocohub model; publish it with "
                "`mocohub push` (config.json + model.safetensors)."
            ) from None
        except (HfHubHTTPError, HFValidationError) as e:
            raise InputError(f"Cannot fetch {name} of {where} ({_reason(e)}).") from None
        except network_errors() as e:
            raise NotAvailableError(
                f"The download of {name} of {where} from {_endpoint()} failed ({_reason(e)}); "
                "try again, or pass a local model folder (config.json + model.safetensors)."
            ) from None
    return Path(paths[0]).parent


def from_pretrained(
    source: str,
    *,
    revision: str | None = None,
    head: bool = False,
    pretrained: bool = True,
) -> Backbone:
    """The mocohub model in a Hub repo (``"org/name"`` or ``"hf-hub:org/name[@rev]"``),
    or in a local folder that :func:`save_pretrained` wrote.

    Args:
        source: the repo, optionally with its revision after ``@``; or a folder.
        revision: a branch, tag or commit (overrides one given in ``source``).
        head: keep the stored projection head as ``fc``.
        pretrained: False fetches only ``config.json`` and returns random weights.

    Example:
        >>> model = from_pretrained("hf-hub:org/moco-r50")
        >>> model.mocohub_config.preprocessing.image_size
        224
    """
    if os.path.isdir(source) and revision is None:  # as transformers' from_pretrained does
        folder, where = Path(source), str(source)
    else:
        repo_id, stated = parse_repo(source)
        where = f"{HF_PREFIX}{repo_id}" + (f"@{revision or stated}" if revision or stated else "")
        folder = download_repo(where, weights=pretrained)
    if not pretrained:
        config = read_config(folder)
        if head and config.head is None:
            raise MissingHeadError(f"{where} holds no projection head; load it with head=False.")
        config = replace(config, meta={**config.meta, "hub_repo": where})
        return build_model((config if head else config.without_head()).untrained())
    model = load_pretrained(folder, head=head)
    config = model.mocohub_config
    if where.startswith(HF_PREFIX):
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

    Every file is written atomically (see :func:`mocohub.artifact.save_pretrained`).
    ``repo_id`` fills the card's loading example.

    Example:
        >>> save_pretrained(mocohub.load("moco_v2_r50_800ep"), "out/moco-v2-800ep")
        PosixPath('out/moco-v2-800ep')
    """
    config = config or get_config(model)
    params = sum(p.numel() for p in model.parameters())
    card = model_card(config, repo_id=repo_id, num_params=params)
    return _save_files(model, directory, config=config, extra_files={CARD_NAME: card})


def is_artifact_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding ``model.safetensors`` (an artifact folder)."""
    return (Path(path) / WEIGHTS_NAME).is_file()


def for_publishing(
    model: Backbone, source: str | os.PathLike[str], name: str | None = None
) -> Backbone:
    """``model`` with the meta of a published artifact: no paths of this machine.

    A ``source`` path in the meta becomes its file name (a local path means
    nothing on another machine), ``converted_from`` records what was converted
    (a local ``source`` by its name), and ``name`` (if given) names the model.

    Example:
        >>> model = for_publishing(mocohub.load("runs/fm"), "runs/fm", name="moco-fm")
        >>> model.mocohub_config.meta["converted_from"], model.mocohub_config.meta["name"]
        ('fm', 'moco-fm')
    """
    config = get_config(model)
    meta = dict(config.meta)
    stated = meta.get("source")
    if isinstance(stated, str) and Path(stated).exists():
        meta["source"] = Path(stated).name
    text = os.fspath(source)
    meta.setdefault("converted_from", Path(text).name if Path(text).exists() else text)
    if name:
        meta["name"] = name
    model.mocohub_config = replace(config, meta=meta)
    return model


def push_to_hub(
    model_or_folder: nn.Module | str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Publish a model (or a folder) as the Hub repo ``repo_id``; return the commit URL.

    ``model_or_folder`` is a model :func:`mocohub.load` returned, an artifact
    folder (``mocohub convert``, :func:`save_pretrained`), or a local source
    that is converted on the fly: a mocohub run folder or checkpoint, a
    reference ``.pth.tar`` (the backbone, without its head; run ``mocohub
    convert --head`` first to publish the head). The repo is created when
    missing. Only ``config.json``, ``model.safetensors`` and ``README.md`` are
    uploaded; a folder without a card gets one written first. Needs a token
    (``hf auth login``, ``HF_TOKEN`` or ``token``) and the network: offline
    (``HF_HUB_OFFLINE=1`` or ``MOCOHUB_OFFLINE=1``) it refuses at once.

    Example:
        >>> push_to_hub("out/moco-v2-800ep", "me/moco-v2-r50-800ep")
        'https://huggingface.co/me/moco-v2-r50-800ep/commit/...'
        >>> push_to_hub("runs/fm", "me/moco-fm")  # a training run: converted on the fly
    """
    import tempfile

    parse_repo(repo_id)
    if not isinstance(model_or_folder, nn.Module) and not is_artifact_folder(model_or_folder):
        model_or_folder = _converted(Path(model_or_folder))
    if isinstance(model_or_folder, nn.Module):
        get_config(model_or_folder)  # a clear error before anything is written
        _refuse_offline(repo_id)
        with tempfile.TemporaryDirectory(prefix="mocohub-push-") as tmp:
            save_pretrained(model_or_folder, tmp, repo_id=repo_id)
            return _upload(Path(tmp), repo_id, private, revision, commit_message, token)
    folder = Path(model_or_folder)
    config = read_config(folder)  # a clear error for a damaged config.json
    _refuse_offline(repo_id)
    if not (folder / CARD_NAME).is_file():
        atomic_write_text(folder / CARD_NAME, model_card(config, repo_id=repo_id))
    return _upload(folder, repo_id, private, revision, commit_message, token)


def _converted(path: Path) -> nn.Module:
    """The model in a local source that is not an artifact folder, ready to publish."""
    from mocohub.loading import load

    if not path.exists():
        raise InputError(
            f"{path} does not exist; push an artifact folder written by `mocohub convert`, a "
            "`mocohub train` run folder or checkpoint, or a reference MoCo .pth.tar."
        )
    return for_publishing(load(path), path)


def _refuse_offline(repo_id: str) -> None:
    switch = offline()
    if switch:
        variable = switch.split("=")[0]
        raise NotAvailableError(
            f"{switch} is set (offline mode), so nothing can be pushed to {repo_id}; run the "
            f"command with the network and {variable} unset (`unset {variable}`, or "
            f"`{variable}=0 mocohub push ...`)."
        )


def _upload(
    folder: Path,
    repo_id: str,
    private: bool | None,
    revision: str | None,
    message: str | None,
    token: str | None,
) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
    )

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
    except OfflineModeIsEnabled:
        raise NotAvailableError(
            f"huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when it was imported), "
            f"so nothing can be pushed to {repo_id}; run the command again without "
            "HF_HUB_OFFLINE."
        ) from None
    except (HfHubHTTPError, LocalTokenNotFoundError) as e:
        raise InputError(
            f"Cannot push to the Hub repo {repo_id} ({_reason(e)}); log in with `hf auth login` "
            "or set HF_TOKEN, and check that you may write to that repo."
        ) from None
    except network_errors() as e:
        raise NotAvailableError(
            f"Cannot reach the Hugging Face Hub at {_endpoint()} to push to {repo_id} "
            f"({_reason(e)}); check the network (and HF_ENDPOINT), then push again."
        ) from None
    except OSError as e:
        raise InputError(f"Cannot push {folder} to {repo_id} ({_reason(e)}).") from None
    return str(getattr(info, "commit_url", info))
