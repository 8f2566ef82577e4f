"""The precision policy of every forward pass mocohub runs: one vocabulary, one ``auto`` rule.

The vocabulary, everywhere (``mocohub embed``, :class:`~mocohub.features.FeatureExtractor`,
``mocohub train``, ``knn``/``lincls`` and the benchmarks): ``auto``, ``fp32``, ``bf16``,
``fp16``. :func:`resolve_precision` parses a user's value and says what ``auto``
becomes on a device:

- CUDA: ``bf16`` where the GPU supports it, ``fp16`` otherwise;
- CPU: ``bf16`` only when the CPU has bf16 matrix units (``amx_bf16`` or
  ``avx512_bf16`` among :func:`mocohub.sysinfo.cpu_flags`); elsewhere PyTorch
  emulates bf16, several times slower than fp32 (ResNet-50, 1 thread, AVX2:
  1.0 img/s in bf16 against 8.9 in fp32, ``bench/forward_layouts.py``), so
  ``auto`` stays ``fp32``;
- any other device: ``fp32``.

The CPU flags are read from one place, :func:`mocohub.sysinfo.cpu_flags`, which
honours ``MOCOHUB_CPU_FLAGS``: tests emulate each CPU kind through it (and
``pytest --cpu-flags=...``), and a user can hide bf16 units from ``auto`` with
``MOCOHUB_CPU_FLAGS=avx2``.

Example:
    >>> resolve_precision("auto", "cpu", cpu_flags={"avx2", "fma"})
    'fp32'
    >>> resolve_precision("auto", "cpu", cpu_flags={"avx2", "avx512_bf16"})
    'bf16'
    >>> autocast_dtype("bf16")
    torch.bfloat16
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from mocohub import sysinfo
from mocohub.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BF16_CPU_FLAGS",
    "PRECISIONS",
    "autocast_dtype",
    "prefers_channels_last",
    "resolve_precision",
]

#: What ``--precision`` accepts, in the order help texts list it.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: CPU flags of bf16 matrix units (Intel AMX, AVX512-BF16 on Intel and AMD).
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def prefers_channels_last(device: str | torch.device) -> bool:
    """Whether convolutions on ``device`` run in channels_last, in every precision.

    The one layout rule of training (``--channels-last auto``), ``knn`` and ``lincls``:
    yes on CUDA (tensor cores) and on the CPU, where oneDNN is faster in channels_last
    in fp32 too (AVX2-only EPYC, 2 threads: a training step 1.22-1.31x, a ``knn``
    evaluation 1.40x; BENCHMARKS.md); no elsewhere (MPS, XLA: unmeasured).

    Example:
        >>> [prefers_channels_last(device) for device in ("cpu", "cuda:1", "mps")]
        [True, True, False]
    """
    import torch

    return torch.device(device).type in ("cpu", "cuda")


def resolve_precision(
    precision: str = "auto",
    device: str | torch.device = "cpu",
    *,
    cpu_flags: Iterable[str] | None = None,
    choices: Sequence[str] = PRECISIONS,
) -> str:
    """The precision to run: ``precision`` checked against ``choices``, ``auto`` resolved.

    Args:
        precision: the user's value (``auto``, ``fp32``, ``bf16`` or ``fp16``).
        device: where the model runs (``"cpu"``, ``"cuda:1"``, a ``torch.device``).
        cpu_flags: the CPU's feature flags (default: :func:`mocohub.sysinfo.cpu_flags`).
        choices: the values this caller accepts (a subset of :data:`PRECISIONS`).

    Returns:
        ``"fp32"``, ``"bf16"`` or ``"fp16"``; never ``"auto"``.

    Raises:
        ConfigError: ``precision`` is not one of ``choices``.

    Example:
        >>> resolve_precision("auto", "cpu", cpu_flags={"avx512f", "amx_bf16"})
        'bf16'
        >>> resolve_precision("fp16", "cpu")
        'fp16'
    """
    if precision not in choices:
        raise ConfigError(f"Unknown precision {precision!r}; use one of {', '.join(choices)}.")
    if precision != "auto":
        return precision
    kind = str(device).split(":")[0]  # "cuda:1" and torch.device("cuda", 1) alike
    if kind == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu":
        flags = sysinfo.cpu_flags() if cpu_flags is None else frozenset(cpu_flags)
        return "bf16" if flags & BF16_CPU_FLAGS else "fp32"
    return "fp32"


def autocast_dtype(
    precision: str = "auto",
    device: str | torch.device = "cpu",
    *,
    cpu_flags: Iterable[str] | None = None,
    choices: Sequence[str] = PRECISIONS,
) -> torch.dtype | None:
    """The reduced dtype :func:`resolve_precision` gives, for ``torch.autocast`` (None: fp32).

    Example:
        >>> autocast_dtype("auto", "cpu", cpu_flags={"avx2"}) is None
        True
        >>> autocast_dtype("fp16")
        torch.float16
    """
    import torch

    name = resolve_precision(precision, device, cpu_flags=cpu_flags, choices=choices)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
