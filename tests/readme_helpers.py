"""Tiny stand-ins for the data a README reader has, and the README's commands.

The README walkthrough (``tests/test_readme.py``) runs every command and
snippet of README.md as a user types it; only the data is replaced by tiny
files shaped as a user's would be:

- ``imagenet/``: an ImageFolder tree with ``train/`` and ``val/`` (JPEG and
  PNG), or without split folders (:func:`image_folder`);
- ``fashion-mnist``: a folder of MNIST-format IDX files, gzipped as Debian and
  the MNIST mirrors ship them (:func:`idx_folder`);
- a folder of same-size images with a ``labels.csv`` (:func:`labels_csv_folder`);
- ``photos/``: a few JPEG and PNG photos, one in a sub-folder (:func:`photos`);
- ``ref.pth.tar``: a MoCo v2 checkpoint exactly as the reference ``main_moco.py``
  saves it, of a narrow ResNet-18 (:func:`write_reference_checkpoint`);
- ``hf-hub:org/name@v1``: a Hugging Face cache laid out as after a download of
  tag ``v1`` (:func:`fill_hf_cache`).

:func:`user_data` makes them all in one folder (:class:`UserData`). The runners
run a command line as ``mocohub`` would: in this process (:func:`mocohub`), as
its own process (:func:`start`, :func:`finish`), or a launcher that starts its
workers as processes (:func:`launch_here`).

Example:
    >>> readme_commands(Path("README.md").read_text())[0]
    'pip install -e . && python examples/quickstart.py'
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hub_helpers import reference_checkpoint, reference_encoder
from PIL import Image

__all__ = [
    "HF_COMMIT",
    "REFERENCE",
    "Result",
    "UserData",
    "environment",
    "fill_hf_cache",
    "finish",
    "free_ports",
    "idx_folder",
    "image_folder",
    "labels_csv_folder",
    "launch_here",
    "mocohub",
    "normalise_command",
    "ok",
    "photos",
    "readme_commands",
    "readme_python_blocks",
    "run_python",
    "start",
    "user_data",
    "write_reference_checkpoint",
]

ROOT = Path(__file__).resolve().parents[1]
#: the file name of the reference MoCo v2 800-epoch release, as the README uses it
REFERENCE = "moco_v2_800ep_pretrain.pth.tar"

HF_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
CLASSES = ("cat", "dog")


def _image(rng: np.random.Generator, size: int, label: int, channels: int = 3) -> Image.Image:
    """A random image whose brightness depends on its class (so classes differ a little)."""
    base = rng.integers(0, 128, size=(size, size, channels), dtype=np.uint8)
    array = base + np.uint8(100 * label)
    return Image.fromarray(array[..., 0] if channels == 1 else array)


def image_folder(root: Path, *, splits: bool, per_class: int = 4, size: int = 24) -> Path:
    """An ImageFolder tree: ``root/{train,val}/<class>/`` (``splits``) or ``root/<class>/``.

    Half the images are JPEG and half PNG, in two classes.
    """
    rng = np.random.default_rng(0)
    for split in ("train", "val") if splits else ("",):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                suffix = "jpg" if i % 2 else "png"
                _image(rng, size, label).save(folder / f"{name}_{i:03d}.{suffix}")
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    """One MNIST-format IDX file (uint8), gzipped: magic 00 00 08 <dims>, big-endian sizes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def idx_folder(root: Path, *, train: int = 16, val: int = 8, size: int = 28) -> Path:
    """A folder of Fashion-MNIST-style IDX files: ``train-*`` and ``t10k-*``, 10 classes."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for prefix, count in (("train", train), ("t10k", val)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 128, size=(count, size, size)) + 12 * labels[:, None, None]
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def labels_csv_folder(root: Path, *, count: int = 8, size: int = 24) -> Path:
    """A flat folder of same-size RGB PNGs listed in ``labels.csv`` (file,label,class)."""
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    rows = ["file,label,class"]
    for i in range(count):
        label = i % 2
        _image(rng, size, label).save(root / f"{i:03d}.png")
        rows.append(f"{i:03d}.png,{label},{CLASSES[label]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def photos(root: Path) -> Path:
    """A user's photo folder: JPEGs and PNGs of different sizes, one in a sub-folder."""
    rng = np.random.default_rng(3)
    (root / "holiday").mkdir(parents=True)
    sizes = [(40, 30), (32, 32), (28, 36), (48, 40), (30, 30), (36, 28)]
    for i, (width, height) in enumerate(sizes):
        array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        folder = root / "holiday" if i == 5 else root
        Image.fromarray(array).save(folder / f"photo_{i}.{'jpg' if i % 2 else 'png'}")
    return root


def write_reference_checkpoint(path: Path, *, epoch: int = 200) -> torch.nn.Module:
    """A reference-format MoCo v2 ``.pth.tar`` (``module.encoder_q.*``, ``module.encoder_k.*``,
    ``module.queue``, ``module.queue_ptr``, epoch, arch, optimizer) of a ResNet-18 of width 8
    with a 16-d MLP head and a queue of 64; returns its query encoder."""
    encoder = reference_encoder("resnet18", mlp=True, dim=16, width=8)
    checkpoint = reference_checkpoint(encoder, K=64)
    checkpoint["epoch"] = epoch
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return encoder


def fill_hf_cache(cache: Path, repo_id: str, revision: str, folder: Path) -> Path:
    """Lay ``folder``'s files out as huggingface_hub's cache does after downloading
    ``repo_id`` at ``revision`` (a branch or tag name)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / HF_COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / revision).write_text(HF_COMMIT)
    for file in folder.iterdir():
        shutil.copy(file, snapshot / file.name)
    return snapshot


_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`([^`]+)`")
# An inline code span is a command when it starts with one of these programs and has
# arguments (one word names a program; an option is not a command) ...
_PROGRAMS = ("mocohub", "python", "pip", "torchrun", "curl")
# ... or when it is a Python call.
_PYTHON_CALL = re.compile(r"^[A-Za-z_][\w.]*\(.*\)$")


def normalise_command(line: str) -> str:
    """A shell line without its comment, its words joined by single spaces (quotes kept)."""
    return " ".join(shlex.split(line, comments=True, posix=False))


def readme_commands(text: str) -> list[str]:
    """Every command the README shows: the lines of its ``bash`` blocks (comments dropped)
    and the inline code spans that run a program with arguments or are a Python call."""
    commands: list[str] = []
    for language, body in _FENCE.findall(text):
        if language == "bash":
            commands += [c for c in map(normalise_command, body.splitlines()) if c]
    prose = _FENCE.sub("", text)
    for span in _INLINE.findall(prose):
        words = span.split()  # a span may wrap onto the next line
        if _PYTHON_CALL.match(" ".join(words)):
            commands.append(" ".join(words))
        elif len(words) > 1 and words[0] in _PROGRAMS:  # one word names a program
            commands.append(normalise_command(span))
    return commands


def readme_python_blocks(text: str) -> list[str]:
    """The README's ``python`` blocks, each as written."""
    return [body for language, body in _FENCE.findall(text) if language == "python"]


# --------------------------------------------------------------------------
# All of a user's files in one folder
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UserData:
    """What a README reader has, made once (see the module docstring)."""

    root: Path
    imagenet: Path  # train/ and val/, 8 images each
    imagenet_flat: Path  # one tree, no split folders
    fashion_mnist: Path  # IDX files: 8 train, 8 test images
    labels_csv: Path
    photos: Path  # 6 images, one in holiday/
    reference: Path  # reference-format .pth.tar
    reference_encoder: torch.nn.Module  # its query encoder
    shoe: Path  # a JPEG; shoe.png beside it is the same image as a PNG

    def working_folder(self, folder: Path, *names: str) -> Path:
        """``folder`` set up as the user's working folder: ``names`` (``imagenet``,
        ``photos``, ``samples``, ``bench``, the checkpoint as ``moco_v2_800ep_pretrain.pth.tar``
        or ``ref.pth.tar``) linked in, and ``shoe.jpg``, ``shoe.png``, ``a.png`` copied."""
        links = {
            "imagenet": self.imagenet,
            "photos": self.photos,
            REFERENCE: self.reference,
            "ref.pth.tar": self.reference,
            "samples": ROOT / "samples",
            "bench": ROOT / "bench",
            "examples": ROOT / "examples",
        }
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / name).symlink_to(links[name])
        shutil.copy(self.shoe, folder / "shoe.jpg")
        shutil.copy(self.shoe.with_suffix(".png"), folder / "shoe.png")
        shutil.copy(self.shoe.with_suffix(".png"), folder / "a.png")
        return folder


def user_data(root: Path) -> UserData:
    """Every stand-in of :class:`UserData`, made in ``root`` (about a second)."""
    shoe = np.random.default_rng(4).integers(0, 256, size=(36, 30, 3), dtype=np.uint8)
    Image.fromarray(shoe).save(root / "shoe.jpg")
    Image.fromarray(shoe).save(root / "shoe.png")
    reference = root / "www" / REFERENCE
    encoder = write_reference_checkpoint(reference)
    return UserData(
        root=root,
        imagenet=image_folder(root / "imagenet", splits=True),
        imagenet_flat=image_folder(root / "imagenet-flat", splits=False),
        fashion_mnist=idx_folder(root / "fashion-mnist-idx", train=8, val=8),
        labels_csv=labels_csv_folder(root / "labels-csv"),
        photos=photos(root / "photos"),
        reference=reference,
        reference_encoder=encoder,
        shoe=root / "shoe.jpg",
    )


# --------------------------------------------------------------------------
# Running command lines and snippets
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """What a command did: its exit code, stdout and stderr."""

    code: int
    out: str
    err: str


def ok(result: Result) -> Result:
    """``result`` if the command succeeded with no traceback; fail the test otherwise."""
    assert result.code == 0, result.err[-3000:]
    assert "Traceback" not in result.err, result.err[-3000:]
    return result


def mocohub(words: list[str]) -> Result:
    """``mocohub WORDS`` in this process (``mocohub.cli.main``, as ``python -m mocohub``).

    An exception other than ``SystemExit`` (a traceback for the user) propagates.
    """
    from mocohub import cli

    assert words[0] == "mocohub", words
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(words[1:])
        except SystemExit as exit_info:
            code = exit_info.code if isinstance(exit_info.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


_LAUNCHER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def launch_here(words: list[str], capfd: pytest.CaptureFixture[str]) -> Result:
    """A launcher line (``mocohub train --nproc-per-node ...`` or ``torchrun ...``) in this
    process; its workers are processes, whose output ``capfd`` collects. torch's elastic
    agent installs signal handlers and leaves them: they are put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in _LAUNCHER_SIGNALS}
    capfd.readouterr()
    try:
        if words[0] == "torchrun":  # what the torchrun script runs
            from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
            from torch.distributed.run import main as torchrun

            try:
                torchrun(words[1:])
                result = Result(0, "", "")
            except ChildFailedError as failed:
                result = Result(1, "", str(failed))
        else:
            result = mocohub(words)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    workers = capfd.readouterr()
    return Result(result.code, result.out + workers.out, result.err + workers.err)


def environment(**extra: str) -> dict[str, str]:
    """This process's environment for a child: one thread, unbuffered, 127.0.0.1 unproxied."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def start(words: list[str], **popen: Any) -> subprocess.Popen[str]:
    """A command line in its own process; ``mocohub`` and ``python`` are this interpreter's."""
    if words[0] == "mocohub":
        words = [sys.executable, "-m", "mocohub", *words[1:]]
    elif words[0] == "python":
        words = [sys.executable, *words[1:]]
    popen.setdefault("env", environment())
    return subprocess.Popen(
        words, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def finish(process: subprocess.Popen[str], timeout: float = 300) -> Result:
    """Wait for ``process`` (killing it after ``timeout`` seconds) and collect its output."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        err += f"\n(killed after {timeout} s)"
    return Result(process.returncode, out, err)


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1 that nothing listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_python(code: str, prelude: str = "", **names: Any) -> dict[str, Any]:
    """Run README Python ``code`` after ``prelude`` (with ``PIL.Image``, ``np``, ``torch``
    and ``names`` defined) in a fresh namespace, and return that namespace."""
    namespace: dict[str, Any] = {"__name__": "readme", **names}
    setup = "import PIL.Image, numpy as np, torch\n"
    exec(compile(setup + prelude, "<prelude>", "exec"), namespace)
    exec(compile(code, "<README.md>", "exec"), namespace)
    return namespace
