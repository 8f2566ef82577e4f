"""`mocohub train` on image folders, in run folders that hold a run, and from --weights."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from hub_helpers import reference_checkpoint, reference_encoder
from PIL import Image

from mocohub.launch import _ExitHandshake
from mocohub.training import checkpoint as ckpt

# Every preset, shrunk: a tiny ResNet-18, 16-pixel crops, one step of 8 images.
TINY = [
    "--arch", "resnet18", "--width", "8", "--dim", "16", "--queue-size", "16",
    "--batch-size", "8", "--image-size", "16", "--bn-splits", "2", "--workers", "0",
    "--precision", "fp32", "--quiet",
]  # fmt: skip
PRESETS = ["moco_v1", "moco_v2", "cifar", "fashion_mnist"]


def image_tree(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """root/<class>/ with per_class random 20 x 16 RGB PNGs in each of two classes."""
    rng = np.random.default_rng(seed)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return image_tree(tmp_path / "images")


def train_cli(capsys, data: Path, run: Path, *args: str) -> tuple[int, str, str]:
    return run_cli(["train", data, "--out", run, *TINY, "--epochs", "1", *args], capsys)


def numbered(run: Path) -> list[str]:
    return [path.name for _, path in ckpt.numbered_checkpoints(run)]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def epoch_records(run: Path) -> list[int]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["epoch"] for r in map(json.loads, lines) if r.get("event") == "epoch"]


# --- item 1: every preset on image folders ----------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "train-val"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_on_an_image_folder(
    tmp_path: Path, capsys, preset: str, layout: str
) -> None:
    """moco_v2's per-image recipe blurs PIL images: the folder path must feed it PIL images."""
    data = tmp_path / "data"
    if layout == "flat":
        image_tree(data)
    else:
        image_tree(data / "train")
        image_tree(data / "val", per_class=1, seed=1)
    code, out, err = train_cli(capsys, data, tmp_path / "run", "--preset", preset)
    assert code == 0, err
    assert "done: loss" in out
    state = ckpt.load_checkpoint(tmp_path / "run" / ckpt.LAST_NAME)
    assert (state["epoch"], state["config"]["preset"]) == (1, preset)
    # Image folders decode to RGB, also for the gray-statistics fashion_mnist preset.
    assert state["model"]["encoder_q.conv1.weight"].shape[1] == 3


@pytest.mark.parametrize("preset", ["moco_v2", "fashion_mnist"])
def test_in_memory_images_augmented_per_image_are_pil_images_too(
    tmp_path: Path, capsys, preset: str
) -> None:
    """--augment-on workers takes a labels.csv folder's images one by one, as PIL images."""
    data = image_tree(tmp_path / "tree")
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = ["file,label"]
    for label, name in enumerate(("cat", "dog")):
        for path in sorted((data / name).iterdir()):
            path.rename(flat / f"{name}{path.name}")
            rows.append(f"{name}{path.name},{label}")
    (flat / "labels.csv").write_text("\n".join(rows) + "\n")
    code, out, err = train_cli(capsys, flat, tmp_path / "run", "--preset", preset,
                               "--augment-on", "workers")  # fmt: skip
    assert code == 0 and "done: loss" in out, err
    state = ckpt.load_checkpoint(tmp_path / "run" / ckpt.LAST_NAME)
    assert state["model"]["encoder_q.conv1.weight"].shape[1] == 3  # the data's channels


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failed_start_leaves_no_run_folder_behind(
    tmp_path: Path, capsys, tree: Path, workers: int
) -> None:
    broken = tree / "dog" / "2.png"
    broken.write_bytes(broken.read_bytes()[:60])  # a truncated PNG
    run = tmp_path / "run"
    code, _, err = train_cli(capsys, tree, run, "--workers", str(workers))
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err  # one line, from a worker too
    assert f"{broken} cannot be used as an image (truncated" in err
    assert not run.exists()  # no config.json or metrics.jsonl to block the next run

    broken.unlink()
    image_tree(tmp_path / "more", per_class=1)  # back to 8 images: one full batch
    (tmp_path / "more" / "dog" / "0.png").rename(tree / "dog" / "2.png")
    code, out, err = train_cli(capsys, tree, run)  # no --restart needed
    assert code == 0 and "done: loss" in out, err
    assert numbered(run) == ["checkpoint_0001_00000000.pt"]


# --- item 2: a run folder that holds a run ------------------------------------------------


def test_rerunning_into_a_run_folder_is_refused_until_restart(
    tmp_path: Path, capsys, tree: Path
) -> None:
    run = tmp_path / "run"
    assert train_cli(capsys, tree, run, "--epochs", "2")[0] == 0
    kept = {name: digest(run / name) for name in numbered(run)}
    assert list(kept) == ["checkpoint_0001_00000000.pt", "checkpoint_0002_00000000.pt"]
    config = (run / "config.json").read_text()

    code, out, err = train_cli(capsys, tree, run, "--epochs", "1", "--lr", "0.1")
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert f"{run} already holds a run" in err
    assert "--resume auto" in err and "--restart" in err
    assert {name: digest(run / name) for name in numbered(run)} == kept  # nothing deleted
    assert (run / "config.json").read_text() == config
    assert epoch_records(run) == [1, 2]

    code, _, err = train_cli(capsys, tree, run, "--restart", "--resume", "auto")
    assert code == 2 and "pass only one of them" in err
    assert numbered(run) == list(kept)

    code, _, err = train_cli(capsys, tree, run, "--epochs", "1", "--restart")
    assert code == 0, err
    assert numbered(run) == ["checkpoint_0001_00000000.pt"]  # a new run from epoch 0
    assert digest(run / "checkpoint_0001_00000000.pt") != kept["checkpoint_0001_00000000.pt"]
    assert epoch_records(run) == [1]
    assert json.loads((run / "config.json").read_text())["epochs"] == 1


def test_resuming_from_an_earlier_checkpoint_of_the_run_needs_restart(
    tmp_path: Path, capsys, tree: Path
) -> None:
    run = tmp_path / "run"
    assert train_cli(capsys, tree, run, "--epochs", "2")[0] == 0
    first, second = (run / name for name in numbered(run))
    newest = digest(second)

    code, _, err = train_cli(capsys, tree, run, "--epochs", "2", "--resume", str(first))
    assert code == 2
    assert f"has checkpoints after {first.name} ({second.name})" in err
    assert "--restart" in err and "--resume auto" in err
    assert digest(second) == newest

    # Epoch 2 again, with another learning rate: a new checkpoint_0002.
    code, _, err = train_cli(
        capsys, tree, run, "--epochs", "2", "--resume", str(first), "--restart", "--lr", "3"
    )
    assert code == 0, err
    assert numbered(run) == [first.name, second.name]
    assert digest(second) != newest
    assert os.path.samefile(run / ckpt.LAST_NAME, second)


def test_workers_restarted_by_torchrun_continue_their_run(
    tmp_path: Path, capsys, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-restarts: the restarted workers get the same arguments (here --restart), and
    must continue the run the failed attempt checkpointed, not refuse or discard it."""
    run = tmp_path / "run"
    assert train_cli(capsys, tree, run, "--epochs", "1", "--restart")[0] == 0
    first = digest(run / "checkpoint_0001_00000000.pt")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    code, out, err = train_cli(capsys, tree, run, "--epochs", "2", "--restart")
    assert code == 0 and "done: loss" in out, err
    assert numbered(run) == ["checkpoint_0001_00000000.pt", "checkpoint_0002_00000000.pt"]
    assert digest(run / "checkpoint_0001_00000000.pt") == first
    assert epoch_records(run) == [1, 2]


# --- item 13: resuming a finished run ------------------------------------------------------


def test_resume_auto_on_a_finished_run_says_it_is_complete(
    tmp_path: Path, capsys, tree: Path
) -> None:
    run = tmp_path / "run"
    assert train_cli(capsys, tree, run, "--epochs", "2")[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}

    code, out, err = train_cli(capsys, tree, run, "--epochs", "2", "--resume", "auto")
    assert code == 0, err
    assert out == (
        f"{run} is already complete (epoch 2 of 2): nothing to do. To train longer, "
        "rerun with --resume auto --epochs N (N above 2).\n"
    )
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # nothing written

    code, out, _ = train_cli(capsys, tree, run, "--epochs", "1", "--resume", "auto")
    assert code == 0 and "already complete (epoch 2, past --epochs 1)" in out

    code, out, err = train_cli(capsys, tree, run, "--epochs", "3", "--resume", "auto")
    assert code == 0 and "done: loss" in out, err
    assert epoch_records(run) == [1, 2, 3]


# --- item 5: --weights ---------------------------------------------------------------------


def test_weights_starts_a_new_run_from_a_reference_checkpoint(
    tmp_path: Path, capsys, tree: Path
) -> None:
    # Exactly what the reference main_moco.py saves, for the shrunk fashion_mnist model.
    encoder = reference_encoder(mlp=False, dim=16, width=8, small_stem=True)
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():  # weights that no seeded initialisation could give
        for param in encoder.parameters():
            param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    reference = reference_checkpoint(encoder, K=16)
    torch.save(reference, tmp_path / "checkpoint_0199.pth.tar")
    assert reference["epoch"] == 200 and "module.queue" in reference["state_dict"]

    run = tmp_path / "run"
    # A learning rate of ~0: after one step the encoders are still the reference's.
    args = ["--preset", "fashion_mnist", "--lr", "1e-12"]
    code, _, err = train_cli(
        capsys, tree, run, *args, "--weights", str(tmp_path / "checkpoint_0199.pth.tar")
    )
    assert code == 0, err
    state = ckpt.load_checkpoint(run / ckpt.LAST_NAME)
    assert state["epoch"] == 1  # fine-tuning starts at epoch 0, unlike --resume (epoch 200)
    params = dict(encoder.named_parameters())
    for side in ("encoder_q", "encoder_k"):
        for name, value in params.items():
            torch.testing.assert_close(state["model"][f"{side}.{name}"], value.detach())
    assert not torch.allclose(state["model"]["queue"], reference["state_dict"]["module.queue"])

    # A mocohub run folder as --weights: its newest checkpoint's encoders.
    code, _, err = train_cli(capsys, tree, tmp_path / "again", *args, "--weights", str(run))
    assert code == 0, err
    again = ckpt.load_checkpoint(tmp_path / "again" / ckpt.LAST_NAME)
    torch.testing.assert_close(
        again["model"]["encoder_q.conv1.weight"], state["model"]["encoder_q.conv1.weight"]
    )

    (tmp_path / "empty").mkdir()
    code, _, err = train_cli(capsys, tree, tmp_path / "x", *args, "--weights", tmp_path / "empty")
    assert code == 2 and "holds no checkpoint" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


# --- issue 17: the launcher repeats the command it was given ------------------------------


def test_the_launcher_passes_the_parsed_options_to_its_workers(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import torch.distributed.run

    from mocohub.training.cli import train_command

    launched: list[list[str]] = []
    monkeypatch.setattr(torch.distributed.run, "main", launched.append)
    # No other node is there to check in at the end (mocohub.launch._ExitHandshake).
    monkeypatch.setattr(_ExitHandshake, "WAIT", 0.1)
    for name in ("LOCAL_RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    given = [
        "data", "--out", "runs/x", "--preset", "cifar", "--no-mlp", "--lr", "0.5",
        "--resume", "auto", "--quiet", "--nodes", "2", "--node-rank", "0",
        "--master-addr", "10.0.0.1", "--master-port", "29511", "--nproc-per-node", "3",
    ]  # fmt: skip
    # Called as a click command, not through mocohub's entry point.
    train_command.main(list(given), standalone_mode=False)
    (torchrun_args,) = launched
    assert "--nnodes=2" in torchrun_args and "--nproc-per-node=3" in torchrun_args
    worker = torchrun_args[torchrun_args.index("mocohub") + 1 :]
    assert worker[0] == "train"
    parsed = train_command.make_context("train", worker[1:]).params
    original = train_command.make_context("train", list(given)).params
    launch = {"nodes", "node_rank", "master_addr", "master_port", "nproc_per_node"}
    assert {k: v for k, v in parsed.items() if k not in launch} == {
        k: v for k, v in original.items() if k not in launch
    }
    assert parsed["nodes"] == 1 and parsed["nproc_per_node"] == 1  # workers launch nothing
    assert "node 0: waiting for 2 nodes at 10.0.0.1:29511" in capsys.readouterr().err

    train_command.main([*given[:-4], "--node-rank", "1"], standalone_mode=False)
    assert "waiting" not in capsys.readouterr().err  # said once, by node 0


# --- item 13: two processes under srun ------------------------------------------------------


def test_under_srun_only_rank_0_reports(tmp_path: Path, free_port: int) -> None:
    """Two processes with SLURM's variables only (no RANK): one `done:` line, one waiting line,
    and no DDP deprecation warning on either."""
    data = image_tree(tmp_path / "images")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env |= {
        "OMP_NUM_THREADS": "1",
        "SLURM_NTASKS": "2",
        "SLURM_NNODES": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port),
    }
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "mocohub", "train", str(data), "--out", str(tmp_path / "run"),
             *TINY, "--epochs", "1", "--preset", "fashion_mnist"],
            env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    (out0, err0), (out1, err1) = (p.communicate(timeout=300) for p in processes)
    assert [p.returncode for p in processes] == [0, 0], err0 + err1
    assert "done: loss" in out0 and out1 == ""
    assert f"rank 0: waiting for 2 nodes (2 processes) at 127.0.0.1:{free_port}" in err0
    assert "waiting" not in err1
    assert "broadcast_buffers" not in err0 + err1


def test_lr_steps_drop_the_rate_where_asked_and_a_step_past_the_run_is_noted(
    tmp_path: Path, tree: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """``--schedule steps`` with the reference's 120,160 over a 2-epoch run would never
    drop the rate: the run says so. ``--lr-steps 1`` drops it x0.1 from the second epoch."""

    def epoch_lrs(run: Path) -> list[float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if r.get("event") == "epoch"]
        return [r["lr"] for r in records]

    steps = ["--epochs", "2", "--schedule", "steps", "--lr", "0.03", "--batch-size", "8"]
    code, _, err = train_cli(capsys, tree, tmp_path / "late", *steps)
    assert code == 0, err
    assert "would drop at epochs 120, 160, after the run's 2 epochs" in caplog.text
    base, second = epoch_lrs(tmp_path / "late")  # --lr scaled to the batch: 0.03 * 8 / 256
    assert base == pytest.approx(0.03 * 8 / 256) and second == base

    caplog.clear()
    code, _, err = train_cli(capsys, tree, tmp_path / "stepped", *steps, "--lr-steps", "1")
    assert code == 0, err
    assert "would drop" not in caplog.text
    assert epoch_lrs(tmp_path / "stepped") == [base, pytest.approx(base * 0.1)]
    saved = json.loads((tmp_path / "stepped" / "config.json").read_text())
    assert saved["lr_steps"] == [1]

    code, _, err = train_cli(capsys, tree, tmp_path / "bad", "--lr-steps", "0,x")
    assert code == 2 and "'--lr-steps'" in err and "positive epochs" in err
    assert not (tmp_path / "bad").exists()
