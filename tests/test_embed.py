"""mocohub embed: decoding, one row per good file, errors, resume after interruption, shards.

Tests that compare numbers with another path pin ``--precision fp32``; what ``auto``
picks is tested on emulated CPUs (``cpu_kind``, ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from embed_helpers import (
    BF16_MIN_COSINE,
    copy_samples,
    make_model,
    png_header_claiming,
    sample_files,
    write_broken_files,
)
from PIL import Image

from mocohub.cli import main
from mocohub.embed import EmbedSettings, embed_files, output_files, shard_work
from mocohub.embed_outputs import verified_meta
from mocohub.errors import ConfigError, InputError
from mocohub.features import FeatureExtractor, TorchEmbedder, open_torch_embedder
from mocohub.imageio import DEFAULT_MAX_PIXELS, DecodeError, decode_image, scan_inputs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "gray")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], dict[str, str]]:
    """48 real images (PNG, upper-case .JPG, WebP in sub-folders) and the broken files."""
    root = tmp_path_factory.mktemp("data") / "images"
    good = copy_samples(root, 48)
    (root / "labels.csv").write_text("not,an,image\n")  # not an image name: ignored
    broken = write_broken_files(root / "broken")
    return root, good, broken


def read_outputs(out: Path) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    files = output_files(out)
    errors = [json.loads(line) for line in files["errors"].read_text().splitlines()]
    return np.load(out), files["manifest"].read_text().splitlines(), errors


# --- decoding ---------------------------------------------------------------


def test_a_path_gets_its_exif_orientation_and_a_pil_image_is_taken_as_it_is(
    tmp_path: Path, model_dir: Path
) -> None:
    """As the README says: pass ``ImageOps.exif_transpose(image)`` for the path's rows."""
    from PIL import ImageOps

    picture = Image.open(sample_files(1)[0]).convert("L").resize((40, 24))
    picture.paste(255, (0, 0, 12, 24))  # a white band on the left: rotation shows
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    path = tmp_path / "phone.jpg"
    picture.save(path, exif=exif, quality=95)
    extractor = FeatureExtractor(str(model_dir), device="cpu", precision="fp32")
    by_path = extractor([str(path)])
    as_is = extractor([Image.open(path)])
    upright = extractor([ImageOps.exif_transpose(Image.open(path))])
    np.testing.assert_allclose(upright, by_path, atol=1e-6)
    assert float((as_is * by_path).sum()) < 0.999  # unit rows: the unrotated picture differs


def test_decode_converts_modes_orientation_and_frames(tmp_path: Path) -> None:
    red = (255, 0, 0)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "palette.png", transparency=0)
    Image.new("I;16", (8, 8), 128 * 257).save(tmp_path / "deep.png")
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "clear.png")
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "alpha.png")
    frames = [Image.new("RGB", (8, 8), red), Image.new("RGB", (8, 8), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.new("RGB", (40, 20), red).save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGB", (8, 8), red).save(tmp_path / "plain.bmp")
    Image.new("RGB", (8, 8), red).save(tmp_path / "plain.TIFF")

    def near(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        return all(abs(x - y) <= 3 for x, y in zip(a, b, strict=True))

    assert near(decode_image(tmp_path / "cmyk.jpg").getpixel((4, 4)), red)
    pal = decode_image(tmp_path / "palette.png")
    assert pal.mode == "RGB"
    assert pal.getpixel((0, 0)) == (255, 255, 255)  # transparent: composited on white
    assert pal.getpixel((4, 4)) == red
    assert decode_image(tmp_path / "deep.png", mode="L").getpixel((3, 3)) == 128  # scaled
    assert decode_image(tmp_path / "clear.png").getpixel((1, 1)) == (255, 255, 255)
    alpha = decode_image(tmp_path / "alpha.png")
    assert alpha.getpixel((0, 0)) == (255, 255, 255)
    assert alpha.getpixel((5, 5)) == red
    assert near(decode_image(tmp_path / "anim.gif").getpixel((4, 4)), red)  # first frame
    assert decode_image(tmp_path / "rotated.jpg").size == (20, 40)
    for name in ("plain.bmp", "plain.TIFF"):
        assert decode_image(tmp_path / name).getpixel((2, 2)) == red
    assert decode_image(tmp_path / "plain.bmp", mode="L").mode == "L"


def test_decode_reduces_large_jpegs_but_keeps_twice_the_resize(tmp_path: Path) -> None:
    Image.effect_noise((1024, 768), 40).convert("RGB").save(tmp_path / "big.jpg")
    full = decode_image(tmp_path / "big.jpg")
    reduced = decode_image(tmp_path / "big.jpg", min_size=64)
    assert full.size == (1024, 768)
    assert min(reduced.size) >= 128
    assert reduced.size[0] < 1024


def test_decode_refuses_bombs_and_honours_max_pixels(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_header_claiming(100_000, 100_000))
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(tmp_path / "bomb.png")
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(tmp_path / "bomb.png", max_pixels=10**9)  # Pillow lifted, ours hit
    Image.new("RGB", (100, 100)).save(tmp_path / "small.png")
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(tmp_path / "small.png", max_pixels=5_000)
    assert decode_image(tmp_path / "small.png", max_pixels=10_000).size == (100, 100)


def test_scan_orders_folders_lists_and_rejects_unknown_inputs(tmp_path: Path, dataset) -> None:
    root, good, broken = dataset
    found = scan_inputs([root])
    assert sorted(map(str, good)) == sorted(p for p in found if "broken" not in p)
    assert {Path(p).name for p in found if "broken" in p} == set(broken)
    assert found == scan_inputs([root])  # deterministic
    assert not any(p.endswith("labels.csv") for p in found)
    listing = tmp_path / "some.txt"
    listing.write_text(f"# a comment\n{good[3]}\n\n{good[1]}\nmissing.png\n")
    assert scan_inputs([listing, good[1]]) == [
        str(good[3]),
        str(good[1]),
        str(tmp_path / "missing.png"),
    ]
    with pytest.raises(InputError, match="does not exist"):
        scan_inputs([tmp_path / "nothing-here"])
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="neither a folder"):
        scan_inputs([tmp_path / "table.csv"])


def test_default_workers_use_the_cores_the_model_leaves_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mocohub import embed

    monkeypatch.setattr(embed.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(embed.torch.cuda, "is_available", lambda: False)
    for threads, workers in ((8, 0), (6, 2), (1, 4)):
        monkeypatch.setattr(embed.torch, "get_num_threads", lambda t=threads: t)
        assert embed.default_workers("auto") == embed.default_workers("cpu") == workers
    monkeypatch.setattr(embed.torch.cuda, "is_available", lambda: True)
    assert embed.default_workers("auto") == embed.default_workers("cuda:1") == 8
    assert embed.default_workers("cpu") == 4  # the model stays on the CPU: as above
    # no workers: each batch is decoded on the model's threads, whatever --max-pixels
    assert embed.decode_threads(0) == 1  # get_num_threads() is 1 now
    monkeypatch.setattr(embed.torch, "get_num_threads", lambda: 6)
    assert embed.decode_threads(0) == 6
    assert embed.decode_threads(2) == 1


def test_decoding_threads_write_the_batch_in_place_with_the_numbers_of_one_thread(dataset) -> None:
    """Threads write each crop into its row of one batch array, which becomes the batch
    without a stacking copy; with a broken file among them the good rows are stacked."""
    from mocohub.embed_decode import Collate, DecodedFiles
    from mocohub.preprocessing import Preprocessing

    paths = scan_inputs([dataset[0]])
    good = [i for i, p in enumerate(paths) if "broken" not in p][:5]
    mixed = [*good[:2], next(i for i, p in enumerate(paths) if "broken" in p), *good[2:]]
    prep = Preprocessing(28, 32, (0.286,), (0.353,), channels=1)
    collate = Collate(prep, channels_last=True)
    threaded = DecodedFiles(paths, prep, None, threads=2)
    try:
        for indices in (good, mixed):
            items = threaded.__getitems__(indices)
            batch = collate(items)["images"]
            serial = collate(DecodedFiles(paths, prep, None).__getitems__(indices))["images"]
            assert torch.equal(batch, serial) and len(batch) == len(good)
            assert batch.is_contiguous(memory_format=torch.channels_last)
            rows = [x for _, x, _ in items if x is not None]
            assert np.shares_memory(batch.numpy(), rows[0]) == (indices == good)
    finally:
        threaded.close()


def test_threads_decode_files_over_pillows_own_limit_without_touching_it(
    tmp_path: Path, dataset, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --max-pixels above Pillow's limit, batches are still decoded on the model's
    threads (the limit is checked per call, Pillow's process-wide one is left alone)."""
    import threading

    from mocohub import embed

    paths = [p for p in scan_inputs([dataset[0]]) if "broken" not in p][:6]
    settings = EmbedSettings(model=str(model_dir), batch_size=3, device="cpu", precision="fp32")
    opener = lambda precision: open_torch_embedder(str(model_dir), device="cpu")  # noqa: E731
    embed_files(paths, tmp_path / "ref.npy", settings, opener)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every file is over Pillow's limit
    monkeypatch.setattr(embed.torch, "get_num_threads", lambda: 3)  # the model's threads
    seen: list[tuple[str, int | None]] = []  # (thread, Pillow's limit) as each file decodes
    load = Image.Image.load

    def spy(self: Image.Image):
        seen.append((threading.current_thread().name, Image.MAX_IMAGE_PIXELS))
        return load(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    for max_pixels in (None, DEFAULT_MAX_PIXELS + 1):
        lifted = EmbedSettings(**{**settings.__dict__, "max_pixels": max_pixels})
        out = tmp_path / f"{max_pixels}.npy"
        embed_files(paths, out, lifted, opener)
        np.testing.assert_array_equal(np.load(out), np.load(tmp_path / "ref.npy"))
    assert {limit for _, limit in seen} == {100} and Image.MAX_IMAGE_PIXELS == 100
    assert all(name.startswith("mocohub-decode") for name, _ in seen), seen
    capped = EmbedSettings(**{**settings.__dict__, "max_pixels": 200})
    embed_files(paths, tmp_path / "capped.npy", capped, opener, restart=True)
    reasons = {e["reason"][:15] for e in read_outputs(tmp_path / "capped.npy")[2]}
    assert reasons == {"too many pixels"}


def test_decoding_threads_give_what_one_thread_gives(dataset) -> None:
    from mocohub.embed_decode import DecodedFiles
    from mocohub.preprocessing import Preprocessing

    paths = scan_inputs([dataset[0]])
    prep = Preprocessing(28, 32, (0.286,), (0.353,), channels=1)
    one = DecodedFiles(paths, prep, None, threads=1)
    three = DecodedFiles(paths, prep, None, threads=3)
    indices = list(range(len(paths)))
    filters = list(warnings.filters)
    try:
        serial, threaded = one.__getitems__(indices), three.__getitems__(indices)
    finally:
        three.close()
    assert warnings.filters == filters  # decoding on threads leaves the filters alone
    assert [(i, reason) for i, _, reason in threaded] == [(i, r) for i, _, r in serial]
    assert sum(x is None for _, x, _ in serial) == 8  # the broken files
    for (_, a, _), (_, b, _) in zip(serial, threaded, strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)


def test_batches_are_normalised_exactly_as_the_preprocessing_says() -> None:
    from mocohub.embed_decode import Collate
    from mocohub.preprocessing import Preprocessing

    for prep in (Preprocessing.imagenet(32), Preprocessing(28, 32, (0.286,), (0.353,), channels=1)):
        crops = torch.randint(0, 256, (5, prep.channels, prep.image_size, prep.image_size))
        crops = crops.to(torch.uint8)
        for channels_last in (False, True):
            x = Collate(prep, channels_last).to_model(crops)
            assert torch.equal(x, prep.batch()(crops))  # bit for bit
            layout = torch.channels_last if channels_last else torch.contiguous_format
            assert x.is_contiguous(memory_format=layout)


def test_decoding_processes_yield_the_cpu_to_a_model_on_the_cpu(
    tmp_path: Path, dataset, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers decode at nice 19, so they never take a core from the model's threads."""
    from mocohub.embed_decode import DecodedFiles

    # each worker (forked with this patch) reports its niceness as the "reason" a file failed
    niceness = lambda self, i: (i, None, f"nice {os.nice(0)}")  # noqa: E731
    monkeypatch.setattr(DecodedFiles, "__getitem__", niceness)
    paths = scan_inputs([dataset[0]])[:8]
    settings = EmbedSettings(model=str(model_dir), batch_size=4, device="cpu")
    opener = lambda precision: open_torch_embedder(str(model_dir), device="cpu")  # noqa: E731
    embed_files(paths, tmp_path / "f.npy", settings, opener, workers=2)
    reasons = {e["reason"] for e in read_outputs(tmp_path / "f.npy")[2]}
    assert reasons == {"nice 19"}, reasons


# --- the command -------------------------------------------------------------


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the CLI; it must exit non-zero. Returns (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    assert isinstance(code, int)
    assert code != 0
    return code, capsys.readouterr().err


@pytest.mark.precision
def test_embed_writes_one_row_per_good_file_and_lists_the_broken(
    tmp_path: Path, dataset, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, good, broken = dataset
    out = tmp_path / "out" / "feats.npy"
    args = ["embed", str(root), "--out", str(out), "--model", str(model_dir), "--quiet"]
    args += ["--precision", "fp32"]
    main([*args, "--workers", "2", "--batch-size", "8", "--part-size", "16"])
    feats, manifest, errors = read_outputs(out)
    assert feats.shape == (len(good), 64)
    assert feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert sorted(manifest) == sorted(map(str, good))
    assert len(set(manifest)) == len(manifest)
    assert manifest == [p for p in scan_inputs([root]) if "broken" not in p]
    assert {Path(e["path"]).name: e["reason"] for e in errors}.keys() == broken.keys()
    for e in errors:
        assert broken[Path(e["path"]).name] in e["reason"]
    # row i is the features of manifest path i (the same as the Python API gives)
    extractor = FeatureExtractor(str(model_dir), device="cpu", precision="fp32")
    picked = [0, 7, 20, len(manifest) - 1]
    np.testing.assert_allclose(feats[picked], extractor([manifest[i] for i in picked]), atol=1e-5)
    meta = json.loads(output_files(out)["meta"].read_text())
    assert (meta["rows"], meta["skipped"], meta["dim"], meta["precision"]) == (48, 8, 64, "fp32")
    summary = capsys.readouterr().out
    assert "embedded 48 images, skipped 8" in summary
    assert "images/s" in summary
    assert not output_files(out)["parts"].exists()

    # the same command again: the output is up to date, nothing is embedded
    written = out.stat().st_mtime_ns
    main([*args, "--workers", "2", "--batch-size", "8", "--part-size", "16"])
    assert "is up to date" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == written

    # float16 output, and --strict turns the skips into a non-zero exit (outputs still written)
    half = tmp_path / "half.npy"
    argv = [*args[:3], str(half), *args[4:], "--workers", "0", "--dtype", "float16", "--strict"]
    assert "--strict" in fails(argv, capsys)[1]
    assert np.load(half).dtype == np.float16
    np.testing.assert_allclose(np.load(half), feats, atol=2e-3)


def test_bad_arguments_give_one_clear_error(
    tmp_path: Path, model_dir: Path, dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    model = ["--model", str(model_dir), "--quiet"]
    images = str(dataset[0])
    cases = [
        ([images, "--out", str(tmp_path / "f.txt")], "must be a .npy"),
        ([images, "--out", str(tmp_path / "f.npy"), "--shard", "3/2"], "--shard"),
        ([images, "--out", str(tmp_path / "f.npy"), "--output", "head"], "no projection head"),
        ([str(empty), "--out", str(tmp_path / "f.npy")], "No image files"),
        ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "f.npy")], "does not exist"),
    ]
    for argv, message in cases:
        code, err = fails(["embed", *argv, *model], capsys)
        assert code == 2
        assert message in err
        assert err.startswith("Error: ") and err.count("\n") == 1  # one line, no traceback
    assert not list(tmp_path.glob("*.npy"))


def test_backend_seam_reports_a_missing_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from mocohub import backends

    monkeypatch.setitem(backends.BACKENDS, "onnxruntime", "mocohub.no_such_module:open_embedder")
    with pytest.raises(ConfigError, match="onnxruntime backend needs"):
        backends.open_backend("onnxruntime")
    assert backends.open_backend("torch") is open_torch_embedder


def test_another_backend_plugs_into_the_same_pipeline(
    tmp_path: Path,
    dataset,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The backend seam: `--backend onnxruntime` opens its embedder from the model path.

    A stand-in for mocohub.export's ONNX embedder (exporting takes longer than
    this whole file may) returns the torch features times 3: the pipeline's
    normalisation must give the torch backend's rows.
    """
    from mocohub import backends

    monkeypatch.setitem(backends.BACKENDS, "onnxruntime", "embed_helpers:open_scaled_embedder")
    torch_out, other_out = tmp_path / "torch.npy", tmp_path / "other.npy"
    common = ["embed", str(dataset[0]), "--workers", "0", "--quiet", "--model", str(model_dir)]
    main([*common, "--out", str(torch_out)])
    main([*common, "--out", str(other_out), "--backend", "onnxruntime"])
    torch_rows, torch_manifest, torch_errors = read_outputs(torch_out)
    other_rows, other_manifest, other_errors = read_outputs(other_out)
    assert (other_manifest, other_errors) == (torch_manifest, torch_errors)
    np.testing.assert_allclose(other_rows, torch_rows, atol=1e-6)
    assert json.loads(output_files(other_out)["meta"].read_text())["backend"] == "onnxruntime"
    argv = [*common, "--out", str(tmp_path / "x.npy"), "--backend", "onnxruntime"]
    assert "apply to the torch backend" in fails([*argv, "--output", "head"], capsys)[1]


# --- resume and shards -------------------------------------------------------


def run_embed(
    paths: list[str], out: Path, model_dir: Path, batch_size: int = 4, **options
) -> np.ndarray:
    settings = EmbedSettings(model=str(model_dir), batch_size=batch_size, part_size=8, device="cpu")
    opener = lambda precision: open_torch_embedder(  # noqa: E731
        str(model_dir), device="cpu", precision=precision
    )
    embed_files(paths, out, settings, opener, **options)
    return np.load(out)


@pytest.mark.precision
def test_interrupted_run_resumes_to_the_same_array(
    tmp_path: Path, dataset, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = scan_inputs([dataset[0]])
    reference = run_embed(paths, tmp_path / "ref.npy", model_dir)
    out = tmp_path / "feats.npy"
    real = TorchEmbedder.embed_batch
    calls = []

    def interrupted(self: TorchEmbedder, images):
        calls.append(len(images))
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(TorchEmbedder, "embed_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_embed(paths, out, model_dir)
    parts = output_files(out)["parts"]
    finished = [json.loads(p.read_text()) for p in parts.glob("0*.json")]
    rows_done = sum(len(record["rows"]) for record in finished)
    assert len(finished) >= 2
    assert 0 < rows_done < len(reference)
    assert not out.exists()

    # other settings refuse to mix with the unfinished run, unless told to restart
    settings = EmbedSettings(model=str(model_dir), batch_size=8, part_size=8, device="cpu")
    opener = lambda precision: open_torch_embedder(str(model_dir), device="cpu")  # noqa: E731
    with pytest.raises(InputError, match="--restart"):
        embed_files(paths, out, settings, opener)

    embedded_again: list[int] = []

    def counted(self: TorchEmbedder, images):
        embedded_again.append(len(images))
        return real(self, images)

    monkeypatch.setattr(TorchEmbedder, "embed_batch", counted)
    resumed = run_embed(paths, out, model_dir)
    assert np.array_equal(resumed, reference)
    assert sum(embedded_again) == len(reference) - rows_done  # finished parts were kept
    assert read_outputs(out)[1:] == read_outputs(tmp_path / "ref.npy")[1:]

    # --restart discards an unfinished run of other settings
    other = tmp_path / "other.npy"
    calls.clear()
    monkeypatch.setattr(TorchEmbedder, "embed_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_embed(paths, other, model_dir)
    monkeypatch.setattr(TorchEmbedder, "embed_batch", real)
    embed_files(paths, other, settings, opener, restart=True)
    np.testing.assert_allclose(np.load(other), reference, atol=1e-5)
    assert not output_files(other)["parts"].exists()


def test_the_help_names_every_extension_a_folder_is_searched_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mocohub.imageio import IMAGE_EXTENSIONS

    main(["embed", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert all(re.search(rf"{re.escape(ext)}\b", shown) for ext in IMAGE_EXTENSIONS)


def test_a_model_that_does_not_load_leaves_nothing_behind(
    tmp_path: Path, dataset, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "model.pth"
    broken.write_bytes(b"not a checkpoint")
    out = tmp_path / "feats.npy"
    with pytest.raises(SystemExit) as failed:
        main(["embed", str(dataset[0]), "--out", str(out), "--model", str(broken), "-q"])
    assert failed.value.code != 0 and "Error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]  # no feats.npy.parts/


def test_ctrl_c_on_the_command_line_says_how_to_resume(
    tmp_path: Path, dataset, model_dir: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real, calls = TorchEmbedder.embed_batch, []

    def interrupted(self: TorchEmbedder, images):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
        return real(self, images)

    monkeypatch.setattr(TorchEmbedder, "embed_batch", interrupted)
    out = tmp_path / "feats.npy"
    argv = ["embed", str(dataset[0]), "--out", str(out), "--model", str(model_dir), "-q"]
    argv += ["--batch-size", "8", "--part-size", "8", "--device", "cpu", "--workers", "0"]
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert f"the finished parts are kept in {output_files(out)['parts']}" in err
    assert "rerun the same command to resume" in err
    assert not out.exists()
    monkeypatch.setattr(TorchEmbedder, "embed_batch", real)
    main(argv)  # and the same command does, without embedding the finished parts again
    said = capsys.readouterr().out
    assert out.is_file() and "read in this run, the rest resumed from its parts" in said


def test_ctrl_c_before_a_part_is_finished_promises_nothing(
    tmp_path: Path, dataset, model_dir: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(self: TorchEmbedder, images):
        raise KeyboardInterrupt

    monkeypatch.setattr(TorchEmbedder, "embed_batch", interrupted)
    out = tmp_path / "feats.npy"
    argv = ["embed", str(dataset[0]), "--out", str(out), "--model", str(model_dir), "-q"]
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--device", "cpu", "--workers", "0"])
    assert stopped.value.code == 130
    assert "Interrupted" not in capsys.readouterr().err  # no part was finished to resume


def test_two_shares_of_one_embed_are_refused_the_same_out(
    tmp_path: Path, dataset, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "feats.npy"
    argv = ["embed", str(dataset[0]), "--out", str(out), "--model", str(model_dir), "-q"]
    argv += ["--device", "cpu", "--workers", "0"]
    main([*argv, "--shard", "0/2"])
    first = out.read_bytes()
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--shard", "1/2"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "holds share 0/2 of an embed, and this is share 1/2" in err and "embed-merge" in err
    assert out.read_bytes() == first  # share 0's work is kept
    main([*argv, "--shard", "1/2", "--restart"])
    assert out.read_bytes() != first


def test_an_output_is_replaced_only_when_mocohub_wrote_it_and_never_silently(
    tmp_path: Path, dataset, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "feats.npy"
    out.write_bytes(b"the user's own file")
    argv = ["embed", "--out", str(out), "--model", str(model_dir), "-q", "--device", "cpu"]
    with pytest.raises(SystemExit) as refused:
        main([*argv, str(dataset[0])])
    assert refused.value.code != 0
    err = capsys.readouterr().err
    assert "no feats.meta.json says mocohub embed wrote it" in err and "--restart" in err
    assert out.read_bytes() == b"the user's own file"  # untouched

    main([*argv, str(dataset[0]), "--restart"])
    assert "replacing" not in capsys.readouterr().out
    rows, inputs = len(np.load(out)), verified_meta(out)["inputs"]  # 48 images, 8 broken
    some = sorted(p for p in dataset[0].rglob("*.png"))[:3]
    main([*argv, *map(str, some)])  # other inputs, the same --out
    said = capsys.readouterr().out
    assert f"(replacing an output of other inputs ({inputs} files, now 3): {rows} rows)" in said
    assert len(np.load(out)) == 3
    main([*argv, *map(str, some), "--batch-size", "2"])  # the same inputs, other settings
    assert "(replacing an output made with other settings: 3 rows)" in capsys.readouterr().out


@pytest.mark.parametrize("first", ["feats.npy", "feats.parquet"])
def test_a_npy_and_a_parquet_of_one_name_never_take_over_each_others_files(
    tmp_path: Path, dataset, model_dir: Path, capsys: pytest.CaptureFixture[str], first: str
) -> None:
    """They share feats.manifest.txt, .errors.jsonl and .meta.json: the second is refused."""
    some = [str(p) for p in sorted(dataset[0].rglob("*.png"))[:4]]
    argv = ["-m", str(model_dir), "-q", "--device", "cpu", "--workers", "0"]
    earlier = tmp_path / first
    main(["embed", *some, "--out", str(earlier), *argv])
    files = output_files(earlier)
    before = {role: files[role].read_bytes() for role in ("manifest", "errors", "meta")}
    second = earlier.with_suffix(".parquet" if first.endswith(".npy") else ".npy")
    for command in (["embed", *some[:2]], ["embed", *some[:2], "--restart"]):
        with pytest.raises(SystemExit) as refused:
            main([*command, "--out", str(second), *argv])
        assert refused.value.code == 2
        err = capsys.readouterr().err
        assert f"{earlier} is an embed output, and {second.name} would take over" in err
        assert "choose another --out name" in err
        assert {role: files[role].read_bytes() for role in before} == before
        assert not second.exists()
    verified_meta(earlier)  # still whole: index and search take it
    other = tmp_path / "val" / second.name  # another name (here: folder) is fine
    main(["embed", *some[:2], "--out", str(other), *argv])
    assert verified_meta(other)["rows"] == 2


def test_a_run_that_embeds_nothing_fails_and_says_where_list_paths_are_looked_for(
    tmp_path: Path, dataset, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = dataset[0]
    names = [p.relative_to(root.parent) for p in sorted(root.rglob("*.png"))[:3]]
    listed = tmp_path / "lists" / "some.txt"  # relative to the data's parent, not to the list
    listed.parent.mkdir()
    listed.write_text("".join(f"{n}\n" for n in names))
    out = tmp_path / "feats.npy"
    argv = ["embed", str(listed), "--out", str(out), "-m", str(model_dir), "--device", "cpu"]
    with pytest.raises(SystemExit) as failed:
        main([*argv, "-q"])
    assert failed.value.code == 2
    err = capsys.readouterr().err
    assert f"None of the 3 inputs could be embedded; {output_files(out)['errors']}" in err
    assert f"Relative paths in a list are taken from the list's folder ({listed.parent})" in err
    reasons = [json.loads(line)["reason"] for line in output_files(out)["errors"].open()]
    assert len(reasons) == 3 and all("not found" in r for r in reasons)
    beside = root.parent / "some.txt"  # the same list where its paths start: all found
    beside.write_text(listed.read_text())
    main([*argv[:1], str(beside), *argv[2:], "-q"])
    assert len(np.load(out)) == 3


@pytest.mark.precision
def test_shards_merged_equal_one_run(
    tmp_path: Path, dataset, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = scan_inputs([dataset[0]])
    reference = run_embed(paths, tmp_path / "all.npy", model_dir)
    shards = [tmp_path / f"s{i}.npy" for i in range(3)]
    for i, shard in enumerate(shards):
        run_embed(paths, shard, model_dir, shard=(i, 3), workers=0)
    assert sum(len(np.load(s)) for s in shards) == len(reference)
    merged = tmp_path / "merged.npy"
    main(["embed-merge", *map(str, reversed(shards)), "--out", str(merged)])
    assert np.array_equal(np.load(merged), reference)
    assert read_outputs(merged)[1:] == read_outputs(tmp_path / "all.npy")[1:]
    assert json.loads(output_files(merged)["meta"].read_text())["shard"] == [0, 1]
    argv = ["embed-merge", str(shards[0]), str(shards[2]), "--out", str(tmp_path / "x.npy")]
    assert "exactly once" in fails(argv, capsys)[1]
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.precision
@pytest.mark.parametrize("count", [2, 3])
def test_shards_split_the_images_whatever_the_batch_size(
    tmp_path: Path, dataset, model_dir: Path, count: int
) -> None:
    """20 files and batches of 64: every shard gets its 1/n of them, merged bit-identically."""
    paths = scan_inputs([dataset[0]])[8:28]  # good PNGs, the broken files, good JPEGs
    assert len(paths) == 20 and sum("/broken/" in p for p in paths) == 8
    reference = run_embed(paths, tmp_path / "all.npy", model_dir, batch_size=64)
    shards = [tmp_path / f"s{i}.npy" for i in range(count)]
    for i, shard in enumerate(shards):
        run_embed(paths, shard, model_dir, batch_size=64, shard=(i, count))
        _, manifest, errors = read_outputs(shard)
        share = paths[i * 20 // count : (i + 1) * 20 // count]  # 10 + 10, or 6 + 7 + 7
        assert sorted([*manifest, *(e["path"] for e in errors)]) == sorted(share)
    merged = tmp_path / "merged.npy"
    main(["embed-merge", *map(str, shards), "--out", str(merged)])
    assert np.array_equal(np.load(merged), reference)
    assert read_outputs(merged)[1:] == read_outputs(tmp_path / "all.npy")[1:]


def test_shard_work_owns_images_and_runs_whole_batches() -> None:
    assert shard_work(20, 64, (0, 2)) == (range(0, 10), range(0, 1))
    assert shard_work(20, 64, (1, 2)) == (range(10, 20), range(0, 1))
    assert shard_work(1000, 64, (1, 3)) == (range(333, 666), range(5, 11))
    assert shard_work(1, 8, (0, 2)) == (range(0, 0), range(0))  # fewer images than shards
    with pytest.raises(ConfigError, match="--shard"):
        shard_work(10, 4, (2, 2))


def test_merge_refuses_shards_run_at_other_precisions(
    tmp_path: Path, dataset, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = scan_inputs([dataset[0]])[:8]
    for i, precision in enumerate(("bf16", "fp32")):
        settings = EmbedSettings(
            model=str(model_dir), batch_size=4, device="cpu", precision=precision
        )

        def opener(chosen: str) -> TorchEmbedder:
            return open_torch_embedder(str(model_dir), device="cpu", precision=chosen)

        embed_files(paths, tmp_path / f"s{i}.npy", settings, opener, shard=(i, 2))
    argv = ["embed-merge", str(tmp_path / "s0.npy"), str(tmp_path / "s1.npy")]
    assert "(precision)" in fails([*argv, "--out", str(tmp_path / "m.npy")], capsys)[1]
    assert not (tmp_path / "m.npy").exists()


@pytest.mark.precision
def test_auto_takes_the_precision_of_the_emulated_cpu_and_records_it(
    tmp_path: Path, dataset, model_dir: Path, cpu_kind, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "some.txt"
    listing.write_text("".join(f"{p}\n" for p in dataset[1][:12]))
    rows = {}
    for flags, expected in (
        ("avx2,fma", "fp32"),
        ("avx2,avx512_bf16", "bf16"),
        ("amx_bf16", "bf16"),
    ):
        cpu_kind(flags)
        out = tmp_path / f"{flags}.npy"
        main(["embed", str(listing), "--out", str(out), "--model", str(model_dir), "-q"])
        assert json.loads(output_files(out)["meta"].read_text())["precision"] == expected
        assert f"precision {expected})" in capsys.readouterr().out
        rows[flags] = np.load(out)
    fp32, bf16 = rows["avx2,fma"], rows["avx2,avx512_bf16"]
    assert not np.array_equal(fp32, bf16)
    assert (fp32 * bf16).sum(1).min() >= BF16_MIN_COSINE  # rows are L2-normalised


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_array(tmp_path: Path, model_dir: Path) -> None:
    """SIGKILL a real `mocohub embed` mid-run; the rerun finishes it with the same result."""
    folder = tmp_path / "images"
    copy_samples(folder, 80)
    out = tmp_path / "feats.npy"
    args = ["embed", str(folder), "--out", str(out), "--model", str(model_dir), "--quiet"]
    args += ["--workers", "0", "--batch-size", "1", "--part-size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "mocohub", *args], env=env)
    parts = output_files(out)["parts"]
    deadline = time.monotonic() + 60
    while len(list(parts.glob("0*.json"))) < 3 and process.poll() is None:
        assert time.monotonic() < deadline, "mocohub embed made no progress in 60 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists(), "the run finished before it could be killed"
    done_before = len(list(parts.glob("0*.json")))
    assert 3 <= done_before < 80

    main(args)  # the rerun, in this process
    reference = tmp_path / "ref.npy"
    main([*args[:3], str(reference), *args[4:-1], "80"])  # the same batches, in one part
    assert np.array_equal(np.load(out), np.load(reference))
    assert read_outputs(out)[1] == read_outputs(reference)[1]


def test_a_run_that_failed_before_any_part_does_not_block_the_next(
    tmp_path: Path, dataset, model_dir: Path
) -> None:
    paths = scan_inputs([dataset[0]])
    out = tmp_path / "feats.npy"
    typo = EmbedSettings(model=str(tmp_path / "no-such-model"), batch_size=8, device="cpu")

    def no_model(precision: object) -> None:
        raise InputError("no such model")

    with pytest.raises(InputError, match="no such model"):
        embed_files(paths, out, typo, no_model)  # type: ignore[arg-type]
    # Nothing was embedded, so a run with other settings starts without --restart.
    np.testing.assert_allclose(
        run_embed(paths, out, model_dir), run_embed(paths, tmp_path / "r.npy", model_dir)
    )


def test_the_next_batch_is_decoded_while_the_model_runs_this_one(
    dataset, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """workers=0: batch i + 1 is decoded on a background thread while the caller embeds batch i,
    with the records of plain, one-at-a-time decoding, and errors raised at their own batch."""
    import threading

    from mocohub.embed_decode import Collate, DecodedFiles, open_batches
    from mocohub.features import open_torch_embedder

    embedder = open_torch_embedder(str(model_dir), device="cpu", precision="fp32")
    paths = scan_inputs([dataset[0]])[:12]
    sampler = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    prep = embedder.preprocessing
    plain, collate = DecodedFiles(paths, prep, None, threads=1), Collate(prep, True)
    expected = [collate(plain.__getitems__(indices)) for indices in sampler]
    expected = [(b["rows"], b["failed"], b["images"]) for b in expected]

    decoded_on: list[str] = []
    decode = DecodedFiles.__getitems__

    def recording(self: DecodedFiles, indices: list[int]) -> list:
        decoded_on.append(threading.current_thread().name)
        if indices[0] == 8:
            raise OSError("the disk went away")
        return decode(self, indices)

    monkeypatch.setattr(DecodedFiles, "__getitems__", recording)
    batches = open_batches(paths, sampler, embedder, "cpu", None, workers=0)
    try:
        for rows, failed, images in expected[:2]:
            got = next(batches)
            assert (got["rows"], got["failed"]) == (rows, failed)
            assert torch.equal(got["images"], images)
        with pytest.raises(OSError, match="the disk went away"):
            next(batches)  # batch 3's error, at batch 3
    finally:
        batches.close()
    assert len(decoded_on) == 3 and all(n.startswith("mocohub-prefetch") for n in decoded_on)


def test_a_gpu_backend_gets_uint8_crops_and_normalises_them_itself(
    dataset, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the torch backend is sent uint8 crops (a quarter of the bytes, no float work
    on the CPU) and normalises them on its device, to the numbers of CPU normalisation."""
    from mocohub import embed_decode
    from mocohub.features import open_torch_embedder

    embedder = open_torch_embedder(str(model_dir), device="cpu", precision="fp32")
    paths = scan_inputs([dataset[0]])[:8]
    sampler = [[0, 1, 2, 3], [4, 5, 6, 7]]
    plain = embed_decode.open_batches(paths, sampler, embedder, "cpu", None, workers=0)
    try:
        floats = [b["images"] for b in plain]
    finally:
        plain.close()
    monkeypatch.setattr(embed_decode.torch.cuda, "is_available", lambda: True)  # a GPU machine
    loader = embed_decode.DataLoader

    def unpinned(*args: Any, **options: Any) -> Any:  # pinning memory needs a real GPU
        return loader(*args, **{**options, "pin_memory": False})

    monkeypatch.setattr(embed_decode, "DataLoader", unpinned)
    batches = embed_decode.open_batches(paths, sampler, embedder, "cuda", None, workers=0)
    try:
        crops = [b["images"] for b in batches]
    finally:
        batches.close()
    assert [c.dtype for c in crops] == [torch.uint8, torch.uint8]
    for crop, x in zip(crops, floats, strict=True):
        assert crop.shape == x.shape
        np.testing.assert_array_equal(embedder.embed_batch(crop), embedder.embed_batch(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_uint8_crops_normalised_on_the_gpu_give_the_cpu_numbers(dataset, model_dir: Path) -> None:
    from mocohub import embed_decode
    from mocohub.features import open_torch_embedder

    gpu = open_torch_embedder(str(model_dir), device="cuda", precision="fp32")
    cpu = open_torch_embedder(str(model_dir), device="cpu", precision="fp32")
    paths = scan_inputs([dataset[0]])[:8]
    batches = embed_decode.open_batches(paths, [list(range(8))], gpu, "cuda", None, workers=0)
    try:
        crops = next(batches)["images"]
    finally:
        batches.close()
    assert crops.dtype == torch.uint8 and crops.is_pinned()
    np.testing.assert_allclose(gpu.embed_batch(crops), cpu.embed_batch(crops), atol=1e-4)


def test_a_file_where_the_parts_folder_goes_is_one_clear_error(
    tmp_path: Path, dataset, model_dir: Path
) -> None:
    paths = scan_inputs([dataset[0]])
    out = tmp_path / "feats.npy"
    (tmp_path / "feats.npy.parts").write_text("someone's file")
    with pytest.raises(InputError, match=r"feats.npy.parts is a file, but mocohub embed keeps"):
        run_embed(paths, out, model_dir)
    assert (tmp_path / "feats.npy.parts").read_text() == "someone's file"  # left alone
    assert not out.exists()
