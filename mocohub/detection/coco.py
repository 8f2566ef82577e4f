"""COCO-format detection data: an instances JSON file and its image folder, checked on load.

:class:`CocoDetection` reads what torchvision's detection models train on:
boxes (COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``), contiguous labels
``1..C`` (category ids sorted; 0 is the background), instance masks from
polygons or RLE (:mod:`pycocotools.mask`) and the crowd flags. In training
(``train=True``) crowd regions and empty boxes are left out of the targets, as
torchvision's reference scripts do; the evaluation reads the crowd regions
from the JSON file itself (:mod:`mocohub.detection.evaluate`).

Augmentation: a horizontal flip of the image, its boxes and its masks
(``torchvision.transforms.v2`` on ``tv_tensors``), asked for per sample with
the key ``(index, True)``, so that a training loop draws the flips from its own
seeded generator and a resumed run replays them exactly. Images are not
resized here: the detector's ``GeneralizedRCNNTransform`` resizes every image
so that its short side is ``min_size`` (at most ``max_size`` long), and
resizing twice would only blur. Other ``transforms`` (v2, called as
``transforms(image, target)``) may be added.

The data layout of a folder DATA (see :func:`coco_split`)::

    DATA/annotations/instances_train.json   DATA/train/<file_name>
    DATA/annotations/instances_val.json     DATA/val/<file_name>

(COCO 2017's ``instances_train2017.json`` with ``train2017/`` is found too.)

Every problem in the data is one :class:`CocoDataError` line naming the file
and what to fix: a missing image, an empty, non-JSON or incomplete
annotation file, a box reaching outside its image, a category id that the
``categories`` list lacks.

Example:
    >>> data = CocoDetection(*coco_split("shapes", "train"), train=True)
    >>> image, target = data[(0, True)]  # the first image, flipped
    >>> sorted(target)
    ['area', 'boxes', 'image_id', 'iscrowd', 'labels', 'masks']
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mocohub.errors import ConfigError, InputError

__all__ = [
    "BOX_TOLERANCE",
    "CocoDataError",
    "CocoDetection",
    "coco_split",
    "collate_detection",
    "read_coco_json",
    "require_pycocotools",
]

#: How far (pixels) a box may reach past its image's border before it is an error
#: (COCO's own float boxes overshoot by rounding); such boxes are clipped.
BOX_TOLERANCE = 1.0

_INSTALL_HINT = 'install it with: pip install "mocohub[det]"'


class CocoDataError(InputError):
    """A COCO annotation file, or an image it names, that cannot be used as it is."""


def require_pycocotools() -> Any:
    """The ``pycocotools.mask`` module, or one :class:`ConfigError` line saying how to get it.

    Example:
        >>> require_pycocotools().area  # doctest: +SKIP
        <cyfunction area at ...>
    """
    try:
        import pycocotools.mask as mask_utils
    except ImportError:
        raise ConfigError(
            f"Detection masks and COCO evaluation need pycocotools; {_INSTALL_HINT}"
        ) from None
    # pycocotools 2.0.x under NumPy 2 warns on every decode; the masks are right.
    warnings.filterwarnings(
        "ignore",
        "__array__ implementation doesn't accept a copy",
        DeprecationWarning,
        "pycocotools",
    )
    return mask_utils


_INTEGERS = ("id", "image_id", "category_id")  # COCO's ids; width and height too


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_coco_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked contents of a COCO instances file: ``images``, ``annotations``, ``categories``.

    Raises :class:`CocoDataError` for a missing, empty or non-JSON file and
    for one without those three lists or whose entries lack their keys (an
    image's ``id``, ``file_name``, ``width``, ``height``; an annotation's
    ``id``, ``image_id``, ``category_id``, ``bbox``; a category's ``id``).

    Example:
        >>> len(read_coco_json("shapes/annotations/instances_val.json")["images"])
        16
    """
    path = Path(path)
    where = f"the annotation file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CocoDataError(f"No annotation file at {path}; check the path.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CocoDataError(f"Cannot read {where} ({e}); pass a COCO JSON file.") from None
    if not text.strip():
        raise CocoDataError(f"{where.capitalize()} is empty; pass a COCO instances JSON file.")
    try:
        content = json.loads(text)
    except ValueError as e:
        raise CocoDataError(
            f"{where.capitalize()} is not valid JSON ({e}); pass a COCO instances JSON file."
        ) from None
    needed = {
        "images": ("id", "file_name", "width", "height"),
        "annotations": ("id", "image_id", "category_id", "bbox"),
        "categories": ("id",),
    }
    if not isinstance(content, dict):
        raise CocoDataError(f"{where.capitalize()} is not a COCO object; it holds a list.")
    for key, fields in needed.items():
        entries = content.get(key)
        if not isinstance(entries, list):
            raise CocoDataError(
                f"{where.capitalize()} has no {key!r} list; a COCO instances file needs "
                "'images', 'annotations' and 'categories'."
            )
        for entry in entries:
            lacking = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if lacking:
                raise CocoDataError(
                    f"An entry of {key!r} in {path} lacks {', '.join(map(repr, lacking))} "
                    f"({json.dumps(entry)[:80]}); every entry needs {', '.join(fields)}."
                )
            wrong = [f for f in fields if f in _INTEGERS and not _is_int(entry[f])]
            if key == "images":
                wrong += [f for f in ("width", "height") if not _is_int(entry[f]) or entry[f] < 1]
                wrong += [] if isinstance(entry["file_name"], str) else ["file_name"]
            if wrong:
                what = {"file_name": "a text", "width": "a positive whole number"}.get(
                    "width" if wrong[0] == "height" else wrong[0], "a whole number"
                )
                raise CocoDataError(
                    f"An entry of {key!r} in {path} ({json.dumps(entry)[:80]}): its "
                    f"{wrong[0]} is not {what}; fix it."
                )
    seen: set[int] = set()
    for image in content["images"]:
        if image["id"] in seen:
            raise CocoDataError(f"{path} lists image id {image['id']} twice; give each its own id.")
        seen.add(image["id"])
    if not content["images"]:
        raise CocoDataError(f"{where.capitalize()} lists no images; add images to it.")
    if not content["categories"]:
        raise CocoDataError(f"{where.capitalize()} lists no categories; add them.")
    return content


def coco_split(
    data: str | os.PathLike[str], split: str, annotations: str | os.PathLike[str] | None = None
) -> tuple[Path, Path]:
    """``(annotation file, image folder)`` of ``split`` (``"train"``, ``"val"``) of DATA.

    Looks for ``DATA/annotations/instances_{split}.json`` (then COCO 2017's
    ``instances_{split}2017.json``); images are in ``DATA/{split}`` (or
    ``DATA/{split}2017``), else in DATA itself. An explicit ``annotations``
    file is used as given, with the same image folder rule.

    Example:
        >>> coco_split("shapes", "val")
        (PosixPath('shapes/annotations/instances_val.json'), PosixPath('shapes/val'))
    """
    root = Path(data)
    if annotations is None:
        names = [f"instances_{split}.json", f"instances_{split}2017.json"]
        found = [
            root / "annotations" / name for name in names if (root / "annotations" / name).is_file()
        ]
        if not found:
            raise CocoDataError(
                f"{root} has no annotations/instances_{split}.json; a COCO data folder holds "
                f"annotations/instances_{split}.json and the images in {split}/ (or pass the "
                f"annotation file with --{split}-ann)."
            )
        annotations = found[0]
    for folder in (root / split, root / f"{split}2017"):
        if folder.is_dir():
            return Path(annotations), folder
    return Path(annotations), root


def _box_problem(box: Any, width: float, height: float) -> str | None:
    if not (
        isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box)
    ):
        return f"its bbox {json.dumps(box)[:60]} is not 4 numbers [x, y, width, height]"
    x, y, w, h = box
    if w < 0 or h < 0:
        return f"its bbox {box} has a negative width or height"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"its bbox {box} reaches outside the {width}x{height} image"
    return None


class CocoDetection(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """Images and detection targets of one COCO split (see the module docstring).

    Args:
        annotations: the instances JSON file.
        images: the folder the images' ``file_name`` are relative to.
        train: leave crowd regions and empty boxes out of the targets.
        channels: 3 (RGB) or 1 (gray) images, as the backbone takes (an
            attribute that may be set later, once the backbone is known).
        masks: decode instance masks (Mask R-CNN); needs pycocotools.
        transforms: called as ``transforms(image, target)`` after the flip.

    Items are ``(image, target)``: a float ``tv_tensors.Image`` in [0, 1] of
    shape ``(channels, H, W)`` and a dict with ``boxes`` (``BoundingBoxes``,
    XYXY), ``labels`` (int64, 1..C), ``masks`` (``Mask``, uint8, N x H x W,
    with ``masks=True``), ``image_id``, ``area`` and ``iscrowd``. The key is an
    index, or ``(index, flip)``.

    Example:
        >>> data = CocoDetection("ann.json", "images", train=False, channels=1)
        >>> data.category_ids[:3], data.num_classes
        ([1, 2, 3], 11)
    """

    def __init__(
        self,
        annotations: str | os.PathLike[str],
        images: str | os.PathLike[str],
        *,
        train: bool = True,
        channels: int = 3,
        masks: bool = True,
        transforms: Callable[..., Any] | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels}.")
        self.annotation_file, self.image_dir = Path(annotations), Path(images)
        self.train, self.channels, self.masks = train, channels, masks
        self.transforms = transforms
        if masks:
            require_pycocotools()
        content = read_coco_json(self.annotation_file)
        categories = sorted(int(c["id"]) for c in content["categories"])
        self.category_ids: list[int] = categories
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in content["categories"]}
        self.category_names = [names[i] for i in categories]
        self._label = {category: label for label, category in enumerate(categories, start=1)}
        self.images: list[dict[str, Any]] = content["images"]
        by_id = {int(image["id"]): image for image in self.images}
        self.image_ids = [int(image["id"]) for image in self.images]
        self._annotations: dict[int, list[dict[str, Any]]] = {i: [] for i in by_id}
        for ann in content["annotations"]:
            self._check(ann, by_id)
            self._annotations[int(ann["image_id"])].append(ann)
        missing = [
            im["file_name"]
            for im in self.images
            if not (self.image_dir / im["file_name"]).is_file()
        ]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CocoDataError(
                f"The image {self.image_dir / missing[0]}{more} named in {self.annotation_file} "
                "does not exist; put the images there or fix their file_name."
            )

    def _check(self, ann: dict[str, Any], images: dict[int, dict[str, Any]]) -> None:
        image = images.get(int(ann["image_id"]))
        what = f"Annotation {ann['id']} in {self.annotation_file}"
        if image is None:
            raise CocoDataError(
                f"{what} is for image id {ann['image_id']}, which 'images' lacks; fix its image_id."
            )
        if int(ann["category_id"]) not in self._label:
            known = ", ".join(map(str, self.category_ids[:10]))
            raise CocoDataError(
                f"{what} has category id {ann['category_id']}, which 'categories' lacks "
                f"(it has {known}{' ...' if len(self.category_ids) > 10 else ''}); "
                "add the category or fix the annotation."
            )
        problem = _box_problem(ann["bbox"], image["width"], image["height"])
        if problem is not None:
            raise CocoDataError(f"{what} (image {image['file_name']}): {problem}; fix the box.")
        if self.masks and not ann.get("iscrowd") and "segmentation" not in ann:
            raise CocoDataError(
                f"{what} has no segmentation, which Mask R-CNN needs; add it, or train "
                "--kind faster_rcnn (boxes only)."
            )

    @property
    def num_classes(self) -> int:
        """The categories plus the background: torchvision's ``num_classes``."""
        return len(self.category_ids) + 1

    def label_to_category(self, labels: Sequence[int]) -> list[int]:
        """COCO category ids of contiguous labels (1..C)."""
        return [self.category_ids[int(label) - 1] for label in labels]

    def __len__(self) -> int:
        return len(self.images)

    def _image(self, entry: dict[str, Any]) -> torch.Tensor:
        from mocohub.imageio import DecodeError, decode_image

        path = self.image_dir / entry["file_name"]
        if not path.is_file():
            raise CocoDataError(f"The image {path} does not exist (any more); put it back.")
        try:
            image = decode_image(path, mode="L" if self.channels == 1 else "RGB", max_pixels=None)
        except DecodeError as e:
            raise CocoDataError(
                f"Cannot decode the image {path} ({e.reason}); replace it."
            ) from None
        if image.size != (entry["width"], entry["height"]):
            raise CocoDataError(
                f"The image {path} is {image.size[0]}x{image.size[1]} but "
                f"{self.annotation_file} says {entry['width']}x{entry['height']}; fix its size."
            )
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        pixels = pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels
        return pixels.permute(2, 0, 1).float().div_(255)

    def _mask(self, ann: dict[str, Any], height: int, width: int) -> np.ndarray:
        mask_utils = require_pycocotools()
        segmentation = ann.get("segmentation")
        try:
            if isinstance(segmentation, list):  # polygons
                rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
            elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
                rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed RLE
            else:
                rle = segmentation  # compressed RLE
            return np.asarray(mask_utils.decode(rle), dtype=np.uint8)
        except Exception as e:  # pycocotools raises bare Exceptions and TypeErrors
            raise CocoDataError(
                f"The segmentation of annotation {ann['id']} in {self.annotation_file} is "
                f"neither polygons nor RLE ({type(e).__name__}: {e}); fix it."
            ) from None

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, dict[str, Any]]:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        index, flip = key if isinstance(key, tuple) else (key, False)
        entry = self.images[index]
        height, width = int(entry["height"]), int(entry["width"])
        anns = self._annotations[int(entry["id"])]
        if self.train:
            anns = [
                a for a in anns if not a.get("iscrowd") and a["bbox"][2] > 0 and a["bbox"][3] > 0
            ]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor(
                [self._label[int(a["category_id"])] for a in anns], dtype=torch.int64
            ),
            "image_id": int(entry["id"]),
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns]),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
        }
        if self.masks:
            stack = (
                np.stack([self._mask(a, height, width) for a in anns])
                if anns
                else np.zeros((0, height, width), np.uint8)
            )
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stack))
        image: torch.Tensor = tv_tensors.Image(self._image(entry))
        if flip:
            image = TF.horizontal_flip(image)
            target["boxes"] = TF.horizontal_flip(target["boxes"])
            if self.masks:
                target["masks"] = TF.horizontal_flip(target["masks"])
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """A batch as torchvision's detection models take it: a list of images, a list of targets.

    Example:
        >>> images, targets = collate_detection([data[0], data[1]])
    """
    return [image for image, _ in batch], [target for _, target in batch]
