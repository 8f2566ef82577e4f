"""onnxruntime providers: the options each gets, the GPU it runs on, where TensorRT caches.

The options are checked exactly as they are handed to onnxruntime (a CPU
cannot start the CUDA or TensorRT providers); what only a GPU can show (the
input's stream ordering, the engine cache reused by another process) is in the
``gpu`` tests at the end, skipped without one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mocohub.errors import ConfigError
from mocohub.export import providers as ort_providers
from mocohub.export.providers import (
    provider_options,
    resolve_device,
    trt_cache_folder,
    user_cache_dir,
)

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


def test_cuda_gets_its_device_and_no_exhaustive_cudnn_search() -> None:
    assert provider_options([CUDA, CPU], device_id=3) == [
        (CUDA, {"device_id": "3", "cudnn_conv_algo_search": "HEURISTIC"}),
        (CPU, {}),
    ]
    assert provider_options([CPU]) == [(CPU, {})]


def test_tensorrt_gets_a_cache_a_profile_for_the_batch_range_and_fp16(tmp_path: Path) -> None:
    cache = tmp_path / "engines"
    (trt, trt_options), (cuda, cuda_options) = provider_options(
        [TRT, CUDA],
        device_id=1,
        input_name="images",
        item_shape=(3, 224, 224),
        max_batch=64,
        fp16=True,
        trt_cache=cache,
    )
    assert (trt, cuda) == (TRT, CUDA)
    assert trt_options == {
        "device_id": "1",
        "trt_fp16_enable": "True",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": "images:1x3x224x224",
        "trt_profile_opt_shapes": "images:64x3x224x224",
        "trt_profile_max_shapes": "images:64x3x224x224",
    }
    assert cuda_options == {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"}
    # an fp32 uint8-pixels graph: no fp16, its own input; no folder: no engine cache
    [(_, pixels)] = provider_options(
        [TRT], input_name="pixels", item_shape=(32, 32, 3), max_batch=8, fp16=False
    )
    assert pixels["trt_fp16_enable"] == "False" and "trt_engine_cache_enable" not in pixels
    assert pixels["trt_profile_min_shapes"] == "pixels:1x32x32x3"
    assert pixels["trt_profile_max_shapes"] == "pixels:8x32x32x3"
    with pytest.raises(ConfigError, match="max_batch must be at least 1"):
        provider_options([TRT], max_batch=0)


def test_the_device_is_the_one_asked_for_or_the_process_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A machine with 4 GPUs, emulated: this process's current device is 2."""
    monkeypatch.setattr(ort_providers.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert resolve_device() == ([CUDA, CPU], 2)
    assert resolve_device("auto") == ([CUDA, CPU], 2)
    assert resolve_device("cuda") == ([CUDA, CPU], 2)
    assert resolve_device("cuda:1") == ([CUDA, CPU], 1)
    assert resolve_device(3) == ([CUDA, CPU], 3)
    assert resolve_device(torch.device("cuda", 0)) == ([CUDA, CPU], 0)
    assert resolve_device("cpu") == ([CPU], None)
    with pytest.raises(ConfigError, match=r"cuda:7 does not exist: this machine shows 4 GPUs"):
        resolve_device("cuda:7")
    with pytest.raises(ConfigError, match="device cpu was asked for with GPU providers"):
        resolve_device("cpu", "cuda")
    with pytest.raises(ConfigError, match="Unknown device 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(ort_providers.ort, "get_available_providers", lambda: [CPU])
    assert resolve_device() == ([CPU], None)  # the CPU build of onnxruntime
    with pytest.raises(ConfigError, match="onnxruntime here cannot use it"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:0")
    monkeypatch.setattr(ort_providers.ort, "get_available_providers", lambda: [CUDA, CPU])
    assert resolve_device(None, "cuda") == ([CUDA, CPU], 0)  # torch without CUDA: GPU 0


def test_engines_are_cached_next_to_the_graph_per_content_and_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    first, second = tmp_path / "a" / "model.fp16.onnx", tmp_path / "b" / "model.fp16.onnx"
    for graph, content in ((first, b"weights one"), (second, b"weights two")):
        graph.parent.mkdir()
        graph.write_bytes(content)
    folder = trt_cache_folder(first, 1)
    assert folder.is_dir() and folder.name == "cuda1"
    assert folder.parent.parent == first.parent / "trt-cache"
    assert trt_cache_folder(first, 1) == folder  # the next process finds it again
    assert trt_cache_folder(first, 0) != folder  # one folder per GPU
    # onnxruntime names engines after the file name and the graph's node names, not its
    # weights: another export of the same architecture, or a re-export into the same folder,
    # must not load these engines
    assert trt_cache_folder(second, 1).parent.name != folder.parent.name
    first.write_bytes(b"weights three")
    assert trt_cache_folder(first, 1) != folder
    # a folder that cannot hold the cache (here a file in the way; a read-only mount alike)
    # sends it to the user's cache
    third = tmp_path / "c" / "model.onnx"
    third.parent.mkdir()
    third.write_bytes(b"weights four")
    (third.parent / "trt-cache").write_text("not a folder")
    fallback = trt_cache_folder(third, 0)
    assert fallback.is_dir() and fallback.parent.parent == tmp_path / "user-cache/mocohub/trt"


def test_the_user_cache_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir() == tmp_path / "mocohub"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir() == Path.home() / ".cache" / "mocohub"


# --- on a GPU ------------------------------------------------------------------------


def _gpu_export(root: Path) -> dict:
    """A tiny 3-channel 32 px model, exported as plain fp32 and fp16 graphs."""
    from mocohub.artifact import ModelConfig, build_model, save_pretrained
    from mocohub.export import export_model
    from mocohub.preprocessing import Preprocessing

    prep = Preprocessing(32, 36, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), channels=3)
    torch.manual_seed(0)
    model = build_model(ModelConfig("resnet18", small_stem=True, width=8, preprocessing=prep))
    save_pretrained(model, root / "src")
    export_model(
        root / "src", root / "out", formats="onnx", fp16=True, verify=False, log=lambda _: None
    )
    return {"out": root / "out", "model": model.eval()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_batch_made_on_the_gpu_is_read_after_pytorch_wrote_it(tmp_path: Path) -> None:
    """onnxruntime runs on its own stream: without the wait, it reads the input while the
    kernels queued behind a long one on PyTorch's stream have not written it yet."""
    from mocohub.export import OnnxEmbedder

    exported = _gpu_export(tmp_path)
    embedder = OnnxEmbedder(exported["out"] / "model.onnx", "cuda")
    assert embedder.providers[0] == CUDA and embedder.device_id == torch.cuda.current_device()
    model = exported["model"].cuda()
    torch.cuda.synchronize()
    for scale in (1.0, 3.0, 9.0):  # other inputs each time: a reused block is no answer
        torch.cuda._sleep(200_000_000)  # PyTorch's stream is busy for ~0.1 s ...
        pixels = torch.randint(0, 256, (16, 3, 32, 32), device="cuda")  # ... and these kernels
        x = (pixels.float() / 255 - 0.4) / 0.25 * scale  # wait behind it; onnxruntime's do not
        out = embedder.embed_batch(x)
        with torch.inference_mode():
            expected = model(x).cpu().numpy()
        # loose enough for TF32 (onnxruntime and PyTorch may use it), far tighter than a
        # batch read too early (another batch's numbers, or none)
        np.testing.assert_allclose(out, expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_the_session_runs_on_the_gpu_it_was_given(tmp_path: Path) -> None:
    from mocohub.export import OnnxEmbedder

    exported = _gpu_export(tmp_path)
    embedder = OnnxEmbedder(exported["out"] / "model.onnx", "cuda", device="cuda:1")
    assert embedder.device_id == 1
    assert embedder.session.get_provider_options()[CUDA]["device_id"] == "1"
    x = torch.randn(4, 3, 32, 32, device="cuda:1")
    with torch.inference_mode():
        expected = exported["model"].to("cuda:1")(x).cpu().numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(embedder.embed_batch(x), expected, rtol=2e-2, atol=2e-2 * scale)


_OPEN_AND_RUN = """
import json, sys, time, numpy as np
from mocohub.export import OnnxEmbedder
start = time.perf_counter()
embedder = OnnxEmbedder(sys.argv[1], "tensorrt", max_batch=8)
embedder.embed_batch(np.zeros((3, 3, 32, 32), np.float32))
print(json.dumps({"providers": embedder.providers, "seconds": time.perf_counter() - start}))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_second_process_loads_the_tensorrt_engine_from_the_cache(tmp_path: Path) -> None:
    if not ort_providers._tensorrt_loadable():
        pytest.skip("TensorRT's libraries are not installed")
    exported = _gpu_export(tmp_path)
    graph = exported["out"] / "model.fp16.onnx"

    def run() -> dict:
        done = subprocess.run(
            [sys.executable, "-c", _OPEN_AND_RUN, str(graph)],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    assert run()["providers"][0] == TRT
    engines = {p: p.stat().st_mtime_ns for p in graph.parent.rglob("*.engine")}
    assert engines, "TensorRT wrote no engine into the cache folder"
    assert all("trt-cache" in p.parts for p in engines)
    assert run()["providers"][0] == TRT
    # loaded, not rebuilt: the same engine files, untouched
    assert {p: p.stat().st_mtime_ns for p in graph.parent.rglob("*.engine")} == engines
