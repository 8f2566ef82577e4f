"""Shared by the embedding, index and search tests: tiny models, real images, broken files."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mocohub.artifact import HeadConfig, ModelConfig, build_model, save_pretrained
from mocohub.preprocessing import Preprocessing

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "fashion-mnist"

# The lowest cosine accepted between an image's bf16 and fp32 features. Measured per image
# over the bundled model on the 300 samples, make_model() of seeds 0-5 (gray and RGB, 64
# samples each) and a width-4 ResNet-18 of seeds 0-5 (64 random inputs each), on an AMD EPYC
# with avx512_bf16 (native bf16), with ATEN_CPU_CAPABILITY=avx2, and with that plus
# ONEDNN_MAX_CPU_ISA=AVX2 (bf16 emulated as on an AVX2-only CPU): the worst cosine was
# 0.999896 in all three (bundled model; 0.99995 and 0.99998 for the others), the median
# 0.99998-0.999996. 1 - BF16_MIN_COSINE is about 5x the worst gap measured.
BF16_MIN_COSINE = 0.9995


def make_model(
    folder: Path, *, rgb: bool = False, head: bool = False, seed: int = 0, width: int = 8
) -> Path:
    """A random tiny ResNet-18 artifact folder: 28 px gray, or 32 px RGB."""
    torch.manual_seed(seed)
    if rgb:
        prep = Preprocessing(32, 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels=3)
    else:
        prep = Preprocessing(28, 32, (0.286,), (0.353,), channels=1)
    config = ModelConfig(
        "resnet18",
        small_stem=True,
        in_channels=prep.channels,
        width=width,
        head=HeadConfig("mlp", 16) if head else None,
        preprocessing=prep,
    )
    model = build_model(config)
    # move BN statistics off their defaults so features differ between images more
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    save_pretrained(model, folder)
    return folder


def sample_files(count: int) -> list[Path]:
    """The first ``count`` committed Fashion-MNIST PNGs (real images)."""
    files = sorted(SAMPLES.glob("*.png"))[:count]
    assert len(files) == count, f"samples/fashion-mnist has only {len(files)} PNGs"
    return files


def copy_samples(folder: Path, count: int) -> list[Path]:
    """``count`` sample images copied into ``folder`` as PNG, JPEG, and in a subfolder."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for n, src in enumerate(sample_files(count)):
        if n % 3 == 0:
            dst = folder / src.name
            shutil.copyfile(src, dst)
        elif n % 3 == 1:
            dst = folder / "jpeg" / (src.stem + ".JPG")
            dst.parent.mkdir(exist_ok=True)
            Image.open(src).save(dst, quality=95)
        else:
            dst = folder / "sub" / "deeper" / (src.stem + ".webp")
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.open(src).save(dst, lossless=True)
        written.append(dst)
    return written


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG file whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def write_broken_files(folder: Path) -> dict[str, str]:
    """Pathological files in ``folder``: name -> a word their error reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    good = (SAMPLES / "00000_ankle-boot.png").read_bytes()
    jpeg = folder / "_tmp.jpg"
    Image.open(SAMPLES / "00001_pullover.png").resize((200, 200)).save(jpeg, quality=90)
    jpeg_bytes = jpeg.read_bytes()
    jpeg.unlink()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image\n")
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    middle = len(good) // 2
    flipped = (
        good[:middle] + bytes(b ^ 0xFF for b in good[middle : middle + 16]) + good[middle + 16 :]
    )
    (folder / "corrupt.png").write_bytes(flipped)
    (folder / "truncated.jpeg").write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    (folder / "garbage.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    (folder / "bomb.png").write_bytes(png_header_claiming(100_000, 100_000))
    (folder / "dangling.gif").symlink_to(folder / "no-such-file.gif")
    return {
        "empty.jpg": "empty",
        "notes.png": "not an image",
        "truncated.png": "truncated",
        "corrupt.png": "corrupt",
        "truncated.jpeg": "truncated",
        "garbage.tif": "",
        "bomb.png": "too many pixels",
        "dangling.gif": "not found",
    }


class ScaledEmbedder:
    """A non-torch backend stand-in: the torch backend's raw features times 3."""

    def __init__(self, model_path: str) -> None:
        from mocohub.features import open_torch_embedder

        self.inner = open_torch_embedder(model_path, device="cpu")
        self.preprocessing = self.inner.preprocessing
        self.dim = self.inner.dim

    def embed_batch(self, images: torch.Tensor) -> np.ndarray:
        return self.inner.embed_batch(images) * 3.0


def open_scaled_embedder(model_path: str, **options: Any) -> ScaledEmbedder:
    """Opened as `mocohub.export.onnx_embedder:open_embedder` is (its options ignored)."""
    return ScaledEmbedder(model_path)
