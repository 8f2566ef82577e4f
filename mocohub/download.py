"""Download a weights file once, verify it, keep it in the torch hub cache.

:func:`fetch_url` stores ``https://.../NAME`` as ``<torch hub dir>/checkpoints/NAME``
(the folder ``torch.hub.load_state_dict_from_url`` uses, so the two share
files), showing a progress bar. The bytes go to a hidden temporary file beside
it, are hashed as they arrive, and are renamed into place only when complete
and matching the expected hash: the cache never holds a partial or tampered
file under the real name. A cached file is verified again on every use.

Offline (``MOCOHUB_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) nothing is downloaded:
a cached file is used, a missing one is one clear error. Without a network a
download fails fast (a connection or a read that stalls for :data:`TIMEOUT`
seconds, no retries) with one error that says where to put the file by hand.

Example:
    >>> path = fetch_url("https://dl.fbaipublicfiles.com/moco/moco_checkpoints/"
    ...                  "moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar", hash="md5:a04e12f8")
    >>> path.name
    'moco_v2_800ep_pretrain.pth.tar'
"""

from __future__ import annotations

import hashlib
import http.client
import os
import posixpath
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mocohub.errors import InputError
from mocohub.fileio import atomic_writer

__all__ = [
    "OFFLINE_VARIABLES",
    "TIMEOUT",
    "NotAvailableError",
    "cache_dir",
    "check_hash",
    "fetch_url",
    "file_hash",
    "offline",
]

#: environment variables that forbid downloads when set to 1/true/yes/on
OFFLINE_VARIABLES = ("MOCOHUB_OFFLINE", "HF_HUB_OFFLINE")
#: seconds a connection (or a read during a download) may stall before it fails
TIMEOUT = 10.0
_CHUNK = 1 << 20


class NotAvailableError(InputError):
    """A file that cannot be had now: offline and not cached, or the download failed.

    Unlike a hash mismatch, another copy of the same weights may still be tried.
    """


def offline() -> str | None:
    """The ``NAME=value`` that switches downloads off, or None when they are allowed.

    Example:
        >>> os.environ["MOCOHUB_OFFLINE"] = "1"; offline()
        'MOCOHUB_OFFLINE=1'
    """
    for name in OFFLINE_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={value}"
    return None


def cache_dir() -> Path:
    """Where downloaded weights are kept: ``torch.hub.get_dir()/checkpoints``.

    ``TORCH_HOME`` (or ``torch.hub.set_dir``) moves it, as for torch.hub. Until
    ``torch.hub`` is imported (``set_dir`` needs it) the folder is torch's default,
    found from the environment as ``get_dir`` finds it, so ``mocohub list`` and
    ``info`` need not import torch.
    """
    hub = sys.modules.get("torch.hub")
    if hub is not None:
        return Path(hub.get_dir()) / "checkpoints"
    home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def file_hash(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """The hex digest of a file's content (``"md5"`` or ``"sha256"``)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _split(expected: str) -> tuple[str, str]:
    algorithm, _, prefix = expected.partition(":")
    if algorithm not in ("md5", "sha256") or len(prefix) < 8:
        raise InputError(
            f"Cannot check against the hash {expected!r}; give 'md5:<hex>' or 'sha256:<hex>' "
            "with at least 8 hex digits."
        )
    return algorithm, prefix.lower()


def check_hash(path: str | os.PathLike[str], expected: str, what: str | None = None) -> None:
    """Raise an :class:`~mocohub.errors.InputError` unless ``path``'s digest starts as ``expected``.

    ``expected`` is ``"md5:<hex prefix>"`` or ``"sha256:<hex prefix>"``.

    Example:
        >>> check_hash("moco_v2_800ep_pretrain.pth.tar", "md5:a04e12f8")
    """
    algorithm, prefix = _split(expected)
    actual = file_hash(path, algorithm)
    if not actual.startswith(prefix):
        raise InputError(
            f"{what or path} has {algorithm} {actual[: max(len(prefix), 12)]}, not {prefix} as "
            f"expected: it is corrupt or was tampered with, so mocohub refuses it; delete {path} "
            "and download it again."
        )


def fetch_url(
    url: str,
    *,
    hash: str | None = None,
    directory: str | os.PathLike[str] | None = None,
    progress: bool = True,
    file_name: str | None = None,
) -> Path:
    """The local copy of ``url``: from the cache, else downloaded, verified and cached.

    Args:
        url: an ``http://`` or ``https://`` URL.
        hash: ``"md5:<hex prefix>"`` / ``"sha256:<hex prefix>"`` the file must
            match (checked on download and on every cache hit), or None.
        directory: the cache folder; :func:`cache_dir` by default.
        progress: show a progress bar (on stderr) while downloading.
        file_name: the cached file's name; the URL's last path part by default.

    Example:
        >>> fetch_url("http://127.0.0.1:8000/w.pth.tar", hash="sha256:0123abcd", progress=False)
        PosixPath('/root/.cache/torch/hub/checkpoints/w.pth.tar')
    """
    name = file_name or posixpath.basename(urllib.parse.urlparse(url).path)
    if not name or name in (".", ".."):
        raise InputError(f"{url} does not end in a file name; pass the URL of a weights file.")
    folder = Path(directory) if directory is not None else cache_dir()
    target = folder / name
    if target.is_file():
        if hash is not None:
            check_hash(target, hash, what=f"The cached copy of {url}")
        return target
    switch = offline()
    if switch:
        raise NotAvailableError(
            f"{switch} forbids downloads and {name} is not in the cache ({folder}); put the "
            f"file there, pass its local path instead, or unset {switch.split('=')[0]} to "
            f"download {url}."
        )
    _download(url, target, hash, progress)
    return target


def _download(url: str, target: Path, expected: str | None, progress: bool) -> None:
    from mocohub import __version__

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        progress = False
    algorithm, prefix = _split(expected) if expected else ("sha256", "")
    digest = hashlib.new(algorithm)
    request = urllib.request.Request(url, headers={"User-Agent": f"mocohub/{__version__}"})
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = (
                tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name)
                if progress
                else None
            )
            received = 0
            try:
                with atomic_writer(target) as f:
                    while chunk := response.read(_CHUNK):
                        f.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                    if total is not None and received != total:
                        raise NotAvailableError(
                            f"The download of {url} stopped early; try again, or fetch the file "
                            "yourself and pass its local path."
                        )
                    actual = digest.hexdigest()
                    if expected and not actual.startswith(prefix):
                        # Raising inside the writer removes the temporary file.
                        raise InputError(
                            f"The download of {url} has {algorithm} {actual[:12]}, not {prefix} "
                            "as expected: it is corrupt or was tampered with, so it was not "
                            "cached; try again later, or check the source of the file."
                        )
            finally:
                if bar is not None:
                    bar.close()
    except urllib.error.HTTPError as e:
        raise NotAvailableError(
            f"Cannot download {url}: the server answered {e.code} {e.reason}; check the URL, "
            f"or fetch the file yourself and put it at {target} (or pass its local path)."
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", None) or e
        raise NotAvailableError(
            f"Cannot download {url} ({reason}). Check the network; or download the file on a "
            f"machine that has one and put it at {target} (the cache mocohub reads first), or "
            "pass its local path instead. MOCOHUB_OFFLINE=1 (or HF_HUB_OFFLINE=1) uses cached "
            "files only, without trying the network."
        ) from None
