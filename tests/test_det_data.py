"""COCO-format detection data (mocohub.detection.coco): what it reads, and its errors."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import run_cli
from det_helpers import SIZE, coco_folder, edit_annotations, tiny_backbone

from mocohub.detection.coco import CocoDataError, CocoDetection, coco_split, collate_detection
from mocohub.errors import ConfigError


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_backbone(tmp_path_factory.mktemp("model") / "tiny")


def _mask_box(mask: torch.Tensor) -> list[float]:
    """The [x1, y1, x2, y2] box around a binary mask's pixels."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_reads_boxes_labels_polygon_masks_and_crowds(tmp_path: Path) -> None:
    """COCO xywh boxes become xyxy, category ids 3 and 7 become labels 1 and 2, polygons
    become masks filling their boxes; a crowd (RLE) region is left out of training targets
    and kept, flagged, for evaluation."""
    data = coco_folder(tmp_path / "data", crowd=True)
    train = CocoDetection(*coco_split(data, "train"), train=True, channels=1)
    image, target = train[0]
    assert image.shape == (1, SIZE, SIZE) and image.dtype == torch.float32
    assert float(image.max()) == pytest.approx(200 / 255)
    assert target["boxes"].tolist() == [[4, 6, 22, 24], [30, 28, 56, 38]]
    assert target["labels"].tolist() == [1, 2]
    assert train.category_ids == [3, 7] and train.num_classes == 3
    assert train.label_to_category([2, 1]) == [7, 3]
    for mask, box in zip(target["masks"], target["boxes"].tolist(), strict=True):
        assert _mask_box(mask) == box and int(mask.sum()) == (box[2] - box[0]) * (box[3] - box[1])
    assert target["iscrowd"].tolist() == [0, 0]

    evaluation = CocoDetection(*coco_split(data, "train"), train=False, channels=3)
    image, target = evaluation[0]
    assert image.shape == (3, SIZE, SIZE)
    assert target["iscrowd"].tolist() == [0, 0, 1]
    assert _mask_box(target["masks"][2]) == [2, 48, 12, 60]  # the RLE, column-major
    assert int(target["masks"][2].sum()) == 120


def test_compressed_rle_equals_its_polygon(tmp_path: Path) -> None:
    """A segmentation stored as compressed RLE (pycocotools' string counts) decodes to the
    same mask as the polygon it was made from."""
    import pycocotools.mask as mask_utils

    data = coco_folder(tmp_path / "data", train=1)
    path = data / "annotations" / "instances_train.json"

    def to_rle(content: dict[str, Any]) -> None:
        ann = content["annotations"][0]
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], SIZE, SIZE))
        ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}

    polygon_mask = CocoDetection(path, data / "train", channels=1)[0][1]["masks"][0]
    edit_annotations(path, to_rle)
    rle_mask = CocoDetection(path, data / "train", channels=1)[0][1]["masks"][0]
    assert torch.equal(rle_mask, polygon_mask) and int(rle_mask.sum()) == 18 * 18


def test_flip_moves_image_boxes_and_masks_together(tmp_path: Path) -> None:
    """The key (index, True) mirrors the image, its boxes and its masks: each box still
    frames its mask and the bright square's pixels."""
    data = CocoDetection(*coco_split(coco_folder(tmp_path / "data"), "train"), channels=1)
    image, target = data[0]
    flipped, flipped_target = data[(0, True)]
    assert torch.equal(flipped, image.flip(-1))
    assert flipped_target["boxes"].tolist() == [[42, 6, 60, 24], [8, 28, 34, 38]]
    for mask, box in zip(flipped_target["masks"], flipped_target["boxes"].tolist(), strict=True):
        assert _mask_box(mask) == box
    x1, y1, x2, y2 = (int(v) for v in flipped_target["boxes"][0])
    assert bool((flipped[0, y1:y2, x1:x2] == 200 / 255).all())
    assert torch.equal(flipped_target["labels"], target["labels"])


def test_collate_keeps_images_and_targets_apart(tmp_path: Path) -> None:
    data = CocoDetection(*coco_split(coco_folder(tmp_path / "data"), "train"), masks=False)
    images, targets = collate_detection([data[0], data[1]])
    assert len(images) == 2 and [t["image_id"] for t in targets] == [100, 101]
    assert "masks" not in targets[0]


def test_layout_and_its_error(tmp_path: Path) -> None:
    """DATA/annotations/instances_SPLIT.json with images in DATA/SPLIT; COCO 2017's names too."""
    data = coco_folder(tmp_path / "data")
    assert coco_split(data, "val") == (data / "annotations" / "instances_val.json", data / "val")
    (data / "annotations" / "instances_val.json").rename(
        data / "annotations" / "instances_val2017.json"
    )
    (data / "val").rename(data / "val2017")
    assert coco_split(data, "val") == (
        data / "annotations" / "instances_val2017.json",
        data / "val2017",
    )
    with pytest.raises(CocoDataError, match=r"has no annotations/instances_test\.json"):
        coco_split(data, "test")


def test_missing_pycocotools_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = coco_folder(tmp_path / "data")
    for name in ("pycocotools", "pycocotools.mask", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r'pip install "mocohub\[det\]"'):
        CocoDetection(*coco_split(data, "train"), masks=True)
    CocoDetection(*coco_split(data, "train"), masks=False)  # boxes alone need no pycocotools


def _rewrite(data: Path, change: Any) -> None:
    edit_annotations(data / "annotations" / "instances_train.json", change)


def _set(content: dict[str, Any], key: str, value: Any) -> None:
    content["annotations"][0][key] = value


# (what is broken, how, what the one-line message says)
BROKEN = {
    "missing image": (
        lambda data: (data / "train" / "train_001.png").unlink(),
        r"The image .*train_001\.png named in .* does not exist",
    ),
    "empty file": (
        lambda data: (data / "annotations" / "instances_train.json").write_text(""),
        r"annotation file .* is empty",
    ),
    "not JSON": (
        lambda data: (data / "annotations" / "instances_train.json").write_text("{images: ["),
        r"is not valid JSON",
    ),
    "no categories list": (
        lambda data: _rewrite(data, lambda c: c.pop("categories")),
        r"has no 'categories' list",
    ),
    "annotation without bbox": (
        lambda data: _rewrite(data, lambda c: c["annotations"][1].pop("bbox")),
        r"An entry of 'annotations' in .* lacks 'bbox'",
    ),
    "image id not a number": (
        lambda data: _rewrite(data, lambda c: c["images"][0].update(id="first")),
        r"An entry of 'images' in .*: its id is not a whole number",
    ),
    "image id twice": (
        lambda data: _rewrite(data, lambda c: c["images"][1].update(id=100)),
        r"lists image id 100 twice",
    ),
    "box outside the image": (
        lambda data: _rewrite(data, lambda c: _set(c, "bbox", [50, 6, 18, 18])),
        r"Annotation 1 .*train_000\.png.*bbox \[50, 6, 18, 18\] reaches outside the 64x64 image",
    ),
    "unknown category": (
        lambda data: _rewrite(data, lambda c: _set(c, "category_id", 5)),
        r"Annotation 1 .* has category id 5, which 'categories' lacks \(it has 3, 7\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_data_errors_are_one_line_exit_2(
    case: str, tmp_path: Path, backbone: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each broken data set stops `mocohub finetune-det` with exit code 2 and one line on
    stderr (no traceback), before a run folder is made."""
    data = coco_folder(tmp_path / "data", train=2, val=1)
    breaks, message = BROKEN[case]
    breaks(data)
    run = tmp_path / "run"
    args = ["finetune-det", data, "--model", backbone, "--out", run, "--iters", "1"]
    args += ["--batch-size", "2", "--workers", "0", "--precision", "fp32"]
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("Error: ")
    assert re.search(message, err), err
    assert not run.exists()


def test_val_split_errors_stop_the_start_too(
    tmp_path: Path, backbone: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = coco_folder(tmp_path / "data", train=2, val=1)
    content = json.loads((data / "annotations" / "instances_val.json").read_text())
    content["annotations"][0]["category_id"] = 99
    (data / "annotations" / "instances_val.json").write_text(json.dumps(content))
    run = tmp_path / "run"
    code, _, err = run_cli(
        ["finetune-det", data, "--model", backbone, "--out", run, "--iters", "1"], capsys
    )
    assert code == 2 and "instances_val.json has category id 99" in err
    assert len(err.strip().splitlines()) == 1 and not run.exists()


def test_broken_segmentation_is_a_data_error(tmp_path: Path) -> None:
    """Masks are decoded when an image is read: a segmentation that is neither polygons nor
    RLE is a CocoDataError naming the annotation (the loop's one-line error)."""
    data = coco_folder(tmp_path / "data", train=1)
    _rewrite(data, lambda c: _set(c, "segmentation", {"counts": 3}))
    dataset = CocoDetection(*coco_split(data, "train"))
    with pytest.raises(CocoDataError, match=r"segmentation of annotation 1 .* neither polygons"):
        dataset[0]
