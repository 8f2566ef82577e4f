"""Reference MoCo v3 checkpoints (facebookresearch/moco-v3 ``main_moco.py``) resume and
start mocohub runs: ``--resume X.pth.tar`` continues as from mocohub's own checkpoint of
that epoch end, ``--weights X.pth.tar`` starts from its weights, and a checkpoint of the
other MoCo is one clear error.

What ``main_moco.py`` saves at each epoch end, for a DDP-wrapped ``MoCo_ResNet`` or
``MoCo_ViT``: ``{'epoch': epoch + 1, 'arch', 'state_dict' (module.base_encoder.*,
module.momentum_encoder.*, module.predictor.*), 'optimizer' (LARS or AdamW over
model.parameters()), 'scaler' (its GradScaler's state)}``; its resume loads all four and
starts at ``checkpoint['epoch']``. The files here are built that way from the oracle of
``tests/test_moco_v3.py`` (a transcription of the reference's builder and LARS): the
model and optimizer are the oracle's, loaded with a mocohub run's state at an epoch end,
and AdamW's state is written as the torch of the reference's time wrote it (an integer
``step``, none of the param-group keys added since).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import run_cli
from hub_helpers import reference_checkpoint, reference_encoder
from v3_helpers import SAMPLES, newest_state, sample_images, tiny_v3
from v3_reference import RefLARS, RefMoCo, RefMoCoResNet, RefMoCoViT

from mocohub.backbones import build_backbone
from mocohub.errors import ConfigError
from mocohub.training import checkpoint as ckpt
from mocohub.training import v3_training
from mocohub.training.config import TrainConfig, preset
from mocohub.training.train import TrainingInterrupted, build_moco, train
from mocohub.vit import build_vit

#: torch 1.9's AdamW param group (the reference's time): no maximize, foreach, capturable,
#: differentiable or fused yet; its per-parameter "step" was a Python int.
OLD_ADAMW_GROUP = {"lr", "betas", "eps", "weight_decay", "amsgrad", "params"}
#: what a CUDA GradScaler's state_dict() holds (the reference trains under fp16 autocast)
REFERENCE_SCALER = {
    "scale": 32768.0,
    "growth_factor": 2.0,
    "backoff_factor": 0.5,
    "growth_interval": 2000,
    "_growth_tracker": 137,
}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return sample_images(96)  # 3 steps of 32 an epoch


def _oracle(config: TrainConfig) -> RefMoCo:
    """The reference's model for ``config``, built as main_moco.py builds it."""
    if config.arch.startswith("vit_"):
        vit = functools.partial(build_vit, config.arch, img_size=config.image_size, in_channels=1)
        return RefMoCoViT(vit, config.dim, config.mlp_dim, config.T)
    resnet = functools.partial(
        build_backbone,
        config.arch,
        small_stem=True,
        width=config.width,
        in_channels=1,
        zero_init_residual=True,
    )
    return RefMoCoResNet(resnet, config.dim, config.mlp_dim, config.T)


def reference_v3_checkpoint(config: TrainConfig, native: dict[str, Any]) -> dict[str, Any]:
    """What the reference main_moco.py would have saved at the epoch end of ``native``
    (a mocohub checkpoint taken there), for a run of ``config``."""
    assert native["step"] == 0, "the reference saves at epoch ends only"
    oracle = _oracle(config)
    oracle.load_state_dict(native["model"], strict=True)  # the same keys, strictly
    optimizer: torch.optim.Optimizer
    if config.optimizer == "lars":
        optimizer = RefLARS(
            oracle.parameters(), weight_decay=config.weight_decay, momentum=config.momentum
        )
    else:
        optimizer = torch.optim.AdamW(oracle.parameters(), weight_decay=config.weight_decay)
    optimizer.load_state_dict(native["optimizer"])  # by position over model.parameters()
    saved = optimizer.state_dict()
    if config.optimizer == "adamw":
        saved = {
            "state": {i: {**s, "step": int(s["step"].item())} for i, s in saved["state"].items()},
            "param_groups": [
                {k: v for k, v in group.items() if k in OLD_ADAMW_GROUP}
                for group in saved["param_groups"]
            ],
        }
    return {
        "epoch": native["epoch"],  # epoch + 1 of the epoch just done: where resume starts
        "arch": config.arch,
        "state_dict": {f"module.{k}": v for k, v in oracle.state_dict().items()},
        "optimizer": saved,
        "scaler": dict(REFERENCE_SCALER),
    }


def _assert_same_optimizer_state(ours: dict[Any, Any], theirs: dict[Any, Any]) -> None:
    """Two optimizers' ``state_dict()["state"]``: the same entries, bit for bit."""
    assert ours.keys() == theirs.keys() and ours
    for index, state in ours.items():
        assert state.keys() == theirs[index].keys(), index
        for name, value in state.items():
            assert torch.equal(value, theirs[index][name]), (index, name)


@pytest.mark.parametrize("arch", ["resnet18", "vit_nano"])
def test_a_reference_v3_checkpoint_resumes_as_mocohub_s_own_checkpoint_of_that_epoch(
    arch: str, images: torch.Tensor, tmp_path: Path
) -> None:
    config = tiny_v3(arch)
    # A mocohub run stopped at the end of epoch 1 of 2 (3 steps an epoch).
    with pytest.raises(TrainingInterrupted, match="after epoch 1"):
        train(config, images, tmp_path / "own", progress=False, stop_after_steps=3)
    native = newest_state(tmp_path / "own")
    assert (native["epoch"], native["step"]) == (1, 0)
    reference = reference_v3_checkpoint(config, native)
    moments = {"lars": ["mu"], "adamw": ["exp_avg", "exp_avg_sq", "step"]}[config.optimizer]
    assert sorted(next(iter(reference["optimizer"]["state"].values()))) == sorted(moments)
    torch.save(reference, tmp_path / "checkpoint_0000.pth.tar")

    # Loaded: the same weights, optimizer state and epoch as mocohub's own checkpoint.
    loaded = ckpt.load_checkpoint(tmp_path / "checkpoint_0000.pth.tar")
    assert ckpt.is_reference_checkpoint(loaded) and ckpt.checkpoint_method(loaded) == "moco_v3"
    torch.manual_seed(7)  # other initial weights: all of them are overwritten
    model = v3_training.build_moco_v3(config, 1)
    optimizer = v3_training.build_v3_optimizer(config, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp32: the reference's scale unused
    assert ckpt.restore_training_state(loaded, model, optimizer, scaler) == (1, 0)
    for key, value in native["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    ours = optimizer.state_dict()
    _assert_same_optimizer_state(ours["state"], native["optimizer"]["state"])
    assert ours["param_groups"] == native["optimizer"]["param_groups"]

    # Resumed: the run goes on from epoch 1 exactly as mocohub's own resume does.
    train(config, images, tmp_path / "from_reference", progress=False,
          resume=tmp_path / "checkpoint_0000.pth.tar")  # fmt: skip
    train(config, images, tmp_path / "own", progress=False, resume="auto")
    a, b = newest_state(tmp_path / "from_reference"), newest_state(tmp_path / "own")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    _assert_same_optimizer_state(a["optimizer"]["state"], b["optimizer"]["state"])
    assert not torch.equal(b["model"]["predictor.0.weight"], native["model"]["predictor.0.weight"])


def test_the_reference_s_scaler_state_resumes_an_fp16_scaler() -> None:
    config = tiny_v3("resnet18")
    torch.manual_seed(0)
    model = v3_training.build_moco_v3(config, 1)
    checkpoint = {
        "epoch": 5,
        "arch": "resnet18",
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "optimizer": v3_training.build_v3_optimizer(config, model).state_dict(),
        "scaler": dict(REFERENCE_SCALER),
    }
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    optimizer = v3_training.build_v3_optimizer(config, model)
    assert ckpt.restore_training_state(checkpoint, model, optimizer, scaler) == (5, 0)
    assert scaler.state_dict() == REFERENCE_SCALER


def test_weights_start_a_run_from_a_reference_v3_checkpoint(
    images: torch.Tensor, tmp_path: Path
) -> None:
    config = tiny_v3("vit_nano", checkpoint_every=1)
    torch.manual_seed(3)
    oracle = _oracle(config)
    with torch.no_grad():  # BN statistics away from their initial values
        oracle.train()(torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16), 0.9)
    reference = {
        "epoch": 300,
        "arch": "vit_nano",
        "state_dict": {f"module.{k}": v for k, v in oracle.state_dict().items()},
        "optimizer": torch.optim.AdamW(oracle.parameters()).state_dict(),
        "scaler": dict(REFERENCE_SCALER),
    }
    torch.save(reference, tmp_path / "vit-nano.pth.tar")
    # One step at the warm-up's learning rate of 0: the trained weights stay the file's.
    with pytest.raises(TrainingInterrupted, match="at step 1"):
        train(config, images, tmp_path / "run", progress=False, stop_after_steps=1,
              weights=tmp_path / "vit-nano.pth.tar")  # fmt: skip
    state = newest_state(tmp_path / "run")
    assert (state["epoch"], state["step"]) == (0, 1)  # a new run, not a resumed one
    trained = [name for name, p in oracle.named_parameters() if p.requires_grad]
    assert any(name.startswith("predictor.") for name in trained)
    for name in trained:
        assert torch.equal(state["model"][name], oracle.state_dict()[name]), name


def _v2_reference(tmp_path: Path) -> Path:
    encoder = reference_encoder(mlp=False, dim=16, width=8, small_stem=True, in_channels=1)
    torch.save(reference_checkpoint(encoder, K=64), tmp_path / "v2.pth.tar")
    return tmp_path / "v2.pth.tar"


def _v3_reference(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = v3_training.build_moco_v3(tiny_v3("resnet18"), 1)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    optimizer = v3_training.build_v3_optimizer(tiny_v3("resnet18"), model).state_dict()
    checkpoint = {"epoch": 1, "arch": "resnet18", "state_dict": state, "optimizer": optimizer}
    torch.save(checkpoint, tmp_path / "v3.pth.tar")
    return tmp_path / "v3.pth.tar"


V2_CONFIG = dict(width=8, dim=16, K=64, image_size=16, batch_size=32, epochs=1, workers=0,
                 precision="fp32", mean=(0.286,), std=(0.353,))  # fmt: skip


@pytest.mark.parametrize("how", ["resume", "weights"])
@pytest.mark.parametrize("into", ["moco_v2", "moco_v3"])
def test_a_checkpoint_of_the_other_moco_is_one_clear_error(
    how: str, into: str, images: torch.Tensor, tmp_path: Path
) -> None:
    if into == "moco_v2":  # a v3 checkpoint into a v1/v2 run
        config, source = preset("fashion_mnist", **V2_CONFIG), _v3_reference(tmp_path)
        message = "holds a MoCo v3 model .* but this run trains MoCo v1/v2; use it with a MoCo v3"
    else:
        config, source = tiny_v3("resnet18"), _v2_reference(tmp_path)
        message = "holds a MoCo v1/v2 model .* but this run trains MoCo v3; use it with a MoCo v1"
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=message) as error:
        train(config, images, run, progress=False, **{how: source})  # type: ignore[arg-type]
    assert "\n" not in str(error.value)
    assert not run.exists() or not any(run.iterdir())  # nothing written


def test_the_method_check_reads_mocohub_checkpoints_too() -> None:
    torch.manual_seed(0)
    v2_model = build_moco(preset("fashion_mnist", **V2_CONFIG), 1)
    v3_model = v3_training.build_moco_v3(tiny_v3("resnet18"), 1)
    for model, other in ((v2_model, v3_model), (v3_model, v2_model)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        state = ckpt.training_state(model, optimizer, None, None, 1, 0, {})
        assert ckpt.checkpoint_method(state) == ("moco_v3" if model is v3_model else "moco")
        ckpt.check_same_method(state, model)
        with pytest.raises(ConfigError, match="but this run trains"):
            ckpt.restore_training_state(state, other)
    # Anything that is not a MoCo (a detector's checkpoint) is not checked.
    ckpt.check_same_method({"format": ckpt.FORMAT, "model": {"backbone.w": 0}}, v3_model)
    assert ckpt.checkpoint_method({"state_dict": {"module.base_encoder.w": 0}}) is None


def test_the_command_line_names_v3_and_refuses_the_other_moco_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    help_text = " ".join(out.split())
    assert "reference MoCo v1/v2/v3 .pth.tar (main_moco.py)" in help_text  # --resume
    assert "a reference MoCo v1/v2/v3 .pth.tar, a mocohub" in help_text  # --weights
    flags = ["--width", "8", "--dim", "16", "--queue-size", "64", "--image-size", "16",
             "--batch-size", "32", "--workers", "0", "--precision", "fp32", "--quiet"]  # fmt: skip
    run = tmp_path / "run"
    code, out, err = run_cli(
        ["train", SAMPLES, "--out", run, "--preset", "fashion_mnist", *flags,
         "--resume", _v3_reference(tmp_path)],
        capsys,
    )  # fmt: skip
    assert code != 0 and "Traceback" not in err
    assert "holds a MoCo v3 model" in err and "--preset moco_v3_r50" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not run.exists() or not any(run.iterdir())
