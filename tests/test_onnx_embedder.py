"""OnnxEmbedder / open_embedder: choosing the file and providers, parity, and `mocohub embed`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mocohub
from mocohub import cli
from mocohub.artifact import ModelConfig, build_model, save_pretrained
from mocohub.errors import ConfigError, InputError
from mocohub.export import OnnxEmbedder, export_model, model_files, open_embedder
from mocohub.export import onnx_embedder as oe
from mocohub.export import providers as ort_providers
from mocohub.features import Embedder
from mocohub.preprocessing import Preprocessing
from mocohub.sysinfo import physical_cores

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "fashion-mnist"


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny 3-channel 32 px model, exported (fp32 + dynamic int8, with pixels graphs)."""
    root = tmp_path_factory.mktemp("onnx_embedder")
    prep = Preprocessing(32, 36, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), channels=3)
    torch.manual_seed(0)
    config = ModelConfig("resnet18", small_stem=True, width=8, preprocessing=prep)
    save_pretrained(build_model(config), root / "src")
    torch.set_num_threads(1)
    result = export_model(
        root / "src",
        root / "out",
        formats="onnx",
        with_preprocessing=True,
        int8=True,
        verify=False,
        log=lambda _: None,
    )
    assert result.report is None and not (root / "out" / "verify.json").exists()
    return {"root": root, "out": root / "out", "model": mocohub.load(root / "src")}


def _colour_images(count: int, size: tuple[int, int]) -> list[Image.Image]:
    """Real Fashion-MNIST images, tinted differently per channel and resized to ``size``."""
    images = []
    for png in sorted(SAMPLES.glob("*.png"))[:count]:
        gray = np.asarray(Image.open(png).resize(size, Image.BILINEAR), dtype=np.float32)
        tint = np.stack([gray, 255 - gray, gray * 0.5], axis=-1)
        images.append(Image.fromarray(tint.astype(np.uint8), "RGB"))
    return images


def test_open_embedder_picks_the_plain_fp32_graph(rgb: dict) -> None:
    out: Path = rgb["out"]
    embedder = open_embedder(out, threads=1)
    assert embedder.path.name == "model.onnx" and embedder.input == "images"
    assert isinstance(embedder, Embedder)  # the embed pipeline's seam
    assert (
        embedder.dim == 64 and embedder.preprocessing == rgb["model"].mocohub_config.preprocessing
    )
    assert embedder.providers == ["CPUExecutionProvider"]
    assert open_embedder(out, precision="int8", threads=1).path.name == "model.int8.onnx"
    assert open_embedder(out / "model.int8.onnx", threads=1).precision == "int8"
    assert model_files.find_model_file(out, pixels=None).name == "model.preprocess.onnx"
    assert model_files.find_model_file(out, gpu=True).name == "model.onnx"  # no fp16 file: fp32
    with pytest.raises(InputError, match="has no fp16 plain graph"):
        open_embedder(out, precision="fp16")
    with pytest.raises(InputError, match=r"not an \.onnx file or an export folder"):
        open_embedder(out / "config.json")
    with pytest.raises(InputError, match="no model file"):
        open_embedder(rgb["root"] / "src")
    broken = rgb["root"] / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    with pytest.raises(InputError, match="onnxruntime cannot load"):
        OnnxEmbedder(broken, "cpu")


def test_embed_batch_equals_pytorch_for_tensors_arrays_and_io_binding(rgb: dict) -> None:
    model = rgb["model"]
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x).numpy()
    plain = OnnxEmbedder(rgb["out"] / "model.onnx", "cpu", threads=1)
    bound = OnnxEmbedder(rgb["out"] / "model.onnx", "cpu", threads=1, io_binding=True)
    for out in (plain.embed_batch(x), plain.embed_batch(x.numpy()), bound.embed_batch(x)):
        assert out.dtype == np.float32 and out.shape == (5, 64)
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match=r"takes a batch of shape \(N, 3, 32, 32\)"):
        plain.embed_batch(np.zeros((2, 1, 28, 28), np.float32))


def test_embed_images_equals_transform_plus_model_for_both_graphs(rgb: dict) -> None:
    """Crop-size images and larger ones (resized and cropped as the preprocessing says)."""
    model = rgb["model"]
    images = _colour_images(3, (32, 32)) + _colour_images(3, (45, 60))
    transform = model.mocohub_config.preprocessing.transform()
    with torch.inference_mode():
        expected = F.normalize(model(torch.stack([transform(im) for im in images])), dim=1)
    for name in ("model.onnx", "model.preprocess.onnx"):
        out = OnnxEmbedder(rgb["out"] / name, "cpu", threads=1).embed_images(images)
        np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)


def test_file_paths_are_refused_by_embed_images_and_taken_by_feature_extractor(
    rgb: dict, tmp_path: Path
) -> None:
    from mocohub import FeatureExtractor

    image = _colour_images(1, (32, 32))[0]
    image.save(tmp_path / "a.png")
    embedder = OnnxEmbedder(rgb["out"] / "model.onnx", "cpu", threads=1)
    with pytest.raises(InputError, match=r"embed_images takes PIL images .* got a str"):
        embedder.embed_images([str(tmp_path / "a.png")])
    from_path = FeatureExtractor(embedder)([tmp_path / "a.png"])  # what the message says
    np.testing.assert_allclose(from_path, embedder.embed_images([image]), atol=1e-6)


def test_rgb_preprocessing_graph_equals_batch_preprocessing(rgb: dict) -> None:
    model = rgb["model"]
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        x = model.mocohub_config.preprocessing.batch()(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        expected = F.normalize(model(x), dim=1).numpy()
    embedder = OnnxEmbedder(rgb["out"] / "model.preprocess.onnx", "cpu", threads=1)
    assert embedder.input == "pixels" and embedder.normalised
    np.testing.assert_allclose(embedder.embed_batch(pixels), expected, atol=2e-6)
    int8 = OnnxEmbedder(rgb["out"] / "model.preprocess.int8.onnx", "cpu", threads=1)
    cosines = (int8.embed_batch(pixels) * expected).sum(1)
    assert cosines.min() >= 0.98


def test_provider_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_only = ["CPUExecutionProvider"]
    monkeypatch.setattr(oe.torch.cuda, "is_available", lambda: False)
    assert oe.resolve_providers("auto") == cpu_only
    monkeypatch.setattr(oe.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        oe.ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", *cpu_only],
    )
    monkeypatch.setattr(ort_providers, "_tensorrt_loadable", lambda: False)
    assert oe.resolve_providers("auto") == ["CUDAExecutionProvider", *cpu_only]
    monkeypatch.setattr(ort_providers, "_tensorrt_loadable", lambda: True)
    assert oe.resolve_providers("auto")[0] == "TensorrtExecutionProvider"
    assert oe.resolve_providers("cpu") == cpu_only
    monkeypatch.setattr(oe.ort, "get_available_providers", lambda: cpu_only)
    with pytest.raises(ConfigError, match="has no CUDAExecutionProvider"):
        oe.resolve_providers("cuda")
    with pytest.raises(ConfigError, match="Unknown providers"):
        oe.resolve_providers("gpu-please")
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


@pytest.mark.precision
def test_mocohub_embed_onnxruntime_equals_torch(rgb: dict, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for n, image in enumerate(_colour_images(6, (40, 40))):
        image.save(folder / f"{n}.png")
    shutil.copy(sorted(SAMPLES.glob("*.png"))[0], folder / "gray.png")  # 1-channel file
    common = [str(folder), "--workers", "0", "--quiet", "--batch-size", "4"]
    runs = {
        "torch": ["--model", str(rgb["root"] / "src"), "--backend", "torch", "--precision", "fp32"],
        "onnx": ["--model", str(rgb["out"]), "--backend", "onnxruntime"],
        "int8": ["--model", str(rgb["out"] / "model.int8.onnx"), "--backend", "onnxruntime"],
    }
    arrays = {}
    for name, args in runs.items():
        cli.main(["embed", *common, "--out", str(tmp_path / f"{name}.npy"), *args])
        arrays[name] = np.load(tmp_path / f"{name}.npy")
    assert arrays["torch"].shape == (7, 64)
    np.testing.assert_allclose(arrays["onnx"], arrays["torch"], atol=1e-5)
    assert (arrays["int8"] * arrays["torch"]).sum(1).min() >= 0.98


# --- GPU sessions, emulated on the CPU (tests/test_ort_providers.py has the real ones) ---

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list:
    """A machine with 4 GPUs (this process's current one: 3) and TensorRT, emulated.

    Returns the providers each onnxruntime session was asked for; the sessions
    themselves run on the CPU (and so report a fallback).
    """
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(oe.ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(ort_providers, "_tensorrt_loadable", lambda: True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    asked: list = []
    real = oe.ort.InferenceSession

    def session(path: str, options: object, providers: list) -> object:
        asked.append(providers)
        return real(path, options, providers=[CPU])

    monkeypatch.setattr(oe.ort, "InferenceSession", session)
    return asked


def _copy_graphs(rgb: dict, folder: Path) -> Path:
    """model.onnx and model.preprocess.onnx, and model.onnx labelled fp16, in ``folder``."""
    import onnx

    folder.mkdir()
    for name in ("model.onnx", "model.preprocess.onnx"):
        shutil.copy(rgb["out"] / name, folder / name)
    proto = onnx.load(folder / "model.onnx")
    for prop in proto.metadata_props:
        if prop.key == "precision":
            prop.value = "fp16"
    onnx.save(proto, folder / "model.fp16.onnx")
    return folder


def test_the_session_gets_the_options_of_its_gpu_and_batch_range(
    rgb: dict, tmp_path: Path, four_gpus: list
) -> None:
    graphs = _copy_graphs(rgb, tmp_path / "graphs")
    with pytest.warns(UserWarning, match=f"could not start {TRT}; model.onnx runs on {CPU}"):
        embedder = OnnxEmbedder(graphs / "model.onnx", device="cuda:2", max_batch=16, threads=1)
    assert embedder.providers == [CPU] and embedder.device_id is None  # what it really got
    (trt, trt_options), (cuda, cuda_options), (cpu, _) = four_gpus[-1]
    assert (trt, cuda, cpu) == (TRT, CUDA, CPU)
    assert cuda_options == {"device_id": "2", "cudnn_conv_algo_search": "HEURISTIC"}
    assert trt_options["device_id"] == "2" and trt_options["trt_fp16_enable"] == "False"
    assert trt_options["trt_profile_min_shapes"] == "images:1x3x32x32"
    assert trt_options["trt_profile_opt_shapes"] == "images:16x3x32x32"
    assert trt_options["trt_profile_max_shapes"] == "images:16x3x32x32"
    cache = Path(trt_options["trt_engine_cache_path"])
    assert trt_options["trt_engine_cache_enable"] == "True" and cache.is_dir()
    assert cache.parent.parent == graphs / "trt-cache" and cache.name == "cuda2"
    # no device named: this process's current GPU; a pixels graph: its uint8 input
    with pytest.warns(UserWarning, match="could not start"):
        OnnxEmbedder(graphs / "model.preprocess.onnx", threads=1)
    [(_, trt_options), (_, cuda_options), _] = four_gpus[-1]
    assert trt_options["device_id"] == cuda_options["device_id"] == "3"
    assert trt_options["trt_profile_max_shapes"] == "pixels:64x32x32x3"
    with pytest.warns(UserWarning, match="could not start"):
        OnnxEmbedder(graphs / "model.fp16.onnx", threads=1)
    assert four_gpus[-1][0][1]["trt_fp16_enable"] == "True"
    # open_embedder passes the device on; device cpu asks for the CPU alone
    with pytest.warns(UserWarning, match="could not start"):
        open_embedder(graphs / "model.onnx", device="cuda:1", threads=1)
    assert four_gpus[-1][1] == (CUDA, {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"})
    embedder = OnnxEmbedder(graphs / "model.onnx", device="cpu", threads=1)
    assert four_gpus[-1] == [(CPU, {})] and embedder.providers == [CPU]


def test_a_batch_over_max_batch_is_run_in_parts(rgb: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    embedder = OnnxEmbedder(rgb["out"] / "model.onnx", "cpu", threads=1, max_batch=4)
    sizes: list[int] = []
    run = embedder.session.run

    def counted(names: list[str], feeds: dict[str, np.ndarray]) -> list:
        sizes.append(len(feeds["images"]))
        return run(names, feeds)

    monkeypatch.setattr(embedder.session, "run", counted)
    x = torch.randn(10, 3, 32, 32)
    with torch.inference_mode():
        expected = rgb["model"](x).numpy()
    np.testing.assert_allclose(embedder.embed_batch(x), expected, atol=1e-4, rtol=1e-4)
    assert sizes == [4, 4, 2]
    with pytest.raises(ConfigError, match="max_batch must be at least 1"):
        OnnxEmbedder(rgb["out"] / "model.onnx", "cpu", max_batch=0)


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on cuda:2: the I/O binding path, on a CPU."""

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 2)


def test_a_cuda_batch_is_bound_after_pytorch_is_done_with_it_on_the_session_gpu(
    rgb: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime's stream does not wait for PyTorch's: the host must, before the run; and
    input and output are bound on the session's GPU (the output was bound on GPU 0)."""
    embedder = OnnxEmbedder(rgb["out"] / "model.onnx", "cpu", threads=1)
    events: list[tuple] = []

    class Stream:
        def __init__(self, device: torch.device) -> None:
            self.device = device

        def synchronize(self) -> None:
            events.append(("pytorch's stream done", str(self.device)))

    class Binding:
        def bind_input(self, name: str, kind: str, device_id: int, *rest: object) -> None:
            events.append(("input", name, kind, device_id))

        def bind_output(self, name: str, kind: str = "cpu", device_id: int = 0) -> None:
            events.append(("output", name, kind, device_id))

        def copy_outputs_to_cpu(self) -> list[np.ndarray]:
            return [np.zeros((3, embedder.dim), np.float32)]

    class Session:
        def io_binding(self) -> Binding:
            return Binding()

        def run_with_iobinding(self, binding: Binding) -> None:
            events.append(("run",))

    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(embedder, "session", Session())
    embedder.on_gpu, embedder.io_binding, embedder.device_id = True, True, 2
    embedder.embed_batch(torch.randn(3, 3, 32, 32).as_subclass(_OnCuda))
    assert events == [
        ("pytorch's stream done", "cuda:2"),
        ("input", "images", "cuda", 2),
        ("output", embedder.output_name, "cuda", 2),
        ("run",),
    ]
    embedder.device_id = 1
    with pytest.raises(InputError, match=r"batch is on cuda:2 but model.onnx runs on cuda:1"):
        embedder.embed_batch(torch.randn(3, 3, 32, 32).as_subclass(_OnCuda))


def test_mocohub_embed_onnxruntime_takes_a_device(
    rgb: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--backend onnxruntime --device cuda:N` was refused; now each process of a multi-GPU
    embed opens its model on its own GPU (by default, the process's current one)."""
    from mocohub.cli import embed as embed_cli

    folder = tmp_path / "images"
    folder.mkdir()
    for n, image in enumerate(_colour_images(2, (40, 40))):
        image.save(folder / f"{n}.png")
    common = [str(folder), "--workers", "0", "--quiet", "--backend", "onnxruntime"]
    common += ["--model", str(rgb["out"])]
    opened: list[dict] = []

    def opener(model: str, **kwargs: object) -> OnnxEmbedder:
        opened.append(kwargs)
        return open_embedder(model, providers="cpu", threads=1)

    with monkeypatch.context() as patch:
        patch.setattr(embed_cli, "open_backend", lambda name: opener)
        cli.main(["embed", *common, "--out", str(tmp_path / "a.npy"), "--device", "cuda:1"])
        cli.main(["embed", *common, "--out", str(tmp_path / "b.npy")])
    assert opened == [{"device": "cuda:1", "max_batch": 64}, {"device": None, "max_batch": 64}]
    assert np.load(tmp_path / "a.npy").shape == (2, 64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the real backend, no GPU
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["embed", *common, "--out", str(tmp_path / "c.npy"), "--device", "cuda:1"])
    assert exit_info.value.code == 2
    assert "cuda:1 was asked for but CUDA is not available" in capsys.readouterr().err
