"""MoCo v3 as a new user meets it: an image folder of RGB (and gray, CMYK, palette) images
of mixed sizes trained with a ViT from the command line, and the clear one-line answers
for checkpoints and models that do not fit where they are given."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import TINY_TRAIN, run_cli
from PIL import Image
from test_vit_library import v3_vit_checkpoint
from timm.models.vision_transformer import VisionTransformer
from v3_helpers import SAMPLES, tiny_v3

import mocohub
from mocohub.card import model_card
from mocohub.errors import ConfigError, InputError
from mocohub.training import v3_training
from mocohub.training.config import preset
from mocohub.training.train import build_moco, load_encoders

#: ViT settings small enough for a CPU test: 16 px views of vit_nano, narrow MLPs, fp32
VIT_FLAGS = ["--arch", "vit_nano", "--image-size", "16", "--dim", "16", "--mlp-dim", "32",
             "--batch-size", "8", "--warmup-epochs", "0", "--workers", "0",
             "--precision", "fp32", "--quiet"]  # fmt: skip


def _user_folder(root: Path) -> Path:
    """An ImageFolder tree as users have them: JPEG and PNG, 50x70 to 300x200, one gray,
    one CMYK and one palette image, two classes of 8."""
    rng = np.random.default_rng(0)
    sizes = [(50, 70), (300, 200), (64, 64), (120, 90)]
    for c, name in enumerate(["cat", "dog"]):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(8):
            w, h = sizes[i % 4]
            pixels = (rng.random((h, w, 3)) * 80 + c * 100).astype(np.uint8)
            image = Image.fromarray(pixels, "RGB")
            mode = {0: "L", 1: "CMYK", 2: "P"}.get(i) if c == 0 else None
            image = image.convert(mode) if mode else image
            suffix = ".jpg" if i % 2 else ".png"
            image.save(folder / f"{name}{i}{suffix}")
    return root


def test_a_resnet_preset_trains_a_vit_on_an_rgb_image_folder_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--preset fashion_mnist_v3 --arch vit_nano` (as `--help` offers): the preset's
    ResNet stem and width are not the user's ViT settings (before: refused, blaming
    --small-stem and --width, which the user never passed)."""
    data = _user_folder(tmp_path / "data")
    run = tmp_path / "run"
    train: list[str | os.PathLike[str]] = ["train", data, "--out", run, "--preset",
                                           "fashion_mnist_v3", *VIT_FLAGS]  # fmt: skip
    code, out, err = run_cli([*train, "--epochs", "1"], capsys)
    assert code == 0, err
    assert "done: loss" in out
    saved = json.loads((run / "config.json").read_text())
    assert (saved["arch"], saved["small_stem"], saved["method"]) == ("vit_nano", False, "moco_v3")
    code, out, err = run_cli([*train, "--epochs", "2", "--resume", "auto"], capsys)
    assert code == 0 and "done: loss" in out, err
    knn: list[str | os.PathLike[str]] = ["knn", "--model", run, "--train", data,
                                         "--val", data / "train", "--workers", "0"]  # fmt: skip
    code, out, err = run_cli(knn, capsys)  # --val names the 16 training images: leave-one-out
    assert code == 0 and "k-NN (k=15" in out and "--val names the training images" in err, err
    model = mocohub.load(run)
    config = model.mocohub_config
    assert (config.arch, config.in_channels, config.image_size) == ("vit_nano", 3, 16)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 16, 16)).shape == (2, 32)
    # What the user did give is still refused: a ViT has no ResNet width.
    code, _, err = run_cli(
        ["train", data, "--out", tmp_path / "w", "--preset", "fashion_mnist_v3", "--width", "32",
         *VIT_FLAGS, "--epochs", "1"],
        capsys,
    )  # fmt: skip
    assert code == 2 and "--small-stem and --width shape a ResNet" in err


def test_the_python_preset_drops_the_resnet_stem_for_a_vit_only() -> None:
    assert preset("fashion_mnist_v3", arch="vit_mini").small_stem is False
    assert preset("fashion_mnist_v3", arch="resnet34").small_stem is True
    with pytest.raises(ConfigError, match="shape a ResNet"):
        preset("fashion_mnist_v3", arch="vit_mini", small_stem=True)


def test_weights_that_do_not_fit_are_one_line_naming_the_flags() -> None:
    """--weights from a checkpoint of other shapes: one sentence (before: PyTorch's
    multi-line report cut at 300 characters, inside a tensor shape)."""
    torch.manual_seed(0)
    source = v3_training.build_moco_v3(tiny_v3("vit_nano"), 1)
    target = v3_training.build_moco_v3(tiny_v3("vit_nano", image_size=20), 1)
    with pytest.raises(ConfigError, match="pos_embed") as e:
        v3_training.load_v3_weights(target, {"model": source.state_dict()})
    assert "\n" not in str(e.value) and "--image-size" in str(e.value)
    # MoCo v1/v2's --weights said it the same broken way.
    small = preset("fashion_mnist", **{**TINY_TRAIN, "dim": 8})
    checkpoint = {"model": build_moco(preset("fashion_mnist", **TINY_TRAIN), 1).state_dict()}
    with pytest.raises(ConfigError, match="encoders do not fit") as e:
        load_encoders(build_moco(small, 1), checkpoint)
    assert "\n" not in str(e.value) and "--dim" in str(e.value)


def test_resuming_a_finished_checkpoint_by_path_says_to_resume_that_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reference v3 checkpoint past --epochs: the advice names the checkpoint, not
    `--resume auto` of an empty folder (which would start from scratch)."""
    torch.manual_seed(0)
    model = v3_training.build_moco_v3(tiny_v3("vit_nano"), 1)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"module." + k: v for k, v in model.state_dict().items()}
    reference = {"epoch": 3, "arch": "vit_nano", "state_dict": state,
                 "optimizer": optimizer.state_dict(), "scaler": {}}  # fmt: skip
    path = tmp_path / "vit-nano.pth.tar"
    torch.save(reference, path)
    run = tmp_path / "run"
    code, out, err = run_cli(
        ["train", SAMPLES, "--out", run, "--preset", "moco_v3_vit_s", *VIT_FLAGS,
         "--epochs", "2", "--resume", path],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert out == (
        f"The checkpoint {path} is already complete (epoch 3, past --epochs 2): nothing to "
        f"do. To train longer, rerun with --resume {path} --epochs N (N above 3).\n"
    )
    assert not run.exists()


def test_a_vit_given_to_the_detector_is_one_error(tmp_path: Path) -> None:
    """Detection takes ResNets; a MoCo v3 ViT loads, so it was an AttributeError
    (a traceback from `mocohub finetune-det`)."""
    from mocohub.detection import build_detector

    checkpoint, _ = v3_vit_checkpoint()
    torch.save(checkpoint, tmp_path / "vit.pth.tar")
    with pytest.raises(InputError, match=r"is a Vision Transformer \(vit_nano\)"):
        build_detector(tmp_path / "vit.pth.tar", "faster_rcnn", num_classes=3)


def test_a_vit_model_card_describes_a_vit(tmp_path: Path) -> None:
    """Not a ResNet's "width 64" and "`fc` is `Identity`"."""
    checkpoint, _ = v3_vit_checkpoint()
    torch.save(checkpoint, tmp_path / "vit.pth.tar")
    card = model_card(mocohub.load(tmp_path / "vit.pth.tar").mocohub_config)
    assert "| Architecture | vit_nano, 4x4 patches |" in card
    assert "| Output | 32-d class token (`head` is `Identity`) |" in card
    assert "width" not in card and "`fc`" not in card


def test_convert_to_timm_names_the_vit_to_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any head count loads a ViT's state dict strictly, so the output names the shape;
    built as printed, timm's VisionTransformer gives mocohub's features exactly."""
    checkpoint, _ = v3_vit_checkpoint()
    torch.save(checkpoint, tmp_path / "vit.pth.tar")
    code, out, err = run_cli(
        ["convert", tmp_path / "vit.pth.tar", "--to", "timm", "--out", tmp_path / "t.pth"],
        capsys,
    )
    assert code == 0, err
    shape = re.search(r"VisionTransformer\(([^)]*)\)", out)
    assert shape is not None, out
    kwargs = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", shape[1])}
    assert kwargs["num_heads"] == 2 and kwargs["num_classes"] == 0
    vit = VisionTransformer(**kwargs).eval()  # type: ignore[arg-type]
    vit.load_state_dict(torch.load(tmp_path / "t.pth", weights_only=True), strict=True)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(vit(x), mocohub.load(tmp_path / "vit.pth.tar")(x))
