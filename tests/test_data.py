"""Training data sources: IDX files, ImageFolder trees, labels.csv folders, tensors, errors."""

from __future__ import annotations

import csv
import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mocohub.training.data as data
from mocohub.errors import ConfigError, InputError
from mocohub.training.data import (
    DatasetInfo,
    TensorImageDataset,
    load_idx_folder,
    load_image_folder,
    load_labelled_folder,
    read_idx,
    resolve_dataset,
)

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "fashion-mnist"
IDX_TYPE_CODES = {"uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes, written here from the format's definition, not with mocohub."""
    header = bytes([0, 0, IDX_TYPE_CODES[array.dtype.name], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    payload = idx_bytes(array)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def sample_rows() -> list[dict[str, str]]:
    with open(SAMPLES / "labels.csv") as f:
        return list(csv.DictReader(f))


def random_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 7, 5), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


@pytest.fixture
def idx_folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """train-* gzipped and t10k-* raw, 7 x 5 images (not square, to catch H/W swaps)."""
    splits = {"train": random_split(12, 0), "t10k": random_split(5, 1)}
    for prefix, (images, labels) in splits.items():
        suffix = ".gz" if prefix == "train" else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return tmp_path, splits


def image_tree(root: Path, per_class: dict[str, int]) -> None:
    """root/<class>/ with the first per_class[class] sample PNGs of that class."""
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        rows = [r for r in sample_rows() if r["class"] == name][:count]
        for row in rows:
            shutil.copy(SAMPLES / row["file"], root / name / row["file"])


# --- read_idx ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([1, -2, 70000, -(2**31)], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
    ],
    ids=["uint8-3d", "int32-1d", "float32-2d"],
)
def test_read_idx_round_trips(tmp_path: Path, suffix: str, array: np.ndarray) -> None:
    out = read_idx(write_idx(tmp_path / f"x-idx{array.ndim}-ubyte{suffix}", array))
    assert out.shape == array.shape
    assert out.dtype == array.dtype  # native byte order, not big-endian
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable


def test_read_idx_refuses_truncated_files(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    payload = idx_bytes(noise)  # random, so gzip cannot shrink it much
    (tmp_path / "raw").write_bytes(payload[:-100])
    (tmp_path / "short.gz").write_bytes(gzip.compress(payload[:-100]))  # whole gzip, short data
    (tmp_path / "cut.gz").write_bytes(gzip.compress(payload)[:-1000])  # gzip stream cut off
    (tmp_path / "header").write_bytes(payload[:10])  # cut inside the dimension sizes
    for name in ("raw", "short.gz", "cut.gz", "header"):
        with pytest.raises(InputError, match=rf"{name} is (a )?truncated"):
            read_idx(tmp_path / name)


def test_read_idx_refuses_files_that_are_not_idx(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not an IDX file.*train-images-idx3-ubyte"):
        read_idx(SAMPLES / "00000_ankle-boot.png")
    (tmp_path / "type").write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(InputError, match="unknown IDX type code 0x07"):
        read_idx(tmp_path / "type")
    (tmp_path / "long").write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"extra")
    with pytest.raises(InputError, match="more data than its header"):
        read_idx(tmp_path / "long")
    with pytest.raises(InputError, match="does not exist"):
        read_idx(tmp_path / "missing-idx1-ubyte")


# --- IDX folders ---------------------------------------------------------------------


def test_load_idx_folder_reads_both_splits(idx_folder) -> None:
    folder, splits = idx_folder
    for split, prefix in [("train", "train"), ("test", "t10k"), ("val", "t10k")]:
        ds = load_idx_folder(folder, split)
        images, labels = splits[prefix]
        assert ds.images.shape == (len(images), 1, 7, 5)
        assert ds.images.dtype == torch.uint8
        assert ds.labels is not None and ds.labels.dtype == torch.int64
        np.testing.assert_array_equal(ds.images[:, 0].numpy(), images)
        np.testing.assert_array_equal(ds.labels.numpy(), labels)


def test_load_idx_folder_accepts_test_prefix(tmp_path: Path) -> None:
    images, labels = random_split(3, 2)
    write_idx(tmp_path / "test-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "test-labels-idx1-ubyte", labels)
    ds = load_idx_folder(tmp_path, "test")
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), images)


def test_load_idx_folder_errors(idx_folder, tmp_path: Path) -> None:
    folder, _ = idx_folder
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))  # 5 images
    with pytest.raises(InputError, match=r"has 5 images but .* has 4 labels"):
        load_idx_folder(folder, "test")
    (folder / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(InputError, match=r"no val images file; add t10k-images-idx3-ubyte\[\.gz\]"):
        load_idx_folder(folder, "test")
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros(4, dtype=np.int32))
    with pytest.raises(InputError, match="uint8 N x H x W"):
        load_idx_folder(folder, "test")
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        load_idx_folder(folder, "dev")


# --- in-memory tensors ---------------------------------------------------------------


def test_tensor_image_dataset_items_and_batches() -> None:
    images = torch.arange(4 * 2 * 3 * 3, dtype=torch.int64).reshape(4, 2, 3, 3).to(torch.uint8)
    ds = TensorImageDataset(images, torch.tensor([3, 0, 1, 3], dtype=torch.int32))
    image, label = ds[3]
    assert torch.equal(image, images[3]) and label == 3
    assert len(ds) == 4 and ds.num_classes == 4 and ds.classes == ("0", "1", "2", "3")
    batch_images, batch_labels = ds.batch(torch.tensor([2, 0]))
    assert torch.equal(batch_images, images[[2, 0]])
    assert batch_labels.tolist() == [1, 3] and batch_labels.dtype == torch.int64

    unlabelled = TensorImageDataset(torch.zeros(5, 6, 7, dtype=torch.uint8))  # N x H x W
    assert unlabelled.images.shape == (5, 1, 6, 7)
    assert unlabelled[0][1] == -1 and unlabelled.batch(torch.tensor([1, 4]))[1].tolist() == [-1, -1]
    flipped = TensorImageDataset(images, transform=lambda x: x.flip(-1))
    assert torch.equal(flipped[1][0], images[1].flip(-1))
    assert torch.equal(flipped.batch(torch.tensor([1]))[0][0], images[1])  # batches stay raw


def test_tensor_image_dataset_refuses_bad_tensors() -> None:
    with pytest.raises(InputError, match="must be uint8"):
        TensorImageDataset(torch.rand(2, 1, 4, 4))
    with pytest.raises(InputError, match="3 images but 2 labels"):
        TensorImageDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(InputError, match="1-D integer"):
        TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0.0, 1.0]))
    with pytest.raises(InputError, match="N x C x H x W"):
        TensorImageDataset(torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(InputError, match="class names"):
        TensorImageDataset(torch.zeros(2, 1, 1, 1, dtype=torch.uint8), [0, 2], classes=["a", "b"])


# --- labels.csv folders --------------------------------------------------------------


def test_sample_folder_loads_300_images_with_their_labels() -> None:
    rows = sample_rows()
    ds = load_labelled_folder(SAMPLES)
    assert ds.images.shape == (300, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels is not None
    assert ds.labels.tolist() == [int(r["label"]) for r in rows]
    assert ds.classes[0] == "t-shirt" and ds.classes[9] == "ankle-boot" and ds.num_classes == 10
    with Image.open(SAMPLES / rows[7]["file"]) as im:
        np.testing.assert_array_equal(ds.images[7, 0].numpy(), np.asarray(im.convert("L")))


def test_labelled_folder_errors_and_colour(tmp_path: Path) -> None:
    Image.new("RGB", (4, 3), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("L", (4, 3), 9).save(tmp_path / "grey.png")
    (tmp_path / "labels.csv").write_text("file,label\nred.png,1\ngrey.png,0\n")
    ds = load_labelled_folder(tmp_path)  # one colour image makes them all RGB
    assert ds.images.shape == (2, 3, 3, 4)
    assert ds.images[0, :, 0, 0].tolist() == [255, 0, 0] and ds.images[1].unique().tolist() == [9]

    (tmp_path / "labels.csv").write_text("file,label\nred.png,1\nnone.png,0\n")
    with pytest.raises(InputError, match=r"none\.png is listed in labels\.csv but does not exist"):
        load_labelled_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("name,label\nred.png,1\n")
    with pytest.raises(InputError, match="needs the columns file and label"):
        load_labelled_folder(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\nred.png,cat\n")
    with pytest.raises(InputError, match="line 2: label 'cat' is not a class index"):
        load_labelled_folder(tmp_path)
    Image.new("L", (5, 5)).save(tmp_path / "big.png")
    (tmp_path / "labels.csv").write_text("file,label\nred.png,1\nbig.png,0\n")
    with pytest.raises(InputError, match=r"differ in size \(4x3, 5x5\)"):
        load_labelled_folder(tmp_path)


# --- ImageFolder trees ---------------------------------------------------------------


def test_image_folder_flat_tree(tmp_path: Path) -> None:
    image_tree(tmp_path, {"trouser": 2, "bag": 3})
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    ds = load_image_folder(tmp_path)
    assert ds.classes == ["bag", "trouser"] and len(ds) == 5
    image, label = ds[4]
    assert label == 1 and image.dtype == torch.uint8 and image.shape == (3, 28, 28)
    file = Path(ds.samples[4][0]).name
    with Image.open(SAMPLES / file) as im:
        grey = torch.from_numpy(np.array(im.convert("L")))
    assert all(torch.equal(image[c], grey) for c in range(3))  # grayscale decoded as RGB
    assert len(load_image_folder(tmp_path, "val")) == 5  # no split folders: any split
    sized = load_image_folder(tmp_path, transform=lambda im: im.size)
    assert sized[0] == ((28, 28), 0)  # a transform gets the PIL image


def test_image_folder_split_tree_and_resolve(tmp_path: Path) -> None:
    image_tree(tmp_path / "train", {"coat": 3, "sandal": 2})
    image_tree(tmp_path / "val", {"coat": 1, "sandal": 1})
    assert len(load_image_folder(tmp_path, "train")) == 5
    assert len(load_image_folder(tmp_path, "val")) == 2
    assert len(load_image_folder(tmp_path / "train", "val")) == 5  # DATA/train itself
    ds, info = resolve_dataset(tmp_path, "val")
    assert len(ds) == 2
    assert info == DatasetInfo(
        "image-folder", str(tmp_path), "val", 2, ("coat", "sandal"), 3, None, in_memory=False
    )
    assert "2 images, 3 channels, sizes vary, 2 classes, decoded per sample" in str(info)
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(InputError, match="has train/ but no val/ folder"):
        load_image_folder(tmp_path, "val")


def exif_rotated_jpeg(path: Path) -> Path:
    """A 20 x 10 JPEG whose EXIF says: rotate 90 degrees clockwise to view (10 x 20)."""
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    return path


def sixteen_bit_png(path: Path, value: int = 40000) -> Path:
    Image.fromarray(np.full((6, 6), value, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


def test_image_folders_and_labelled_folders_decode_as_mocohub_decodes(tmp_path: Path) -> None:
    """EXIF orientation and 16-bit scaling (a plain convert("RGB") ignores the one and clips
    the other), the same pixels as decode_image, for both file-based data kinds."""
    from mocohub.imageio import decode_image

    (tmp_path / "tree" / "a").mkdir(parents=True)
    photo = exif_rotated_jpeg(tmp_path / "tree" / "a" / "photo.jpg")
    sixteen_bit_png(tmp_path / "tree" / "a" / "scan.png")
    tree = load_image_folder(tmp_path / "tree")
    image, _ = tree[0]
    assert image.shape == (3, 20, 10)  # upright
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), np.asarray(decode_image(photo)))
    assert tree[1][0].unique().tolist() == [round(40000 / 257)]  # scaled to 8 bits, not 255
    tree.transform = None  # the PIL images the per-image training recipes take
    assert tree[0][0].mode == "RGB" and tree[0][0].size == (10, 20)

    (tmp_path / "listed").mkdir()
    shutil.copy(photo, tmp_path / "listed" / "photo.jpg")
    (tmp_path / "listed" / "labels.csv").write_text("file,label\nphoto.jpg,0\n")
    listed = load_labelled_folder(tmp_path / "listed")
    assert torch.equal(listed.images[0], image)

    (tmp_path / "tree" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    with pytest.raises(InputError, match=r"broken\.png cannot be used as an image \("):
        load_image_folder(tmp_path / "tree")[0]


def test_image_folder_errors(tmp_path: Path) -> None:
    image_tree(tmp_path, {"shirt": 1})
    (tmp_path / "dress").mkdir()
    with pytest.raises(InputError, match=r"class subfolders dress of .* hold no images"):
        load_image_folder(tmp_path)
    with pytest.raises(InputError, match="has no class subfolders"):
        load_image_folder(tmp_path / "dress")


# --- resolve_dataset -----------------------------------------------------------------


def test_resolve_recognises_sample_and_idx_folders(idx_folder) -> None:
    ds, info = resolve_dataset(SAMPLES, "val")
    assert isinstance(ds, TensorImageDataset) and len(ds) == 300
    assert (info.kind, info.num_samples, info.num_classes) == ("labels-csv", 300, 10)
    assert (info.channels, info.image_size, info.in_memory) == (1, (28, 28), True)
    assert str(info).endswith("300 images, 1 x 28 x 28, 10 classes, in memory")

    folder, splits = idx_folder
    ds, info = resolve_dataset(str(folder), "test")
    assert (info.kind, info.split, info.num_samples, info.image_size) == ("idx", "val", 5, (7, 5))
    assert torch.equal(ds.images[:, 0], torch.from_numpy(splits["t10k"][0]))


def test_resolve_fashion_mnist(idx_folder, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(InputError, match=r"apt-get install dataset-fashion-mnist`, or pass the"):
        resolve_dataset("fashion-mnist")
    folder, _ = idx_folder
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", folder)
    ds, info = resolve_dataset("fashion-mnist", "train")
    assert (info.kind, info.source, info.num_samples) == ("idx", "fashion-mnist", 12)
    assert isinstance(ds, TensorImageDataset) and ds.classes == data.FASHION_MNIST_CLASSES
    assert info.classes == data.FASHION_MNIST_CLASSES and info.classes[9] == "ankle-boot"


def test_resolve_in_memory_sources() -> None:
    images = torch.randint(0, 256, (6, 3, 4, 5), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    ds, info = resolve_dataset((images, labels))
    assert torch.equal(ds.images, images) and ds.labels is not None
    assert torch.equal(ds.labels, labels)
    assert (info.kind, info.num_samples, info.channels, info.image_size) == ("tensor", 6, 3, (4, 5))
    _, info = resolve_dataset(images)
    assert info.classes == () and info.in_memory
    original = TensorImageDataset(images, labels)
    ds, _ = resolve_dataset(original, transform=lambda x: x[:1])
    assert ds[0][0].shape == (1, 4, 5) and original.transform is None
    with pytest.raises(InputError, match="pass \\(images, labels\\)"):
        resolve_dataset((images,))
    with pytest.raises(InputError, match="cannot use a list"):
        resolve_dataset([images])  # type: ignore[arg-type]


def test_resolve_refuses_unusable_paths(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist; pass an ImageFolder tree"):
        resolve_dataset(tmp_path / "nowhere")
    with pytest.raises(InputError, match="is empty"):
        resolve_dataset(tmp_path)
    shutil.copy(SAMPLES / "00000_ankle-boot.png", tmp_path)
    with pytest.raises(InputError, match=r"no class subfolders, IDX files or labels\.csv"):
        resolve_dataset(tmp_path)
    with pytest.raises(InputError, match="is a file, not a folder"):
        resolve_dataset(tmp_path / "00000_ankle-boot.png")
    with pytest.raises(ConfigError, match="use 'train' or 'val'"):
        resolve_dataset(tmp_path, "holdout")
