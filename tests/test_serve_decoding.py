"""mocohub.imageio as the server's decoder threads use it: per-call pixel limits, bytes input."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from embed_helpers import png_header_claiming
from PIL import Image, ImageFile

from mocohub.imageio import DecodeError, decode_image, open_image


def test_pixel_limits_are_per_call_and_never_touch_pillows_global(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (100, 100), (10, 20, 30)).save(tmp_path / "small.png")
    # Pillow refuses over twice its limit: 10,000 pixels with this one
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    seen: list[int | None] = []  # Pillow's limit while pixels are decoded
    load = ImageFile.ImageFile.load

    def watched_load(self: ImageFile.ImageFile) -> object:
        seen.append(Image.MAX_IMAGE_PIXELS)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", watched_load)
    assert decode_image(tmp_path / "small.png", max_pixels=None).size == (100, 100)
    assert decode_image(tmp_path / "small.png", max_pixels=20_000).size == (100, 100)
    with pytest.raises(DecodeError, match=r"too many pixels \(100x100 > 5000"):
        decode_image(tmp_path / "small.png", max_pixels=5_000)
    # another thread decoding now would see Pillow's limit as its owner set it
    assert seen and set(seen) == {1000} and Image.MAX_IMAGE_PIXELS == 1000


def test_open_image_reads_only_the_header_of_bytes_and_files(tmp_path: Path) -> None:
    bomb = png_header_claiming(100_000, 100_000)  # 10 G pixels, over Pillow's own limit
    with open_image(io.BytesIO(bomb), max_pixels=None) as image:  # the caller checks itself
        assert image.size == (100_000, 100_000) and image.format == "PNG"
    too_many = r"too many pixels \(100000x100000 > 1000000000"
    with pytest.raises(DecodeError, match=too_many), open_image(io.BytesIO(bomb), max_pixels=10**9):
        pass
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(tmp_path / "bomb.png")
    with pytest.raises(DecodeError, match="empty file"):
        decode_image(io.BytesIO(b""))
    with pytest.raises(DecodeError, match="not an image"):
        decode_image(io.BytesIO(b"GIF89a but not really"))
    buffer = io.BytesIO()
    Image.new("L", (40, 30), 7).save(buffer, format="PNG")
    assert decode_image(io.BytesIO(buffer.getvalue())).getpixel((3, 3)) == (7, 7, 7)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_from_bytes_too() -> None:
    buffer = io.BytesIO()
    Image.effect_noise((1024, 768), 40).convert("RGB").save(buffer, format="JPEG")
    reduced = decode_image(io.BytesIO(buffer.getvalue()), min_size=64)
    assert min(reduced.size) >= 128 and reduced.size[0] < 1024
