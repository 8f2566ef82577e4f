"""mocohub export publishes a folder whole, and every loader refuses files of two exports."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import onnx
import pytest
import torch

import mocohub
from mocohub import cli
from mocohub.artifact import ArtifactMismatchError, ModelConfig, build_model, save_pretrained
from mocohub.export import OnnxEmbedder, export_model
from mocohub.export import pipeline as pipeline_module
from mocohub.export import verify as verify_module
from mocohub.export.onnx import read_metadata
from mocohub.export.serve import open_served_model
from mocohub.preprocessing import Preprocessing

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "fashion-mnist"
REPO = Path(__file__).resolve().parent.parent


def _config(width: int) -> ModelConfig:
    prep = Preprocessing(28, 32, (0.286,), (0.353,), channels=1)
    return ModelConfig("resnet18", small_stem=True, in_channels=1, width=width, preprocessing=prep)


def _export(source: Path, out: Path) -> None:
    export_model(source, out, providers="cpu", log=lambda _: None)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two exports of different models: ``a`` (64-d features) and ``b`` (128-d)."""
    root = tmp_path_factory.mktemp("publish")
    torch.set_num_threads(1)
    for name, width in (("a", 8), ("b", 16)):
        torch.manual_seed(width)
        save_pretrained(build_model(_config(width)), root / f"src_{name}")
        _export(root / f"src_{name}", root / name)
    return {"root": root, "a": root / "a", "b": root / "b", "src_b": root / "src_b"}


@pytest.fixture
def quick_graph(exports: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Exports of ``src_b`` reuse b's graph instead of running torch.onnx.export again (slow)."""
    graph = exports["b"] / "model.onnx"
    monkeypatch.setattr(pipeline_module, "export_onnx", lambda model: onnx.load(str(graph)))


def _copy(exports: dict[str, Path], name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(exports[name], target)
    return target


def _old_export(exports: dict[str, Path], tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A copy of export ``a`` for a new export to replace, and its files' contents."""
    target = _copy(exports, "a", tmp_path)
    return target, _snapshot(target)


def _assert_kept(target: Path, before: dict[str, bytes]) -> None:
    """``target`` holds the files it held ``before``, and no hidden folder is left beside it."""
    assert _snapshot(target) == before
    assert _hidden_leftovers(target) == []


def test_the_weights_hash_is_in_every_graph_and_in_verify_json(exports: dict) -> None:
    folder = exports["a"]
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads((folder / "verify.json").read_text())["weights_sha256"] == digest
    props = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert props["weights_sha256"] == digest
    assert read_metadata(folder / "model.onnx")["weights_sha256"] == digest


def test_a_folder_mixing_two_exports_is_refused_by_every_loader(
    exports: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: b's weights and config beside a's graphs and verify.json."""
    mixed = _copy(exports, "a", tmp_path)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(exports["b"] / name, mixed / name)
    message = r"come from different exports.*re-run `mocohub export`"
    with pytest.raises(ArtifactMismatchError, match=message):
        mocohub.load(mixed)
    with pytest.raises(ArtifactMismatchError, match=message):
        OnnxEmbedder(mixed, "cpu", threads=1)
    with pytest.raises(ArtifactMismatchError, match=message):
        open_served_model(mixed, providers="cpu", threads=1)
    images = next(SAMPLES.glob("*.png"))
    for backend in ("onnxruntime", "torch"):
        out = str(tmp_path / f"{backend}.npy")
        args = ["--model", str(mixed), "--backend", backend, "--quiet", "--out", out]
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["embed", str(images), *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "come from different exports" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", str(mixed), "--providers", "cpu", "--port", "0"])
    assert exit_info.value.code == 2
    assert "come from different exports" in capsys.readouterr().err


def test_a_graph_from_another_export_is_refused_beside_verify_json(
    exports: dict, tmp_path: Path
) -> None:
    """ONNX-only folders (no weights shipped) are still checked against verify.json."""
    mixed = _copy(exports, "a", tmp_path)
    (mixed / "model.safetensors").unlink()
    shutil.copy(exports["b"] / "model.onnx", mixed / "model.onnx")
    with pytest.raises(ArtifactMismatchError, match=r"verify\.json checked weights"):
        OnnxEmbedder(mixed, "cpu", threads=1)


def test_exports_of_older_versions_load_with_a_warning(exports: dict, tmp_path: Path) -> None:
    """No hash recorded (mocohub before this check): loaded, with a warning saying so."""
    old = _copy(exports, "a", tmp_path)
    record = json.loads((old / "verify.json").read_text())
    del record["weights_sha256"]
    (old / "verify.json").write_text(json.dumps(record))
    proto = onnx.load(str(old / "model.onnx"))
    kept = [p for p in proto.metadata_props if p.key != "weights_sha256"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(old / "model.onnx"))
    with pytest.warns(UserWarning, match="older mocohub.*re-run `mocohub export`"):
        assert OnnxEmbedder(old, "cpu", threads=1).dim == 64
    with pytest.warns(UserWarning, match="older mocohub"):
        assert mocohub.load(old).mocohub_config.embedding_dim == 64
    # The bundled model is an artifact without verify.json or graphs: nothing to check.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mocohub.load("moco_r18_fashion_mnist")


def test_an_export_interrupted_during_verification_keeps_the_old_one(
    exports: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quick_graph: None
) -> None:
    target, before = _old_export(exports, tmp_path)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_module, "verify_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _export(exports["src_b"], target)
    _assert_kept(target, before)
    assert OnnxEmbedder(target, "cpu", threads=1).dim == 64


def test_a_failed_verification_keeps_the_old_export_and_sets_the_new_one_aside(
    exports: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quick_graph: None
) -> None:
    target, before = _old_export(exports, tmp_path)
    monkeypatch.setitem(verify_module.BOUNDS, "fp32", 1.5)  # no graph can reach it
    with pytest.raises(verify_module.VerificationError, match=r"a\.rejected with verify.json"):
        _export(exports["src_b"], target)
    _assert_kept(target, before)
    rejected = tmp_path / "a.rejected"
    assert json.loads((rejected / "verify.json").read_text())["passed"] is False


_KILLED_EXPORT = """
import os, signal, sys
import onnx
from mocohub.export import pipeline, publish
where, source, target, graph = sys.argv[1:5]
pipeline.export_onnx = lambda model: onnx.load(graph)  # as quick_graph
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if where == "verification":
    pipeline.verify_files = die
else:  # between setting the old folder aside and renaming the new one onto its name
    rename = os.rename
    calls = []
    def rename_then_die(a, b):
        calls.append(a)
        if len(calls) == 2:
            die()
        rename(a, b)
    publish.os.rename = rename_then_die
pipeline.export_model(source, target, providers="cpu", log=lambda _: None)
"""


@pytest.mark.parametrize("where", ["verification", "swap"])
def test_a_killed_export_leaves_the_old_one_or_restores_it(
    exports: dict, tmp_path: Path, where: str
) -> None:
    """kill -9 during verification, or between the two renames of the swap."""
    target, before = _old_export(exports, tmp_path)
    graph = exports["b"] / "model.onnx"
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(_KILLED_EXPORT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(script), where, str(exports["src_b"]), str(target), str(graph)],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    assert run.returncode == -9, run.stderr.decode()[-2000:]
    left = _hidden_leftovers(target)
    if where == "verification":
        assert _snapshot(target) == before  # serve loads the old, complete export
        assert len(left) == 1 and ".export-" in left[0]  # hidden: no loader looks there
    else:
        assert not target.exists()  # nothing that serve loads ...
        assert sorted(k.split("-")[0] for k in left) == [".a.export", ".a.replaced"]
    # The next export cleans up after the killed one (and puts the old folder back first).
    from mocohub.export.publish import prepare_target

    prepare_target(target)
    _assert_kept(target, before)


def test_a_full_disk_is_one_line_and_keeps_the_old_export(
    exports: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    quick_graph: None,
) -> None:
    target, before = _old_export(exports, tmp_path)

    def full(proto: object, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pipeline_module, "save_onnx", full)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(exports["src_b"]), "--out", str(target), "--providers", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"The disk holding {tmp_path} is full" in err, err
    _assert_kept(target, before)


def test_out_under_a_file_is_one_line(
    exports: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "existing.txt").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(exports["src_b"]), "--out", str(tmp_path / "existing.txt/sub")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "existing.txt is a file, not a folder" in err, err


def test_files_that_are_not_the_exports_are_carried_over(
    exports: dict, tmp_path: Path, quick_graph: None
) -> None:
    target = _copy(exports, "a", tmp_path)
    (target / "notes").mkdir()
    (target / "notes" / "a.txt").write_text("mine")
    (target / "model.int8.onnx").write_text("an earlier export's")
    _export(exports["src_b"], target)
    assert (target / "notes" / "a.txt").read_text() == "mine"
    assert not (target / "model.int8.onnx").exists()
    assert OnnxEmbedder(target, "cpu", threads=1).dim == 128
    assert mocohub.load(target).mocohub_config.embedding_dim == 128
