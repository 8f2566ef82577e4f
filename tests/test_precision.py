"""The one precision policy (mocohub.precision), per CPU kind (emulated) and on CUDA (mocked)."""

from __future__ import annotations

import os
import subprocess
import sys

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
