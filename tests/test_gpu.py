"""CUDA-only behaviour of the training loop and its distributed plumbing.

The tests marked ``gpu`` skip without a CUDA device (``bench/gpu.py`` runs them on
the GPU machine: ``pytest -m gpu``); the others check on the CPU what decides them.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mocohub.training.train import use_fixed_size_kernels

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cudnn_picks_its_fastest_kernels_for_training_on_cuda_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fixed-size training on CUDA lets cuDNN benchmark its algorithms (as the
    reference main_moco.py); on the CPU the process-wide flag is left alone."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    use_fixed_size_kernels(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    use_fixed_size_kernels(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True


@pytest.mark.gpu
@needs_cuda
def test_training_on_cuda_benchmarks_cudnn_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mocohub.training.config import preset
    from mocohub.training.train import train

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(0)
    data = (torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8), torch.arange(64) % 4)
    config = preset(
        "fashion_mnist", epochs=1, width=8, dim=16, K=64, batch_size=32, workers=0,
        precision="fp32",
    )  # fmt: skip
    metrics = train(config, data, tmp_path / "run", progress=False)
    assert metrics["epoch"] == 1
    assert torch.backends.cudnn.benchmark is True


@pytest.mark.gpu
@needs_cuda
def test_the_batch_size_check_runs_on_a_gloo_group_beside_nccl(free_port: int) -> None:
    """Under NCCL the per-step batch-size check must not synchronise the GPU: it
    all-gathers host integers on a gloo group over the same ranks."""
    from mocohub.training import distributed

    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{free_port}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
        device_id=torch.device("cuda", 0),
    )
    try:
        group = distributed._host_group()
        assert group is not None and dist.get_backend(group) == "gloo"
        assert distributed._host_group() is group  # made once
        sizes = [torch.zeros(1, dtype=torch.int64)]
        dist.all_gather(sizes, torch.tensor([7]), group=group)
        assert int(sizes[0]) == 7
    finally:
        dist.destroy_process_group()
