"""OnnxEmbedder / open_embedder: choosing the file and providers, parity, and `mocohub embed`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mocohub
from mocohub import cli
from mocohub.errors import ConfigError, InputError
from mocohub.export import OnnxEmbedder, export_model, open_embedder
from mocohub.export import onnx_embedder as oe
from mocohub.features import Embedder
from mocohub.models import ModelConfig, build_model, save_pretrained
from mocohub.preprocessing import Preprocessing

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "fashion-mnist"


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny 3-channel 32 px model, exported (fp32 + dynamic int8, with pixels graphs)."""
    root = tmp_path_factory.mktemp("onnx_embedder")
    prep = Preprocessing(32, 36, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), channels=3)
    torch.manual_seed(0)
    config = ModelConfig("resnet18", small_stem=True, width=8, preprocessing=prep)
    save_pretrained(build_model(config), root / "src")
    torch.set_num_threads(1)
    result = export_model(
        root / "src",
        root / "out",
        formats="onnx",
        with_preprocessing=True,
        int8=True,
        verify=False,
        log=lambda _: None,
    )
    assert result.report is None and not (root / "out" / "verify.json").exists()
    return {"root": root, "out": root / "out", "model": mocohub.load(root / "src")}


def _colour_images(count: int, size: tuple[int, int]) -> list[Image.Image]:
    """Real Fashion-MNIST images, tinted differently per channel and resized to ``size``."""
    images = []
    for png in sorted(SAMPLES.glob("*.png"))[:count]:
        gray = np.asarray(Image.open(png).resize(size, Image.BILINEAR), dtype=np.float32)
        tint = np.stack([gray, 255 - gray, gray * 0.5], axis=-1)
        images.append(Image.fromarray(tint.astype(np.uint8), "RGB"))
    return images


def test_open_embedder_picks_the_plain_fp32_graph(rgb: dict) -> None:
    out: Path = rgb["out"]
    embedder = open_embedder(out, threads=1)
    assert embedder.path.name == "model.onnx" and embedder.input == "images"
    assert isinstance(embedder, Embedder)  # the embed pipeline's seam
    assert (
        embedder.dim == 64 and embedder.preprocessing == rgb["model"].mocohub_config.preprocessing
    )
    assert embedder.providers == ["CPUExecutionProvider"]
    assert open_embedder(out, precision="int8", threads=1).path.name == "model.int8.onnx"
    assert open_embedder(out / "model.int8.onnx", threads=1).precision == "int8"
    assert oe.find_model_file(out, pixels=None).name == "model.preprocess.onnx"
    assert oe.find_model_file(out, gpu=True).name == "model.onnx"  # no fp16 file: fp32
    with pytest.raises(InputError, match="has no fp16 plain graph"):
        open_embedder(out, precision="fp16")
    with pytest.raises(InputError, match=r"not an \.onnx file or an export folder"):
        open_embedder(out / "config.json")
    with pytest.raises(InputError, match="no model file"):
        open_embedder(rgb["root"] / "src")
    broken = rgb["root"] / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    with pytest.raises(InputError, match="onnxruntime cannot load"):
        OnnxEmbedder(broken, "cpu")


def test_embed_batch_equals_pytorch_for_tensors_arrays_and_io_binding(rgb: dict) -> None:
    model = rgb["model"]
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x).numpy()
    plain = OnnxEmbedder(rgb["out"] / "model.onnx", "cpu", threads=1)
    bound = OnnxEmbedder(rgb["out"] / "model.onnx", "cpu", threads=1, io_binding=True)
    for out in (plain.embed_batch(x), plain.embed_batch(x.numpy()), bound.embed_batch(x)):
        assert out.dtype == np.float32 and out.shape == (5, 64)
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match=r"takes a batch of shape \(N, 3, 32, 32\)"):
        plain.embed_batch(np.zeros((2, 1, 28, 28), np.float32))


def test_embed_images_equals_transform_plus_model_for_both_graphs(rgb: dict) -> None:
    """Crop-size images and larger ones (resized and cropped as the preprocessing says)."""
    model = rgb["model"]
    images = _colour_images(3, (32, 32)) + _colour_images(3, (45, 60))
    transform = model.mocohub_config.preprocessing.transform()
    with torch.inference_mode():
        expected = F.normalize(model(torch.stack([transform(im) for im in images])), dim=1)
    for name in ("model.onnx", "model.preprocess.onnx"):
        out = OnnxEmbedder(rgb["out"] / name, "cpu", threads=1).embed_images(images)
        np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)


def test_rgb_preprocessing_graph_equals_batch_preprocessing(rgb: dict) -> None:
    model = rgb["model"]
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        x = model.mocohub_config.preprocessing.batch()(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        expected = F.normalize(model(x), dim=1).numpy()
    embedder = OnnxEmbedder(rgb["out"] / "model.preprocess.onnx", "cpu", threads=1)
    assert embedder.input == "pixels" and embedder.normalised
    np.testing.assert_allclose(embedder.embed_batch(pixels), expected, atol=2e-6)
    int8 = OnnxEmbedder(rgb["out"] / "model.preprocess.int8.onnx", "cpu", threads=1)
    cosines = (int8.embed_batch(pixels) * expected).sum(1)
    assert cosines.min() >= 0.98


def test_provider_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_only = ["CPUExecutionProvider"]
    monkeypatch.setattr(oe.torch.cuda, "is_available", lambda: False)
    assert oe.resolve_providers("auto") == cpu_only
    monkeypatch.setattr(oe.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        oe.ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", *cpu_only],
    )
    monkeypatch.setattr(oe, "_tensorrt_loadable", lambda: False)
    assert oe.resolve_providers("auto") == ["CUDAExecutionProvider", *cpu_only]
    monkeypatch.setattr(oe, "_tensorrt_loadable", lambda: True)
    assert oe.resolve_providers("auto")[0] == "TensorrtExecutionProvider"
    assert oe.resolve_providers("cpu") == cpu_only
    monkeypatch.setattr(oe.ort, "get_available_providers", lambda: cpu_only)
    with pytest.raises(ConfigError, match="has no CUDAExecutionProvider"):
        oe.resolve_providers("cuda")
    with pytest.raises(ConfigError, match="Unknown providers"):
        oe.resolve_providers("gpu-please")
    assert 1 <= oe.physical_cores() <= (os.cpu_count() or 1)


@pytest.mark.precision
def test_mocohub_embed_onnxruntime_equals_torch(rgb: dict, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for n, image in enumerate(_colour_images(6, (40, 40))):
        image.save(folder / f"{n}.png")
    shutil.copy(sorted(SAMPLES.glob("*.png"))[0], folder / "gray.png")  # 1-channel file
    common = [str(folder), "--workers", "0", "--quiet", "--batch-size", "4"]
    runs = {
        "torch": ["--model", str(rgb["root"] / "src"), "--backend", "torch", "--precision", "fp32"],
        "onnx": ["--model", str(rgb["out"]), "--backend", "onnxruntime"],
        "int8": ["--model", str(rgb["out"] / "model.int8.onnx"), "--backend", "onnxruntime"],
    }
    arrays = {}
    for name, args in runs.items():
        cli.main(["embed", *common, "--out", str(tmp_path / f"{name}.npy"), *args])
        arrays[name] = np.load(tmp_path / f"{name}.npy")
    assert arrays["torch"].shape == (7, 64)
    np.testing.assert_allclose(arrays["onnx"], arrays["torch"], atol=1e-5)
    assert (arrays["int8"] * arrays["torch"]).sum(1).min() >= 0.98
