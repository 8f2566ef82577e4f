"""onnxruntime execution providers for mocohub graphs: which ones, on which GPU, with which options.

:func:`resolve_providers` picks the providers (``"auto"``: TensorRT, then CUDA,
then the CPU, when the GPU build of onnxruntime and a CUDA device are there),
:func:`resolve_device` the GPU they run on, and :func:`provider_options` says,
in one pure function, how each provider is set up:

- CUDA: ``device_id``, so a process on GPU N runs there and not on GPU 0;
  ``cudnn_conv_algo_search="HEURISTIC"``: onnxruntime's default, EXHAUSTIVE,
  times every cuDNN algorithm again for each new input shape, and every new
  batch size (an embed's last batch, the serving batcher's batches) is one.
- TensorRT: ``device_id``; an engine cache and a timing cache in a folder of
  their own (:func:`trt_cache_folder`), so that the next process loads the
  engine instead of building it again (minutes for a ResNet-50); one
  optimisation profile for batches 1..``max_batch`` (tuned for ``max_batch``),
  so that a batch size not seen before does not rebuild the engine;
  ``trt_fp16_enable`` for an fp16 graph (TensorRT builds fp32 kernels
  otherwise).

Example:
    >>> provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"], device_id=1)
    [('CUDAExecutionProvider', {'device_id': '1', 'cudnn_conv_algo_search': 'HEURISTIC'}),
     ('CPUExecutionProvider', {})]
"""

from __future__ import annotations

import ctypes.util
import os
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort
import torch

from mocohub.download import file_hash
from mocohub.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_BATCH",
    "GPU_PROVIDERS",
    "TRT_CACHE_NAME",
    "provider_options",
    "resolve_device",
    "resolve_providers",
    "trt_cache_folder",
    "user_cache_dir",
]

#: the largest batch one onnxruntime call gets unless the caller says otherwise
#: (``mocohub embed``'s and ``mocohub serve``'s default batch, the largest verified one)
DEFAULT_MAX_BATCH = 64
#: the folder, next to a graph, that holds its TensorRT engines
TRT_CACHE_NAME = "trt-cache"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_TRT, _CUDA, _CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
_PROVIDER_NAMES = {
    "cpu": [_CPU],
    "cuda": [_CUDA, _CPU],
    "tensorrt": [_TRT, _CUDA, _CPU],
}


def _tensorrt_loadable() -> bool:
    for name in ("nvinfer", "nvinfer_10"):
        found = ctypes.util.find_library(name)
        if found:
            try:
                ctypes.CDLL(found)
                return True
            except OSError:
                continue
    return False


def resolve_providers(providers: str | Sequence[str] = "auto") -> list[str]:
    """onnxruntime provider names for ``"auto"``, ``"cpu"``, ``"cuda"``, ``"tensorrt"``, a list.

    Example:
        >>> resolve_providers("cuda")
        ['CUDAExecutionProvider', 'CPUExecutionProvider']
    """
    available = ort.get_available_providers()
    if isinstance(providers, str):
        if providers == "auto":
            chosen = []
            if _CUDA in available and torch.cuda.is_available():
                if _TRT in available and _tensorrt_loadable():
                    chosen.append(_TRT)
                chosen.append(_CUDA)
            return [*chosen, _CPU]
        if providers not in _PROVIDER_NAMES:
            raise ConfigError(
                f"Unknown providers {providers!r}; use auto, cpu, cuda, tensorrt or a list of "
                "onnxruntime provider names."
            )
        providers = _PROVIDER_NAMES[providers]
    missing = [p for p in providers if p not in available]
    if missing:
        raise ConfigError(
            f"onnxruntime here has no {', '.join(missing)} (it has {', '.join(available)}); "
            "install onnxruntime-gpu with a matching CUDA, or use providers='cpu'."
        )
    return list(providers)


def resolve_device(
    device: str | int | torch.device | None = None, providers: str | Sequence[str] = "auto"
) -> tuple[list[str], int | None]:
    """The providers and the CUDA device index (None: the CPU) a session should use.

    ``device`` None or ``"auto"``: the GPU providers ``providers`` resolves to,
    on PyTorch's current device (the process's own GPU, as set by
    ``torch.cuda.set_device`` or ``CUDA_VISIBLE_DEVICES``); ``"cpu"``: the
    CPU provider; ``"cuda"``, ``"cuda:N"``, a ``torch.device`` or an index N:
    that GPU, which the providers must be able to run on.

    Example:
        >>> resolve_device("cuda:1")
        (['TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider'], 1)
    """
    if device is None or str(device) == "auto":
        chosen = resolve_providers(providers)
        if not any(p in GPU_PROVIDERS for p in chosen):
            return chosen, None
        # GPU 0 when PyTorch cannot see the GPUs (a CPU build of torch)
        return chosen, torch.cuda.current_device() if torch.cuda.is_available() else 0
    try:
        where = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from e
    if where.type == "cpu":
        chosen = [_CPU] if providers == "auto" else resolve_providers(providers)
        if any(p in GPU_PROVIDERS for p in chosen):
            raise ConfigError(f"device cpu was asked for with GPU providers {chosen}; drop one.")
        return chosen, None
    if where.type != "cuda":
        raise ConfigError(f"onnxruntime runs on cpu or cuda:N here, not {where}.")
    if not torch.cuda.is_available():
        raise ConfigError(f"Device {device} was asked for but CUDA is not available; use cpu.")
    index = torch.cuda.current_device() if where.index is None else where.index
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ConfigError(f"Device cuda:{index} does not exist: this machine shows {count} GPUs.")
    chosen = resolve_providers(providers)
    if not any(p in GPU_PROVIDERS for p in chosen):
        raise ConfigError(
            f"Device cuda:{index} was asked for but onnxruntime here cannot use it (providers "
            f"{', '.join(chosen)}); install onnxruntime-gpu with a matching CUDA, or use cpu."
        )
    return chosen, index


def provider_options(
    providers: Sequence[str],
    *,
    device_id: int = 0,
    input_name: str = "images",
    item_shape: Sequence[int] | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    fp16: bool = False,
    trt_cache: str | os.PathLike[str] | None = None,
) -> list[tuple[str, dict[str, str]]]:
    """``providers`` with their options, as ``onnxruntime.InferenceSession(providers=...)`` takes.

    Args:
        providers: provider names, e.g. from :func:`resolve_providers`.
        device_id: the CUDA device the GPU providers run on.
        input_name, item_shape: the graph's input and the shape of one of its
            items (``(3, 224, 224)``): TensorRT's profile then covers batches
            1..``max_batch`` of it (None: no explicit profile; TensorRT builds
            for the shapes it meets and rebuilds when one falls outside).
        max_batch: the largest batch the caller runs (TensorRT's profile).
        fp16: the graph computes in float16 (``trt_fp16_enable``).
        trt_cache: the folder of TensorRT's engine and timing caches (None: no cache).

    All values are strings, as onnxruntime's Python binding passes them on;
    TensorRT's booleans are ``"True"``/``"False"`` (its binding refuses ``"1"``).

    Example:
        >>> provider_options(["TensorrtExecutionProvider"], item_shape=(3, 224, 224),
        ...                  max_batch=8, trt_cache="cache")[0][1]["trt_profile_max_shapes"]
        'images:8x3x224x224'
    """
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}.")
    out: list[tuple[str, dict[str, str]]] = []
    for name in providers:
        options: dict[str, str] = {}
        if name == _CUDA:
            options = {"device_id": str(device_id), "cudnn_conv_algo_search": "HEURISTIC"}
        elif name == _TRT:
            options = {"device_id": str(device_id), "trt_fp16_enable": str(bool(fp16))}
            if trt_cache is not None:
                folder = os.fspath(trt_cache)
                options |= {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": folder,
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": folder,
                }
            if item_shape is not None:
                dims = "x".join(str(d) for d in item_shape)
                options |= {
                    "trt_profile_min_shapes": f"{input_name}:1x{dims}",
                    "trt_profile_opt_shapes": f"{input_name}:{max_batch}x{dims}",
                    "trt_profile_max_shapes": f"{input_name}:{max_batch}x{dims}",
                }
        out.append((name, options))
    return out


def user_cache_dir() -> Path:
    """mocohub's folder in the user's cache: ``$XDG_CACHE_HOME/mocohub`` or ``~/.cache/mocohub``.

    Example:
        >>> user_cache_dir()
        PosixPath('/home/me/.cache/mocohub')
    """
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mocohub"


def trt_cache_folder(graph: str | os.PathLike[str], device_id: int = 0) -> Path:
    """The folder, created, where TensorRT keeps the engines of ``graph`` on GPU ``device_id``.

    ``trt-cache/KEY/cudaN`` next to the graph when that folder can be written,
    else ``trt/KEY/cudaN`` in :func:`user_cache_dir`. KEY is the start of the
    graph file's SHA-256: onnxruntime names an engine after the graph's file
    name and node names, not its weights, so two exports of one architecture
    (or a re-export into the same folder) would otherwise load each other's
    engines. One folder per GPU: processes on different GPUs never write the
    same engine file at once.

    Example:
        >>> trt_cache_folder("out/onnx/model.fp16.onnx", 0)
        PosixPath('out/onnx/trt-cache/3fa1c2d4e5b6a7f8/cuda0')
    """
    path = Path(graph)
    key = file_hash(path)[:16]
    candidates = [path.parent / TRT_CACHE_NAME, user_cache_dir() / "trt"]
    for root in candidates:
        folder = root / key / f"cuda{device_id}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # read-only artifact (a shared model store, a read-only mount)
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise ConfigError(
        f"No writable folder for TensorRT's engine cache ({', '.join(map(str, candidates))}); "
        "set XDG_CACHE_HOME to a writable folder."
    )
