"""What this machine offers mocohub: versions, devices, CPU flags and matrix units, onnxruntime.

Library code, no command: :func:`cpu_flags` and :func:`usable_cpus` are read by
the precision policy (:mod:`mocohub.precision`), data loading and the
benchmarks; :func:`collect` is what ``mocohub env`` (:mod:`mocohub.cli.env`)
prints. Nothing here imports another mocohub module at import time, so any
module may import this one; :func:`collect` reads the precision policy when
it runs.

Example:
    >>> usable_cpus() >= 1
    True
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import sys
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "CPU_FLAGS_ENV",
    "collect",
    "cpu_flags",
    "cpu_model",
    "loader_workers",
    "onnxruntime_distributions",
    "package_version",
    "usable_cpus",
]

# Wheels that all install the same `onnxruntime` module; two at once break it.
ONNXRUNTIME_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
)


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. under taskset or Slurm).

    Every default that sizes itself by the machine (decoding workers, threads) counts
    from here, as PyTorch's DataLoader does when it warns about too many workers.

    Example:
        >>> usable_cpus() >= 1
        True
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def loader_workers(asked: int) -> int:
    """DataLoader worker processes to start when ``asked`` for: at most :func:`usable_cpus`.

    More only add contention (and PyTorch's warning, once per loader). No batch of
    mocohub's training, evaluation or detection loaders depends on the number of
    workers (samples are seeded or read in order), so the cap changes no result.

    Example:
        >>> loader_workers(0), loader_workers(10_000) == usable_cpus()
        (0, True)
    """
    return min(asked, usable_cpus())


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads of one core count once).

    onnxruntime gets one intra-op thread per physical core: hyper-threads share a
    core's vector units and only add contention.

    Example:
        >>> 1 <= physical_cores() <= usable_cpus()
        True
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return len(cores) or os.cpu_count() or 1


#: Replaces the detected CPU flags (space- or comma-separated) when set: tests emulate a
#: CPU kind with it, and ``MOCOHUB_CPU_FLAGS=avx2`` hides bf16 units from ``precision="auto"``.
CPU_FLAGS_ENV = "MOCOHUB_CPU_FLAGS"


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags: ``MOCOHUB_CPU_FLAGS`` when set, else what the kernel reports.

    Every automatic choice that depends on the CPU kind (:mod:`mocohub.precision`)
    reads the flags here, so patching this function or setting the variable
    emulates another CPU.

    Example:
        >>> "avx2" in cpu_flags()  # on an x86-64 CPU from 2013 or later
        True
    """
    forced = os.environ.get(CPU_FLAGS_ENV)
    if forced is not None:
        return frozenset(forced.replace(",", " ").split())
    return _kernel_cpu_flags()


#: The CPU flags that decide mocohub's speed: vector width, fp16 conversion, and bf16
#: and int8 units. Benchmarks name the ones present beside every figure.
SPEED_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
#: Flags of int8 dot-product or matrix units (VNNI, AMX-INT8).
INT8_CPU_FLAGS = frozenset({"amx_int8", "avx512_vnni", "avx_vnni"})


def speed_flags() -> list[str]:
    """Which of :data:`SPEED_FLAGS` this CPU has (:func:`cpu_flags`), in that order.

    Example:
        >>> speed_flags()  # an AVX2-only AMD EPYC
        ['avx2', 'fma', 'f16c']
    """
    flags = cpu_flags()
    return [flag for flag in SPEED_FLAGS if flag in flags]


@cache
def _kernel_cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@cache
def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC 9554" (the machine type where unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(distribution: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def onnxruntime_distributions() -> dict[str, str]:
    """Installed onnxruntime builds, name -> version (more than one is a conflict)."""
    found = {name: package_version(name) for name in ONNXRUNTIME_DISTRIBUTIONS}
    return {name: version for name, version in found.items() if version}


def collect() -> dict[str, Any]:
    """A dictionary describing the software and hardware mocohub will use."""
    import torch

    from mocohub import __version__
    from mocohub.precision import BF16_CPU_FLAGS, resolve_precision

    flags = cpu_flags()
    cpu: dict[str, Any] = {
        "model": cpu_model(),
        "threads": torch.get_num_threads(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_matrix_units": sorted(flags & BF16_CPU_FLAGS),
        "int8_matrix_units": sorted(flags & INT8_CPU_FLAGS),
        "precision_auto": resolve_precision("auto", "cpu"),
    }
    if CPU_FLAGS_ENV in os.environ:
        cpu["flags_from"] = CPU_FLAGS_ENV
    info: dict[str, Any] = {
        "mocohub": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": package_version("torchvision"),
        "cpu": cpu,
        "cuda": {
            "available": torch.cuda.is_available(),
            "version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "onnx": package_version("onnx"),
        "onnxruntime": onnxruntime_distributions(),
        "huggingface_hub": package_version("huggingface-hub"),
        "safetensors": package_version("safetensors"),
        "faiss": package_version("faiss-cpu") or package_version("faiss-gpu"),
    }
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError as error:
        info["onnxruntime_providers"] = f"cannot import onnxruntime: {error}"
    return info
