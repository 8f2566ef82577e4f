"""The outputs of ``mocohub embed``: written together or not at all, checked when read.

Files beside ``OUT.npy``:

- ``OUT.npy``: one row per embedded image (float32 or float16, L2-normalised by default);
- ``OUT.manifest.txt``: line *i* is the path of row *i* (plain text, so ``sed -n 5p``
  and ``np.loadtxt``-free readers work; a path holding a line break is refused);
- ``OUT.errors.jsonl``: one ``{"path": ..., "reason": ...}`` per skipped file;
- ``OUT.meta.json``: the record: model, output, dims, precision, input digest,
  shard, counts, and the size and SHA-256 of each of the three files above.

:func:`write_outputs` publishes them with :class:`mocohub.publish.Publication`:
the three files are written whole to temporaries first (an array too large for
the disk fails before any output changes), then the record, then the renames.
:func:`verified_meta`, which ``mocohub index`` and ``mocohub embed-merge`` read
outputs through, refuses files that disagree with their record: what an
interrupted publication (kill, Ctrl-C, full disk) can leave is refused, never
read as an array and a manifest of two different runs. An output whose record
names no digests (written by an older mocohub) is refused the same way: it
cannot be checked, and rerunning ``mocohub embed`` rewrites it.

Example:
    >>> meta = verified_meta("feats.npy")  # InputError if its files do not belong together
    >>> meta["rows"], meta["dim"]
    (1998, 2048)
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mocohub.errors import ConfigError, InputError
from mocohub.fileio import disk_errors, process_is_gone, remove_dead_temporaries
from mocohub.publish import Publication, check_files

__all__ = [
    "FORMAT",
    "check_side_files_free",
    "complete_output",
    "load_features",
    "output_files",
    "read_meta",
    "remove_orphans",
    "verified_meta",
    "write_outputs",
]

FORMAT = "mocohub-embeddings"
DATA = ("features", "manifest", "errors")  # the files the record names
_ROWS_PER_WRITE = 4096
_ROWS_PER_GROUP = 65536  # Parquet row groups


def output_files(out: str | os.PathLike[str]) -> dict[str, Path]:
    """The files an embed run writes for ``out`` (which must end in ``.npy``).

    Example:
        >>> output_files("feats.npy")["manifest"]
        PosixPath('feats.manifest.txt')
    """
    out = Path(out)
    if out.suffix not in (".npy", ".parquet"):
        raise ConfigError(f"--out must be a .npy (or .parquet) file name, got {out}.")
    stem = out.with_suffix("")
    return {
        "features": out,
        "manifest": stem.with_name(stem.name + ".manifest.txt"),
        "errors": stem.with_name(stem.name + ".errors.jsonl"),
        "meta": stem.with_name(stem.name + ".meta.json"),
        "parts": out.with_name(out.name + ".parts"),
    }


def _npy_header(rows: int, dim: int, dtype: str) -> bytes:
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    fields = {"descr": descr, "fortran_order": False, "shape": (rows, dim)}
    np.lib.format.write_array_header_1_0(header, fields)
    return header.getvalue()


def _blocks(arrays: Sequence[Path], dim: int, dtype: str) -> Iterator[np.ndarray]:
    """The rows of the arrays in ``arrays``, in blocks of at most ``_ROWS_PER_WRITE``."""
    for path in arrays:
        part = load_features(path)
        if part.ndim != 2 or part.shape[1] != dim:
            raise InputError(f"{path} holds {part.shape[1:]} features, not ({dim},).")
        for start in range(0, len(part), _ROWS_PER_WRITE):
            yield np.ascontiguousarray(part[start : start + _ROWS_PER_WRITE], dtype=dtype)


class _ParquetSink:
    """What pyarrow writes a Parquet file to: the publication's hashing writer."""

    closed = False

    def __init__(self, file: Any) -> None:
        self.file, self.position = file, 0

    def write(self, data: Any) -> int:
        count = self.file.write(data)
        self.position += count
        return int(count)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _write_parquet(
    file: Any, blocks: Iterator[np.ndarray], rows: Sequence[str], dim: int, dtype: str
) -> int:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    values = pa.from_numpy_dtype(np.dtype(dtype))
    schema = pa.schema([("id", pa.string()), ("embedding", pa.list_(values, dim))])
    written = 0
    pending: list[np.ndarray] = []

    def flush(writer: Any, chunk: np.ndarray) -> None:
        nonlocal written
        if written + len(chunk) > len(rows):
            raise InputError(f"The parts hold more rows than their records name ({len(rows)}).")
        ids = pa.array(rows[written : written + len(chunk)], pa.string())
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), dim)
        writer.write_table(pa.Table.from_arrays([ids, embedding], schema=schema))
        written += len(chunk)

    with pq.ParquetWriter(_ParquetSink(file), schema) as writer:
        held = 0
        for block in blocks:
            pending.append(block)
            held += len(block)
            while held >= _ROWS_PER_GROUP:  # fixed row groups: the same bytes however cut
                joined = np.concatenate(pending)
                flush(writer, joined[:_ROWS_PER_GROUP])
                pending, held = [joined[_ROWS_PER_GROUP:]], held - _ROWS_PER_GROUP
        if held or written == 0:
            flush(writer, np.concatenate(pending) if pending else np.zeros((0, dim), dtype))
    return written


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError as e:
        raise ConfigError(
            "Parquet outputs need the pyarrow library: run `pip install 'mocohub[parquet]'`."
        ) from e
    return pyarrow


def load_features(path: str | os.PathLike[str]) -> np.ndarray:
    """The (rows, dim) array of an embed output or part: ``.npy`` (memory-mapped) or ``.parquet``.

    Example:
        >>> load_features("feats.parquet").shape
        (1998, 2048)
    """
    if Path(path).suffix != ".parquet":
        return np.load(path, mmap_mode="r")
    _pyarrow()
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def check_side_files_free(files: dict[str, Path]) -> None:
    """Refuse an output whose manifest, errors file and record belong to another output.

    ``feats.npy`` and ``feats.parquet`` share ``feats.manifest.txt``,
    ``feats.errors.jsonl`` and ``feats.meta.json``: writing one beside the
    other would leave the other without the map from its rows to files. So
    when the other is an intact embed output, this raises :class:`InputError`.

    Example:
        >>> check_side_files_free(output_files("feats.parquet"))  # feats.npy embedded before
        Traceback (most recent call last):
        mocohub.errors.InputError: feats.npy is an embed output, and ...
    """
    out = files["features"]
    other = out.with_suffix(".npy" if out.suffix == ".parquet" else ".parquet")
    if not other.is_file() or not files["meta"].is_file():
        return
    try:
        meta = read_meta(other)
    except InputError:
        return
    if check_files(meta, {"features": other}) is None:
        raise InputError(
            f"{other} is an embed output, and {out.name} would take over its "
            f"{files['manifest'].name}, {files['errors'].name} and {files['meta'].name} "
            f"(a .npy and a .parquet of one name share them): choose another --out name, "
            f"or delete {other} first."
        )


def write_outputs(
    files: dict[str, Path],
    arrays: Sequence[Path],
    rows: Sequence[str],
    errors: Sequence[tuple[str, str]],
    dim: int,
    dtype: str,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Publish the rows of the ``.npy`` files ``arrays`` (in order) as one output.

    A ``.parquet`` target (``files`` of ``OUT.parquet``) holds an ``id`` column
    (``rows``) and an ``embedding`` column (fixed-size lists of ``dtype``), in
    row groups of a fixed size, so the same rows give the same bytes however
    the parts cut them; the manifest and errors files are written beside it.

    ``rows`` names the path of each row, ``errors`` the skipped files; ``meta``
    goes into the record with the counts and the files' digests. The array is
    streamed part by part (bounded memory at any size). A full, read-only or
    unwritable disk is one :class:`InputError`; the earlier output is then left
    as it was. Returns the record.
    """
    check_side_files_free(files)
    header = _npy_header(len(rows), dim, dtype)
    array_bytes = len(header) + len(rows) * dim * np.dtype(dtype).itemsize
    manifest = "".join(p + "\n" for p in rows).encode("utf-8", "surrogateescape")
    skipped = "".join(json.dumps({"path": p, "reason": r}) + "\n" for p, r in errors).encode()
    needed = array_bytes + len(manifest) + len(skipped)
    parquet = files["features"].suffix == ".parquet"
    with disk_errors(files["features"], needed=needed), Publication() as publication:
        size = None if parquet else array_bytes
        with publication.writer(files["features"], "features", size=size) as f:
            blocks = _blocks(arrays, dim, dtype)
            if parquet:
                written = _write_parquet(f, blocks, rows, dim, dtype)
            else:
                f.write(header)
                written = 0
                for block in blocks:
                    f.write(block)
                    written += len(block)
            if written != len(rows):
                raise InputError(
                    f"The parts hold {written} rows but their records name {len(rows)}."
                )
        with publication.writer(files["manifest"], "manifest") as f:
            f.write(manifest)
        with publication.writer(files["errors"], "errors") as f:
            f.write(skipped)
        counts = {"rows": len(rows), "skipped": len(errors), "dim": dim, "dtype": dtype}
        return publication.publish(files["meta"], {"format": FORMAT, **meta, **counts})


def read_meta(out: str | os.PathLike[str]) -> dict[str, Any]:
    """The record (``.meta.json``) of an embed output, unchecked (InputError when not one).

    Example:
        >>> read_meta("feats.npy")["model"]
        'moco_v2_r50_800ep'
    """
    path = output_files(out)["meta"]
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"Cannot read {path} ({e}); is {out} the output of mocohub embed?") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{path} is not a mocohub embed description.")
    return meta


def verified_meta(out: str | os.PathLike[str]) -> dict[str, Any]:
    """The record of ``out`` once its array, manifest and errors file are checked against it.

    Raises :class:`InputError` (one line, saying to rerun ``mocohub embed``)
    when any of them is missing or is not the file the record names.

    Example:
        >>> verified_meta("feats.npy")["rows"]
        1998
    """
    meta = read_meta(out)
    files = output_files(out)
    problem = check_files(meta, {role: files[role] for role in DATA})
    if problem is not None:
        raise InputError(
            f"The files of {out} do not belong together: {problem}; rerun the mocohub embed "
            "(or embed-merge) command that wrote them, which resumes and rewrites them."
        )
    return meta


def complete_output(files: dict[str, Path], key: str, dtype: str) -> dict[str, Any] | None:
    """The record of a complete, intact earlier output of run ``key`` in ``dtype``, else None.

    Raises :class:`InputError` when ``OUT`` is a file that no embed record
    describes (not mocohub's to replace; the caller's ``restart`` skips this).
    """
    try:
        meta = read_meta(files["features"])
    except InputError:
        if files["features"].exists():
            raise InputError(
                f"{files['features']} exists and no {files['meta'].name} says mocohub embed "
                "wrote it; choose another --out, or add --restart to replace it."
            ) from None
        return None
    if meta.get("key") != key or meta.get("dtype") != dtype:
        return None
    return meta if check_files(meta, {role: files[role] for role in DATA}) is None else None


def remove_orphans(files: dict[str, Path]) -> list[Path]:
    """Delete the temporaries that dead writers of these outputs left (their own pid named them).

    Covers the outputs' temporaries beside ``OUT.npy``, the parts' in
    ``OUT.npy.parts/``, and the array temporaries of older mocohubs
    (``.OUT.npy.<pid>.tmp``). A file of a live process is kept. Returns the
    deleted paths.

    Example:
        >>> remove_orphans(output_files("feats.npy"))
        [PosixPath('.feats.npy.4242.9f3a1c0d.tmp')]
    """
    names = {files[role].name for role in (*DATA, "meta")}
    folder = files["features"].parent
    removed = remove_dead_temporaries(folder, names.__contains__)
    removed += remove_dead_temporaries(files["parts"], lambda name: True)
    old = re.compile(rf"\.{re.escape(files['features'].name)}\.(\d+)\.tmp")
    for path in folder.glob(f".{files['features'].name}.*.tmp") if folder.is_dir() else []:
        match = old.fullmatch(path.name)
        if match and path.is_file() and process_is_gone(int(match[1])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
