"""A picture of search results: one row per query, the query then its neighbours and scores.

``mocohub search --grid`` draws it; any code that has query paths, neighbour
paths and scores (from :meth:`mocohub.index.Index.search`) can call
:func:`draw_grid` itself.

Example:
    >>> ids, scores = index.search(query_features, k=5)
    >>> draw_grid(query_paths, [[str(i) for i in row] for row in ids], scores, "grid.png")
    PosixPath('grid.png')
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

__all__ = ["GRID_ROWS", "draw_grid"]

#: queries drawn at most; more would make an unreadable picture
GRID_ROWS = 16


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _thumbnail(path: str, size: int) -> Image.Image:
    from mocohub.imageio import DecodeError, decode_image

    try:
        image = decode_image(path, mode="RGB", min_size=size)
    except DecodeError:
        image = Image.new("RGB", (size, size), (200, 200, 200))
        ImageDraw.Draw(image).text((6, size // 2 - 8), "unreadable", fill=(90, 0, 0))
        return image
    return ImageOps.pad(image, (size, size), Image.Resampling.BICUBIC, color=(255, 255, 255))


def draw_grid(
    queries: Sequence[str],
    neighbours: Sequence[Sequence[str]],
    scores: np.ndarray,
    out: str | os.PathLike[str],
    *,
    thumb: int = 128,
) -> Path:
    """A PNG with one row per query: the query (red frame), then its neighbours and scores.

    At most 16 queries are drawn. The file is written atomically.

    Example:
        >>> draw_grid(["q.png"], [["q.png", "b.png"]], np.array([[1.0, 0.9]]), "grid.png")
        PosixPath('grid.png')
    """
    from mocohub.fileio import atomic_writer

    rows = min(len(queries), GRID_ROWS)
    cols = 1 + max((len(n) for n in neighbours[:rows]), default=0)
    pad, label = 6, 22
    cell_w, cell_h = thumb + pad, thumb + label + pad
    canvas = Image.new("RGB", (cols * cell_w + pad, rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    for r in range(rows):
        cells = [(queries[r], "query")]
        cells += [(n, f"#{j + 1}  {float(scores[r][j]):.3f}") for j, n in enumerate(neighbours[r])]
        for c, (path, text) in enumerate(cells):
            x, y = pad + c * cell_w, pad + r * cell_h
            canvas.paste(_thumbnail(path, thumb), (x, y))
            if c == 0:
                draw.rectangle(
                    (x - 2, y - 2, x + thumb + 1, y + thumb + 1), outline=(200, 0, 0), width=2
                )
            draw.text((x + 2, y + thumb + 3), text, fill=(0, 0, 0), font=font)
    target = Path(out)
    with atomic_writer(target) as f:
        canvas.save(f, format="PNG")
    return target
