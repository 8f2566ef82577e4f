"""``mocohub index`` and ``mocohub search``: embeddings -> index -> neighbours, and a grid.

``mocohub index feats.npy --out feats.index`` builds an :class:`~mocohub.index.Index`
whose ids are the paths in ``feats.manifest.txt`` and remembers the model and
output of ``feats.meta.json``; ``mocohub search feats.index --query q.jpg``
embeds the queries with that model (or ``--model``), prints each query's
neighbours with their cosine scores, and with ``--grid out.png`` draws one
row per query: the query, then its neighbours with their scores.

Example:
    >>> draw_grid(["q.png"], [["a.png", "b.png"]], np.array([[0.98, 0.91]]), "grid.png")
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from mocohub.errors import InputError

__all__ = ["draw_grid", "index_command", "search_command"]

_GRID_ROWS = 16  # queries drawn at most; more would make an unreadable picture


@click.command("index")
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Index folder.")
@click.option(
    "--kind",
    type=click.Choice(["auto", "exact", "flat", "ivf", "hnsw"]),
    default="auto",
    show_default=True,
    help="exact (torch), flat/ivf/hnsw (faiss); auto picks by size.",
)
@click.option("--nlist", type=click.IntRange(min=1), default=None, help="IVF clusters.")
@click.option("--nprobe", type=click.IntRange(min=1), default=None, help="IVF clusters searched.")
def index_command(
    features: str, out: str, kind: str, nlist: int | None, nprobe: int | None
) -> None:
    """Build a search index from FEATURES (.npy written by `mocohub embed`).

    Example: mocohub index feats.npy --out feats.index
    """
    from mocohub.embed import output_files
    from mocohub.index import Index

    files = output_files(features)
    try:
        vectors = np.load(features, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise InputError(f"Cannot read {features} as a .npy array ({e}).") from e
    ids: list[Any] | None = None
    if files["manifest"].exists():
        ids = files["manifest"].read_text(encoding="utf-8").splitlines()
    meta: dict[str, Any] = {"features": os.path.abspath(features)}
    if files["meta"].exists():
        meta["embeddings"] = json.loads(files["meta"].read_text())
    index = Index.build(vectors, ids, kind=kind, nlist=nlist, nprobe=nprobe, meta=meta)
    index.save(out)
    size = f"{len(index)} vectors ({index.dim}-d, {index.kind})"
    click.echo(f"built a search index of {size} -> {out}")


@click.command("search")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--query", "-q", "queries", multiple=True, required=True, help="Image, folder or .txt list."
)
@click.option("--model", "-m", default=None, help="Model of the index (default: the recorded one).")
@click.option("--k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--grid", type=click.Path(dir_okay=False), default=None, help="Draw a PNG grid.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of text.")
def search_command(
    index_dir: str,
    queries: tuple[str, ...],
    model: str | None,
    k: int,
    grid: str | None,
    device: str,
    as_json: bool,
) -> None:
    """Find the K images in INDEX_DIR nearest to each query image.

    Example: mocohub search feats.index --query shoe.jpg --k 5 --grid shoe.png
    """
    import torch

    from mocohub.features import FeatureExtractor
    from mocohub.imageio import scan_inputs
    from mocohub.index import Index

    index = Index.load(index_dir)
    recorded = index.meta.get("embeddings", {})
    model = model or recorded.get("model")
    if not model:
        raise InputError(f"{index_dir} does not record its model; pass --model.")
    extractor = FeatureExtractor(
        model,
        device=device,
        output=recorded.get("output", "pooled"),
        normalize=True,
        precision="auto",  # a few queries: the check against fp32 costs nothing
    )
    paths, batches = [], []
    for path in scan_inputs(queries):
        try:
            batches.append(extractor.prepare([path]))
            paths.append(path)
        except InputError as e:
            warnings.warn(f"skipping query: {e}", stacklevel=1)
    if not paths:
        raise InputError("None of the query images could be read; check --query.")
    feats = extractor.embed_prepared(torch.cat(batches))
    found, scores = index.search(feats, k)
    for query, ids, row in zip(paths, found, scores, strict=True):
        if as_json:
            hits = [{"id": _plain(i), "score": float(s)} for i, s in zip(ids, row, strict=True)]
            click.echo(json.dumps({"query": query, "neighbours": hits}))
            continue
        click.echo(f"query: {query}")
        for rank, (i, s) in enumerate(zip(ids, row, strict=True), 1):
            click.echo(f"{rank:4d}  {s:.4f}  {i}")
    if grid:
        draw_grid(paths, [[str(i) for i in ids] for ids in found], scores, grid)
        click.echo(f"grid -> {grid}", err=True)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


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

    rows = min(len(queries), _GRID_ROWS)
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
