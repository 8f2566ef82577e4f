"""Readers for the data set formats on disk: MNIST IDX files, a folder with a
``labels.csv``, and ImageFolder trees.

IDX files and ``labels.csv`` folders are read whole into a
:class:`~mocohub.training.datasets.TensorImageDataset`; an ImageFolder tree
becomes a torchvision ``ImageFolder`` whose images are decoded per sample by
:func:`decode_file` (:func:`mocohub.imageio.decode_image`: EXIF orientation,
mode conversion, pixel limit). :func:`~mocohub.training.data.resolve_dataset`
chooses among them.

Example:
    >>> load_idx_folder("/usr/share/datasets/fashion-mnist", "test")
    TensorImageDataset(10000 x 1 x 28 x 28 uint8, 10 classes)
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2.functional import pil_to_tensor

from mocohub.errors import ConfigError, InputError
from mocohub.imageio import DecodeError, decode_image, open_image

from .datasets import Split, TensorImageDataset, Transform

__all__ = [
    "decode_file",
    "existing_folder",
    "load_idx_folder",
    "load_image_folder",
    "load_labelled_folder",
    "normalise_split",
    "read_idx",
]

# The third byte of an IDX file's magic number -> its (big-endian) value type.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DEFLATE_MAX_RATIO = 1100  # deflate never expands data more than ~1032 times

_SPLIT_ALIASES: dict[str, Split] = {
    "train": "train",
    "val": "val",
    "validation": "val",
    "test": "val",
}
_SPLIT_FOLDERS: dict[Split, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val", "validation", "test"),
}
_IDX_PREFIXES: dict[Split, tuple[str, ...]] = {"train": ("train",), "val": ("t10k", "test")}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one MNIST-format IDX file, gzip-compressed or not, as a native-endian array.

    Example:
        >>> read_idx("train-labels-idx1-ubyte.gz").shape
        (60000,)
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        stored_bytes = path.stat().st_size
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            return _read_idx_stream(
                f, path, stored_bytes * _DEFLATE_MAX_RATIO if gzipped else stored_bytes
            )
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; check the path to the IDX file.") from None
    except IsADirectoryError:
        raise InputError(
            f"{path} is a folder; pass one IDX file, or use load_idx_folder."
        ) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputError(
            f"{path} is a truncated or damaged gzip file ({e}); download it again."
        ) from None


def _read_idx_stream(f: io.BufferedIOBase, path: Path, max_bytes: int) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[3] == 0:
        raise InputError(
            f"{path} is not an IDX file (it does not start with 00 00 <type> <dimensions>); "
            "pass an MNIST-format file such as train-images-idx3-ubyte.gz."
        )
    dtype = _IDX_DTYPES.get(magic[2])
    if dtype is None:
        raise InputError(
            f"{path} has the unknown IDX type code 0x{magic[2]:02x}; pass an MNIST-format file "
            "(types 0x08, 0x09, 0x0b, 0x0c, 0x0d, 0x0e)."
        )
    header = f.read(4 * magic[3])
    if len(header) < 4 * magic[3]:
        raise InputError(f"{path} is truncated inside its header; download it again.")
    shape = tuple(int(n) for n in np.frombuffer(header, dtype=">u4"))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if 4 + len(header) + nbytes > max_bytes:
        raise InputError(
            f"{path} is truncated: its header promises {shape} values of {dtype.itemsize} byte(s) "
            "but the file is too short to hold them; download it again."
        )
    data = bytearray(nbytes)  # writable, so the array below is too
    view, got = memoryview(data), 0
    while got < nbytes and (n := f.readinto(view[got:])):
        got += n
    if got < nbytes:
        raise InputError(
            f"{path} is truncated: its header promises {shape} values ({nbytes} bytes) "
            f"but only {got} bytes follow; download it again."
        )
    if f.read(1):
        raise InputError(
            f"{path} holds more data than its header's shape {shape} says; "
            "download it again or check that it is an IDX file."
        )
    return np.frombuffer(data, dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def load_idx_folder(
    folder: str | os.PathLike[str],
    split: str = "train",
    *,
    classes: Sequence[str] | None = None,
) -> TensorImageDataset:
    """Load a split of MNIST-format IDX files (``train-*`` or ``t10k-*``/``test-*``).

    Images become N x 1 x H x W uint8, labels int64.

    Example:
        >>> load_idx_folder("/usr/share/datasets/fashion-mnist", "test")
        TensorImageDataset(10000 x 1 x 28 x 28 uint8, 10 classes)
    """
    folder = existing_folder(folder)
    split_ = normalise_split(split)
    images_path = _find_idx_file(folder, split_, "images", 3)
    labels_path = _find_idx_file(folder, split_, "labels", 1)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise InputError(
            f"{images_path} holds {images.dtype} values of shape {images.shape}; an images "
            "file must hold uint8 N x H x W (IDX type 0x08 with 3 dimensions)."
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InputError(
            f"{labels_path} holds {labels.dtype} values of shape {labels.shape}; a labels "
            "file must hold one integer per image (1 dimension)."
        )
    if len(images) != len(labels):
        raise InputError(
            f"{images_path.name} has {len(images)} images but {labels_path.name} has "
            f"{len(labels)} labels; put the matching pair of files in {folder}."
        )
    return TensorImageDataset(
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        classes=classes,
    )


def _find_idx_file(folder: Path, split: Split, what: str, dims: int) -> Path:
    for prefix in _IDX_PREFIXES[split]:
        for sep in ("-", "."):  # some MNIST mirrors name them train-images.idx3-ubyte
            for suffix in ("", ".gz"):
                path = folder / f"{prefix}-{what}{sep}idx{dims}-ubyte{suffix}"
                if path.is_file():
                    return path
    expected = f"{_IDX_PREFIXES[split][0]}-{what}-idx{dims}-ubyte[.gz]"
    raise InputError(f"{folder} has no {split} {what} file; add {expected} (the MNIST file names).")


def load_labelled_folder(
    folder: str | os.PathLike[str], csv_name: str = "labels.csv"
) -> TensorImageDataset:
    """Load a flat folder of same-size images listed in a CSV (``file,label[,class]``).

    Grayscale images stay 1 channel; if any image has colour, all become RGB.

    Example:
        >>> ds = load_labelled_folder("samples/fashion-mnist")
        >>> ds.images.shape, ds.classes[9]
        (torch.Size([300, 1, 28, 28]), 'ankle-boot')
    """
    folder = existing_folder(folder)
    table = folder / csv_name
    if not table.is_file():
        raise InputError(f"{folder} has no {csv_name}; add one with columns file,label.")
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames or []
    if "file" not in columns or "label" not in columns:
        raise InputError(f"{table} needs the columns file and label (it has {columns}); add them.")
    if not rows:
        raise InputError(f"{table} lists no images; add one row per image.")
    names: dict[int, str] = {}
    labels = []
    for line, row in enumerate(rows, start=2):
        try:
            label = int(row["label"])
        except (TypeError, ValueError):
            label = -1
        if label < 0:
            raise InputError(
                f"{table} line {line}: label {row['label']!r} is not a class index 0, 1, ...; "
                "fix it."
            )
        labels.append(label)
        name = (row.get("class") or "").strip()
        if name and names.setdefault(label, name) != name:
            raise InputError(
                f"{table} names label {label} both {names[label]!r} and {name!r}; "
                "give each label one class name."
            )
    paths = [folder / row["file"] for row in rows]
    modes = _image_modes(paths)  # headers only: gray data stay 1 channel
    mode = "L" if all(_is_gray(m) for m in modes) else "RGB"
    arrays = [np.asarray(_decode_listed(path, mode)) for path in paths]
    sizes = {(a.shape[1], a.shape[0]) for a in arrays}  # after EXIF orientation
    if len(sizes) > 1:
        shown = [f"{w}x{h}" for w, h in sorted(sizes)[:3]]
        raise InputError(
            f"the images in {folder} differ in size ({', '.join(shown)}); resize them to one "
            "size, or arrange them as an ImageFolder tree (one subfolder per class)."
        )
    images = torch.from_numpy(np.stack(arrays))
    images = images.unsqueeze(1) if mode == "L" else images.permute(0, 3, 1, 2).contiguous()
    classes = [names.get(i, str(i)) for i in range(max(labels) + 1)]
    return TensorImageDataset(images, torch.tensor(labels), classes=classes)


def _is_gray(mode: str) -> bool:
    return mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;16")


def _image_modes(paths: list[Path]) -> set[str]:
    """The modes of the images at ``paths``, from their headers (mocohub's one decoder)."""
    modes = set()
    for path in paths:
        if not path.is_file():
            raise InputError(
                f"{path} is listed in labels.csv but does not exist; add it or remove its row."
            )
        try:
            with open_image(path) as image:
                modes.add(image.mode)
        except DecodeError as error:
            raise InputError(
                f"{path} is not a readable image ({error.reason}); replace it or remove its row."
            ) from None
    return modes


def _decode_listed(path: Path, mode: str) -> Image.Image:
    try:
        return decode_image(path, mode=mode)
    except DecodeError as error:  # a damaged file shows only when decoded
        raise InputError(
            f"{path} is not a readable image ({error.reason}); replace it or remove its row."
        ) from None


class _ImageFolder(ImageFolder):
    """torchvision's ImageFolder, ignoring hidden folders (.ipynb_checkpoints, ...)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name[0] != ".")
        return classes, {name: i for i, name in enumerate(classes)}


def decode_file(path: str, mode: str = "RGB") -> Image.Image:
    """One image file of a data set, decoded as mocohub decodes every image.

    :func:`mocohub.imageio.decode_image` at full size: EXIF orientation applied,
    any mode converted to ``mode`` (``"RGB"`` or ``"L"``), decompression bombs
    refused. A file that cannot be used raises :class:`InputError` naming it.

    Example:
        >>> decode_file("imagenet/train/n01440764/a.JPEG").mode
        'RGB'
    """
    try:
        return decode_image(path, mode=mode)
    except DecodeError as error:
        raise InputError(
            f"{path} cannot be used as an image ({error.reason}); replace it or remove it "
            "from the data set."
        ) from None


def load_image_folder(
    root: str | os.PathLike[str],
    split: str = "train",
    transform: Transform | None = None,
) -> ImageFolder:
    """Load an ImageFolder tree: ``root/<class>/<image>``, or ``root/train|val/<class>/<image>``.

    Images are decoded to RGB by :func:`decode_file` when an item is read (in
    DataLoader workers) and passed to ``transform`` as PIL images; without a
    transform an item is a 3 x H x W uint8 tensor (set ``dataset.transform =
    None`` for the PIL image). A tree without ``train``/``val`` folders serves
    every split.

    Example:
        >>> ds = load_image_folder("imagenet", "val")  # imagenet/val/n01440764/...
        >>> image, label = ds[0]
    """
    root = existing_folder(root)
    folder = _split_folder(root, normalise_split(split))
    class_dirs = [d for d in sorted(folder.iterdir()) if d.is_dir() and d.name[0] != "."]
    if not class_dirs:
        raise InputError(
            f"{folder} has no class subfolders; put the images in one subfolder per class "
            f"(e.g. {folder / 'cat' / '0001.jpg'})."
        )
    try:
        return _ImageFolder(
            str(folder),
            transform=transform or pil_to_tensor,
            loader=decode_file,
        )
    except FileNotFoundError:
        empty = [d.name for d in class_dirs if not any(_is_image(p) for p in d.rglob("*"))]
        raise InputError(
            f"the class subfolders {', '.join(empty[:5])} of {folder} hold no images "
            f"({', '.join(IMG_EXTENSIONS[:4])}, ...); add some or remove those subfolders."
        ) from None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and path.is_file()


def _split_folder(root: Path, split: Split) -> Path:
    present = [name for name in ("train", "val", "validation", "test") if (root / name).is_dir()]
    if not present:
        return root
    for name in _SPLIT_FOLDERS[split]:
        if name in present:
            return root / name
    raise InputError(
        f"{root} has {', '.join(n + '/' for n in present)} but no {split}/ folder; "
        f"add {root / split} with one subfolder per class."
    )


def normalise_split(split: str) -> Split:
    """``"train"`` or ``"val"`` for a split name (``"validation"``/``"test"`` mean val).

    Example:
        >>> normalise_split("test")
        'val'
    """
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ConfigError(
            f"unknown split {split!r}; use 'train' or 'val' ('test' also means val)."
        ) from None


def existing_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, or :class:`InputError` unless it is an existing folder.

    Example:
        >>> existing_folder("samples/fashion-mnist").name
        'fashion-mnist'
    """
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"{path} does not exist; pass an ImageFolder tree, a folder of IDX files, "
            "a folder with labels.csv, or 'fashion-mnist'."
        )
    if not path.is_dir():
        raise InputError(f"{path} is a file, not a folder; pass the folder that holds the data.")
    return path
