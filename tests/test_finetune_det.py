"""``mocohub finetune-det`` / ``eval-det``: a tiny backbone fine-tuned on a tiny COCO set.

The data are four or six 64x64 gray images with two rectangles each (tests/det_helpers.py),
the backbone a ResNet-18 of width 8 with the small stem; every run pins fp32 and one
thread per process, so nothing depends on the CPU kind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import run_cli
from det_helpers import coco_folder, tiny_backbone
from train_helpers import ROOT, assert_same_weights, records

from mocohub.detection.coco import CocoDetection
from mocohub.training import checkpoint as ckpt
from mocohub.training.det_config import DetConfig
from mocohub.training.detection import finetune_detector
from mocohub.training.progress import TrainingInterrupted

#: Options of every run here: the images' own size, no worker processes, fp32.
TINY = ["--min-size", "64", "--max-size", "64", "--workers", "0", "--precision", "fp32"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_backbone(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_finetune_then_eval_det(
    tmp_path: Path, backbone: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Four iterations lower the loss; the run folder holds the checkpoints, the metrics
    (losses and COCO AP per epoch), the curves, and eval.json, which `mocohub eval-det`
    reproduces from the last checkpoint. The run folder rules are `mocohub train`'s."""
    data = coco_folder(tmp_path / "data", train=4, val=2)
    run = tmp_path / "run"
    command = ["finetune-det", data, "--model", backbone, "--out", run, "--iters", "4"]
    command += ["--batch-size", "2", "--lr", "0.08", "--warmup-iters", "2", *TINY]
    command += ["--norm", "bn", "--fpn-norm", "none", "--quiet"]
    code, out, err = run_cli(command, capsys)
    assert code == 0, err
    assert out.startswith("done: loss ") and "box AP" in out and "mask AP" in out

    epochs = [r for r in records(run) if r.get("event") == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]  # 4 images / batch 2 = 2 steps an epoch
    assert epochs[-1]["loss"] < 0.8 * epochs[0]["loss"], [r["loss"] for r in epochs]
    for record in epochs:
        assert {"loss_classifier", "loss_mask", "loss_objectness", "bbox_AP", "segm_AP"} <= set(
            record
        )
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for _, p in ckpt.numbered_checkpoints(run)] == [
        "checkpoint_0001_00000000.pt",
        "checkpoint_0002_00000000.pt",
    ]
    config = json.loads((run / "config.json").read_text())
    assert config["iters"] == 4 and config["epochs"] == 2 and config["kind"] == "mask_rcnn"

    written = json.loads((run / "eval.json").read_text())
    assert written["checkpoint"] == "checkpoint_0002_00000000.pt"
    assert written["bbox_AP"] == epochs[-1]["bbox_AP"]
    (run / "eval.json").unlink()
    code, out, err = run_cli(["eval-det", run, "--data", data], capsys)
    assert code == 0, err
    evaluated = json.loads(out)
    for key in ("bbox_AP", "bbox_AP50", "segm_AP"):
        assert evaluated[key] == pytest.approx(written[key], abs=1e-6), key
    assert json.loads((run / "eval.json").read_text()) == evaluated

    code, _, err = run_cli(command, capsys)  # the same command again: refused, nothing lost
    assert code == 2 and "already holds a run" in err and "--resume auto" in err
    code, out, _ = run_cli([*command, "--resume", "auto"], capsys)
    assert code == 0 and "already complete" in out


def _config(backbone: Path, **changes: Any) -> DetConfig:
    values: dict[str, Any] = {
        "model": str(backbone),
        "batch_size": 2,
        "iters": 3,
        "lr": 0.08,
        "warmup_iters": 2,
        "min_size": 64,
        "max_size": 64,
        "workers": 0,
        "precision": "fp32",
        "norm": "bn",
        "fpn_norm": "bn",
        "checkpoint_every": 1,
    }
    return DetConfig(**{**values, **changes})


def test_sigterm_saves_and_resume_is_bit_identical(
    tmp_path: Path, backbone: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM in the first step: a checkpoint inside the epoch, then a clean stop (exit
    code 143). `--resume auto` then ends with the same weights, optimizer state and
    metrics as a run never stopped (fp32, one thread, flips and batch order seeded)."""
    data = coco_folder(tmp_path / "data", train=4, val=0)
    (data / "annotations" / "instances_val.json").unlink()  # no evaluation: faster
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    finetune_detector(_config(backbone), data, whole, progress=False)

    read = CocoDetection.__getitem__
    sent: list[int] = []

    def read_then_sigterm(self: CocoDetection, key: Any) -> Any:
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)
        return read(self, key)

    monkeypatch.setattr(CocoDetection, "__getitem__", read_then_sigterm)
    with pytest.raises(TrainingInterrupted, match="in epoch 1 at step 1") as stop:
        finetune_detector(_config(backbone), data, stopped, progress=False)
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert ckpt.find_latest_checkpoint(stopped).name == "checkpoint_0000_00000001.pt"
    monkeypatch.undo()

    finetune_detector(_config(backbone), data, stopped, resume="auto", progress=False)
    assert_same_weights(whole, stopped)
    assert records(whole) == records(stopped)
    assert ckpt.load_checkpoint(stopped / ckpt.LAST_NAME)["step"] == 1  # 3 iterations: (1, 1)


@pytest.mark.slow  # torchrun and two new processes import torch, torchvision and pycocotools
def test_two_processes_under_gloo(tmp_path: Path, backbone: Path, free_port: int) -> None:
    """`--nproc-per-node 2` on the CPU: two gloo workers (sync_bn falls back to plain BN
    there, with a warning), one report, one set of checkpoints, one eval.json."""
    data = coco_folder(tmp_path / "data", train=4, val=2)
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "mocohub", "finetune-det", str(data), "--model", str(backbone)]
    command += ["--out", str(run), "--iters", "2", "--batch-size", "2", "--warmup-iters", "1"]
    command += [*TINY, "--nproc-per-node", "2", "--master-port", str(free_port), "--quiet"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: loss") == 1, done.stdout
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint_0001_00000000.pt",
        "checkpoint_last.pt",
    ]
    assert ckpt.load_checkpoint(run / ckpt.LAST_NAME)["step"] == 0
    assert "bbox_AP" in json.loads((run / "eval.json").read_text())
    assert len([r for r in records(run) if r.get("event") == "epoch"]) == 1


def test_cheap_refusals_are_one_line(
    tmp_path: Path, backbone: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Settings that cannot work stop before anything is built or written."""
    data = coco_folder(tmp_path / "data", train=2, val=1)
    run = tmp_path / "run"
    base = ["finetune-det", data, "--model", backbone, "--out", run, *TINY]
    code, _, err = run_cli([*base, "--batch-size", "4"], capsys)
    assert code == 2 and "The 2 training images make no batch of 4" in err
    code, _, err = run_cli([*base, "--val-ann", tmp_path / "none.json"], capsys)
    assert code == 2 and "No annotation file at" in err
    assert not run.exists()
    code, _, err = run_cli(["eval-det", tmp_path, "--data", data], capsys)
    assert code == 2 and "is not a finetune-det run folder" in err
    assert len(err.strip().splitlines()) == 1


def test_run_settings_reach_the_detector(backbone: Path) -> None:
    """config.json's settings build the detector: the loaded backbone's weights (or, with
    --random-init, the same network's random ones), the norm, the FPN norm, the sizes."""
    import mocohub
    from mocohub.training.det_eval import build_run_detector

    loaded = mocohub.load(str(backbone)).conv1.weight
    options: dict[str, Any] = {"norm": "gn", "fpn_norm": "none", "min_size": 64, "max_size": 96}
    sized = {"fpn_channels": 32, "rois_per_image": 64, "rpn_proposals": 100}
    detector = build_run_detector(DetConfig(model=str(backbone), **options, **sized), 3)
    assert torch.equal(detector.backbone.body.conv1.weight, loaded)
    assert isinstance(detector.backbone.body.bn1, torch.nn.GroupNorm)
    assert detector.transform.min_size == (64,) and detector.transform.max_size == 96
    assert detector.roi_heads.box_predictor.cls_score.out_features == 3
    # the heads' work, sized for small images
    assert detector.backbone.out_channels == 32
    assert detector.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert detector.rpn._post_nms_top_n["training"] == 100
    assert detector.rpn._pre_nms_top_n["training"] == 200
    default = build_run_detector(DetConfig(model=str(backbone), **options), num_classes=3)
    assert default.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    config = DetConfig(model=str(backbone), pretrained=False, **options)
    random = build_run_detector(config, num_classes=3)
    assert random.backbone.body.conv1.weight.shape == loaded.shape
    assert not torch.equal(random.backbone.body.conv1.weight, loaded)
