"""mocohub embed on webdataset shards and Parquet/CSV tables, and --output-format parquet.

Every run pins ``--precision fp32``; the reference is the same images embedded from files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import webdataset
from embed_helpers import make_model, sample_files

from mocohub.cli import main
from mocohub.embed_outputs import output_files, verified_meta

ARGS = ["--precision", "fp32", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "gray")


@pytest.fixture(scope="module")
def images() -> list[Path]:
    return sample_files(10)


def embed(*args: str) -> None:
    main(["embed", *args])


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["embed", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.count("\n") == 1, err
    return err


def read(out: Path) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    files = output_files(out)
    errors = [json.loads(line) for line in files["errors"].read_text().splitlines()]
    return np.load(out), files["manifest"].read_text().splitlines(), errors


def write_shards(folder: Path, images: list[Path]) -> list[str]:
    """Two shards of 5 + 5 samples (png + cls), plus a sample with no image and one whose
    .jpg is text, in the second. Returns the keys in order."""
    folder.mkdir(parents=True)
    keys = []
    for shard in range(2):
        with webdataset.TarWriter(str(folder / f"{shard:06d}.tar")) as sink:
            for n, image in enumerate(images[shard * 5 : shard * 5 + 5]):
                key = f"class{n % 2}/{shard * 5 + n:04d}"
                sink.write({"__key__": key, "png": image.read_bytes(), "cls": str(n % 2)})
                keys.append(key)
            if shard == 1:
                sink.write({"__key__": "labels-only", "cls": "1", "json": b"{}"})
                sink.write({"__key__": "text-as-jpeg", "jpg": b"not an image\n"})
                keys += ["labels-only", "text-as-jpeg"]
    return keys


def test_webdataset_shards_round_trip_their_keys(
    tmp_path: Path,
    model: Path,
    images: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = write_shards(tmp_path / "shards", images)
    listed = tmp_path / "files.txt"
    listed.write_text("".join(f"{p}\n" for p in images))
    embed(str(listed), "--out", str(tmp_path / "files.npy"), "-m", str(model), *ARGS)
    reference = np.load(tmp_path / "files.npy")

    pattern = str(tmp_path / "shards" / "{000000..000001}.tar")
    out = tmp_path / "wds.npy"
    embed(pattern, "--out", str(out), "-m", str(model), *ARGS)
    array, manifest, errors = read(out)
    assert manifest == keys[:10]  # the image samples, as webdataset keys them, in shard order
    assert [e["path"] for e in errors] == ["labels-only", "text-as-jpeg"]
    assert "no image in this webdataset sample (it holds: cls, json)" in errors[0]["reason"]
    assert "not an image" in errors[1]["reason"] or "cannot identify" in errors[1]["reason"]
    # the last batch holds the two bad samples: the same images, other batch neighbours
    np.testing.assert_allclose(array, reference, atol=1e-5)
    assert np.array_equal(array[:8], reference[:8])

    folder = tmp_path / "folder.npy"  # a folder of .tar files is the same input
    embed(str(tmp_path / "shards"), "--out", str(folder), "-m", str(model), *ARGS)
    assert read(folder)[1:] == (manifest, errors) and np.array_equal(np.load(folder), array)

    capsys.readouterr()
    embed(pattern, "--out", str(out), "-m", str(model), *ARGS)  # members known by their tars
    assert "is up to date" in capsys.readouterr().out


def test_bad_shard_inputs_are_one_clear_line(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path / "f.npy"), "-m", str(model), *ARGS]
    err = fails(capsys, str(tmp_path / "{000000..000009}.tar"), *out)
    assert "matches no file" in err and "000000.tar" in err
    (tmp_path / "000000.tar").write_bytes(b"")
    with webdataset.TarWriter(str(tmp_path / "000000.tar")) as sink:
        sink.write({"__key__": "a", "cls": "1"})
    err = fails(capsys, str(tmp_path / "{000000..000001}.tar"), *out)
    assert "1 of the 2 shards" in err and "000001.tar" in err
    (tmp_path / "x.tar").write_bytes(b"this is not a tar file" * 40)
    assert "uncompressed tar" in fails(capsys, str(tmp_path / "x.tar"), *out)


def write_table(path: Path, images: list[Path], ids: list[str], kind: str, **columns: str) -> None:
    """A table of ``ids`` and the paths of ``images`` relative to the table's folder."""
    relative = [os.path.relpath(p, path.parent) for p in images]
    table = pa.table({columns.get("id", "id"): ids, columns.get("path", "path"): relative})
    if kind == "parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_tables_of_ids_and_paths_round_trip_their_ids(
    tmp_path: Path, model: Path, images: list[Path], kind: str
) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    copies = []
    for image in images:
        copies.append(samples / image.name)
        copies[-1].write_bytes(image.read_bytes())
    (samples / "broken.png").write_text("no image\n")
    ids = [f"{n:03d}" for n in range(len(copies) + 1)]  # "007" must stay "007"
    table = tmp_path / "lists" / f"items.{kind}"
    table.parent.mkdir()
    write_table(table, [*copies, samples / "broken.png"], ids, kind)
    listed = tmp_path / "files.txt"
    listed.write_text("".join(f"{p}\n" for p in [*copies, samples / "broken.png"]))

    embed(str(listed), "--out", str(tmp_path / "files.npy"), "-m", str(model), *ARGS)
    embed(str(table), "--out", str(tmp_path / "ids.npy"), "-m", str(model), *ARGS)
    array, manifest, errors = read(tmp_path / "ids.npy")
    assert manifest == ids[:-1]
    assert [e["path"] for e in errors] == [ids[-1]]
    assert np.array_equal(array, np.load(tmp_path / "files.npy"))  # same files, same batches


def test_a_table_without_its_id_column_is_one_clear_line(
    tmp_path: Path, model: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    table = tmp_path / "items.parquet"
    write_table(table, images[:2], ["a", "b"], "parquet", id="name")
    out = ["--out", str(tmp_path / "f.npy"), "-m", str(model), *ARGS]
    err = fails(capsys, str(table), *out)
    assert "has no column 'id' (its columns: name, path)" in err and "--id-column" in err
    embed(str(table), *out, "--id-column", "name")
    assert read(tmp_path / "f.npy")[1] == ["a", "b"]


def test_parquet_output_holds_ids_and_the_npy_rows(
    tmp_path: Path, model: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    keys = write_shards(tmp_path / "shards", images)
    npy = tmp_path / "npy" / "f.npy"  # not beside f.parquet: they would share f.manifest.txt
    embed(str(tmp_path / "shards"), "--out", str(npy), "-m", str(model), *ARGS)
    out = tmp_path / "f.parquet"
    embed(str(tmp_path / "shards"), "--out", str(out), "-m", str(model), *ARGS)
    table = pq.read_table(out)
    assert table.column_names == ["id", "embedding"]
    assert table.column("id").to_pylist() == keys[:10]
    embedding = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    array = read(npy)[0]
    assert embedding.dtype == np.float32 and np.array_equal(embedding, array)
    assert verified_meta(out)["rows"] == 10  # published and checked like the .npy
    assert output_files(out)["errors"].read_text() == output_files(npy)["errors"].read_text()

    capsys.readouterr()
    embed(str(tmp_path / "shards"), "--out", str(out), "-m", str(model), *ARGS)
    assert "is up to date" in capsys.readouterr().out
    # `mocohub index` takes the parquet output as it takes a .npy: its rows and ids.
    from mocohub.index import Index

    main(["index", str(out), "--out", str(tmp_path / "p.index")])
    index = Index.load(tmp_path / "p.index")
    assert list(index.ids) == keys[:10]
    query = array[:2]
    (ids, scores), (want_ids, want_scores) = (
        i.search(query, k=3) for i in (index, Index.build(array, keys[:10]))
    )
    assert ids.tolist() == want_ids.tolist() and np.array_equal(scores, want_scores)
    args = ["--out", str(tmp_path / "g.npy"), "-m", str(model), "--output-format", "parquet"]
    err = fails(capsys, str(tmp_path / "shards"), *args)
    assert "--output-format parquet writes a .parquet file" in err


def test_missing_libraries_name_their_extra(
    tmp_path: Path,
    model: Path,
    images: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_shards(tmp_path / "shards", images)
    table = tmp_path / "items.parquet"
    write_table(table, images[:2], ["a", "b"], "parquet")
    out = ["--out", str(tmp_path / "f.npy"), "-m", str(model), *ARGS]
    for name in ("webdataset", "webdataset.shardlists", "webdataset.tariterators"):
        monkeypatch.setitem(sys.modules, name, None)
    err = fails(capsys, str(tmp_path / "shards" / "{000000..000001}.tar"), *out)
    assert "pip install 'mocohub[wds]'" in err
    assert "pip install 'mocohub[wds]'" in fails(capsys, str(tmp_path / "shards"), *out)
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)
    assert "pip install 'mocohub[parquet]'" in fails(capsys, str(table), *out)


def test_parquet_bytes_do_not_depend_on_how_the_parts_cut_the_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards merged by rank 0 and one process's parts cut the rows differently: row groups
    of a fixed size make the same file of both (here groups of 3 rows, 8 rows)."""
    import mocohub.embed_outputs as embed_outputs

    monkeypatch.setattr(embed_outputs, "_ROWS_PER_GROUP", 3)
    rows = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
    ids = [f"id-{n}" for n in range(8)]
    written = []
    for cuts in ([8], [2, 5, 1], [3, 3, 2]):
        folder = tmp_path / "-".join(map(str, cuts))
        folder.mkdir()
        arrays, start = [], 0
        for n, count in enumerate(cuts):
            arrays.append(folder / f"{n}.npy")
            np.save(arrays[-1], rows[start : start + count])
            start += count
        files = output_files(folder / "f.parquet")
        embed_outputs.write_outputs(files, arrays, ids, [], 5, "float32", {"key": "k"})
        written.append(files["features"].read_bytes())
    assert written[0] == written[1] == written[2]
    table = pq.read_table(tmp_path / "8" / "f.parquet")
    assert pq.ParquetFile(tmp_path / "8" / "f.parquet").metadata.num_row_groups == 3
    assert table.column("id").to_pylist() == ids
    assert np.array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), rows)
