"""mocohub embed under torchrun and srun: a share per process, one merge equal to one process.

Every run pins ``--precision fp32`` and one thread per process; the one-process
reference is run once per module.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from embed_helpers import copy_samples, make_model

from mocohub.cli import main
from mocohub.embed import EmbedResult, EmbedSettings, embed_files, output_files
from mocohub.embed_dist import process_device, process_workers, shard_output
from mocohub.embed_outputs import verified_meta
from mocohub.embed_parts import plan_parts
from mocohub.features import TorchEmbedder, open_torch_embedder
from mocohub.imageio import DEFAULT_MAX_PIXELS, scan_inputs
from mocohub.launch import ProcessPlace, process_place

ROLES = ("features", "manifest", "errors", "meta")
ARGS = ["--precision", "fp32", "--batch-size", "4", "--part-size", "4", "--quiet"]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder-shaped tree of 21 images in 3 classes, and one file that is no image."""
    root = tmp_path_factory.mktemp("dist") / "images"
    for n, name in enumerate(("bag", "coat", "shirt")):
        copy_samples(root / name, 7 + n)  # 7, 8, 9 images: shares cut batches unevenly
    (root / "coat" / "zz-notes.png").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "gray")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tree: Path, model: Path) -> Path:
    """The outputs of one process (through the CLI, as a user runs it)."""
    out = tmp_path_factory.mktemp("one") / "feats.npy"
    assert main(["embed", str(tree), "--out", str(out), "--model", str(model), *ARGS]) in (0, None)
    return out


def same_outputs(out: Path, reference: Path) -> None:
    """Byte for byte: array, manifest, errors file, and the record (key and parts included)."""
    mine, theirs = output_files(out), output_files(reference)
    for role in ROLES:
        assert mine[role].read_bytes() == theirs[role].read_bytes(), role
    assert not out.with_name(out.name + ".shards").exists()


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return env | {"OMP_NUM_THREADS": "1", **extra}


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mocohub", "embed", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_with_two_processes_writes_the_one_process_files(
    tmp_path: Path, tree: Path, model: Path, reference: Path, free_port: int
) -> None:
    out = tmp_path / "feats.npy"
    launch = ["--nproc-per-node", "2", "--master-port", str(free_port)]
    args = [str(tree), "--out", str(out), "--model", str(model), *ARGS]
    done = cli(*args, *launch, env=worker_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1  # rank 0 reports, once
    assert "embedded 24 images, skipped 1" in done.stdout
    assert "by 2 processes (25 read in this run)" in done.stdout
    same_outputs(out, reference)

    again = cli(*args, *launch, env=worker_env())
    assert again.returncode == 0 and "is up to date" in again.stdout, again.stderr
    # the merged record is the one-process run's: one process finds it up to date too
    single = cli(*args, env=worker_env())
    assert "is up to date" in single.stdout, single.stderr


def test_a_rerun_after_a_process_died_redoes_only_its_unfinished_parts(
    tmp_path: Path,
    tree: Path,
    model: Path,
    reference: Path,
    free_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a killed node leaves: rank 0's share published, rank 1's first part saved."""
    out = tmp_path / "feats.npy"
    paths = scan_inputs([tree])
    settings = EmbedSettings(
        model=str(model), precision="fp32", batch_size=4, part_size=4, max_pixels=DEFAULT_MAX_PIXELS
    )

    def opener(precision: str) -> Any:
        return open_torch_embedder(str(model), device="cpu", precision=precision)

    embed_files(paths, shard_output(out, 0, 2), settings, opener, shard=(0, 2))
    real = TorchEmbedder.embed_batch
    calls = []

    def dies(self: TorchEmbedder, images: torch.Tensor) -> Any:
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # stands for SIGKILL: the part in progress is lost
        return real(self, images)

    monkeypatch.setattr(TorchEmbedder, "embed_batch", dies)
    with pytest.raises(KeyboardInterrupt):
        embed_files(paths, shard_output(out, 1, 2), settings, opener, shard=(1, 2))
    monkeypatch.setattr(TorchEmbedder, "embed_batch", real)

    owned, batches, _ = plan_parts(len(paths), 4, 4, (1, 2))
    first = range(batches[0].start * 4, batches[0].stop * 4)
    left = sum(i not in first for i in owned)  # rank 1's images after its first part
    assert 0 < left < len(owned)

    launch = ["--nproc-per-node", "2", "--master-port", str(free_port)]
    done = cli(
        str(tree), "--out", str(out), "--model", str(model), *ARGS, *launch, env=worker_env()
    )
    assert done.returncode == 0, done.stderr
    assert f"by 2 processes ({left} read in this run)" in done.stdout
    same_outputs(out, reference)


def another_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def srun(tree: Path, out: Path, models: tuple[Path, Path], port: int) -> list[tuple[int, str, str]]:
    """Two processes started as srun starts them: SLURM_* only, no RANK/WORLD_SIZE."""
    env = worker_env(
        SLURM_NTASKS="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SLURM_NNODES="1"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "mocohub", "embed", str(tree), "--out", str(out),
             "--model", str(models[rank]), *ARGS],
            env=env | {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in processes]
    return [(p.returncode, *output) for p, output in zip(processes, outputs, strict=True)]


def test_under_srun_a_process_that_dies_stops_the_others_and_a_rerun_redoes_its_share(
    tmp_path: Path, tree: Path, model: Path, reference: Path, free_port: int
) -> None:
    out = tmp_path / "feats.npy"
    broken = tmp_path / "not-a-model"
    broken.mkdir()  # rank 1 fails as it opens the model, after its share was planned
    (_, out0, err0), (_, _, err1) = srun(tree, out, (model, broken), free_port)
    assert "holds no checkpoint" in err1
    assert out0 == "" and err0.count("\n") == 1, err0
    assert "Another process of this run stopped before its share was done" in err0
    assert not out.exists() and verified_meta(shard_output(out, 0, 2))["rows"] > 0  # kept

    results = srun(tree, out, (model, model), another_port())
    assert [code for code, _, _ in results] == [0, 0], results
    (_, out0, _), (_, out1, _) = results
    owned = plan_parts(len(scan_inputs([tree])), 4, 4, (1, 2))[0]
    assert f"by 2 processes ({len(owned)} read in this run)" in out0 and out1 == ""
    same_outputs(out, reference)


def test_process_place_reads_torchrun_then_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*DIST_VARS, "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(name, raising=False)
    assert process_place() == ProcessPlace(0, 1, 0, 1)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NNODES", "4")
    assert process_place() == ProcessPlace(5, 8, 1, 4)
    monkeypatch.setenv("RANK", "2")  # torchrun inside an allocation: its variables win
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert process_place() == ProcessPlace(2, 4, 0, 4)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_each_process_opens_its_model_on_its_own_gpu(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LOCAL_RANK 3 of a machine with 2 GPUs (as CUDA is patched here) -> cuda:1, both backends."""
    import mocohub.cli.embed as cli_embed
    import mocohub.embed_dist as embed_dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert process_device("auto", 3) == "cuda:1" and process_device("cuda", 2) == "cuda:0"
    assert process_device("cpu", 3) == "cpu" and process_device("cuda:0", 3) == "cuda:0"

    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(name, value)
    opened: list[dict[str, Any]] = []
    monkeypatch.setattr(cli_embed, "open_backend", lambda name: lambda m, **kw: opened.append(kw))

    def distributed(paths: Any, out: Any, settings: Any, open_embedder: Any, place: Any, **kw: Any):
        open_embedder("fp32")
        assert settings.device == "auto"  # the run's key does not depend on the GPU it ran on
        return EmbedResult(Path(out), 1, 0, 1, 1.0, "fp32")

    monkeypatch.setattr(embed_dist, "embed_distributed", distributed)
    (tmp_path / "a.png").write_bytes(b"")
    main(["embed", str(tmp_path), "--out", str(tmp_path / "f.npy"), "-m", "m", "-q",
          "--backend", backend, "--workers", "0"])  # fmt: skip
    assert opened and opened[0]["device"] == "cuda:1"


def test_processes_on_one_cpu_share_its_cores_for_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mocohub.sysinfo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mocohub.sysinfo, "usable_cpus", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert process_workers("auto") == 2  # 4 cores each, 2 for the model's threads
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert process_workers("cpu") == 0  # 2 cores each: the model's
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # srun: the affinity mask is the share
    assert process_workers("cpu") == 4


def test_shard_is_refused_under_a_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        main(["embed", str(tmp_path), "--out", str(tmp_path / "f.npy"), "-m", "m",
              "--shard", "1/2"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "drop --shard" in err and err.count("\n") == 1


def test_nproc_per_node_launches_torchrun_with_the_embed_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch.distributed.run

    from mocohub.cli.embed import embed_command

    launched: list[list[str]] = []
    monkeypatch.setattr(torch.distributed.run, "main", launched.append)
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    given = ["a/", "b.parquet", "--out", "f.parquet", "-m", "model", "--precision", "fp32",
             "--no-normalize", "--nproc-per-node", "4", "--master-port", "29555"]  # fmt: skip
    embed_command.main(list(given), standalone_mode=False)
    (args,) = launched
    assert "--nproc-per-node=4" in args and "--master-port=29555" in args
    worker = args[args.index("mocohub") + 1 :]
    assert worker[0] == "embed"
    parsed = embed_command.make_context("embed", worker[1:]).params
    original = embed_command.make_context("embed", list(given)).params
    assert parsed == original | {"nproc_per_node": 1, "master_port": 29500}
