"""What ``mocohub embed`` reads at scale: webdataset tar shards and Parquet/CSV tables of paths.

Besides folders, image files and ``.txt`` lists (:func:`mocohub.imageio.scan_inputs`),
an input may be:

- webdataset shards: a brace pattern (``shards/{000000..000999}.tar``,
  expanded by webdataset), a ``.tar`` file, or a folder holding ``.tar``
  files and no images. Members are grouped into samples, and samples named,
  by webdataset's own rules (``__key__``: the member name up to its first dot;
  extensions lower-cased); a sample's image is its first member whose last
  extension is an image one (``jpg``, ``png``, ``webp``, ...), and its key is
  the manifest entry. A sample without an image is recorded in the errors
  file, as an undecodable file is. Members are read in place (uncompressed
  tar: the offset of each is known from its header), so the run keeps its
  parts, shards and resume exactly as for files.
- a Parquet or CSV table with an id column and a path column (``--id-column``,
  ``--path-column``; relative paths are relative to the table's folder): the
  id is the manifest entry.

Inputs of these kinds come back as :class:`Inputs` (the manifest names, and
where each item's bytes are); when every input is of the older kinds, as the
path list of :func:`~mocohub.imageio.scan_inputs`, unchanged.

Example:
    >>> inputs = scan_sources(["shards/{000000..000001}.tar"])
    >>> inputs.names[:2]
    ['n01440764/000000', 'n01440764/000001']
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mocohub.errors import ConfigError, InputError
from mocohub.imageio import IMAGE_EXTENSIONS, DecodeError, scan_inputs

__all__ = ["Inputs", "names_of", "scan_sources"]

TABLE_EXTENSIONS = frozenset({".parquet", ".csv"})
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # what webdataset's tar_file_iterator skips


@dataclass(frozen=True)
class Inputs:
    """Items to embed: item *i* is ``names[i]`` in the manifest, its bytes in ``files[i]``.

    ``spans[i]`` is ``(offset, size)`` of a tar member inside ``files[i]``, or
    None for a whole file; ``problems`` maps the items that cannot be an
    image to why (a webdataset sample without an image).

    Example:
        >>> items = Inputs(["cat-1"], ["/data/cat.jpg"], [None])
        >>> items.open(0)
        '/data/cat.jpg'
    """

    names: list[str]
    files: list[str]
    spans: list[tuple[int, int] | None]
    problems: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    def open(self, i: int) -> str | IO[bytes]:
        """What :func:`~mocohub.imageio.decode_image` reads for item ``i`` (DecodeError: none)."""
        if i in self.problems:
            raise DecodeError(self.problems[i])
        span = self.spans[i]
        if span is None:
            return self.files[i]
        return io.BytesIO(self._member(i, span))

    def _member(self, i: int, span: tuple[int, int]) -> bytes:
        offset, size = span
        try:
            with open(self.files[i], "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as e:
            raise DecodeError(f"cannot read its tar file ({e.strerror or e})") from e
        if len(data) != size:
            raise DecodeError("its tar file is shorter than its header says (truncated)")
        return data

    def fingerprint(self, i: int, verify_content: bool) -> list[Any]:
        """What identifies item ``i``'s bytes: its file's size and mtime (or content SHA-256)."""
        span = self.spans[i]
        try:
            stat = os.stat(self.files[i])
            if span is None:
                known: Any = _file_sha256(self.files[i]) if verify_content else stat.st_mtime_ns
                return [self.names[i], self.files[i], stat.st_size, known]
            if verify_content:
                member = hashlib.sha256(self._member(i, span)).hexdigest()
                return [self.names[i], self.files[i], *span, member]
            return [self.names[i], self.files[i], *span, stat.st_size, stat.st_mtime_ns]
        except (OSError, DecodeError):  # recorded as a failure when decoded; rechecked next time
            return [self.names[i], self.files[i], None, None]


def _file_sha256(path: str) -> str:
    from mocohub.publish import file_sha256

    return file_sha256(path)


def names_of(paths: Sequence[str] | Inputs) -> Sequence[str]:
    """The manifest entries of ``paths``: the paths themselves, or the :class:`Inputs` names."""
    return paths.names if isinstance(paths, Inputs) else paths


def _require(module: str, extra: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"Reading {what} needs the {module.split('.')[0]} library: "
            f"run `pip install 'mocohub[{extra}]'`."
        ) from e


def _is_pattern(item: str) -> bool:
    return "{" in item and "}" in item and not os.path.exists(item)


def _tar_folder(path: Path) -> list[str] | None:
    """The ``.tar`` files of a folder holding no images (a folder of shards), else None."""
    if not path.is_dir():
        return None
    tars = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
    return [str(p) for p in tars] if tars and not scan_inputs([path]) else None


def _shards(item: str) -> list[str] | None:
    """The tar files ``item`` names (a brace pattern, a .tar file, a folder of them), or None."""
    if _is_pattern(item):
        shardlists = _require("webdataset.shardlists", "wds", "webdataset shards")
        expanded = list(shardlists.expand_urls(item))
        missing = [p for p in expanded if not os.path.isfile(p)]
        if len(missing) == len(expanded):
            raise InputError(
                f"{item} matches no file (the first it names, {expanded[0]}, does not exist); "
                "check the folder and the numbers of the brace pattern."
            )
        if missing:
            raise InputError(
                f"{len(missing)} of the {len(expanded)} shards {item} names do not exist "
                f"(first: {missing[0]}); fix the pattern or restore the shards."
            )
        return expanded
    if item.endswith(".tar") and os.path.isfile(item):
        return [item]
    return _tar_folder(Path(item))


def _tar_members(tar_path: str) -> Iterator[dict[str, Any]]:
    """The regular members of a tar file as webdataset's tar iterator names them, each with
    its (offset, size) in place of its content."""
    try:
        with tarfile.open(tar_path, "r:") as tar:  # "r:": uncompressed, members read in place
            for info in tar:
                name = info.name
                if not info.isreg() or _SKIP_META.match(name):
                    continue
                yield {"fname": name, "data": (info.offset_data, info.size), "__url__": tar_path}
    except (tarfile.TarError, OSError) as e:
        raise InputError(
            f"Cannot read {tar_path} as an uncompressed tar file ({e}); webdataset shards for "
            "mocohub embed are .tar files (decompress .tar.gz ones first)."
        ) from e


def _image_member(sample: dict[str, Any]) -> str | None:
    for ext in sample:
        if not ext.startswith("__") and "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return ext
    return None


def _add_shards(tars: list[str], items: Inputs) -> None:
    tariterators = _require("webdataset.tariterators", "wds", "webdataset shards")
    for tar_path in tars:
        try:
            for sample in tariterators.group_by_keys(_tar_members(tar_path)):
                ext = _image_member(sample)
                items.names.append(sample["__key__"])
                items.files.append(tar_path)
                items.spans.append(sample[ext] if ext else None)
                if ext is None:
                    held = ", ".join(k for k in sample if not k.startswith("__"))
                    items.problems[len(items.names) - 1] = (
                        f"no image in this webdataset sample (it holds: {held})"
                    )
        except ValueError as e:  # webdataset: the same name twice in one sample
            raise InputError(f"{tar_path}: {e.args[0]}; each sample needs distinct names.") from e


def _read_table(path: Path, id_column: str, path_column: str) -> tuple[list[Any], list[Any]]:
    what = "Parquet and CSV inputs"
    pa = _require("pyarrow", "parquet", what)
    try:
        if path.suffix == ".parquet":
            parquet = _require("pyarrow.parquet", "parquet", what)
            columns = parquet.read_schema(path).names
            wanted = [c for c in (id_column, path_column) if c in columns]
            table = parquet.read_table(path, columns=wanted)
        else:
            csv = _require("pyarrow.csv", "parquet", what)
            types = {id_column: pa.string(), path_column: pa.string()}  # "007" stays "007"
            options = csv.ConvertOptions(column_types=types)
            table = csv.read_csv(path, convert_options=options)
            columns = table.column_names
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"Cannot read {path} as a {path.suffix[1:]} table ({e}).") from e
    for column, option in ((id_column, "--id-column"), (path_column, "--path-column")):
        if column not in columns:
            raise InputError(
                f"{path} has no column {column!r} (its columns: {', '.join(columns)}); "
                f"name the column with {option}."
            )
    return table.column(id_column).to_pylist(), table.column(path_column).to_pylist()


def _add_table(path: Path, id_column: str, path_column: str, items: Inputs) -> None:
    ids, paths = _read_table(path, id_column, path_column)
    for row, (name, listed) in enumerate(zip(ids, paths, strict=True)):
        if name is None or listed is None or str(name) == "" or str(listed) == "":
            column = id_column if name is None or str(name) == "" else path_column
            raise InputError(f"Row {row} of {path} has no {column!r}; fill it or drop the row.")
        file = Path(str(listed))
        items.names.append(str(name))
        items.files.append(str(file if file.is_absolute() else path.parent / file))
        items.spans.append(None)


def scan_sources(
    inputs: Iterable[str | os.PathLike[str]], *, id_column: str = "id", path_column: str = "path"
) -> list[str] | Inputs:
    """What ``mocohub embed INPUTS`` embeds: a path list, or :class:`Inputs` for shards/tables.

    Inputs are taken in the order given. Manifest entries must be unique (two
    samples or rows with one key/id are refused).

    Example:
        >>> scan_sources(["ids.parquet"]).names[:2]
        ['img-000', 'img-001']
    """
    given = [str(item) for item in inputs]
    kinds = [(_shards(item), Path(item).suffix.lower() in TABLE_EXTENSIONS) for item in given]
    if all(tars is None and not table for tars, table in kinds):
        return scan_inputs(given)
    items = Inputs([], [], [])
    for item, (tars, table) in zip(given, kinds, strict=True):
        if tars is not None:
            _add_shards(tars, items)
        elif table and Path(item).is_file():
            _add_table(Path(item), id_column, path_column, items)
        else:
            for path in scan_inputs([item]):
                items.names.append(path)
                items.files.append(path)
                items.spans.append(None)
    seen: set[str] = set()
    for name in items.names:
        if name in seen:
            raise InputError(
                f"{name!r} names two items of the inputs (a webdataset key or table id must be "
                "unique: it is the manifest entry); rename one or drop the duplicate."
            )
        seen.add(name)
    return items
