"""MoCo v3 training through the shared loop: presets, the asymmetric augmentation on
both paths, tiny runs that checkpoint and resume bit-identically, and loading the run."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image, ImageOps
from v3_helpers import SAMPLES, newest_state, sample_images, tiny_v3

from mocohub.errors import ConfigError
from mocohub.training import checkpoint as ckpt
from mocohub.training import v3_training
from mocohub.training.augment import PILGaussianBlur
from mocohub.training.batch_augment import BatchAugment, PairAugment, SolarizeParams
from mocohub.training.cli import VIT_ARCHES
from mocohub.training.config import preset
from mocohub.training.lars import LARS
from mocohub.training.train import TrainingInterrupted, train
from mocohub.training.views import batch_augment, per_sample_transforms

# Reference values: facebookresearch/moco-v3 main_moco.py defaults and CONFIG.md commands.
REFERENCE = {
    "moco_v3_r50": dict(arch="resnet50", optimizer="lars", lr=0.6, weight_decay=1e-6,
                        epochs=100, m=0.99, T=1.0, crop_min=0.2, warmup_epochs=10),
    "moco_v3_r50_300ep": dict(arch="resnet50", optimizer="lars", lr=0.3, weight_decay=1e-6,
                              epochs=300, m=0.99, T=1.0, crop_min=0.2, warmup_epochs=10),
    "moco_v3_r50_1000ep": dict(arch="resnet50", optimizer="lars", lr=0.3, weight_decay=1.5e-6,
                               epochs=1000, m=0.996, T=1.0, crop_min=0.2, warmup_epochs=10),
    "moco_v3_vit_s": dict(arch="vit_small", optimizer="adamw", lr=1.5e-4, weight_decay=0.1,
                          epochs=300, m=0.99, T=0.2, crop_min=0.08, warmup_epochs=40),
    "moco_v3_vit_b": dict(arch="vit_base", optimizer="adamw", lr=1.5e-4, weight_decay=0.1,
                          epochs=300, m=0.99, T=0.2, crop_min=0.08, warmup_epochs=40),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_v3_presets_hold_the_reference_values(name: str) -> None:
    config = preset(name)
    common = dict(method="moco_v3", dim=256, mlp_dim=4096, moco_m_cos=True, momentum=0.9,
                  batch_size=4096, lr_batch=256, augmentation="v3", K=0, schedule="cosine",
                  image_size=224)  # fmt: skip
    for key, value in {**common, **REFERENCE[name]}.items():
        assert getattr(config, key) == value, key
    # lr x batch / 256, as main_moco.py line 190; warm-up then cosine per step.
    assert config.scaled_lr() == pytest.approx(config.lr * 16)
    assert v3_training.step_lr(config, config.warmup_epochs, 0, 10) == pytest.approx(config.lr * 16)
    assert v3_training.step_lr(config, 0, 5, 10) == pytest.approx(
        config.lr * 16 * 0.5 / config.warmup_epochs
    )
    assert v3_training.step_momentum(config, config.epochs // 2, 0, 10) == pytest.approx(
        1 - (1 - config.m) / 2
    )


def test_the_small_image_preset_and_the_cli_names() -> None:
    config = preset("fashion_mnist_v3")
    assert (config.method, config.arch, config.small_stem, config.image_size) == (
        "moco_v3",
        "resnet18",
        True,
        28,
    )
    assert (config.augmentation, config.optimizer, config.T, config.bn_splits) == (
        "small_v3",
        "lars",
        0.2,
        1,
    )
    from mocohub.vit import VIT_ARCHITECTURES

    assert tuple(VIT_ARCHITECTURES) == VIT_ARCHES


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"K": 4096}, "MoCo v3 has no queue"),
        ({"bn_splits": 8}, "--bn-splits 8 imitates v1/v2's shuffle BN"),
        ({"symmetric": True}, "always symmetric"),
        ({"optimizer": "sgd"}, "--optimizer lars .* or adamw"),
        ({"schedule": "steps"}, "--schedule steps is v1's"),
        ({"warmup_epochs": 101}, "--warmup-epochs \\(101\\) must be"),
        ({"arch": "vit_small", "small_stem": True}, "a ViT takes neither"),
    ],
)
def test_v3_refuses_settings_that_cannot_work(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        preset("moco_v3_r50", **overrides)


@pytest.mark.parametrize(
    "overrides",
    [{"optimizer": "lars"}, {"warmup_epochs": 5}, {"moco_m_cos": True}, {"arch": "vit_small"}],
)
def test_v1_v2_refuse_v3_settings(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="belong\\(s\\) to MoCo v3"):
        preset("moco_v2", **overrides)


def test_batched_views_draw_blur_and_solarize_with_the_recipe_s_probabilities() -> None:
    config = preset("moco_v3_vit_s", image_size=8)
    pair = batch_augment(config, 3, torch.Generator())
    assert isinstance(pair, PairAugment)
    n = 4000
    generator = torch.Generator().manual_seed(3)
    first = pair.first.sample_params(n, 8, 8, generator)
    second = pair.second.sample_params(n, 8, 8, generator)
    # The same seed, drawn by hand: view 1 takes 31 uniforms a sample, view 2 one more.
    replay = torch.Generator().manual_seed(3)
    u1 = torch.rand(n, 31, generator=replay, dtype=torch.float64)
    u2 = torch.rand(n, 32, generator=replay, dtype=torch.float64)
    assert type(first) is not SolarizeParams  # view 1 never solarizes
    assert bool((first.blur_sigma > 0).all())  # blur p 1.0
    assert torch.equal(second.blur_sigma > 0, u2[:, 25] < 0.1)
    assert isinstance(second, SolarizeParams)
    assert torch.equal(second.solarize, u2[:, 31] < 0.2)
    assert torch.equal(first.grayscale, u1[:, 24] < 0.2)  # the rest as v1/v2 draw it
    assert abs(second.solarize.double().mean().item() - 0.2) < 0.02
    assert abs((second.blur_sigma > 0).double().mean().item() - 0.1) < 0.02
    assert pair.first.scale == pair.second.scale == (0.08, 1.0)
    # A recipe that never solarizes draws what it drew before solarize existed.
    v2 = batch_augment(preset("moco_v2", image_size=8), 3, torch.Generator())
    params = v2.sample_params(n, 8, 8, torch.Generator().manual_seed(4))
    u = torch.rand(n, 31, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert type(params) is not SolarizeParams and params.pack().shape == (n, 11)
    assert torch.equal(params.blur_sigma > 0, u[:, 25] < 0.5)
    assert torch.equal(params.flip, u[:, 22] < 0.5)


def test_batched_solarize_is_pil_s() -> None:
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    augment = BatchAugment(
        None, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, solarize_p=1.0, mean=(0,), std=(1,)
    )
    out = augment(images, generator=torch.Generator().manual_seed(0))
    for image, result in zip(images, out, strict=True):
        pil = ImageOps.solarize(Image.fromarray(image.permute(1, 2, 0).numpy()))
        expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1) / 255
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)


def test_per_image_views_draw_blur_and_solarize_with_the_recipe_s_probabilities(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torchvision.transforms import v2

    calls: list[str] = []
    blur, solarize = PILGaussianBlur.__call__, v2.functional.solarize

    def counted_blur(self: PILGaussianBlur, image: Image.Image) -> Image.Image:
        calls.append("blur")
        return blur(self, image)

    def counted_solarize(image: Any, threshold: float) -> Any:
        calls.append("solarize")
        return solarize(image, threshold)

    monkeypatch.setattr(PILGaussianBlur, "__call__", counted_blur)
    monkeypatch.setattr(
        v2.RandomSolarize, "_call_kernel", lambda self, f, x, **p: counted_solarize(x, 128)
    )
    first, second = per_sample_transforms(preset("moco_v3_vit_s", image_size=8), 3)
    image = Image.new("RGB", (10, 10), (200, 30, 90))
    counts = []
    for transform in (first, second):
        calls.clear()
        torch.manual_seed(0)
        for _ in range(1000):
            transform(image)
        counts.append((calls.count("blur"), calls.count("solarize")))
    assert counts[0] == (1000, 0)  # view 1: always blurred, never solarized
    blurred, solarized = counts[1]
    assert abs(blurred - 100) < 30 and abs(solarized - 200) < 40  # p 0.1 and 0.2


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return sample_images(96)  # 3 steps of 32 an epoch


@pytest.mark.parametrize("arch", ["resnet18", "vit_nano"])
def test_a_tiny_v3_run_resumes_bit_identically(
    arch: str, images: torch.Tensor, tmp_path: Path
) -> None:
    # The ResNet's views are made on the device, the ViT's per image (both paths).
    path = "device" if arch == "resnet18" else "workers"
    config = tiny_v3(arch, checkpoint_every=2, augment_on=path)
    straight = train(config, images, tmp_path / "a", progress=False)
    with pytest.raises(TrainingInterrupted, match="at step 2"):
        train(config, images, tmp_path / "b", progress=False, stop_after_steps=2)
    assert newest_state(tmp_path / "b")["step"] == 2
    resumed = train(config, images, tmp_path / "b", resume="auto", progress=False)
    a, b = newest_state(tmp_path / "a"), newest_state(tmp_path / "b")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    assert {key.split(".")[0] for key in a["model"]} == {
        "base_encoder",
        "momentum_encoder",
        "predictor",
    }
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    moments = "mu" if arch == "resnet18" else "exp_avg"  # LARS / AdamW state
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        assert torch.equal(state_a[key][moments], state_b[key][moments])
    assert resumed["loss"] == straight["loss"]
    # The lr is set at every step: the last step's (epoch 1, step 2 of 3), not the epoch's.
    last_lr = a["optimizer"]["param_groups"][0]["lr"]
    assert last_lr == pytest.approx(v3_training.step_lr(config, 1, 2, 3))
    assert last_lr != pytest.approx(v3_training.step_lr(config, 1, 0, 3))
    # The run folder loads as the base encoder's backbone (projector dropped).
    import mocohub

    backbone = mocohub.load(tmp_path / "b")
    key = "conv1.weight" if arch == "resnet18" else "blocks.0.attn.qkv.weight"
    assert torch.equal(backbone.state_dict()[key], b["model"]["base_encoder." + key])
    # Trained: the base encoder moved, the momentum encoder followed it part way.
    assert not torch.equal(a["model"]["predictor.0.weight"], _init_predictor(config))


def _init_predictor(config: Any) -> torch.Tensor:
    torch.manual_seed(config.seed)
    return v3_training.build_moco_v3(config, 1).predictor[0].weight.detach()


def test_a_v3_run_loads_monitors_and_builds_lars_over_the_reference_parameters(
    images: torch.Tensor, tmp_path: Path
) -> None:
    import mocohub

    config = tiny_v3("resnet18", epochs=1)
    labels = torch.arange(len(images)) % 10
    metrics = train(
        config, images, tmp_path, progress=False, knn_data=((images, labels), (images, labels))
    )
    assert 0.0 <= metrics["knn_top1"] <= 1.0
    torch.manual_seed(0)
    model = v3_training.build_moco_v3(config, 1)
    optimizer = v3_training.build_v3_optimizer(config, model)
    assert isinstance(optimizer, LARS)
    assert optimizer.param_groups[0]["params"] == list(model.parameters())
    # The run folder loads as a backbone: the base encoder without its projector.
    backbone = mocohub.load(tmp_path)
    state = newest_state(tmp_path)["model"]
    torch.testing.assert_close(
        backbone.state_dict()["conv1.weight"], state["base_encoder.conv1.weight"]
    )
    assert not any(k.startswith("fc.") for k in backbone.state_dict())


def test_the_vit_knn_encoder_gives_the_class_token() -> None:
    from mocohub.training.monitor import pooled_features

    torch.manual_seed(0)
    model = v3_training.build_moco_v3(tiny_v3("vit_nano"), 1).eval()
    x = torch.randn(2, 1, 16, 16)
    with pooled_features(v3_training.knn_encoder(model)) as backbone:
        pooled = backbone(x)
    cls, _ = model.base_encoder.forward_cls_and_patches(x)
    torch.testing.assert_close(pooled, cls)
    assert pooled.shape == (2, 32)


def _gloo_worker(
    rank: int, port: int, jobs: list[tuple[str, dict[str, Any]]], images: torch.Tensor, out: str
) -> None:
    """Rank ``rank`` of a 2-process gloo run: the ``train`` calls ``jobs`` lists (run folder,
    keyword arguments), one after the other in the same process group; a job with
    ``stop_after_steps`` must stop. Writes ``rank{rank}.txt``: "ok" or the traceback."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    outcome = "ok"
    try:
        for run_dir, options in jobs:
            config = tiny_v3("vit_nano", checkpoint_every=2)
            try:
                train(config, images, Path(run_dir), progress=False, **options)
            except TrainingInterrupted:
                if "stop_after_steps" not in options:
                    raise
                if rank == 0:  # where rank 0 saved on stopping
                    epoch, step = ckpt.checkpoint_point(newest_state(Path(run_dir)))
                    Path(out, "stopped_at.txt").write_text(f"{epoch} {step}")
            else:
                assert "stop_after_steps" not in options, f"{run_dir} did not stop"
    except BaseException:
        outcome = traceback.format_exc()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(outcome)


@pytest.mark.slow
def test_two_process_gloo_v3_run_checkpoints_and_resumes_bit_identically(
    images: torch.Tensor, tmp_path: Path, free_port: int
) -> None:
    """A tiny ViT (AdamW) on 2 gloo processes, 16 images a rank a step, 3 steps an epoch,
    2 epochs: a run stopped at step 2 (a mid-epoch checkpoint) and resumed with
    resume="auto" ends where the straight run ends, bit for bit: weights, BN statistics,
    AdamW's moments and step counts. The straight run goes between the stop and the
    resume, in the same processes (one launch keeps the test short), so the resume
    starts from whatever state that run left in them, as a fresh process would not."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    jobs = [
        (str(stopped), {"stop_after_steps": 2}),
        (str(straight), {}),
        (str(stopped), {"resume": "auto"}),
    ]
    mp.start_processes(
        _gloo_worker,
        args=(free_port, jobs, images, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert outcomes == ["ok", "ok"], outcomes

    a, b = newest_state(straight), newest_state(stopped)
    assert ckpt.checkpoint_point(a) == ckpt.checkpoint_point(b) == (2, 0)
    assert json.loads((stopped / "config.json").read_text())["method"] == "moco_v3"
    assert (tmp_path / "stopped_at.txt").read_text() == "0 2"  # mid-epoch: step 2 of 3
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for index, moments in state_a.items():
        assert moments.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name, value in moments.items():
            assert torch.equal(value, state_b[index][name]), (index, name)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert not torch.equal(a["model"]["predictor.0.weight"], _init_predictor(tiny_v3("vit_nano")))


def test_lincls_v3_protocol_values() -> None:
    from mocohub.training.lincls_config import protocol_config

    config = protocol_config("moco_v3")
    # facebookresearch/moco-v3 main_lincls.py: -b 1024, --lr 0.1 x batch / 256, 90
    # epochs, --wd 0, momentum 0.9, cosine (adjust_learning_rate).
    assert (config.epochs, config.batch_size, config.lr) == (90, 1024, pytest.approx(0.4))
    assert (config.momentum, config.weight_decay, config.schedule) == (0.9, 0.0, "cosine")
    assert protocol_config("moco_v3", batch_size=512).lr == pytest.approx(0.2)
    moco = protocol_config("moco")
    assert (moco.epochs, moco.batch_size, moco.lr, moco.schedule) == (100, 256, 30.0, "steps")
    with pytest.raises(ConfigError, match="Unknown protocol 'v4'"):
        protocol_config("v4")


def test_train_and_lincls_v3_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli_helpers import run_cli

    data = SAMPLES
    run = tmp_path / "run"
    flags = ["--width", "8", "--dim", "16", "--mlp-dim", "32", "--image-size", "16",
             "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "1", "--workers", "0",
             "--precision", "fp32", "--quiet"]  # fmt: skip
    code, out, err = run_cli(
        ["train", data, "--out", run, "--preset", "fashion_mnist_v3", *flags], capsys
    )
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert (saved["method"], saved["optimizer"], saved["augmentation"]) == (
        "moco_v3",
        "lars",
        "small_v3",
    )
    code, out, err = run_cli(
        ["train", data, "--out", tmp_path / "bad", "--preset", "fashion_mnist_v3",
         "--queue-size", "64", *flags],
        capsys,
    )  # fmt: skip
    assert code != 0 and "MoCo v3 has no queue" in err
    lincls = ["lincls", data, "--model", run, "--out", tmp_path / "lin", "--workers", "0"]
    code, out, err = run_cli(
        [*lincls, "--protocol", "moco_v3", "--epochs", "1", "--batch-size", "32"], capsys
    )
    assert code == 0, err
    # the lr scaled to the batch is the protocol's rule, not a change
    assert "(reference protocol, moco_v3 settings, 1 epoch, changed: --batch-size 32)" in out
    result = json.loads((tmp_path / "lin" / "lincls.json").read_text())
    assert result["config"]["lr"] == pytest.approx(0.1 * 32 / 256)
    assert result["config"]["schedule"] == "cosine"


def test_weights_load_from_a_v3_checkpoint_of_either_format() -> None:
    config = tiny_v3("vit_nano")
    torch.manual_seed(1)
    source = v3_training.build_moco_v3(config, 1)
    reference = {"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}
    for checkpoint in ({"model": source.state_dict()}, reference):
        torch.manual_seed(2)
        target = v3_training.build_moco_v3(config, 1)
        v3_training.load_v3_weights(target, checkpoint)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="holds no MoCo v3 weights"):
        v3_training.load_v3_weights(target, {"state_dict": {"module.encoder_q.fc.weight": 0}})
    with pytest.raises(ConfigError, match="use the same --arch, --dim and --mlp-dim"):
        v3_training.load_v3_weights(
            v3_training.build_moco_v3(tiny_v3("vit_nano", dim=8), 1), {"model": source.state_dict()}
        )
