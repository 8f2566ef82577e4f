"""mocohub index + mocohub search: a query from the set finds itself first; the grid is drawn."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from embed_helpers import copy_samples, make_model
from PIL import Image

from mocohub.cli import main
from mocohub.grid import draw_grid
from mocohub.index import Index


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """60 embedded sample images (RGB model, 32 px), their index, and the manifest."""
    root = tmp_path_factory.mktemp("search")
    model = make_model(root / "model", rgb=True)
    copy_samples(root / "images", 60)
    feats = root / "feats.npy"
    main(["embed", str(root / "images"), "--out", str(feats), "--model", str(model), "-q"])
    main(["index", str(feats), "--out", str(root / "index"), "--kind", "exact"])
    manifest = (root / "feats.manifest.txt").read_text().splitlines()
    return root, model, manifest


def test_index_command_keeps_paths_and_model(indexed, capsys: pytest.CaptureFixture[str]) -> None:
    root, model, manifest = indexed
    index = Index.load(root / "index")
    assert (index.kind, len(index), index.dim) == ("exact", 60, 64)
    assert index.ids.tolist() == manifest
    assert index.meta["embeddings"]["model"] == str(model)
    main(["index", str(root / "feats.npy"), "--out", str(root / "auto")])
    assert "index of 60 vectors" in capsys.readouterr().out


def test_search_finds_the_query_itself_first_and_draws_the_grid(
    indexed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, model, manifest = indexed
    queries = [manifest[4], manifest[31]]
    grid = tmp_path / "grid.png"
    capsys.readouterr()
    argv = ["search", str(root / "index"), "--k", "5", "--grid", str(grid)]
    main([*argv, "--query", queries[0], "--query", queries[1], "--model", str(model)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query: {queries[0]}"
    rank, score, path = lines[1].split(maxsplit=2)
    assert (rank, path) == ("1", queries[0])
    assert float(score) == pytest.approx(1.0, abs=1e-3)
    assert lines[6] == f"query: {queries[1]}"
    assert lines[7].split(maxsplit=2)[2] == queries[1]
    assert len(lines) == 12
    picture = Image.open(grid)
    assert picture.format == "PNG"
    # two rows of a query and 5 neighbours, 128 px thumbnails with labels
    assert picture.width > 6 * 128 and picture.height > 2 * 128
    assert picture.width < 7 * 128 and picture.height < 3 * 128


def test_search_without_model_uses_the_recorded_one_and_prints_json(
    indexed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _model, manifest = indexed
    folder = tmp_path / "queries"
    folder.mkdir()
    shutil.copyfile(manifest[10], folder / "a.png")
    (folder / "b.png").write_text("not an image")  # skipped with a warning
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"b\.png"):
        main(["search", str(root / "index"), "--query", str(folder), "--k", "3", "--json"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 1
    assert records[0]["query"] == str(folder / "a.png")
    assert records[0]["neighbours"][0]["id"] == manifest[10]  # the same pixels, another path
    assert [n["score"] for n in records[0]["neighbours"]] == sorted(
        (n["score"] for n in records[0]["neighbours"]), reverse=True
    )


def test_search_errors_are_one_line(
    indexed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, model, _ = indexed
    (tmp_path / "bad.png").write_text("nope")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, pytest.warns(UserWarning, match="skipping"):
        main(["search", str(root / "index"), "--query", str(tmp_path / "bad.png")])
    assert exit_info.value.code == 2
    assert "None of the query images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["search", str(tmp_path), "--query", str(tmp_path / "bad.png"), "--model", str(model)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "mocohub index" in err
    assert err.count("\n") == 1


def test_a_model_whose_size_changed_since_the_index_is_named_with_how_to_rebuild(
    indexed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An index names its model; when the weights under that name give another size (a
    bundled model retrained at another width), search says so and how to rebuild."""
    root, _model, manifest = indexed
    shutil.copytree(root / "index", tmp_path / "index")
    wider = make_model(tmp_path / "same-name", rgb=True, width=16)
    header = json.loads((tmp_path / "index" / "index.json").read_text())
    header["meta"]["embeddings"]["model"] = str(wider)
    (tmp_path / "index" / "index.json").write_text(json.dumps(header))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["search", str(tmp_path / "index"), "--query", manifest[0]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"queries have 128 dims but the index has 64 (made with {wider})" in err
    assert "mocohub embed" in err and "mocohub index" in err
    assert err.count("\n") == 1


def test_a_grid_drawn_away_from_relative_paths_says_why_its_tiles_are_grey(
    indexed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, model, _manifest = indexed
    monkeypatch.chdir(root)  # embedded as a user would: `mocohub embed images/`
    main(["embed", "images", "--out", str(tmp_path / "rel.npy"), "--model", str(model), "-q"])
    main(["index", str(tmp_path / "rel.npy"), "--out", str(tmp_path / "rel.index")])
    query = str(root / "images" / sorted(p.name for p in (root / "images").iterdir())[0])
    argv = ["search", str(tmp_path / "rel.index"), "--query", query, "--k", "3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # from the folder embed ran in, every tile is found
        main([*argv, "--grid", str(tmp_path / "here.png")])
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"3 of the 3 neighbours .* not files here .*images/"):
        main([*argv, "--grid", str(tmp_path / "away.png")])
    assert (tmp_path / "away.png").is_file()  # still drawn: the search itself is right


def test_a_grid_of_webdataset_keys_says_that_they_are_not_files(indexed, tmp_path: Path) -> None:
    import webdataset as wds

    root, model, _manifest = indexed
    images = sorted((root / "images").iterdir())[:8]
    with wds.TarWriter(str(tmp_path / "shard.tar")) as sink:
        for i, image in enumerate(images):
            sink.write({"__key__": f"sample{i:05d}", "png": image.read_bytes()})
    feats = tmp_path / "feats.parquet"
    main(["embed", str(tmp_path / "shard.tar"), "--out", str(feats), "--model", str(model), "-q"])
    main(["index", str(feats), "--out", str(tmp_path / "index")])
    argv = ["search", str(tmp_path / "index"), "--query", str(images[0]), "--k", "2"]
    with pytest.warns(UserWarning, match=r"not files here \(first: sample00000\).*webdataset keys"):
        main([*argv, "--grid", str(tmp_path / "grid.png")])


def test_draw_grid_marks_unreadable_neighbours(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (50, 30), (10, 200, 10)).save(good)
    out = draw_grid(
        [str(good)],
        [[str(good), str(tmp_path / "gone.png")]],
        np.array([[1.0, 0.5]]),
        tmp_path / "g.png",
        thumb=64,
    )
    picture = Image.open(out).convert("RGB")
    assert picture.size == (3 * 70 + 6, 64 + 22 + 6 + 6)
    assert picture.getpixel((6 + 32, 6 + 32)) == (10, 200, 10)  # the query, padded on white
    assert picture.getpixel((6 + 70 + 32, 6 + 4)) == (255, 255, 255)  # padding above it
    assert picture.getpixel((6 + 140 + 2, 6 + 2)) == (200, 200, 200)  # the grey placeholder
    assert not list(tmp_path.glob(".g.png.*"))  # no temporary file left behind
