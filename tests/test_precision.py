"""The one precision policy (mocohub.precision), per CPU kind (emulated) and on CUDA (mocked)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mocohub import sysinfo
from mocohub.errors import ConfigError
from mocohub.precision import PRECISIONS, autocast_dtype, resolve_precision

pytestmark = pytest.mark.precision

AVX2_ONLY = "fpu sse4_2 avx avx2 fma f16c"
AVX512_BF16 = AVX2_ONLY + " avx512f avx512bw avx512_vnni avx512_bf16"  # AMD Zen 4, Cooper Lake
AMX = AVX512_BF16 + " amx_tile amx_int8 amx_bf16"  # Sapphire Rapids and later


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(AVX2_ONLY, "fp32"), (AVX512_BF16, "bf16"), (AMX, "bf16"), ("", "fp32")],
    ids=["avx2-only", "avx512_bf16", "amx", "no-flags"],
)
def test_auto_on_a_cpu_follows_its_bf16_units(
    flags: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sysinfo, "cpu_flags", lambda: frozenset(flags.split()))
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("auto", "cpu", cpu_flags=flags.split()) == expected
    assert autocast_dtype("auto", "cpu") == (torch.bfloat16 if expected == "bf16" else None)


@pytest.mark.parametrize(("bf16_supported", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_takes_bf16_where_the_gpu_has_it(
    bf16_supported: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    monkeypatch.setattr(sysinfo, "cpu_flags", lambda: frozenset(AMX.split()))  # irrelevant
    assert resolve_precision("auto", "cuda:1") == expected
    assert autocast_dtype("auto", torch.device("cuda")) == getattr(
        torch, {"bf16": "bfloat16", "fp16": "float16"}[expected]
    )
    assert resolve_precision("auto", "meta") == "fp32"  # any other device


def test_explicit_values_are_kept_and_unknown_ones_refused_in_one_vocabulary() -> None:
    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16")
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert resolve_precision(name, "cpu", cpu_flags=AMX.split()) == name
        assert autocast_dtype(name, "cuda") is dtype
    with pytest.raises(ConfigError, match=r"Unknown precision 'int4'; use one of auto, fp32"):
        resolve_precision("int4")
    with pytest.raises(ConfigError, match=r"use one of fp32, bf16\.$"):
        resolve_precision("auto", choices=("fp32", "bf16"))


def test_training_and_evaluation_use_the_same_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from mocohub.training.config import preset
    from mocohub.training.eval_data import autocast_dtype as eval_dtype
    from mocohub.training.train import choose_precision

    cpu = torch.device("cpu")
    auto = preset("fashion_mnist", precision="auto")
    monkeypatch.setattr(sysinfo, "cpu_flags", lambda: frozenset(AVX2_ONLY.split()))
    assert choose_precision(auto, cpu) is None
    monkeypatch.setattr(sysinfo, "cpu_flags", lambda: frozenset(AVX512_BF16.split()))
    assert choose_precision(auto, cpu) is torch.bfloat16
    assert choose_precision(preset("fashion_mnist", precision="fp32"), cpu) is None
    assert choose_precision(preset("fashion_mnist", precision="fp16"), cpu) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert choose_precision(auto, torch.device("cuda")) is torch.float16
    # knn / lincls take fp32 or bf16 only
    assert (eval_dtype("fp32"), eval_dtype("bf16")) == (None, torch.bfloat16)
    with pytest.raises(ConfigError, match="use one of fp32, bf16"):
        eval_dtype("auto")


@pytest.mark.parametrize("flags", [AVX2_ONLY, AVX512_BF16], ids=["avx2-only", "avx512_bf16"])
def test_the_loop_runs_channels_last_on_every_cpu_kind_in_every_precision(
    flags: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """oneDNN's convolutions are faster in channels_last on the CPU in fp32 too (the
    AVX2-only CPU's step 1.22-1.24x over NCHW): ``auto`` no longer keeps fp32 in NCHW."""
    from mocohub.training.config import preset
    from mocohub.training.train import choose_channels_last, train

    monkeypatch.setattr(sysinfo, "cpu_flags", lambda: frozenset(flags.split()))
    cpu = torch.device("cpu")
    for precision in ("auto", "fp32", "bf16"):
        assert choose_channels_last(preset("fashion_mnist", precision=precision), cpu)
    assert not choose_channels_last(preset("fashion_mnist", channels_last="off"), cpu)
    assert choose_channels_last(preset("fashion_mnist", channels_last="on"), cpu)
    assert choose_channels_last(preset("fashion_mnist"), torch.device("cuda"))
    assert not choose_channels_last(preset("fashion_mnist"), torch.device("mps"))

    # The run itself: its saved weights keep the layout they trained in.
    config = preset("fashion_mnist", width=8, dim=16, K=16, batch_size=8, bn_splits=2,
                    epochs=1, workers=0, precision="fp32")  # fmt: skip
    images = torch.randint(0, 255, (16, 1, 28, 28), dtype=torch.uint8)
    for layout, expected in (("auto", True), ("off", False)):
        run = tmp_path / layout
        layout_config = dataclasses.replace(config, channels_last=layout)
        train(layout_config, images, run, progress=False)
        saved = torch.load(sorted(run.glob("checkpoint_*.pt"))[-1], weights_only=False)
        weight = saved["model"]["encoder_q.layer1.0.conv1.weight"]  # (8, 8, 3, 3)
        assert weight.is_contiguous(memory_format=torch.channels_last) is expected
        assert weight.is_contiguous() is not expected


def test_mocohub_cpu_flags_replaces_the_detected_flags_here_and_in_child_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(sysinfo.CPU_FLAGS_ENV, "avx2, fma")
    assert sysinfo.cpu_flags() == {"avx2", "fma"}
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setenv(sysinfo.CPU_FLAGS_ENV, "avx512_bf16")
    assert resolve_precision("auto", "cpu") == "bf16"
    code = "from mocohub.precision import resolve_precision; print(resolve_precision())"
    for flags, expected in (("avx2", "fp32"), ("amx_bf16 avx2", "bf16")):
        env = {**os.environ, sysinfo.CPU_FLAGS_ENV: flags}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.stdout.strip() == expected, run.stderr


def test_the_cpu_flags_option_reaches_the_library(request: pytest.FixtureRequest) -> None:
    """``pytest --cpu-flags=...`` (the CI's second pass) is what mocohub sees as the CPU."""
    forced = request.config.getoption("--cpu-flags")
    if forced is None:
        pytest.skip("run with --cpu-flags=... to check the option")
    assert sysinfo.cpu_flags() == frozenset(forced.replace(",", " ").split())
    assert os.environ[sysinfo.CPU_FLAGS_ENV] == forced


@pytest.mark.parametrize(
    ("flags", "speed", "int8"),
    [
        (AVX2_ONLY, ["avx2", "fma", "f16c"], []),
        (
            AVX512_BF16,
            ["avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni"],
            ["avx512_vnni"],
        ),
        (
            AMX,
            [
                "avx2",
                "fma",
                "f16c",
                "avx512f",
                "avx512_bf16",
                "avx512_vnni",
                "amx_tile",
                "amx_bf16",
                "amx_int8",
            ],
            ["amx_int8", "avx512_vnni"],
        ),
        ("", [], []),
    ],
    ids=["avx2-only", "avx512_bf16", "amx", "no-flags"],
)
def test_the_speed_flags_benchmarks_name_are_the_present_ones_in_one_order(
    monkeypatch: pytest.MonkeyPatch, flags: str, speed: list[str], int8: list[str]
) -> None:
    monkeypatch.setenv(sysinfo.CPU_FLAGS_ENV, flags)
    assert sysinfo.speed_flags() == speed  # sse4_2, avx, avx512bw: not among them
    assert sysinfo.collect()["cpu"]["int8_matrix_units"] == int8  # what `mocohub env` says
