"""`mocohub export` of a MoCo v3 ViT (a vit_nano from a reference-format checkpoint):
fp32/fp16/int8 graphs, dynamic batch, --with-preprocessing, the same parity checks."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import run_cli
from test_vit_library import v3_vit_checkpoint

import mocohub
from mocohub.export.onnx import read_metadata
from mocohub.export.quantize import VIT_OP_TYPES, load_image_folder
from mocohub.export.verify import BOUNDS

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "fashion-mnist"
GRAPHS = {
    "model.onnx": "fp32",
    "model.fp16.onnx": "fp16",
    "model.int8.onnx": "int8",
    "model.preprocess.onnx": "fp32",
    "model.preprocess.fp16.onnx": "fp16",
    "model.preprocess.int8.onnx": "int8",
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("vit-export")
    checkpoint, _ = v3_vit_checkpoint()
    torch.save(checkpoint, root / "vit-nano.pth.tar")
    samples = sorted(SAMPLES.glob("*.png"))
    calib, held = root / "calib", root / "held"
    calib.mkdir()
    held.mkdir()
    for png in samples[:16]:
        shutil.copy(png, calib / png.name)
    for png in samples[16:48]:
        shutil.copy(png, held / png.name)
    torch.set_num_threads(1)
    args = ["export", root / "vit-nano.pth.tar", "--out", root / "out", "--with-preprocessing"]
    args += ["--fp16", "--int8", "--calibration", calib, "--verify-images", held]
    return {"root": root, "args": [*args, "--providers", "cpu"], "held": held}


def test_export_of_a_vit_writes_every_graph_within_its_bounds(
    exported: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(exported["args"], capsys)
    assert code == 0, err
    folder: Path = exported["root"] / "out"
    assert {p.name for p in folder.iterdir()} >= {*GRAPHS, "verify.json", "model.safetensors"}
    verify = json.loads((folder / "verify.json").read_text())
    assert verify["passed"] is True and len(verify["checks"]) == 2 * len(GRAPHS)
    assert all(c["cosine_min"] >= BOUNDS[c["precision"]] for c in verify["checks"])
    model = mocohub.load(exported["root"] / "vit-nano.pth.tar")
    for name, precision in GRAPHS.items():
        meta = read_metadata(folder / name)
        assert meta["precision"] == precision and meta["config"].arch == "vit_nano"
        dims = onnx.load(str(folder / name)).graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"

    # our own check, beside verify's: fp32 at two batch sizes (the batch is dynamic)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    images = load_image_folder(exported["held"], model.mocohub_config.preprocessing)
    x = images.tensors[:5]
    with torch.no_grad():
        expected = model(x)
    for batch in (1, 5):
        (got,) = session.run(None, {"images": x[:batch].numpy()})
        cosine = F.cosine_similarity(torch.from_numpy(got), expected[:batch])
        assert got.shape == (batch, 32) and float(cosine.min()) >= 0.9999
    pixels = ort.InferenceSession(
        str(folder / "model.preprocess.onnx"), providers=["CPUExecutionProvider"]
    )
    (embeddings,) = pixels.run(None, {"pixels": images.pixels[:5]})
    # unit rows, at fp32's bound (gray pixels go through the graph's RGB -> luma product)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert float(F.cosine_similarity(torch.from_numpy(embeddings), expected).min()) >= 0.9999


def test_a_vits_int8_graph_quantizes_its_matrix_products_only(
    exported: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    folder: Path = exported["root"] / "out"
    if not (folder / "model.int8.onnx").is_file():
        assert run_cli(exported["args"], capsys)[0] == 0
    graph = onnx.load(str(folder / "model.int8.onnx")).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    fed = Counter(n.op_type for n in graph.node if set(n.input) & dequantized)
    assert fed["MatMul"] > 0 and fed["Conv"] == 1  # the patch projection
    # LayerNorm and GELU take float inputs (onnxruntime's default quantizes them too,
    # which cost parity: see export/quantize.py)
    assert fed["LayerNormalization"] == fed["Gelu"] == 0, fed
    assert "Gemm" in VIT_OP_TYPES and "LayerNormalization" not in VIT_OP_TYPES
