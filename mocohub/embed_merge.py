"""Merging the outputs of ``mocohub embed --shard i/n`` runs into the output of one run.

Example:
    >>> merge_outputs(["f0.npy", "f1.npy"], "feats.npy")["rows"]
    2000
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from mocohub.embed_outputs import (
    output_files,
    read_meta,
    remove_orphans,
    verified_meta,
    write_outputs,
)
from mocohub.errors import InputError
from mocohub.fileio import disk_errors

__all__ = ["merge_outputs", "read_meta"]


def merge_outputs(
    parts: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    run_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Concatenate the outputs of ``--shard 0/n`` ... ``--shard n-1/n`` into ``out``.

    Every shard must be present once, from the same input list and settings,
    and its files must agree with its record
    (:func:`~mocohub.embed_outputs.verified_meta`); the result equals one
    unsharded run, published as :mod:`mocohub.embed_outputs` describes.
    ``run_meta`` replaces the merged record's settings (what
    :func:`mocohub.embed.run_record` gives for the one-process run: its key
    and parts, as :mod:`mocohub.embed_dist` writes). Returns the merged record.

    Example:
        >>> merge_outputs(["f0.npy", "f1.npy"], "feats.npy")["rows"]
        2000
    """
    metas = [verified_meta(p) for p in parts]
    if not metas:
        raise InputError("Name the shard outputs to merge.")
    count = metas[0]["shard"][1]
    same = (
        "inputs_sha256",
        "model",
        "backend",
        "output",
        "normalized",
        "dim",
        "dtype",
        "batch_size",
        "precision",
    )
    for path, meta in zip(parts, metas, strict=True):
        differing = [k for k in same if meta.get(k) != metas[0].get(k)]
        if differing == ["precision"]:  # e.g. "auto" on machines of different kinds
            raise InputError(
                f"{path} ran in {meta['precision']} but {parts[0]} in {metas[0]['precision']} "
                "(precision); rerun the shards with one --precision (fp32, bf16 or fp16)."
            )
        if differing or meta["shard"][1] != count:
            raise InputError(
                f"{path} was made with other inputs or settings than {parts[0]} "
                f"({', '.join(differing) or 'shard count'}); merge shards of one run only."
            )
    order = sorted(range(len(metas)), key=lambda j: metas[j]["shard"][0])
    found = [metas[j]["shard"][0] for j in order]
    if found != list(range(count)):
        raise InputError(
            f"The shards given are {found} of {count}; pass each of 0..{count - 1} exactly once."
        )
    sources = [output_files(parts[j]) for j in order]
    rows: list[str] = []
    errors: list[tuple[str, str]] = []
    for src in sources:
        rows.extend(src["manifest"].read_text(encoding="utf-8").splitlines())
        for line in src["errors"].read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            errors.append((record["path"], record["reason"]))
    files = output_files(out)
    with disk_errors(files["features"]):
        files["features"].parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(files)
    recorded = {k: v for k, v in metas[0].items() if k not in ("files", "parts")}
    merged = {**recorded, "shard": [0, 1], "key": None} if run_meta is None else run_meta
    arrays = [s["features"] for s in sources]
    dim, dtype = metas[0]["dim"], metas[0]["dtype"]
    return write_outputs(files, arrays, rows, errors, dim, dtype, merged)
