"""One decoder: knn's data, embed, serve and int8 calibration see the same tensors for a file.

The file is the hard case: a CMYK JPEG whose EXIF orientation says "rotate
90 degrees", which a plain ``Image.open(...).convert("RGB")`` gets wrong twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from PIL import Image
from serve_helpers import ThreadServer, request

from mocohub.artifact import ModelConfig, build_model
from mocohub.export import OnnxEmbedder
from mocohub.export.onnx import add_metadata, save_onnx
from mocohub.export.quantize import load_image_folder
from mocohub.export.serve import ServeSettings, create_app
from mocohub.export.serve_request import decode_for_model
from mocohub.features import CropToTensor, FeatureExtractor
from mocohub.imageio import decode_image
from mocohub.preprocessing import Preprocessing
from mocohub.training.data import load_image_folder as load_training_folder
from mocohub.training.data import resolve_dataset
from mocohub.training.eval_transforms import BatchEvalTransform, per_image_transform

ORIENTATION = 0x0112
CROP = 24


def _config(channels: int) -> ModelConfig:
    prep = Preprocessing(CROP, 28, (0.5,) * channels, (0.25,) * channels, channels=channels)
    return ModelConfig(
        "resnet18", small_stem=True, in_channels=channels, width=8, preprocessing=prep
    )


def _rotated_cmyk_jpeg(path: Path, width: int, height: int) -> None:
    """A colourful CMYK JPEG stored sideways, with EXIF orientation 6 (rotate 90 clockwise)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x * y) % 256], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(rgb, "RGB").convert("CMYK").save(path, "JPEG", quality=95, exif=exif)
    with Image.open(path) as stored:
        assert stored.mode == "CMYK" and stored.getexif()[ORIENTATION] == 6


def _flatten_graph(path: Path, config: ModelConfig) -> None:
    """A plain graph whose features are its input, flattened: serve's tensor comes back out."""
    prep = config.preprocessing
    size = prep.channels * prep.image_size**2
    shape: list[str | int] = ["batch", prep.channels, prep.image_size, prep.image_size]
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["features"], axis=1)],
        "flatten",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", size])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    save_onnx(add_metadata(proto, config, precision="fp32"), path)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("stored", [(40, 30), (CROP, CROP)], ids=["resized", "crop-size"])
def test_every_path_gives_the_same_tensor_for_a_rotated_cmyk_jpeg(
    tmp_path: Path, channels: int, stored: tuple[int, int]
) -> None:
    config = _config(channels)
    prep = config.preprocessing
    folder = tmp_path / "images" / "coat"  # an ImageFolder tree: one class
    folder.mkdir(parents=True)
    jpeg = folder / "a.jpg"
    _rotated_cmyk_jpeg(jpeg, *stored)

    # embed (FeatureExtractor, and the crop mocohub embed's workers make)
    embedded = FeatureExtractor(build_model(config), device="cpu").prepare([jpeg])
    decoded = decode_image(jpeg, mode="L" if channels == 1 else "RGB", min_size=prep.resize_size)
    assert decoded.size == stored[::-1]  # the EXIF rotation was applied
    crop = CropToTensor(prep)(decoded)
    torch.testing.assert_close(embedded, prep.batch()(crop[None]), rtol=0, atol=0)

    # knn / lincls on an image folder: training.data's ImageFolder + the evaluation transform
    dataset = load_training_folder(tmp_path / "images")
    dataset.transform = per_image_transform(prep, None, "auto")
    knn, _ = dataset[0]
    torch.testing.assert_close(knn[None], embedded, rtol=0, atol=1e-6)

    # int8 calibration (and the export's verification images)
    calibration = load_image_folder(tmp_path / "images", prep)
    torch.testing.assert_close(calibration.tensors, embedded, rtol=0, atol=0)
    gray_or_rgb = crop.permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(
        calibration.pixels[0], np.broadcast_to(gray_or_rgb, (CROP,) * 2 + (3,))
    )

    # serve: the request's bytes decoded and cropped, then the model's normalisation
    _flatten_graph(tmp_path / "model.onnx", config)
    embedder = OnnxEmbedder(tmp_path / "model.onnx", "cpu", threads=1)
    served = decode_for_model(jpeg.read_bytes(), embedder, "The image")
    np.testing.assert_array_equal(served, gray_or_rgb)
    server = ThreadServer(create_app(embedder, ServeSettings()))
    try:
        status, _, body = request(
            server.url + "/embed", jpeg.read_bytes(), {"Content-Type": "image/jpeg"}
        )
    finally:
        server.close()
    assert status == 200, body
    rows = torch.tensor(json.loads(body)["embeddings"])
    torch.testing.assert_close(rows, F.normalize(embedded.flatten(1), dim=1), rtol=0, atol=1e-6)


def test_the_in_memory_data_path_decodes_the_same_pixels(tmp_path: Path) -> None:
    """knn on a labels.csv folder (decoded once, into memory) at the crop size."""
    config = _config(3)
    prep = config.preprocessing
    _rotated_cmyk_jpeg(tmp_path / "a.jpg", CROP, CROP)
    (tmp_path / "labels.csv").write_text("file,label\na.jpg,0\n")
    dataset, _ = resolve_dataset(str(tmp_path))
    images, _ = dataset.batch(torch.tensor([0]))
    knn = BatchEvalTransform(prep, "auto")(images)
    embedded = FeatureExtractor(build_model(config), device="cpu").prepare([tmp_path / "a.jpg"])
    torch.testing.assert_close(knn, embedded, rtol=0, atol=1e-6)
