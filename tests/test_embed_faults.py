"""mocohub embed under injected faults: full disks, interrupted publication, changed inputs,
read-only folders, paths through files, and temporaries of killed writers.

Every test pins ``--precision fp32`` and compares arrays bit for bit with a clean run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from embed_helpers import make_model, sample_files
from PIL import Image

from mocohub.cli import main
from mocohub.embed_outputs import output_files, verified_meta
from mocohub.errors import InputError
from mocohub.features import TorchEmbedder
from mocohub.index import Index


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "gray")


def make_images(folder: Path, names: list[str], *, start: int = 0, ext: str = ".png") -> None:
    """Sample images ``start``, ``start + 1``, ... saved as ``folder/name + ext``."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sample_files(start + len(names))[start:]
    for name, src in zip(names, sources, strict=True):
        Image.open(src).save(folder / (name + ext))


def embed_args(folder: Path, out: Path, model: Path) -> list[str]:
    return [
        "embed", str(folder), "--out", str(out), "--model", str(model), "-q",
        "--precision", "fp32", "--device", "cpu", "--workers", "0",
        "--batch-size", "4", "--part-size", "4",
    ]  # fmt: skip


def embed_new_images(folder: Path, out: Path, model: Path, count: int) -> None:
    """Embed ``count`` new images 000.png, 001.png, ... in ``folder`` into ``out``."""
    make_images(folder, [f"{n:03d}" for n in range(count)])
    main(embed_args(folder, out, model))


def embedded_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The list the size of each batch the model embeds from now on is appended to."""
    embedded: list[int] = []
    real = TorchEmbedder.embed_batch
    monkeypatch.setattr(
        TorchEmbedder, "embed_batch", lambda self, x: embedded.append(len(x)) or real(self, x)
    )
    return embedded


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; it must exit 2 with one line on stderr and no traceback. Returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    return err


def snapshot(out: Path) -> dict[str, bytes]:
    """The bytes of every output file of ``out``."""
    files = output_files(out)
    return {role: files[role].read_bytes() for role in ("features", "manifest", "errors", "meta")}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def fail_when(monkeypatch: pytest.MonkeyPatch, name: str, hit: Callable[..., bool], error: Any):
    """Make ``os.<name>`` raise ``error`` on calls for which ``hit(*args)`` is true."""
    real = getattr(os, name)

    def faulty(*args: Any, **kwargs: Any) -> Any:
        if hit(*args):
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, faulty)


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


# --- item 1: the outputs of one run are published together or not at all ----------------


def test_full_disk_during_assembly_leaves_the_earlier_output_whole(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The fault of issue 18 #1: a complete output, inputs swapped, the rerun's disk fills."""
    folder, out = tmp_path / "images", tmp_path / "out" / "feats.npy"
    embed_new_images(folder, out, model_dir, 12)
    before = snapshot(out)
    for n in (2, 7):  # two files swapped for others: still 12
        (folder / f"{n:03d}.png").unlink()
    make_images(folder, ["100", "101"], start=20)

    # the array cannot be reserved on the disk: refused before any output file changes
    fail_when(
        monkeypatch,
        "posix_fallocate",
        lambda fd, *_: ".feats.npy." in fd_path(fd),
        OSError(errno.ENOSPC, "No space left on device"),
    )
    monkeypatch.setattr(
        "mocohub.fileio.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0)
    )
    err = fails(embed_args(folder, out, model_dir), capsys)
    rows_bytes = 12 * 64 * 4  # and the .npy header, the manifest and the errors: under 1 MB
    assert rows_bytes < 10**6
    assert err.endswith(
        f"The disk holding {out.parent} is full: free 1 MB or choose another --out.\n"
    )
    assert snapshot(out) == before  # the earlier output, whole and still consistent
    verified_meta(out)
    assert temporaries(out.parent) == []
    assert output_files(out)["parts"].exists()  # the finished parts are kept for the rerun

    # the disk fills while the manifest is being flushed (after the array was written)
    monkeypatch.undo()
    fail_when(
        monkeypatch,
        "fsync",
        lambda fd: ".feats.manifest.txt." in fd_path(fd),
        OSError(errno.ENOSPC, "No space left on device"),
    )
    assert "is full" in fails(embed_args(folder, out, model_dir), capsys)
    assert snapshot(out) == before and temporaries(out.parent) == []

    monkeypatch.undo()
    embedded = embedded_batches(monkeypatch)
    main(embed_args(folder, out, model_dir))
    assert embedded == []  # every part had been saved: the rerun only assembled them
    main(embed_args(folder, tmp_path / "fresh.npy", model_dir))
    assert np.array_equal(np.load(out), np.load(tmp_path / "fresh.npy"))
    manifest = output_files(out)["manifest"].read_text().splitlines()
    assert manifest == output_files(tmp_path / "fresh.npy")["manifest"].read_text().splitlines()
    assert str(folder / "100.png") in manifest and str(folder / "002.png") not in manifest


def test_an_interrupted_publication_is_refused_then_finished_by_the_rerun(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Ctrl-C (or a kill) after the array was published but before the manifest was."""
    folder, out = tmp_path / "images", tmp_path / "feats.npy"
    embed_new_images(folder, out, model_dir, 12)
    (folder / "005.png").unlink()
    make_images(folder, ["050"], start=30)

    fail_when(
        monkeypatch,
        "replace",
        lambda src, dst: Path(dst).name == "feats.manifest.txt",
        KeyboardInterrupt(),
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(embed_args(folder, out, model_dir))
    assert exit_info.value.code == 130  # "Aborted."
    monkeypatch.undo()
    assert temporaries(tmp_path) == []
    # the new array with the old manifest: index refuses them, in one line
    err = fails(["index", str(out), "--out", str(tmp_path / "index")], capsys)
    assert "do not belong together" in err and "feats.manifest.txt" in err
    assert "rerun the mocohub embed" in err
    assert not (tmp_path / "index").exists()
    argv = ["embed-merge", str(out), "--out", str(tmp_path / "merged.npy")]
    assert "do not belong together" in fails(argv, capsys)

    main(embed_args(folder, out, model_dir))  # resumes from the kept parts
    main(embed_args(folder, tmp_path / "fresh.npy", model_dir))
    assert snapshot(out)["features"] == snapshot(tmp_path / "fresh.npy")["features"]
    main(["index", str(out), "--out", str(tmp_path / "index"), "--kind", "exact"])
    index = Index.load(tmp_path / "index")
    query = np.load(out)[index.ids.tolist().index(str(folder / "050.png"))]
    ids, scores = index.search(query, k=1)
    assert ids[0, 0] == str(folder / "050.png") and scores[0, 0] == pytest.approx(1.0)


# A real `mocohub embed` that SIGKILLs itself at the moment ``os.replace`` would publish
# the file named by argv[1] (no cleanup runs: what a kill -9 or a power cut leaves).
KILL_AT_PUBLISH = """
import os, signal, sys
real = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
os.replace = replace
from mocohub.cli import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_a_kill_during_publication_is_refused_then_cleaned_and_finished(
    tmp_path: Path, model_dir: Path, capsys
) -> None:
    folder, out = tmp_path / "images", tmp_path / "feats.npy"
    embed_new_images(folder, out, model_dir, 8)
    (folder / "001.png").unlink()
    make_images(folder, ["077"], start=50)
    argv = [sys.executable, "-c", KILL_AT_PUBLISH, "feats.manifest.txt"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([*argv, *embed_args(folder, out, model_dir)], env=env, check=False)
    assert killed.returncode == -9
    left = temporaries(tmp_path)  # the manifest's and the errors file's, of a dead process
    assert [name.split(".")[1] for name in left] == ["feats", "feats"]
    err = fails(["index", str(out), "--out", str(tmp_path / "index")], capsys)
    assert "feats.manifest.txt is not the file its record names" in err

    main(embed_args(folder, out, model_dir))
    assert temporaries(tmp_path) == []
    main(embed_args(folder, tmp_path / "fresh.npy", model_dir))
    assert snapshot(out)["features"] == snapshot(tmp_path / "fresh.npy")["features"]
    assert snapshot(out)["manifest"] == snapshot(tmp_path / "fresh.npy")["manifest"]


def test_outputs_that_disagree_with_their_record_are_refused(
    tmp_path: Path, model_dir: Path, capsys
) -> None:
    folder = tmp_path / "images"
    make_images(folder, [f"{n:03d}" for n in range(8)])
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    main(embed_args(folder, a, model_dir))
    (folder / "000.png").unlink()
    make_images(folder, ["999"], start=40)
    main(embed_args(folder, b, model_dir))
    # same row count, one path different: b's manifest beside a's array and record
    output_files(a)["manifest"].write_bytes(output_files(b)["manifest"].read_bytes())
    err = fails(["index", str(a), "--out", str(tmp_path / "ia")], capsys)
    assert "a.manifest.txt is not the file its record names" in err
    # a record written before digests were recorded cannot vouch for its files
    meta = json.loads(output_files(b)["meta"].read_text())
    del meta["files"]
    output_files(b)["meta"].write_text(json.dumps(meta))
    err = fails(["index", str(b), "--out", str(tmp_path / "ib")], capsys)
    assert "older mocohub" in err and "rerun the mocohub embed" in err
    # the rerun of an embed whose record does not vouch for its files rewrites them
    main(embed_args(folder, b, model_dir))
    main(["index", str(b), "--out", str(tmp_path / "ib")])
    # a bare array is still indexed by row number
    np.save(tmp_path / "bare.npy", np.eye(3, dtype=np.float32))
    main(["index", str(tmp_path / "bare.npy"), "--out", str(tmp_path / "ibare")])
    assert Index.load(tmp_path / "ibare").ids.tolist() == [0, 1, 2]


# --- item 4: a file changed under the same name is embedded again ------------------------


def test_a_file_replaced_under_its_name_is_embedded_again(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    folder, out = tmp_path / "images", tmp_path / "feats.npy"
    embed_new_images(folder, out, model_dir, 12)
    target = folder / "005.png"
    stat = target.stat()
    Image.open(sample_files(60)[59]).save(target)  # another picture, the same name
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    embedded = embedded_batches(monkeypatch)
    capsys.readouterr()
    main(embed_args(folder, out, model_dir))
    said = capsys.readouterr().out
    assert "up to date" not in said and "(4 read in this run, 8 unchanged kept" in said
    assert embedded == [4]  # only the batch (and part) holding the changed file
    main(embed_args(folder, tmp_path / "fresh.npy", model_dir))
    assert np.array_equal(np.load(out), np.load(tmp_path / "fresh.npy"))
    verified_meta(out)

    # only the modification time changed (touch): that part is embedded again, the same rows
    embedded.clear()
    os.utime(folder / "010.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
    main(embed_args(folder, out, model_dir))
    assert embedded == [4]
    assert np.array_equal(np.load(out), np.load(tmp_path / "fresh.npy"))
    embedded.clear()
    main(embed_args(folder, out, model_dir))
    assert embedded == [] and "is up to date" in capsys.readouterr().out


def test_verify_content_notices_a_change_that_keeps_size_and_time(
    tmp_path: Path, model_dir: Path, capsys
) -> None:
    """Uncompressed BMPs of one size: a copied picture with the old mtime restored."""
    folder, out = tmp_path / "images", tmp_path / "feats.npy"
    make_images(folder, [f"{n:03d}" for n in range(8)], ext=".bmp")
    target = folder / "003.bmp"
    argv = [*embed_args(folder, out, model_dir), "--verify-content"]
    main(argv)
    stat = target.stat()
    target.write_bytes((folder / "006.bmp").read_bytes())
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size
    capsys.readouterr()
    main(argv)
    assert "(4 read in this run, 4 unchanged kept" in capsys.readouterr().out
    feats = np.load(out)
    manifest = output_files(out)["manifest"].read_text().splitlines()
    row = feats[manifest.index(str(target))]  # now the picture of 006.bmp, in another batch
    np.testing.assert_allclose(row, feats[manifest.index(str(folder / "006.bmp"))], atol=1e-6)
    assert not np.allclose(row, feats[manifest.index(str(folder / "002.bmp"))], atol=1e-3)


# --- item 10: full, read-only and impossible output folders: one line, exit 2 -------------


def test_a_full_disk_while_saving_a_part_is_one_line(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    folder, out = tmp_path / "images", tmp_path / "feats.npy"
    make_images(folder, [f"{n:03d}" for n in range(12)])
    saved = []
    real_fsync = os.fsync

    def fill_at_the_second_part(fd: int) -> None:
        name = fd_path(fd)
        if "/feats.npy.parts/.0000" in name and name.split("/")[-1].count(".npy"):
            saved.append(name)
            if len(saved) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fill_at_the_second_part)
    err = fails(embed_args(folder, out, model_dir), capsys)
    assert err.startswith(f"Error: The disk holding {tmp_path} is full")
    assert not out.exists() and temporaries(tmp_path) == []
    monkeypatch.undo()
    parts = output_files(out)["parts"]
    assert [p.name for p in sorted(parts.glob("0*.json"))] == ["000000.json"]
    main(embed_args(folder, out, model_dir))
    main(embed_args(folder, tmp_path / "fresh.npy", model_dir))
    assert np.array_equal(np.load(out), np.load(tmp_path / "fresh.npy"))


@pytest.mark.parametrize(
    ("code", "said"),
    [(errno.EROFS, "is on a read-only file system"), (errno.EACCES, "permission denied")],
)
def test_an_output_folder_that_cannot_be_written_is_one_line(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys, code: int, said: str
) -> None:
    """Injected: chmod cannot make a folder read-only for root, which the tests may run as."""
    folder, locked = tmp_path / "images", tmp_path / "locked"
    make_images(folder, ["000", "001"])
    locked.mkdir()
    error = OSError(code, os.strerror(code))
    under = lambda path, *_: str(path).startswith(str(locked))  # noqa: E731
    fail_when(monkeypatch, "mkdir", under, error)
    fail_when(monkeypatch, "open", under, error)
    err = fails(embed_args(folder, locked / "feats.npy", model_dir), capsys)
    assert f"{locked} {said}" in err or f"in {locked} ({said})" in err
    assert "choose another --out" in err
    main(embed_args(folder, tmp_path / "feats.npy", model_dir))
    assert "--out" in fails(["index", str(tmp_path / "feats.npy"), "--out", str(locked)], capsys)
    assert list(locked.iterdir()) == []


def test_an_output_under_a_file_is_one_line(tmp_path: Path, model_dir: Path, capsys) -> None:
    folder = tmp_path / "images"
    make_images(folder, ["000", "001"])
    existing = tmp_path / "existing.txt"
    existing.write_text("a file\n")
    for out in (existing / "feats.npy", existing / "sub" / "feats.npy"):
        err = fails(embed_args(folder, out, model_dir), capsys)
        assert f"{existing} is a file" in err and "choose another --out" in err
    main(embed_args(folder, tmp_path / "feats.npy", model_dir))
    err = fails(["index", str(tmp_path / "feats.npy"), "--out", str(existing / "sub")], capsys)
    assert f"{existing} is a file" in err
    assert existing.read_text() == "a file\n"


# --- item 11: temporaries of killed writers are removed at the next start ----------------


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, out = tmp_path / "images", tmp_path / "feats.npy"
    make_images(folder, [f"{n:03d}" for n in range(8)])
    real = TorchEmbedder.embed_batch
    calls: list[int] = []

    def interrupted(self: TorchEmbedder, images: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(TorchEmbedder, "embed_batch", interrupted)
    with pytest.raises(SystemExit):
        main(embed_args(folder, out, model_dir))
    monkeypatch.undo()
    dead, live = dead_pid(), 1  # pid 1 runs as long as the machine (or container) does
    parts = output_files(out)["parts"]
    orphans = [
        tmp_path / f".feats.npy.{dead}.0badf00d.tmp",
        tmp_path / f".feats.manifest.txt.{dead}.12345678.tmp",
        tmp_path / f".feats.npy.{dead}.tmp",  # the array temporary of older mocohubs
        parts / f".000001.npy.{dead}.9abcdef0.tmp",
    ]
    kept = [
        tmp_path / f".feats.npy.{live}.0badf00d.tmp",  # its writer may still be running
        tmp_path / f".other.npy.{dead}.0badf00d.tmp",  # not this output's
        tmp_path / ".feats.npy.notapid.tmp",
    ]
    for path in [*orphans, *kept]:
        path.write_bytes(b"\0" * 1024)
    main(embed_args(folder, out, model_dir))
    assert [p for p in orphans if p.exists()] == []
    assert [p for p in kept if p.exists()] == kept
    main(embed_args(folder, tmp_path / "fresh.npy", model_dir))
    assert np.array_equal(np.load(out), np.load(tmp_path / "fresh.npy"))


def test_index_files_that_disagree_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "index"
    Index.build(rng.normal(size=(20, 8)), [f"a{i}" for i in range(20)], kind="exact").save(folder)
    fail_when(
        monkeypatch,
        "replace",
        lambda src, dst: Path(dst).name == "vectors.npy",
        KeyboardInterrupt(),
    )
    other = Index.build(rng.normal(size=(20, 8)), [f"b{i}" for i in range(20)], kind="exact")
    with pytest.raises(KeyboardInterrupt):
        other.save(folder)
    monkeypatch.undo()
    assert temporaries(folder) == []
    with pytest.raises(InputError, match=r"do not belong together: vectors\.npy is not the file"):
        Index.load(folder)
    other.save(folder)
    assert Index.load(folder).ids.tolist() == [f"b{i}" for i in range(20)]
    header = json.loads((folder / "index.json").read_text())
    del header["files"]
    (folder / "index.json").write_text(json.dumps(header))
    with pytest.raises(InputError, match=r"older mocohub.*build it again"):
        Index.load(folder)


def test_help_says_how_files_are_known(capsys: pytest.CaptureFixture[str]) -> None:
    main(["embed", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "known by its path, size and modification time" in said
    assert "--verify-content Know each file by a SHA-256 of its content" in said
