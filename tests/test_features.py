"""FeatureExtractor and the torch backend: inputs, outputs, precision and its safety check.

Tests that compare numbers pin ``precision="fp32"``; the ``auto`` choice is tested by
emulating each CPU kind (``cpu_kind`` fixture, ``tests/conftest.py``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from embed_helpers import BF16_MIN_COSINE, make_model, sample_files
from PIL import Image

import mocohub
from mocohub.errors import ConfigError, InputError
from mocohub.features import Embedder, FeatureExtractor, TorchEmbedder
from mocohub.fusion import fuse_batchnorm
from mocohub.loading import load


@pytest.fixture(scope="module")
def gray_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "gray")


@pytest.fixture(scope="module")
def rgb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("m") / "rgb", rgb=True, head=True)


@pytest.mark.precision
def test_paths_images_and_tensors_give_the_same_features(gray_dir: Path) -> None:
    files = sample_files(6)
    images = [Image.open(f) for f in files]
    pixels = torch.stack([torch.from_numpy(np.array(im)) for im in images]).unsqueeze(1)
    fx = FeatureExtractor(gray_dir, device="cpu", batch_size=4, precision="fp32")
    assert mocohub.FeatureExtractor is FeatureExtractor
    from_paths = fx([str(f) for f in files])
    assert from_paths.shape == (6, 64)
    assert from_paths.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(from_paths, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(fx(images), from_paths, atol=1e-5)
    np.testing.assert_allclose(fx(pixels), from_paths, atol=1e-5)  # uint8 (N, C, H, W)
    np.testing.assert_allclose(fx(pixels.float() / 255), from_paths, atol=1e-5)  # [0, 1] floats
    np.testing.assert_allclose(fx(pixels[2]), from_paths[2:3], atol=1e-5)  # one (C, H, W)
    np.testing.assert_allclose(fx(files[1]), from_paths[1:2], atol=1e-5)  # one path
    # RGB images are turned to luma for this gray model, and larger ones resized + cropped
    rgb = [im.convert("RGB").resize((56, 56), Image.Resampling.BICUBIC) for im in images[:2]]
    assert fx(rgb).shape == (2, 64)

    # the same numbers as the model itself on its evaluation transform
    model = load(gray_dir)
    prep = model.mocohub_config.preprocessing
    with torch.no_grad():
        direct = F.normalize(model(torch.stack([prep.transform()(im) for im in images])), dim=1)
    np.testing.assert_allclose(from_paths, direct.numpy(), atol=1e-5)


@pytest.mark.precision
def test_the_readme_call_mixes_paths_images_and_tensors_in_one_list(
    rgb_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Image.open(sample_files(1)[0]).save("shoe.png")
    image = Image.open(sample_files(2)[1]).convert("RGB").resize((50, 40))
    fx = FeatureExtractor(rgb_dir, device="cpu", precision="fp32")
    torch.manual_seed(0)
    feats = fx(["shoe.png", image, torch.rand(3, 40, 40)])  # as README.md shows it

    torch.manual_seed(0)
    tensor = torch.rand(3, 40, 40)
    assert feats.shape == (3, 64)
    # each row is that item embedded on its own
    alone = np.concatenate([fx("shoe.png"), fx(image), fx(tensor)])
    np.testing.assert_allclose(feats, alone, atol=1e-5)
    uint8 = (tensor * 255).round().to(torch.uint8)
    mixed = fx([uint8, "shoe.png", tensor, image])  # uint8 and float tensors, any order
    np.testing.assert_allclose(mixed[[1, 2, 3]], feats[[0, 2, 1]], atol=1e-5)
    np.testing.assert_allclose(mixed[0], fx(uint8[None])[0], atol=1e-5)


@pytest.mark.precision
def test_outputs_dtypes_and_normalisation(rgb_dir: Path) -> None:
    batch = torch.randint(0, 256, (3, 3, 40, 48), dtype=torch.uint8)
    pooled = FeatureExtractor(rgb_dir, device="cpu", precision="fp32")
    head = FeatureExtractor(rgb_dir, device="cpu", output="head", precision="fp32")
    spatial = FeatureExtractor(rgb_dir, device="cpu", output="spatial", precision="fp32")
    raw = FeatureExtractor(rgb_dir, device="cpu", normalize=False, precision="fp32")
    half = FeatureExtractor(rgb_dir, device="cpu", dtype=np.float16, precision="fp32")
    assert pooled(batch).shape == (3, 64)
    assert head(batch).shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(head(batch), axis=1), 1.0, atol=1e-5)
    maps = spatial(batch)
    assert maps.shape == (3, 64, 4, 4)  # 32 px crop, small stem, three stride-2 stages
    # pooled features are the spatial maps averaged
    np.testing.assert_allclose(raw(batch), maps.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw(batch), axis=1), 1.0)
    assert half(batch).dtype == np.float16
    np.testing.assert_allclose(half(batch), pooled(batch), atol=2e-3)
    assert pooled([]).shape == (0, 64)


def test_bad_inputs_raise_one_clear_error(gray_dir: Path, tmp_path: Path) -> None:
    fx = FeatureExtractor(gray_dir, device="cpu")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputError, match=r"broken\.png"):
        fx([str(sample_files(1)[0]), str(tmp_path / "broken.png")])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        fx(torch.full((1, 1, 28, 28), 200.0))
    with pytest.raises(InputError, match="N, C, H, W"):
        fx(torch.zeros(28, 28, dtype=torch.uint8))
    with pytest.raises(InputError, match="Cannot embed a int"):
        fx([42])  # type: ignore[list-item]
    with pytest.raises(InputError, match=r"one image \(C, H, W\).*\(N, C, H, W\) on its own"):
        fx([str(sample_files(1)[0]), torch.zeros(2, 1, 28, 28)])
    with pytest.raises(InputError, match="head=True"):
        TorchEmbedder(load(gray_dir), device="cpu", output="head")
    with pytest.raises(InputError, match=r"no 'head' output.*--output pooled"):
        FeatureExtractor(gray_dir, device="cpu", output="head")
    with pytest.raises(ConfigError, match="precision"):
        FeatureExtractor(gray_dir, precision="int4")
    with pytest.raises(ConfigError, match="float32 or float16"):
        FeatureExtractor(gray_dir, dtype=np.int8)


@pytest.mark.precision
def test_auto_follows_the_emulated_cpu_and_an_explicit_precision_is_kept(cpu_kind) -> None:
    cpu_kind("avx2,fma")  # an AVX2-only CPU: bf16 would be emulated, slowly
    assert TorchEmbedder(_tiny(), device="cpu").precision == "fp32"
    for flags in ("avx512f,avx512_bf16", "avx512f,amx_bf16,amx_tile"):
        cpu_kind(flags)
        embedder = TorchEmbedder(_tiny(), device="cpu")
        assert embedder.precision == "bf16" and not embedder.checked  # checked on first use
        pinned = TorchEmbedder(_tiny(), device="cpu", precision="fp32")
        assert pinned.precision == "fp32" and pinned.checked
    assert TorchEmbedder(_tiny(), device="cpu", precision="bf16").checked  # asked for: unchecked
    assert embedder.channels_last  # faster in fp32 too, on AVX2 CPUs as on GPUs


@pytest.mark.precision
def test_batchnorm_is_folded_on_a_copy_without_changing_features(rgb_dir: Path) -> None:
    model = load(rgb_dir, head=True)
    x = torch.randn(5, 3, 32, 32)
    fused = TorchEmbedder(model, device="cpu", output="head", precision="fp32")
    plain = TorchEmbedder(
        model, device="cpu", output="head", fuse=False, channels_last=False, precision="fp32"
    )
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.model.modules())
    assert plain.model is model  # not copied, and the original keeps its BatchNorms
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 20
    np.testing.assert_allclose(fused.embed_batch(x), plain.embed_batch(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(plain.embed_batch(x), model(x).numpy(), rtol=1e-6, atol=1e-6)
    maps = fused.forward(x, "spatial")
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(model.children())[:-2])  # up to layer4
        np.testing.assert_allclose(maps.numpy(), trunk(x).numpy(), rtol=1e-4, atol=1e-5)


def _tiny() -> torch.nn.Module:
    from mocohub.artifact import ModelConfig, build_model
    from mocohub.preprocessing import Preprocessing

    torch.manual_seed(0)
    prep = Preprocessing(16, 16, (0.5,), (0.25,), channels=1)
    return build_model(
        ModelConfig("resnet18", small_stem=True, in_channels=1, width=4, preprocessing=prep)
    )


@pytest.mark.precision
def test_reduced_precision_is_checked_against_fp32_on_the_first_images(
    cpu_kind, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_kind("amx_bf16")  # a CPU with bf16 matrix units: "auto" picks bf16
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    exact = TorchEmbedder(_tiny(), device="cpu", precision="fp32").embed_batch(x)

    strict = TorchEmbedder(_tiny(), device="cpu", min_cosine=1.01)  # no bf16 result can pass
    assert strict.precision == "bf16"
    with pytest.warns(RuntimeWarning, match="using fp32"):
        first = strict.embed_batch(x)
    assert strict.precision == "fp32"
    # the whole batch again in fp32 (channels_last, chosen with bf16): equal up to summation order
    np.testing.assert_allclose(first, exact, atol=1e-5)
    np.testing.assert_allclose(strict.embed_batch(x), exact, atol=1e-5)

    passes: list[tuple[str, int]] = []  # (precision, images) of every forward pass
    run = TorchEmbedder._run

    def counted(self: TorchEmbedder, images: torch.Tensor, precision: str, output: str):
        passes.append((precision, len(images)))
        return run(self, images, precision, output)

    monkeypatch.setattr(TorchEmbedder, "_run", counted)
    lenient = TorchEmbedder(_tiny(), device="cpu", min_cosine=0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low = lenient.embed_batch(x)
        assert np.array_equal(lenient.embed_batch(x), low)
    # the check costs one fp32 pass over the first check_images (2) images, once
    assert passes == [("bf16", 6), ("fp32", 2), ("bf16", 6)]
    assert lenient.precision == "bf16"
    cosine = F.cosine_similarity(torch.from_numpy(low), torch.from_numpy(exact), dim=1)
    assert float(cosine.min()) >= BF16_MIN_COSINE
    # it really ran in bf16: measured, the largest difference is 0.015-0.076 (seeds 0-5)
    assert np.abs(low - exact).max() > 1e-3
    # weights stored in bf16 give exactly the numbers of torch.autocast, BatchNorm folded or
    # not (then it keeps float32 statistics, as under autocast), and the model stays fp32
    model = fuse_batchnorm(_tiny()).to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(x.contiguous(memory_format=torch.channels_last)).float()
    np.testing.assert_array_equal(low, autocast.numpy())
    unfused = _tiny()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = unfused.eval()(x).float()
    plain = TorchEmbedder(unfused, device="cpu", precision="bf16", fuse=False, channels_last=False)
    np.testing.assert_array_equal(plain.embed_batch(x), autocast.numpy())
    assert {p.dtype for p in unfused.parameters()} == {torch.float32}


def test_an_embedder_is_a_backend(gray_dir: Path) -> None:
    """Anything with preprocessing, dim and embed_batch plugs into FeatureExtractor."""
    inner = TorchEmbedder(load(gray_dir), device="cpu")

    class Wrapped:
        preprocessing = inner.preprocessing
        dim = inner.dim

        def embed_batch(self, images: torch.Tensor) -> np.ndarray:
            return inner.embed_batch(images) * 3.0  # normalisation must undo the scale

    assert isinstance(Wrapped(), Embedder)
    files = [str(f) for f in sample_files(3)]
    np.testing.assert_allclose(
        FeatureExtractor(Wrapped())(files),
        FeatureExtractor(gray_dir, device="cpu")(files),
        atol=1e-6,
    )
    with pytest.raises(ConfigError, match="PyTorch model"):
        FeatureExtractor(Wrapped(), output="spatial")


def test_crops_in_pillows_layout_hold_the_pixels_the_transform_normalises() -> None:
    """CropToTensor.hwc (what embed decodes to) is CropToTensor's crop, untransposed, and
    embed's per-image normalisation of it gives the evaluation transform's numbers."""
    from mocohub.embed_decode import Collate
    from mocohub.features import CropToTensor
    from mocohub.preprocessing import Preprocessing

    rng = np.random.default_rng(0)
    for prep, mode in (
        (Preprocessing.imagenet(32), "RGB"),
        (Preprocessing(28, 32, (0.3,), (0.4,), 1), "L"),
    ):
        crop = CropToTensor(prep)
        for size in ((50, 37), (prep.image_size, prep.image_size)):  # resized, or kept as is
            image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8))
            hwc = crop.hwc(image.convert(mode))
            assert hwc.shape == (prep.image_size, prep.image_size, prep.channels)
            assert torch.equal(torch.from_numpy(hwc.copy()).permute(2, 0, 1), crop(image))
            collate = Collate(prep, channels_last=True)
            batch = collate.stack([collate.normalise(hwc)])
            assert batch.is_contiguous(memory_format=torch.channels_last)
            expected = prep.transform()(image.convert(mode))[None]
            torch.testing.assert_close(batch, expected, rtol=0, atol=1e-6)
