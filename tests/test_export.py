"""mocohub export: the artifacts it writes, their parity with PyTorch, and its verification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors import safe_open

import mocohub
from mocohub import cli
from mocohub.artifact import ModelConfig, build_model, save_pretrained
from mocohub.errors import InputError
from mocohub.export.onnx import OPSET, read_metadata
from mocohub.export.onnx_embedder import OnnxEmbedder, open_embedder
from mocohub.export.quantize import ImageSet, load_image_folder, quantize_int8
from mocohub.export.verify import BOUNDS, VerificationError, neighbour_agreement, verify_files
from mocohub.preprocessing import Preprocessing

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "fashion-mnist"
ONNX_FILES = {
    "model.onnx": "fp32",
    "model.fp16.onnx": "fp16",
    "model.int8.onnx": "int8",
    "model.preprocess.onnx": "fp32",
    "model.preprocess.fp16.onnx": "fp16",
    "model.preprocess.int8.onnx": "int8",
}


def gray_config() -> ModelConfig:
    prep = Preprocessing(28, 32, (0.286,), (0.353,), channels=1)
    return ModelConfig("resnet18", small_stem=True, in_channels=1, width=8, preprocessing=prep)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny 1-channel model exported by the CLI with every option; real images apart."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    save_pretrained(build_model(gray_config()), root / "src")
    samples = sorted(SAMPLES.glob("*.png"))
    calib, held = root / "calib", root / "held"
    calib.mkdir()
    held.mkdir()
    for png in samples[:48]:
        shutil.copy(png, calib / png.name)
    for png in samples[48:112]:
        shutil.copy(png, held / png.name)
    (calib / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = root / "out"
    torch.set_num_threads(1)
    result = CliRunner().invoke(
        cli.cli,
        [
            "export",
            str(root / "src"),
            "--out",
            str(out),
            "--with-preprocessing",
            "--fp16",
            "--int8",
            "--calibration",
            str(calib),
            "--providers",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    model = mocohub.load(root / "src")
    images = load_image_folder(held, model.mocohub_config.preprocessing)
    return {"out": out, "output": result.output, "model": model, "images": images}


def test_export_writes_every_artifact_and_reports(exported: dict) -> None:
    out: Path = exported["out"]
    names = {p.name for p in out.iterdir()}
    assert names == {"model.safetensors", "config.json", "README.md", "verify.json", *ONNX_FILES}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "resnet18" and meta["embedding_dim"] == "64"
    assert meta["mocohub_version"] == mocohub.__version__ and meta["format"] == "pt"
    assert (out / "README.md").read_text().startswith("---")
    assert json.loads((out / "config.json").read_text())["preprocessing"]["channels"] == 1
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] is True
    assert len(verify["checks"]) == 2 * len(ONNX_FILES)
    assert {c["inputs"] for c in verify["checks"]} == {"random", "images"}
    assert all(c["cosine_min"] >= BOUNDS[c["precision"]] for c in verify["checks"])
    output: str = exported["output"]
    assert "skipped 1 unreadable file(s)" in output and "zz_broken.png" in output
    assert "static (48 images)" in output
    assert "model.preprocess.int8.onnx" in output and "verified: every file" in output


@pytest.mark.parametrize("name", sorted(ONNX_FILES))
def test_graphs_pass_the_checker_and_carry_metadata(exported: dict, name: str) -> None:
    path = exported["out"] / name
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert any(o.domain in ("", "ai.onnx") and o.version == OPSET for o in proto.opset_import)
    (graph_input,) = proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    meta = read_metadata(path)
    assert meta["precision"] == ONNX_FILES[name]
    assert meta["config"] == exported["model"].mocohub_config
    if "preprocess" in name:
        assert graph_input.name == "pixels" and meta["input"] == "pixels" and meta["normalised"]
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert [d.dim_value for d in dims[1:]] == [28, 28, 3]
    else:
        assert graph_input.name == "images" and not meta["normalised"]
        assert [d.dim_value for d in dims[1:]] == [1, 28, 28]
    if ONNX_FILES[name] == "int8":  # really quantized: int8 weights behind DequantizeLinear
        ops = {n.op_type for n in proto.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert any(t.data_type == onnx.TensorProto.INT8 for t in proto.graph.initializer)


def test_onnx_embedder_takes_an_export_folder(exported: dict, tmp_path: Path) -> None:
    out: Path = exported["out"]
    embedder = OnnxEmbedder(out, "cpu", threads=1)
    assert embedder.path == out / "model.onnx" and embedder.input == "images"
    some = tmp_path / "some"
    some.mkdir()
    for name in ("model.int8.onnx", "model.preprocess.onnx"):
        shutil.copy(out / name, some / name)
    with pytest.raises(InputError, match=r"several graphs and no model\.onnx \(model\.int8"):
        OnnxEmbedder(some, "cpu")
    (some / "model.preprocess.onnx").unlink()
    assert OnnxEmbedder(some, "cpu", threads=1).path == some / "model.int8.onnx"
    (some / "model.int8.onnx").unlink()
    with pytest.raises(InputError, match="holds no mocohub ONNX graph"):
        OnnxEmbedder(some, "cpu")
    with pytest.raises(InputError, match=r"does not exist; pass an \.onnx file or an export"):
        OnnxEmbedder(tmp_path / "absent.onnx", "cpu")


def test_embed_with_a_preprocessing_graph_says_it_is_for_serve(
    exported: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    graph = exported["out"] / "model.preprocess.int8.onnx"
    with pytest.raises(InputError, match=r"takes uint8 images \(N, 28, 28, 3\) and is for"):
        open_embedder(graph, threads=1)
    args = ["embed", str(SAMPLES / "00000_ankle-boot.png"), "--backend", "onnxruntime"]
    args += ["--model", str(graph), "--out", str(tmp_path / "feats.npy")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "`mocohub serve`" in err and "pass the plain graph (model.int8.onnx)" in err


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _reference(model: torch.nn.Module, images: ImageSet, pixels: bool) -> np.ndarray:
    with torch.inference_mode():
        if not pixels:
            return model(images.tensors).numpy()
        x = model.mocohub_config.preprocessing.batch()(
            torch.from_numpy(images.pixels).permute(0, 3, 1, 2)
        )
        return F.normalize(model(x), dim=1).numpy()


@pytest.mark.parametrize("name", sorted(ONNX_FILES))
def test_parity_with_pytorch_on_held_out_images(exported: dict, name: str) -> None:
    """Images the int8 calibration never saw; each precision within its bound."""
    embedder = OnnxEmbedder(exported["out"] / name, "cpu", threads=1)
    images: ImageSet = exported["images"]
    pixels = embedder.input == "pixels"
    out = embedder.embed_batch(images.pixels if pixels else images.tensors)
    reference = _reference(exported["model"], images, pixels)
    assert out.shape == reference.shape == (64, 64) and out.dtype == np.float32
    assert _cosines(out, reference).min() >= BOUNDS[ONNX_FILES[name]]
    if ONNX_FILES[name] == "fp32":
        assert np.abs(out - reference).max() < 1e-4
    if ONNX_FILES[name] == "int8":  # chance would keep about 10 of 63 neighbours
        assert neighbour_agreement(reference, out) > 0.5


@pytest.mark.parametrize("name", ["model.onnx", "model.int8.onnx", "model.preprocess.onnx"])
def test_dynamic_batch_gives_the_same_rows(exported: dict, name: str) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported["out"] / name), providers=["CPUExecutionProvider"])
    images: ImageSet = exported["images"]
    x = images.pixels if "preprocess" in name else images.tensors.numpy()
    whole = session.run(None, {session.get_inputs()[0].name: x[:17]})[0]
    assert whole.shape == (17, 64)
    for size in (1, 3):
        part = session.run(None, {session.get_inputs()[0].name: x[:size]})[0]
        assert part.shape == (size, 64)
        np.testing.assert_allclose(part, whole[:size], rtol=1e-4, atol=1e-5)


def test_preprocessing_graph_equals_batch_preprocessing_plus_model(exported: dict) -> None:
    """Colour uint8 images (luma inside the graph for this gray model) and real gray ones."""
    embedder = OnnxEmbedder(exported["out"] / "model.preprocess.onnx", "cpu", threads=1)
    colour = np.random.default_rng(3).integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)
    pixels = np.concatenate([colour, exported["images"].pixels[:5]])
    model = exported["model"]
    with torch.inference_mode():
        x = model.mocohub_config.preprocessing.batch()(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        expected = F.normalize(model(x), dim=1).numpy()
    out = embedder.embed_batch(pixels)
    np.testing.assert_allclose(out, expected, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_verification_fails_naming_the_worst_case(exported: dict) -> None:
    """The files checked against another model (a wrong export) must fail, loudly."""
    torch.manual_seed(1)
    other = build_model(gray_config())
    report = verify_files(
        other,
        {"model.onnx": "fp32", "model.int8.onnx": "int8"},
        folder=exported["out"],
        providers="cpu",
    )
    assert not report.passed
    assert {c.inputs for c in report.checks} == {"random", "synthetic"}
    worst = report.worst()
    assert worst is not None and not worst.passed
    with pytest.raises(VerificationError, match=rf"worst: {worst.file} on {worst.inputs} inputs"):
        report.raise_for_failure()
    assert "NO" in report.table()


def test_dynamic_int8_without_calibration(exported: dict, tmp_path: Path) -> None:
    from mocohub.export.onnx import add_metadata, save_onnx

    core = onnx.load(str(exported["out"] / "model.onnx"))
    model = exported["model"]
    proto = add_metadata(quantize_int8(core), model.mocohub_config, precision="int8")
    assert {"DynamicQuantizeLinear", "ConvInteger"} <= {n.op_type for n in proto.graph.node}
    save_onnx(proto, tmp_path / "dyn.onnx")
    images: ImageSet = exported["images"]
    out = OnnxEmbedder(tmp_path / "dyn.onnx", "cpu", threads=1).embed_batch(images.tensors)
    assert _cosines(out, _reference(model, images, False)).min() >= BOUNDS["int8"]


def test_safetensors_only_and_option_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_pretrained(build_model(gray_config()), tmp_path / "src")
    (tmp_path / "st").mkdir()
    for leftover in ("model.int8.onnx", "verify.json", "notes.txt"):  # an earlier export's
        (tmp_path / "st" / leftover).write_text("old")
    runner = CliRunner()
    ok = runner.invoke(
        cli.cli,
        ["export", str(tmp_path / "src"), "--out", str(tmp_path / "st"), "--format", "safetensors"],
    )
    assert ok.exit_code == 0, ok.output
    assert {p.name for p in (tmp_path / "st").iterdir()} == {
        "model.safetensors",
        "config.json",
        "README.md",
        "notes.txt",  # not a file mocohub writes: kept
    }
    assert "removed" in ok.output and "model.int8.onnx" in ok.output
    for args, message in [
        (["--format", "safetensors", "--int8"], "add onnx to --format"),
        (["--format", "onnx,tiff"], "Unknown export format(s) tiff"),
        (["--calibration", str(SAMPLES)], "add --int8"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "x"), *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "model.onnx").exists()


def test_export_error_for_a_missing_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "is not" in capsys.readouterr().err


def test_neighbour_agreement() -> None:
    x = np.random.default_rng(0).standard_normal((30, 8))
    assert neighbour_agreement(x, x) == 1.0
    assert neighbour_agreement(x, x * 3.0) == 1.0  # cosine neighbours ignore scale
    shuffled = np.random.default_rng(1).standard_normal((30, 8))
    assert neighbour_agreement(x, shuffled) < 0.7
    assert neighbour_agreement(x[:1], x[:1]) is None
