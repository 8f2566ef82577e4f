"""The synthetic Fashion-MNIST detection set: exact masks and boxes, seeded, written whole."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from mocohub.detection import synthetic
from mocohub.detection.synthetic import Items, generate, main, make_canvas
from mocohub.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fashion-mnist"  # 8 training items, IDX
# pycocotools' decode under numpy 2 (a warning about its C extension, not about our data)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_same_command_writes_byte_identical_files(tmp_path: Path) -> None:
    for name in ("a", "b"):
        main(["--out", str(tmp_path / name), "--images", "6", "--seed", "3",
              "--source", str(FIXTURE)])  # fmt: skip
    first, second = files(tmp_path / "a"), files(tmp_path / "b")
    assert sorted(first) == [
        "README.md",
        "annotations/instances_train.json",
        "annotations/instances_val.json",
        *[f"train/{i:06d}.png" for i in range(1, 7)],
        "val/000001.png",
    ]
    assert first == second
    main(["--out", str(tmp_path / "c"), "--images", "6", "--seed", "4", "--source", str(FIXTURE)])
    assert files(tmp_path / "c")["train/000001.png"] != first["train/000001.png"]


def test_an_idx_folder_gives_its_test_split_when_it_has_one(tmp_path: Path) -> None:
    for name in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
        (tmp_path / f"t10k-{name}").write_bytes((FIXTURE / f"train-{name}").read_bytes())
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not read")
    items = synthetic.load_items(tmp_path)
    assert items.images.shape == (8, 28, 28)
    assert items.description == f"{tmp_path} (test split)"
    assert synthetic.load_items(FIXTURE).description == f"{FIXTURE} (train split)"


def test_more_images_keep_the_first_ones(tmp_path: Path) -> None:
    generate(tmp_path / "few", images=2, val_images=1, source=FIXTURE)
    generate(tmp_path / "more", images=4, val_images=2, source=FIXTURE)
    few, more = files(tmp_path / "few"), files(tmp_path / "more")
    for name in ("train/000001.png", "train/000002.png", "val/000001.png"):
        assert few[name] == more[name]


def test_masks_and_boxes_are_exact_and_cover_every_drawn_pixel(tmp_path: Path) -> None:
    out = generate(tmp_path / "set", images=12, val_images=4, seed=1)  # the repository samples
    for split in ("train", "val"):
        coco = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert coco["categories"][9]["name"] == "ankle-boot"
        for image in coco["images"]:
            pixels = np.asarray(Image.open(out / split / image["file_name"]))
            assert pixels.shape == (image["height"], image["width"]) == (128, 128)
            anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            assert 1 <= len(anns) <= 6
            owners = np.zeros(pixels.shape, np.int64)
            for ann in anns:
                mask = mask_utils.decode(ann["segmentation"]).astype(bool)
                ys, xs = np.nonzero(mask)
                x0, y0 = xs.min(), ys.min()
                w, h = xs.max() - x0 + 1, ys.max() - y0 + 1
                assert ann["bbox"] == [float(x0), float(y0), float(w), float(h)]
                assert ann["area"] == int(mask.sum()) > 0
                assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 10
                assert (pixels[mask] >= synthetic.INK).all()
                owners += mask
            assert owners.max() == 1  # no pixel belongs to two objects
            assert np.array_equal(owners == 1, pixels > 0)  # every drawn pixel has its object
    readme = (out / "README.md").read_text()
    assert "python -m mocohub.detection.synthetic --out DIR --images 12 --val-images 4" in readme
    assert "--seed 1" in readme and "samples/fashion-mnist" in readme


class ScriptedRng:
    """A stand-in for np.random.Generator that returns the values a test chose."""

    def __init__(self, integers: list[int], scales: list[float]) -> None:
        self._integers, self._scales = list(integers), list(scales)

    def integers(self, low: int, high: int | None = None) -> int:
        value = self._integers.pop(0)
        assert (0 if high is None else low) <= value < (low if high is None else high)
        return value

    def uniform(self, low: float, high: float) -> float:
        return self._scales.pop(0)


def squares() -> Items:
    images = np.zeros((2, 28, 28), np.uint8)
    images[0, 10:18, 10:18] = 200  # a small square item
    images[1, 2:26, 2:26] = 100  # a large one
    return Items(images, np.array([4, 7]), "two squares")


def test_later_items_cover_earlier_ones_and_hidden_ones_are_left_out() -> None:
    items = squares()
    # 3 objects: small at (0, 0), large at (0, 0) over it, small at (60, 60); scale 1
    rng = ScriptedRng([3, 0, 0, 0, 1, 0, 0, 0, 60, 60], [1.0, 1.0, 1.0])
    canvas, objects = make_canvas(items, np.array([0, 1]), rng, 128, 6)  # type: ignore[arg-type]
    assert [label for label, _ in objects] == [7, 4]  # the first small square is hidden
    large, small = (mask for _, mask in objects)
    assert large.sum() == 24 * 24 and large[2:26, 2:26].all()
    assert small.sum() == 8 * 8 and small[70:78, 70:78].all()
    assert (canvas[2:26, 2:26] == 100).all() and (canvas[70:78, 70:78] == 200).all()
    assert canvas.astype(bool).sum() == 24 * 24 + 8 * 8


def test_a_partly_covered_item_keeps_its_visible_pixels() -> None:
    # large at (0, 0), then small at (0, 14): the small square covers the large one's corner
    rng = ScriptedRng([2, 1, 0, 0, 0, 0, 14], [1.0, 1.0])
    _, objects = make_canvas(squares(), np.array([0, 1]), rng, 64, 6)  # type: ignore[arg-type]
    (_, large), (_, small) = objects
    assert large.sum() == 24 * 24 - 2 * 8  # rows 10-17 of columns 24-25 now show the small one
    assert not (large & small).any()


def test_validation_canvases_use_other_items_than_training_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pools: dict[int, set[int]] = {}
    original = synthetic.make_canvas

    def spy(items: Items, pool: np.ndarray, *args: Any) -> Any:
        pools.setdefault(len(pool), set()).update(pool.tolist())
        return original(items, pool, *args)

    monkeypatch.setattr(synthetic, "make_canvas", spy)
    generate(tmp_path / "set", images=2, val_images=2)
    assert sorted(pools) == [60, 240]  # every fifth item of each class (30 per class)
    assert not pools[60] & pools[240]
    labels = synthetic.load_items().labels
    assert np.bincount(labels[sorted(pools[60])], minlength=10).tolist() == [6] * 10


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    code = exit_info.value.code
    return int(code) if isinstance(code, int) else 1, capsys.readouterr().err


def test_a_folder_with_files_is_refused_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    code, err = run_main(["--out", str(tmp_path), "--images", "2"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"Error: {tmp_path} already exists and is not an empty folder; choose a new --out."
    ]
    assert files(tmp_path) == {"mine.txt": b"keep me"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "no/such/folder"], "no/such/folder is not a folder"),
        (["--source", "README.md"], "README.md is not a folder"),
        (["--source", "tests"], "tests has no train images file"),
        (["--size", "40"], "--size >= 56"),
        (["--images", "0"], "Need --images >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, err = run_main(["--out", str(tmp_path / "set"), *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "set").exists()


def test_missing_repository_samples_say_to_pass_a_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mocohub.training import data

    monkeypatch.setattr(synthetic, "_SAMPLES", tmp_path / "gone")
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    with pytest.raises(InputError, match=r"not in this installation .* pass --source"):
        generate(tmp_path / "set", images=1)


def test_an_installed_package_falls_back_to_debians_fashion_mnist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No samples/ outside a clone; /usr/share/datasets/fashion-mnist serves instead."""
    from readme_helpers import idx_folder

    from mocohub.training import data

    monkeypatch.setattr(synthetic, "_SAMPLES", tmp_path / "gone")
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", idx_folder(tmp_path / "debian", val=20))
    generate(tmp_path / "set", images=2, val_images=1)
    record = json.loads((tmp_path / "set" / "annotations" / "instances_train.json").read_text())
    assert len(record["images"]) == 2


def test_a_full_disk_leaves_no_folder_and_no_leftovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = []

    def png(canvas: np.ndarray) -> bytes:
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(1)
        return b"png"

    monkeypatch.setattr(synthetic, "_png", png)
    with pytest.raises(InputError, match="is full"):
        generate(tmp_path / "set", images=5, source=FIXTURE)
    assert list(tmp_path.iterdir()) == []
