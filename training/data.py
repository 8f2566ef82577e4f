"""Training data: turn what a user names into a data set of uint8 images and labels.

:func:`resolve_dataset` is the one entry point of ``mocohub train`` / ``knn`` /
``lincls``. It accepts

- an ImageFolder tree: ``DATA/`` with one subfolder per class, or ``DATA/train``
  and ``DATA/val`` like ImageNet (decoded per sample, in DataLoader workers, by
  :func:`mocohub.imageio.decode_image`: EXIF orientation, mode conversion, pixel limit);
- a folder of MNIST-format IDX files (``train-images-idx3-ubyte.gz`` ...), or
  ``"fashion-mnist"`` for the files of Debian's ``dataset-fashion-mnist``;
- a flat folder of images with a ``labels.csv`` (columns ``file,label`` and
  optionally ``class``), like the repository's ``samples/fashion-mnist``;
- in memory: a :class:`TensorImageDataset`, an ``(images, labels)`` tuple, or a
  bare uint8 tensor.

Small data sets come back as a :class:`TensorImageDataset` (every image in one
N x C x H x W uint8 tensor, for batched augmentation on the training device),
ImageFolder trees as a torchvision ``ImageFolder``; a :class:`DatasetInfo` says
which, with the number of samples, the classes and the image shape.

Example:
    >>> dataset, info = resolve_dataset("samples/fashion-mnist")
    >>> print(info)
    labels-csv samples/fashion-mnist: 300 images, 1 x 28 x 28, 10 classes, in memory
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2.functional import pil_to_tensor

from mocohub.errors import ConfigError, InputError
from mocohub.imageio import DecodeError, decode_image

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "DatasetInfo",
    "TensorImageDataset",
    "decode_file",
    "load_idx_folder",
    "load_image_folder",
    "load_labelled_folder",
    "read_idx",
    "resolve_dataset",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)

Split = Literal["train", "val"]
Transform = Callable[[Any], Any]
Kind = Literal["image-folder", "idx", "labels-csv", "tensor"]

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
_IDX_NAME = re.compile(r"idx\d-ubyte(\.gz)?$")


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


class TensorImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """In-memory images (N x C x H x W uint8) and labels (int64), item ``(image, label)``.

    The training loop takes whole batches at once with :meth:`batch` (or
    ``.images[idx]`` and ``.labels[idx]``) and augments them on the device; the
    optional per-sample ``transform`` only applies to ``dataset[i]``. A 3-D
    tensor is taken as N x H x W grayscale. Without labels every item's label
    is -1.

    Example:
        >>> ds = TensorImageDataset(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.arange(4))
        >>> images, labels = ds.batch(torch.tensor([0, 2]))
        >>> images.shape, labels.tolist(), ds.num_classes
        (torch.Size([2, 1, 28, 28]), [0, 2], 4)
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        *,
        classes: Sequence[str] | None = None,
        transform: Transform | None = None,
    ) -> None:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8:
            raise InputError(
                f"images must be uint8 (0-255), not {images.dtype}; "
                "convert them with (x * 255).round().to(torch.uint8)."
            )
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.ndim != 4 or len(images) == 0:
            raise InputError(
                f"images must be a non-empty N x C x H x W (or N x H x W) tensor, "
                f"not of shape {tuple(images.shape)}; stack them into one."
            )
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex():
                raise InputError(
                    f"labels must be a 1-D integer tensor, not {labels.dtype} of shape "
                    f"{tuple(labels.shape)}; pass one class index per image."
                )
            if len(labels) != len(images):
                raise InputError(
                    f"there are {len(images)} images but {len(labels)} labels; "
                    "pass exactly one label per image."
                )
            labels = labels.to(torch.int64)
            if int(labels.min()) < 0:
                raise InputError("labels must be class indices 0, 1, ...; shift negative labels.")
        self.images = images
        self.labels: torch.Tensor | None = labels
        num_classes = 0 if labels is None else int(labels.max()) + 1
        self.classes = (
            tuple(str(i) for i in range(num_classes)) if classes is None else tuple(classes)
        )
        if len(self.classes) < num_classes:
            raise InputError(
                f"labels go up to {num_classes - 1} but only {len(self.classes)} class names "
                "were given; pass one name per class index."
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, -1 if self.labels is None else int(self.labels[index])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels (-1 where there are none) at ``index``, untransformed."""
        images = self.images[index.to(self.images.device)]
        if self.labels is None:
            return images, torch.full((len(images),), -1, dtype=torch.int64, device=images.device)
        return images, self.labels[index.to(self.labels.device)]

    def to(self, device: torch.device | str) -> TensorImageDataset:
        """The same data set with its tensors on ``device`` (for on-device augmentation)."""
        labels = None if self.labels is None else self.labels.to(device)
        return TensorImageDataset(
            self.images.to(device), labels, classes=self.classes, transform=self.transform
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"TensorImageDataset({n} x {c} x {h} x {w} uint8, {self.num_classes} classes)"


Source = str | os.PathLike[str] | TensorImageDataset | torch.Tensor | np.ndarray | tuple[Any, Any]


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`resolve_dataset` found: enough to choose the augmentation path and to log.

    ``channels`` and ``image_size`` describe the images as stored, before any
    transform; ``image_size`` is ``(height, width)``, or None where the images
    may differ in size (ImageFolder trees). ``in_memory`` means the data set is a
    :class:`TensorImageDataset` (augment whole batches on the device); otherwise
    images are decoded per sample in DataLoader workers.

    Example:
        >>> info = DatasetInfo("tensor", "tensor", "train", 60000, ("0", "1"), 1, (28, 28), True)
        >>> info.num_classes
        2
    """

    kind: Kind
    source: str
    split: Split
    num_samples: int
    classes: tuple[str, ...]
    channels: int
    image_size: tuple[int, int] | None
    in_memory: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __str__(self) -> str:
        if self.image_size is None:
            shape = f"{self.channels} channels, sizes vary"
        else:
            shape = f"{self.channels} x {self.image_size[0]} x {self.image_size[1]}"
        where = "in memory" if self.in_memory else "decoded per sample"
        split = "" if self.kind in ("labels-csv", "tensor") else f" ({self.split})"
        return (
            f"{self.kind} {self.source}{split}: {self.num_samples} images, {shape}, "
            f"{self.num_classes} classes, {where}"
        )


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
    folder = _existing_folder(folder)
    split_ = _normalise_split(split)
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
    folder = _existing_folder(folder)
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
    modes = set()
    for path in paths:  # headers only: gray data stay 1 channel
        with _open_image(path) as im:
            modes.add(im.mode)
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


def _open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise InputError(
            f"{path} is listed in labels.csv but does not exist; add it or remove its row."
        ) from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(
            f"{path} is not a readable image ({e}); replace it or remove its row."
        ) from None


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
    root = _existing_folder(root)
    folder = _split_folder(root, _normalise_split(split))
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


def resolve_dataset(
    source: Source,
    split: str = "train",
    transform: Transform | None = None,
) -> tuple[TensorImageDataset | ImageFolder, DatasetInfo]:
    """The data set that ``source`` names, and a :class:`DatasetInfo` describing it.

    ``source`` is a folder (ImageFolder tree, IDX files, or images with a
    ``labels.csv``), ``"fashion-mnist"`` (:data:`FASHION_MNIST_DIR`; write
    ``./fashion-mnist`` for a local folder of that name), a
    :class:`TensorImageDataset`, an ``(images, labels)`` tuple or a uint8
    tensor. ``split`` is ``"train"`` or ``"val"`` (``"test"`` is an alias); a
    labels.csv folder or a tensor is the same data for every split.
    ``transform`` is applied per sample (``dataset[i]``).

    Example:
        >>> dataset, info = resolve_dataset("fashion-mnist", "val")
        >>> info.num_samples, info.channels, info.image_size, info.in_memory
        (10000, 1, (28, 28), True)
    """
    split_ = _normalise_split(split)
    if isinstance(source, TensorImageDataset | torch.Tensor | np.ndarray | tuple):
        if isinstance(source, TensorImageDataset):
            data = source
        elif isinstance(source, tuple):
            if len(source) != 2:
                raise InputError(f"got a tuple of {len(source)} items; pass (images, labels).")
            data = TensorImageDataset(*source)
        else:
            data = TensorImageDataset(source)
        data = TensorImageDataset(
            data.images, data.labels, classes=data.classes, transform=transform
        )
        return data, _tensor_info(data, "tensor", "tensor", split_)
    if not isinstance(source, str | os.PathLike):
        raise InputError(
            f"cannot use a {type(source).__name__} as a data set; pass a folder, 'fashion-mnist', "
            "a TensorImageDataset or a uint8 tensor."
        )
    if source == "fashion-mnist":
        if not FASHION_MNIST_DIR.is_dir():
            raise InputError(
                f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR}; run "
                "`apt-get install dataset-fashion-mnist`, or pass the folder holding its IDX files."
            )
        data = load_idx_folder(FASHION_MNIST_DIR, split_, classes=FASHION_MNIST_CLASSES)
        data.transform = transform
        return data, _tensor_info(data, "idx", "fashion-mnist", split_)
    folder = _existing_folder(source)
    files = [p for p in folder.iterdir() if p.name[0] != "."]
    if (folder / "labels.csv").is_file():
        data = load_labelled_folder(folder)
        data.transform = transform
        return data, _tensor_info(data, "labels-csv", str(source), split_)
    if any(_IDX_NAME.search(p.name) for p in files):
        data = load_idx_folder(folder, split_)
        data.transform = transform
        return data, _tensor_info(data, "idx", str(source), split_)
    if any(p.is_dir() for p in files):
        tree = load_image_folder(folder, split_, transform)
        info = DatasetInfo(
            "image-folder",
            str(source),
            split_,
            len(tree.samples),
            tuple(tree.classes),
            channels=3,
            image_size=None,
            in_memory=False,
        )
        return tree, info
    if not files:
        raise InputError(f"{folder} is empty; put images in one subfolder per class, or IDX files.")
    raise InputError(
        f"{folder} has no class subfolders, IDX files or labels.csv; put the images in one "
        "subfolder per class, or add a labels.csv with the columns file,label."
    )


def _tensor_info(data: TensorImageDataset, kind: Kind, source: str, split: Split) -> DatasetInfo:
    _, channels, height, width = data.images.shape
    return DatasetInfo(
        kind, source, split, len(data), data.classes, channels, (height, width), in_memory=True
    )


def _normalise_split(split: str) -> Split:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ConfigError(
            f"unknown split {split!r}; use 'train' or 'val' ('test' also means val)."
        ) from None


def _existing_folder(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"{path} does not exist; pass an ImageFolder tree, a folder of IDX files, "
            "a folder with labels.csv, or 'fashion-mnist'."
        )
    if not path.is_dir():
        raise InputError(f"{path} is a file, not a folder; pass the folder that holds the data.")
    return path
