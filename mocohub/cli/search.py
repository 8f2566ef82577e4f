"""``mocohub index`` and ``mocohub search``: embeddings -> index -> neighbours, and a grid.

``mocohub index feats.npy --out feats.index`` builds an :class:`~mocohub.index.Index`
whose ids are the paths in ``feats.manifest.txt`` and remembers the model and
output of ``feats.meta.json``; ``mocohub search feats.index --query q.jpg``
embeds the queries with that model (or ``--model``), prints each query's
neighbours with their cosine scores, and with ``--grid out.png`` draws one
row per query: the query, then its neighbours with their scores
(:func:`mocohub.grid.draw_grid`).

Example:
    $ mocohub index feats.npy --out feats.index
    $ mocohub search feats.index --query shoe.jpg --k 5 --grid shoe.png
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import click
import numpy as np

from mocohub.errors import InputError
from mocohub.fileio import disk_errors

__all__ = ["index_command", "search_command"]


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
    """Build a search index from FEATURES (.npy or .parquet written by `mocohub embed`).

    With FEATURES.meta.json beside it, the array, manifest and errors file must
    be the ones it records (else: rerun `mocohub embed`); a bare .npy is indexed
    by row number, or by the lines of FEATURES.manifest.txt.

    Example: mocohub index feats.npy --out feats.index
    """
    from mocohub.embed_outputs import load_features, output_files, verified_meta
    from mocohub.index import Index

    files = output_files(features)
    meta: dict[str, Any] = {"features": os.path.abspath(features)}
    if files["meta"].exists():
        meta["embeddings"] = {
            k: v for k, v in verified_meta(features).items() if k not in ("files", "parts")
        }
    try:
        vectors = load_features(features)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"Cannot read {features} as a .npy or .parquet array ({e}).") from e
    ids: list[Any] | None = None
    if files["manifest"].exists():
        ids = files["manifest"].read_text(encoding="utf-8").splitlines()
        if len(ids) != len(vectors):
            raise InputError(
                f"{files['manifest']} names {len(ids)} paths but {features} holds "
                f"{len(vectors)} rows; they are not one output: rerun mocohub embed."
            )
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
        from mocohub.grid import GRID_ROWS, draw_grid

        _warn_missing([str(i) for ids in found[:GRID_ROWS] for i in ids])
        with disk_errors(grid, option="--grid"):
            draw_grid(paths, [[str(i) for i in ids] for ids in found], scores, grid)
        click.echo(f"grid -> {grid}", err=True)


def _warn_missing(shown: list[str]) -> None:
    """Warn when images the grid should show are not where the index says they are."""
    from mocohub.imageio import IMAGE_EXTENSIONS

    missing = [path for path in shown if not os.path.isfile(path)]
    if not missing:
        return
    if all(path.isdigit() for path in missing):
        why = "the index names its rows by number (it was built without FEATURES.manifest.txt)"
    elif not any(os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS for path in missing):
        why = (
            "the index names its rows by ids that are not image files (webdataset keys, or a "
            "table's --id-column): the grid can show only images embedded from files"
        )
    else:
        why = (
            "the index names images by the paths `mocohub embed` was given, relative to the "
            "folder it ran in: run search from that folder, or embed with absolute paths"
        )
    warnings.warn(
        f"{len(missing)} of the {len(shown)} neighbours in the grid are not files here "
        f"(first: {missing[0]}) and are drawn as grey tiles; {why}.",
        stacklevel=1,
    )


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
