"""build_detector: a MoCo backbone in torchvision's Faster/Mask R-CNN, weights arriving exactly."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torchvision
from hub_helpers import reference_checkpoint, reference_encoder
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops.misc import FrozenBatchNorm2d

import mocohub
import mocohub.loading
from mocohub.artifact import ModelConfig
from mocohub.detection import build_detector
from mocohub.errors import ConfigError, InputError
from mocohub.preprocessing import Preprocessing
from mocohub.registry import Weights, WeightsFile

KINDS = ("mask_rcnn", "faster_rcnn")
NORMS = ("sync_bn", "bn", "frozen_bn", "gn")
TINY_NAME = "tiny_det_r18"
BUNDLED = "moco_r18_fashion_mnist"
# Few proposals and samples: the heads' work stays small on a CPU.
LIGHT = {
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "rpn_batch_size_per_image": 32,
    "box_batch_size_per_image": 32,
    "box_detections_per_img": 10,
    "box_score_thresh": 0.0,
}


def build(model: Any, kind: str = "mask_rcnn", **options: Any) -> nn.Module:
    """build_detector for the tiny models, its sync_bn warning (one process) silenced."""
    options = {"num_classes": 4, "min_size": 64, "fpn_channels": 16, **LIGHT, **options}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "mocohub: sync_bn runs as plain BatchNorm")
        return build_detector(model, kind, **options)


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reference-format MoCo v2 .pth.tar of a gray width-8 small-stem ResNet-18."""
    encoder = reference_encoder(small_stem=True, in_channels=1, width=8)
    path = tmp_path_factory.mktemp("reference") / "checkpoint_0199.pth.tar"
    torch.save(reference_checkpoint(encoder), path)
    return path


@pytest.fixture
def tiny_registered(registry_rows: Any) -> str:
    """A registry row for a gray width-8 small-stem ResNet-18 (its file is never fetched)."""
    prep = Preprocessing(28, 32, (0.25,), (0.5,), channels=1)
    config = ModelConfig("resnet18", small_stem=True, in_channels=1, width=8, preprocessing=prep)
    registry_rows(Weights(TINY_NAME, config, (WeightsFile("/nonexistent/tiny_det_r18"),)))
    return TINY_NAME


def targets(kind: str, size: int = 64) -> list[dict[str, torch.Tensor]]:
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 18.0, 60.0, 50.0]])
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
        mask[y0:y1, x0:x1] = 1
    target = {"boxes": boxes, "labels": torch.tensor([1, 3])}
    if kind == "mask_rcnn":
        target["masks"] = masks
    return [target, {k: v.clone() for k, v in target.items()}]


def assert_body_is(detector: nn.Module, backbone: nn.Module, norm: str) -> None:
    """The detector's ResNet holds ``backbone``'s tensors, tensor for tensor, less what
    ``norm`` has no place for (FrozenBN: the batch counter; GN: the running statistics)."""
    body = detector.backbone.body.state_dict()
    expected = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    dropped = {
        "frozen_bn": ("num_batches_tracked",),
        "gn": ("num_batches_tracked", "running_mean", "running_var"),
    }.get(norm, ())
    assert set(body) <= set(expected)
    assert {k for k in set(expected) - set(body) if not k.endswith(dropped)} == set()
    assert len(body) > 0
    for key, value in body.items():
        assert torch.equal(value, expected[key]), key


def norm_types(module: nn.Module) -> set[type]:
    kinds = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d, nn.GroupNorm)
    return {type(m) for m in module.modules() if isinstance(m, kinds)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", NORMS)
def test_registry_entry_without_weights_builds_the_same_random_backbone(
    tiny_registered: str, kind: str, norm: str
) -> None:
    torch.manual_seed(3)
    expected = mocohub.load(tiny_registered, pretrained=False)
    torch.manual_seed(3)  # build_detector loads first, so it draws the same weights
    detector = build(tiny_registered, kind, norm=norm, pretrained=False)
    assert_body_is(detector, expected, norm)
    assert detector.mocohub_options["image_mean"] == [0.25]
    assert detector.mocohub_options["image_std"] == [0.5]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", NORMS)
def test_reference_checkpoint_weights_arrive_exactly_and_train_and_detect(
    reference_file: Path, kind: str, norm: str
) -> None:
    loaded = mocohub.load(reference_file)
    torch.manual_seed(0)
    detector = build(reference_file, kind, norm=norm)
    assert_body_is(detector, loaded, norm)

    images = [torch.rand(1, 64, 64), torch.rand(1, 64, 64)]
    losses = detector.train()(images, targets(kind))
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == expected | ({"loss_mask"} if kind == "mask_rcnn" else set())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert detector.backbone.body.layer4[0].conv1.weight.grad is not None

    with torch.no_grad():
        out = detector.eval()(images)
    assert len(out) == 2
    keys = {"boxes", "labels", "scores"} | ({"masks"} if kind == "mask_rcnn" else set())
    assert set(out[0]) == keys
    n = len(out[0]["boxes"])
    assert out[0]["boxes"].shape == (n, 4)
    assert out[0]["labels"].shape == out[0]["scores"].shape == (n,)
    if kind == "mask_rcnn":
        assert out[0]["masks"].shape == (n, 1, 64, 64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", NORMS)
def test_bundled_model_weights_arrive_exactly(kind: str, norm: str) -> None:
    loaded = mocohub.load(BUNDLED)
    detector = build(BUNDLED, kind, norm=norm)
    assert_body_is(detector, loaded, norm)
    options = detector.mocohub_options
    assert (options["image_mean"], options["image_std"]) == ([0.286], [0.353])
    assert options["backbone"]["meta"]["name"] == BUNDLED


def test_a_module_is_copied_not_changed_and_its_weights_arrive() -> None:
    backbone = mocohub.load(BUNDLED)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    detector = build(backbone, norm="gn", trainable_layers=2)
    assert_body_is(detector, backbone, "gn")
    assert norm_types(backbone) == {nn.BatchNorm2d}
    assert all(p.requires_grad for p in backbone.parameters())
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_frozen_bn_keeps_the_pretrained_statistics_through_training(reference_file: Path) -> None:
    loaded = mocohub.load(reference_file)
    frozen = build(reference_file, "faster_rcnn", norm="frozen_bn")
    plain = build(reference_file, "faster_rcnn", norm="bn")
    assert norm_types(frozen.backbone.body) == {FrozenBatchNorm2d}
    for detector in (frozen, plain):
        detector.train()([torch.rand(1, 64, 64)], targets("faster_rcnn")[:1])
    stats = loaded.layer2[0].bn1.running_mean
    assert torch.equal(frozen.backbone.body.layer2[0].bn1.running_mean, stats)
    assert not torch.equal(plain.backbone.body.layer2[0].bn1.running_mean, stats)


def test_gn_leaves_no_batchnorm_and_keeps_the_bn_scale_and_shift(reference_file: Path) -> None:
    loaded = mocohub.load(reference_file)
    detector = build(reference_file, norm="gn", fpn_norm="gn")
    assert norm_types(detector) == {nn.GroupNorm}
    gn = detector.backbone.body.layer3[1].bn2
    assert gn.num_channels == 32 and gn.num_groups == 16  # 2 channels per group at least
    assert torch.equal(gn.weight, loaded.layer3[1].bn2.weight)
    assert torch.equal(gn.bias, loaded.layer3[1].bn2.bias)


def test_stages_that_do_not_train_are_frozen_with_their_statistics(reference_file: Path) -> None:
    detector = build(reference_file, norm="bn", trainable_layers=2)
    body = detector.backbone.body
    for name in ("conv1", "bn1", "layer1", "layer2"):
        assert not any(p.requires_grad for p in getattr(body, name).parameters()), name
    assert norm_types(body.layer2) == {FrozenBatchNorm2d}
    assert norm_types(body.layer3) == norm_types(body.layer4) == {nn.BatchNorm2d}
    assert all(p.requires_grad for p in body.layer3.parameters())
    # every tensor copied, statistics too; only the frozen stages' batch counters go
    assert_body_is(detector, mocohub.load(reference_file), "frozen_bn")
    assert "layer3.0.bn1.num_batches_tracked" in body.state_dict()


def test_sync_bn_in_one_process_warns_once_and_trains_as_plain_bn(reference_file: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detector = build_detector(
            reference_file,
            "mask_rcnn",
            num_classes=4,
            min_size=64,
            fpn_channels=16,
            norm="sync_bn",
            fpn_norm="sync_bn",
            **LIGHT,
        )
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "\n" not in messages[0]
    assert "sync_bn runs as plain BatchNorm" in messages[0]
    assert "more than one process" in messages[0]
    assert norm_types(detector) == {nn.BatchNorm2d}
    losses = detector.train()([torch.rand(1, 64, 64)], targets("mask_rcnn")[:1])
    sum(losses.values()).backward()
    assert detector.backbone.body.layer1[0].bn1.weight.grad is not None
    assert detector.backbone.fpn.layer_blocks[0][1].weight.grad is not None


def fake_process_group(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """torch.distributed as build_detector sees it under a 2-process job on ``backend``."""
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)


def test_sync_bn_under_nccl_converts_backbone_fpn_and_heads(
    reference_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_process_group(monkeypatch, "nccl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detector = build(reference_file, norm="sync_bn", fpn_norm="sync_bn", trainable_layers=3)
    body = detector.backbone.body
    assert norm_types(body.layer4) == {nn.SyncBatchNorm}
    assert norm_types(body.layer1) == {FrozenBatchNorm2d}  # frozen stages stay frozen
    heads = detector.roi_heads
    for part in (detector.backbone.fpn, heads.box_head, heads.mask_head):
        assert norm_types(part) == {nn.SyncBatchNorm}
    assert_body_is(detector, mocohub.load(reference_file), "frozen_bn")  # frozen: no counters


def test_sync_bn_only_where_asked(reference_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_process_group(monkeypatch, "nccl")
    detector = build(reference_file, norm="frozen_bn", fpn_norm="sync_bn")
    assert norm_types(detector.backbone.body) == {FrozenBatchNorm2d}
    assert norm_types(detector.backbone.fpn) == {nn.SyncBatchNorm}
    detector = build(reference_file, norm="sync_bn", fpn_norm="bn")
    assert norm_types(detector.backbone.body) == {nn.SyncBatchNorm}
    assert norm_types(detector.roi_heads.box_head) == {nn.BatchNorm2d}


def test_sync_bn_under_gloo_warns_that_cpu_has_no_syncbn(
    reference_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_process_group(monkeypatch, "gloo")
    with pytest.warns(UserWarning, match="no SyncBatchNorm for them") as caught:
        detector = build_detector(reference_file, num_classes=4, min_size=64, fpn_channels=16)
    assert len(caught) == 1
    assert norm_types(detector) == {nn.BatchNorm2d}


def test_fpn_norm_puts_norms_in_fpn_and_heads_as_torchvision_v2(reference_file: Path) -> None:
    plain = build(reference_file, norm="bn", fpn_norm=None)
    assert norm_types(plain.backbone.fpn) == set()
    assert isinstance(plain.roi_heads.box_head, TwoMLPHead)
    assert norm_types(plain.roi_heads.mask_head) == set()
    normed = build(reference_file, norm="bn", fpn_norm="bn")
    assert norm_types(normed.backbone.fpn) == {nn.BatchNorm2d}
    assert isinstance(normed.roi_heads.box_head, FastRCNNConvFCHead)
    assert norm_types(normed.roi_heads.box_head) == {nn.BatchNorm2d}
    assert norm_types(normed.roi_heads.mask_head) == {nn.BatchNorm2d}


def test_defaults_follow_the_paper_for_moco_and_torchvision_otherwise(
    reference_file: Path, tiny_registered: str
) -> None:
    def chosen(detector: nn.Module) -> tuple[Any, ...]:
        o = detector.mocohub_options
        return o["norm"], o["fpn_norm"], o["trainable_layers"]

    assert chosen(build(reference_file)) == ("sync_bn", "sync_bn", 5)
    assert chosen(build(mocohub.load(BUNDLED))) == ("sync_bn", "sync_bn", 5)
    assert chosen(build(tiny_registered, pretrained=False)) == ("bn", None, 5)
    supervised = torchvision.models.resnet18()
    detector = build(supervised)
    assert chosen(detector) == ("frozen_bn", None, 3)
    assert detector.mocohub_options["image_mean"] == [0.485, 0.456, 0.406]
    assert_body_is(detector, supervised, "frozen_bn")


def test_sizes_follow_the_backbone_and_anchors_follow_min_size(reference_file: Path) -> None:
    detector = build_detector(
        reference_file, "faster_rcnn", num_classes=4, norm="bn", fpn_norm=None
    )
    options = detector.mocohub_options
    # small stem: 128 px by default; width 8 -> stages of 8..64 channels, FPN of 64
    assert (options["min_size"], options["max_size"], options["fpn_channels"]) == (128, 213, 64)
    assert options["anchor_sizes"] == [5, 10, 20, 41, 82]
    assert detector.rpn.anchor_generator.sizes == ((5,), (10,), (20,), (41,), (82,))
    assert [b[0].in_channels for b in detector.backbone.fpn.inner_blocks] == [8, 16, 32, 64]
    standard = build_detector(torchvision.models.resnet50(), "faster_rcnn", num_classes=4)
    options = standard.mocohub_options
    assert (options["min_size"], options["max_size"], options["fpn_channels"]) == (800, 1333, 256)
    assert options["anchor_sizes"] == [32, 64, 128, 256, 512]  # torchvision's


def test_images_with_the_wrong_channel_count_get_one_clear_error(reference_file: Path) -> None:
    detector = build(reference_file, "faster_rcnn", norm="bn").eval()
    with pytest.raises(InputError, match=r"takes 1-channel images.*convert the images to gray"):
        detector([torch.rand(3, 64, 64)])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "retinanet"}, "Unknown detector kind 'retinanet'"),
        ({"norm": "batchnorm"}, "Unknown norm 'batchnorm'"),
        ({"fpn_norm": "frozen_bn"}, "Unknown fpn_norm 'frozen_bn'"),
        ({"trainable_layers": 6}, "trainable_layers must be 0 to 5"),
        ({"num_classes": 1}, "counts the background too"),
        ({"fpn_channels": -8}, "fpn_channels must be a positive number"),
    ],
)
def test_bad_options_are_config_errors_before_any_loading(
    options: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loaded a model before checking the options")

    monkeypatch.setattr(mocohub.loading, "load", no_loading)
    with pytest.raises(ConfigError, match=message):
        build("moco_v2_r50_800ep", **options)  # a download if it came to loading


def test_a_module_that_is_not_a_resnet_is_refused() -> None:
    with pytest.raises(InputError, match=r"needs a ResNet .* has no conv1"):
        build_detector(nn.Sequential(nn.Conv2d(1, 8, 3)), num_classes=3)


def test_a_gray_module_without_config_needs_its_mean_and_std() -> None:
    gray = mocohub.resnet18(small_stem=True, in_channels=1, width=8)
    with pytest.raises(ConfigError, match="image_mean and image_std need one value per channel"):
        build(gray)
    detector = build(gray, image_mean=[0.5], image_std=[0.25])
    assert detector.transform.image_mean == [0.5]
