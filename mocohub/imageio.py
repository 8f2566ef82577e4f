"""Finding image files and decoding them safely: the input side of ``mocohub embed``.

:func:`scan_inputs` turns folders (searched recursively), image files and text
files listing paths into one deterministic list. :func:`decode_image` opens one
file the same way everywhere in mocohub (the CLI, :class:`~mocohub.features.FeatureExtractor`,
``mocohub search``):

- files over ``max_pixels`` pixels (decompression bombs) are refused from their
  header, before any pixel is decoded. The limit is the caller's, checked per
  call: Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` is never changed (that
  would race between threads decoding with different limits), and a caller that
  allows more than Pillow's own limit gets past it (:func:`open_image`);
- the EXIF orientation is applied; GIFs and other animations give their first frame;
- JPEGs much larger than needed are decoded at a reduced DCT scale (``draft``),
  never below twice the size the preprocessing resizes to, so quality is kept;
- every mode ends as ``"RGB"`` (or ``"L"`` for gray backbones): CMYK and YCbCr
  are converted, palette images are expanded, 16-bit and 32-bit gray are scaled
  (not clipped) to 8 bits, and transparent images (RGBA, LA, palette with
  transparency) are composited on **white**, as viewers show them, so that dark
  objects on transparent backgrounds stay visible.

Failures raise :class:`DecodeError` with a short reason ("empty file",
"truncated or corrupt image data", ...), which the embed pipeline records.
Pillow's warnings about files it still decodes (corrupt EXIF, ...) are ignored
for the process once this module is imported: a file is either decoded or
recorded with its reason, so they are only noise, and ``warnings.catch_warnings``
per call would not be thread-safe.

Example:
    >>> paths = scan_inputs(["photos/", "more.txt"])
    >>> image = decode_image(paths[0], mode="RGB", min_size=256)
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mocohub.errors import InputError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "LIST_EXTENSIONS",
    "DecodeError",
    "decode_image",
    "is_image_path",
    "load_image",
    "open_image",
    "paths_digest",
    "scan_inputs",
    "to_mode",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
#: Pillow's own hard limit (twice its warning threshold): about 179 megapixels.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

# Pillow's warnings are attributed to its own modules (they warn at stacklevel 1).
warnings.filterwarnings("ignore", module=r"PIL\.")


class DecodeError(Exception):
    """A file that cannot be used as an image; ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """True when the file name ends in an image extension (any letter case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def scan_inputs(inputs: Iterable[str | os.PathLike[str]]) -> list[str]:
    """The image paths named by ``inputs``, in a deterministic order, without duplicates.

    Each input is a folder (its image files, recursively, sorted by their path
    relative to the folder), an image file, or a text file (``.txt``, ``.lst``,
    ``.list``) with one path per line (relative paths are relative to the list's
    folder; blank lines and lines starting with ``#`` are skipped; listed paths
    are taken as they are, so a missing one is reported when it is decoded).
    Inputs are taken in the order given; a path met twice is kept once, first.

    Example:
        >>> scan_inputs(["samples/fashion-mnist"])[:2]
        ['samples/fashion-mnist/00000_ankle-boot.png', 'samples/fashion-mnist/00001_pullover.png']
    """
    found: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(_scan_folder(path))
        elif path.suffix.lower() in LIST_EXTENSIONS and path.is_file():
            found.extend(_read_list(path))
        elif is_image_path(path) and (path.exists() or path.is_symlink()):
            found.append(str(path))
        elif not path.exists():
            raise InputError(
                f"{item} does not exist; pass image folders, image files or text files "
                "listing image paths."
            )
        else:
            raise InputError(
                f"{item} is neither a folder, an image file "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}) nor a list of paths "
                f"({', '.join(sorted(LIST_EXTENSIONS))}); rename it or list it in a .txt file."
            )
    seen: set[str] = set()
    unique = []
    for p in found:
        key = os.path.normpath(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _scan_folder(folder: Path) -> list[str]:
    def walk_error(error: OSError) -> None:
        raise InputError(f"Cannot list {error.filename} ({error.strerror}).") from error

    relative: list[tuple[str, ...]] = []
    for root, dirs, files in os.walk(folder, onerror=walk_error):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .cache, .git, our own temp files
        base = Path(root).relative_to(folder).parts
        relative.extend((*base, f) for f in files if not f.startswith(".") and is_image_path(f))
    return [str(folder.joinpath(*parts)) for parts in sorted(relative)]


def _read_list(path: Path) -> Iterator[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"Cannot read the path list {path} ({e}); it must be UTF-8 text.") from e
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            listed = Path(entry)
            yield str(listed if listed.is_absolute() else path.parent / listed)


def _reason(error: BaseException) -> str:
    """The few words a :class:`DecodeError` gives for ``error``."""
    if isinstance(error, FileNotFoundError):
        return "file not found (or a broken link)"
    if isinstance(error, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, UnidentifiedImageError):
        return "not an image file (or an unsupported format)"
    if isinstance(error, Image.DecompressionBombError):
        return f"too many pixels ({error})"
    if isinstance(error, (OSError, SyntaxError, ValueError, EOFError)):
        text = str(error).strip() or type(error).__name__
        return f"truncated or corrupt image data ({text})"
    if isinstance(error, MemoryError):
        return "out of memory while decoding"
    return f"cannot decode ({type(error).__name__}: {error})"


def _open_header(fp: IO[bytes]) -> Image.Image:
    """``Image.open(fp)``, past Pillow's process-wide pixel limit (the caller checks its own)."""
    try:
        return Image.open(fp)
    except Image.DecompressionBombError:
        pass
    # Pillow refused from the header: try its format plugins as Image.open does, but
    # without its size check. Only the header is read, so nothing large is allocated.
    Image.init()
    fp.seek(0)
    prefix = fp.read(16)
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        verdict = accept(prefix) if accept else True
        if verdict and not isinstance(verdict, str):
            fp.seek(0)
            try:
                return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise UnidentifiedImageError("cannot identify the image")


@contextmanager
def open_image(
    source: str | os.PathLike[str] | IO[bytes],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[Image.Image]:
    """The image in ``source`` (a path or a seekable binary file), opened from its header only.

    No pixel is decoded yet: ``image.size``, ``image.format`` and ``image.mode``
    are known, and ``image.load()`` decodes. Images over ``max_pixels`` (None:
    no limit) are refused here, per call: Pillow's process-wide
    ``Image.MAX_IMAGE_PIXELS`` is neither changed nor in the way when the caller
    allows more (GIF frames and TIFF tiles, which Pillow checks again while
    decoding, still obey it).

    Raises:
        DecodeError: with a short reason, for anything that is not an image.

    Example:
        >>> with open_image("photo.jpg", max_pixels=40_000_000) as image:
        ...     image.size
        (4000, 3000)
    """
    with ExitStack() as stack:
        try:
            if isinstance(source, (str, os.PathLike)):
                fp: IO[bytes] = stack.enter_context(open(source, "rb"))
            else:
                fp = source
            empty = fp.seek(0, os.SEEK_END) == 0
            fp.seek(0)
            if empty:
                raise DecodeError("empty file")
            image = stack.enter_context(_open_header(fp))
        except DecodeError:
            raise
        except Exception as e:
            raise DecodeError(_reason(e)) from None
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise DecodeError(
                f"too many pixels ({width}x{height} > {max_pixels}; raise --max-pixels "
                "if it is a genuine image)"
            )
        yield image


def decode_image(
    path: str | os.PathLike[str] | IO[bytes],
    *,
    mode: str = "RGB",
    min_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """The image in ``path`` (or a seekable binary file) as a loaded PIL image of ``mode``.

    :func:`open_image` then :func:`load_image`.

    Args:
        mode: ``"RGB"`` or ``"L"`` (gray, ITU-R 601 luma).
        min_size: the short side the caller will resize to; large JPEGs are
            decoded at a reduced scale whose short side is still at least twice
            this (None: always full size).
        max_pixels: refuse images with more pixels (None: no limit), from the
            header, before decoding.

    Raises:
        DecodeError: with a short reason, for anything that is not a usable image.

    Example:
        >>> decode_image("scan.tiff", mode="L").mode
        'L'
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    with open_image(path, max_pixels=max_pixels) as image:
        return load_image(image, mode=mode, min_size=min_size)


def load_image(
    image: Image.Image, *, mode: str = "RGB", min_size: int | None = None
) -> Image.Image:
    """Decode an image from :func:`open_image` (see :func:`decode_image` for the arguments).

    The caller can look at ``image.size`` in between, to refuse before anything
    is decoded.

    Example:
        >>> with open_image(BytesIO(data), max_pixels=None) as image:
        ...     check(image.size)
        ...     rgb = load_image(image, mode="RGB", min_size=256)
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    try:
        width, height = image.size
        if image.format == "JPEG" and min_size and image.mode in ("RGB", "L"):
            scale = 2 * min_size / min(width, height)
            if scale < 0.5:  # draft only ever reduces by 1/2, 1/4 or 1/8
                target = (math.ceil(width * scale), math.ceil(height * scale))
                image.draft(image.mode, target)
        image.seek(0)  # first frame of animations
        image.load()
        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception:  # a damaged EXIF block must not lose the pixels
            oriented = image
        return to_mode(oriented, mode)
    except Exception as e:  # a decoder bug must cost one file, never the run
        raise DecodeError(_reason(e)) from None


def to_mode(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """``image`` converted to ``"RGB"`` or ``"L"``, transparency composited on white.

    16-bit and 32-bit integer images are scaled to 8 bits by their bit depth,
    float images by their range ([0, 1] or [0, 255]); Pillow's plain
    ``convert`` would clip them.

    Example:
        >>> to_mode(Image.new("RGBA", (2, 2)), "RGB").getpixel((0, 0))
        (255, 255, 255)
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    elif image.mode in ("L", "1") and "transparency" in image.info:
        image = image.convert("LA")
    elif image.mode == "RGB" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image if image.mode == mode else image.convert(mode)


def _to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "F":
        top = 1.0 if float(np.nanmax(values, initial=0.0)) <= 1.0 else 255.0
        scaled = np.nan_to_num(values) * (255.0 / top)
    elif image.mode.startswith("I;16"):
        scaled = values.astype(np.float64) / 257.0
    else:  # "I": 32-bit ints; 16-bit PNGs open so in older Pillows
        top = float(values.max(initial=0))
        scaled = values / (257.0 if top > 255 else 1.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def paths_digest(paths: Sequence[str]) -> str:
    """A SHA-256 of a path list (order matters), to tell whether two runs saw the same input."""
    import hashlib

    digest = hashlib.sha256()
    for p in paths:
        digest.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()
