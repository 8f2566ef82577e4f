"""One call on a machine with one NVIDIA GPU: the GPU tests, then every GPU measurement
against its baseline in the same run, within a time budget (8 minutes at most).

Parts, in this order (each one is skipped, and says so, when the budget left is too
short for it):

1. ``tests``: ``pytest -m gpu`` over the test files that hold GPU-marked tests.
2. ``step``: the MoCo v2 ResNet-50 224 px training step in img/s, as
   ``bench/train_step.py`` builds it: ours (``--precision auto``, channels_last,
   ``--compile``) against the reference transcription in fp32 (the baseline) and
   a supervised step of the same backbone with ours' settings. Goals: ours >= 0.72x
   supervised and >= 3,500 img/s (H100-class GPU).
3. ``train``: ``mocohub.training.train`` end to end on a folder of JPEG files
   (decoding in DataLoader workers), in img/s from its metrics log, against
   ours' model step above; and JPEG decoding alone, PIL on the CPU against
   ``torchvision.io.decode_jpeg`` on the GPU, to show where GPU decoding is faster.
4. ``embed``: ``mocohub embed`` end to end (JPEG files to ``.npy``) against the
   same model's bare forward on decoded batches, ResNet-50 at 224 px, for torch
   bf16, onnxruntime CUDA fp16 and onnxruntime TensorRT fp16. Every onnxruntime
   row names the providers its session really used; a provider that is missing or
   fell back is reported ``unavailable``, never timed under its name
   (``bench/export.py``'s :func:`ort_row`). Goals: >= 0.9x the bare forward and
   >= 5,000 img/s. With more than one GPU, also ``mocohub embed --nproc-per-node
   N`` (one process per GPU, torchrun) against the same command in one process,
   whole commands timed (goal: >= 0.7 N x); on the CPU (the dry run) two
   one-thread processes stand for the GPUs.
5. ``fmnist``: Fashion-MNIST pre-training with the shipped model's recipe (width
   32, ``--crop-min 0.85``, lr 0.12 for batch 512) for as many epochs as the
   budget left allows, with the k-NN monitor after each, on ``--fmnist-data``
   (the IDX files; default ``/usr/share/datasets/fashion-mnist`` where it exists,
   else the 300 committed samples).

Writes ``gpu.json`` (every figure, the machine, the command) and ``gpu.md`` (a
table for BENCHMARKS.md) in ``--out``. Needs no network. ``--dry-run`` runs every
part at tiny sizes on the CPU (CI runs it: ``tests/test_gpu_script.py``).

Run from the repository root, the source tree on the path::

    PYTHONPATH=. python bench/gpu.py                    # on the GPU machine
    PYTHONPATH=. python bench/gpu.py --fmnist-data data/fashion-mnist  # IDX files carried there
    PYTHONPATH=. python bench/gpu.py --dry-run --out /tmp/gpu

Nothing needs installing: with the source tree on PYTHONPATH, ``mocohub`` finds
``training/`` and ``export/`` beside it as ``mocohub.training`` and
``mocohub.export``; run without PYTHONPATH, the script puts the tree's root there
itself (:func:`ensure_package`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results"
FMNIST_SAMPLES = ROOT / "samples" / "fashion-mnist"
PARTS = ("tests", "step", "train", "embed", "fmnist")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each part runs at: the GPU run's sizes, or the dry run's tiny ones."""

    arch: str
    width: int
    small_stem: bool
    image_size: int
    step_batch: int
    K: int
    step_timed: int  # timed steps per row per round
    rounds: int
    warmup: int
    train_images: int
    jpeg_size: tuple[int, int]
    embed_images: int
    embed_batch: int
    fmnist_width: int
    fmnist_batch: int
    fmnist_max_epochs: int
    compile: bool
    precision: str  # the step's and the training's; the dry run pins fp32 (any CPU alike)
    fmnist_images: int | None  # the first N images only (None: all)


GPU_SIZES = Sizes("resnet50", 64, False, 224, 256, 65536, 10, 3, 3, 256 * 32, (400, 300),
                  2048, 256, 32, 256, 50, True, "auto", None)  # fmt: skip
DRY_SIZES = Sizes("resnet18", 8, True, 32, 8, 64, 2, 2, 1, 8 * 12, (48, 40),
                  24, 8, 8, 32, 2, False, "fp32", 96)  # fmt: skip


# --------------------------------------------------------------------------
# Set-up: the package, the clock, the machine
# --------------------------------------------------------------------------


def ensure_package() -> str | None:
    """Make ``mocohub`` (with ``mocohub.training`` and ``mocohub.export``) importable.

    Installed, or on PYTHONPATH as a source tree, it already is (a source tree's
    ``mocohub`` finds ``training/`` and ``export/`` beside it). Run as plain
    ``python bench/gpu.py`` with nothing installed, the tree's root is put on
    ``sys.path`` and PYTHONPATH, for this process and the ones it starts; no
    install, so no build backend is needed on an offline machine. Returns the
    root then, else None.
    """
    try:
        import mocohub.export
        import mocohub.training  # noqa: F401

        return None
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    for name in [n for n in sys.modules if n == "mocohub" or n.startswith("mocohub.")]:
        del sys.modules[name]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    return str(ROOT)


class Budget:
    """The time left of the run; a part starts only when its minimum fits."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


def machine(device: Any) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from mocohub.sysinfo import collect

    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "onnxruntime": ort.__version__,
        "onnxruntime_available_providers": ort.get_available_providers(),
        "host": collect(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1
        )
    return info


def row(
    name: str,
    ran_on: str,
    img_per_s: float | None,
    baseline: str | None = None,
    baseline_img_per_s: float | None = None,
    goals: dict[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One line of the table: a speed, its baseline in the same run, the goals met."""
    ratio = img_per_s / baseline_img_per_s if img_per_s and baseline_img_per_s else None
    met = None
    if goals and img_per_s is not None:
        met = all(
            (ratio is not None and ratio >= goal) if kind == "ratio" else img_per_s >= goal
            for kind, goal in goals.items()
        )
    return {
        "row": name,
        "ran_on": ran_on,
        "img_per_s": img_per_s,
        "baseline": baseline,
        "baseline_img_per_s": baseline_img_per_s,
        "ratio": ratio,
        "goals": goals or {},
        "met": met,
        **extra,
    }


# --------------------------------------------------------------------------
# 1. pytest -m gpu
# --------------------------------------------------------------------------


def run_gpu_tests(tmp: Path, limit_s: float) -> dict[str, Any]:
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "pytest.mark.gpu" in p.read_text(encoding="utf-8")
    )
    junit = tmp / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *files]  # fmt: skip
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=max(limit_s, 10)
        )
        exit_code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        partial = expired.stdout or ""
        partial = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        exit_code, output = None, f"timed out after {limit_s:.0f} s\n{partial}"
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.is_file():
        for suite in ET.parse(junit).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    return {
        "command": " ".join(["python", "-m", "pytest", "-m", "gpu", *files]),
        "files": files,
        "exit_code": exit_code,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"] + counts["errors"],
        "skipped": counts["skipped"],
        "seconds": round(time.monotonic() - started, 1),
        "output_tail": output.strip().splitlines()[-15:],
    }


# --------------------------------------------------------------------------
# 2. The training step (bench/train_step.py's rows, on the device)
# --------------------------------------------------------------------------


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    steps: dict[str, Callable[[int], Any]], device: Any, sizes: Sizes, batch: int
) -> dict[str, list[float]]:
    """img/s of each step function per round: warm-up (compilation) first, then
    rounds whose order rotates, ``sizes.step_timed`` steps each, synchronised at the ends."""
    for step in steps.values():
        for i in range(sizes.warmup):
            step(i)
    sync(device)
    speeds: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(sizes.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            started = time.perf_counter()
            for i in range(sizes.step_timed):
                steps[name](sizes.warmup + i)
            sync(device)
            speeds[name].append(sizes.step_timed * batch / (time.perf_counter() - started))
    return speeds


def step_config(sizes: Sizes) -> Any:
    from mocohub.training.config import preset

    return preset(
        "moco_v2",
        arch=sizes.arch,
        width=sizes.width,
        small_stem=sizes.small_stem,
        image_size=sizes.image_size,
        batch_size=sizes.step_batch,
        K=sizes.K,
        precision=sizes.precision,
        channels_last="on",
        compile=sizes.compile,
    )


def bench_step(device: Any, sizes: Sizes) -> dict[str, Any]:
    import torch
    import train_step as ts  # bench/train_step.py

    from mocohub.training.train import build_moco, choose_precision, use_fixed_size_kernels

    use_fixed_size_kernels(device)  # as the training loop: fixed shapes, cuDNN benchmarks
    config = step_config(sizes)
    fp32 = dataclasses.replace(config, precision="fp32", channels_last="off", compile=False)
    torch.manual_seed(0)
    state = {k: v for k, v in build_moco(config, 3).state_dict().items() if k != "_extra_state"}
    shape = (sizes.step_batch, 3, sizes.image_size, sizes.image_size)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(shape, generator=gen).to(device),
            torch.randn(shape, generator=gen).to(device),
            torch.randint(0, ts.SUPERVISED_CLASSES, (sizes.step_batch,), generator=gen).to(device),
        )
        for _ in range(2)
    ]
    dtype = choose_precision(config, device)
    steps = {
        "ours": ts.make_ours(config, 3, state, batches, device),
        "reference": ts.make_reference(fp32, 3, state, batches, device),
        "supervised": ts.make_supervised(config, 3, state, batches, dtype, True, device),
    }
    speeds = time_steps(steps, device, sizes, sizes.step_batch)
    median = {name: statistics.median(v) for name, v in speeds.items()}
    settings = (
        f"{'bf16' if dtype == torch.bfloat16 else 'fp16' if dtype == torch.float16 else 'fp32'}, "
        f"channels_last, {'compiled' if config.compile else 'eager'}"
    )
    what = f"{sizes.arch} {sizes.image_size} px, batch {sizes.step_batch}"
    rows = [
        row(f"MoCo v2 step, ours ({settings})", str(device), median["ours"],
            "supervised step, same settings", median["supervised"],
            {"ratio": 0.72, "img_per_s": 3500.0} if device.type == "cuda" else {"ratio": 0.72}),
        row("MoCo v2 step, ours", str(device), median["ours"],
            "reference transcription, fp32 NCHW", median["reference"]),
        row(f"supervised step ({settings})", str(device), median["supervised"]),
        row("reference transcription (fp32 NCHW)", str(device), median["reference"]),
    ]  # fmt: skip
    return {
        "what": f"model step on tensors already on the device, {what}, K={config.K}",
        "config": config.to_dict(),
        "img_per_s_per_round": speeds,
        "rows": rows,
    }


# --------------------------------------------------------------------------
# 3. Training end to end from JPEG files; JPEG decoding CPU vs GPU
# --------------------------------------------------------------------------


def jpeg_folder(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """``count`` photo-like JPEGs in two class folders (at most 256 distinct ones, copied)."""
    from embed import make_jpegs  # bench/embed.py

    distinct = folder / "distinct"
    distinct.mkdir(parents=True)
    make_jpegs(distinct, min(count, 256), size)
    files = sorted(distinct.iterdir())
    classes = [folder / "class_a", folder / "class_b"]
    for path in classes:
        path.mkdir()
    for i in range(count):
        shutil.copyfile(files[i % len(files)], classes[i % 2] / f"img_{i:06d}.jpg")
    shutil.rmtree(distinct)
    return sorted(folder.rglob("*.jpg"))


def bench_decode(files: list[Path], device: Any) -> list[dict[str, Any]]:
    import torch
    from torchvision.io import decode_jpeg

    from mocohub.imageio import decode_image

    sample = files[: min(len(files), 512)]
    started = time.perf_counter()
    for path in sample:
        decode_image(path).load()
    cpu = len(sample) / (time.perf_counter() - started)
    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in sample]
    decode_jpeg(data[:4], device=device)  # warm-up (nvjpeg's handles)
    sync(device)
    started = time.perf_counter()
    decode_jpeg(data, device=device)
    sync(device)
    on_device = len(sample) / (time.perf_counter() - started)
    return [
        row("JPEG decode, torchvision.io.decode_jpeg (batch)", str(device), on_device,
            "PIL decode, 1 CPU process", cpu),
        row("JPEG decode, PIL, 1 CPU process", "cpu", cpu),
    ]  # fmt: skip


def bench_train(device: Any, sizes: Sizes, tmp: Path, step_img_per_s: float | None) -> dict:
    import torch

    from mocohub.training.train import train

    files = jpeg_folder(tmp / "jpegs", sizes.train_images, sizes.jpeg_size)
    workers = 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
    config = dataclasses.replace(step_config(sizes), epochs=1, workers=workers)
    torch.manual_seed(0)
    started = time.perf_counter()
    train(config, tmp / "jpegs", tmp / "run", progress=False)
    wall = time.perf_counter() - started
    records = [
        json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    windows = [r["img_per_s"] for r in records if "img_per_s" in r]
    # The first window holds compilation and the workers' start: left out when others exist.
    speed = statistics.median(windows[1:] or windows) if windows else None
    rows = [
        row(f"training end to end from {len(files)} JPEGs ({workers} decode workers)",
            str(device), speed, "the model step alone (ours, above)", step_img_per_s),
    ]  # fmt: skip
    return {
        "config": config.to_dict(),
        "window_img_per_s": windows,
        "wall_s": round(wall, 1),
        "rows": rows + bench_decode(files, device),
    }


# --------------------------------------------------------------------------
# 4. mocohub embed end to end vs the bare forward: torch, onnxruntime CUDA/TensorRT
# --------------------------------------------------------------------------


def bench_embed(device: Any, sizes: Sizes, tmp: Path) -> dict[str, Any]:
    import torch
    from embed import bare_forward, end_to_end, make_jpegs  # bench/embed.py

    import export as ex  # bench/export.py
    from mocohub.artifact import ModelConfig, build_model, save_pretrained
    from mocohub.features import TorchEmbedder
    from mocohub.imageio import decode_image, scan_inputs
    from mocohub.preprocessing import Preprocessing

    images = tmp / "embed-images"
    images.mkdir()
    make_jpegs(images, sizes.embed_images, sizes.jpeg_size)
    paths = scan_inputs([images])
    torch.manual_seed(0)
    prep = Preprocessing.imagenet(sizes.image_size)
    config = ModelConfig(sizes.arch, width=sizes.width, small_stem=sizes.small_stem,
                         preprocessing=prep)  # fmt: skip
    model = build_model(config)
    model_dir = save_pretrained(model, tmp / "model")
    transform = prep.transform()
    decoded = torch.stack([transform(decode_image(p, min_size=prep.resize_size)) for p in paths])
    batches = [b.to(device) for b in decoded.split(sizes.embed_batch)]
    settings = argparse.Namespace(batch=sizes.embed_batch, workers=0 if device.type == "cpu" else 8)
    goals = {"ratio": 0.9, "img_per_s": 5000.0} if device.type == "cuda" else {"ratio": 0.9}
    rows = []

    precision = "bf16" if device.type == "cuda" else "fp32"
    embedder = TorchEmbedder(model, device=device.type, precision=precision)
    embedder.embed_batch(batches[0])  # warm-up
    sync(device)
    bare = statistics.median(bare_forward(embedder, batches) for _ in range(sizes.rounds))
    e2e = end_to_end(paths, model_dir, tmp / "torch.npy", precision, settings, device.type)
    rows.append(row(f"mocohub embed, torch {embedder.precision}", f"torch {device}",
                    e2e["pipeline"], "bare forward, same model", bare, goals))  # fmt: skip

    rows.append(bench_embed_processes(device, sizes, images, model_dir, precision, tmp))

    onnx_dir = tmp / "onnx"
    onnx_dir.mkdir()
    ex.export_files(model, onnx_dir, None, gpu=True, int8=False)
    wanted = [("cuda", "model.fp16.onnx"), ("tensorrt", "model.fp16.onnx")]
    if device.type == "cpu":
        wanted.insert(0, ("cpu", "model.onnx"))  # the dry run's one provider that can run
    for provider, file in wanted:
        precision = "fp16" if "fp16" in file else "fp32"
        name = f"mocohub embed, onnxruntime {ex.PROVIDER_NAMES[provider]} {precision}"
        ort_embedder, record = ex.ort_row(onnx_dir / file, provider)
        if ort_embedder is None:
            rows.append(row(name, "unavailable", None, **record))
            continue
        ort_embedder.embed_batch(batches[0])  # warm-up (TensorRT builds its engine here)
        started = time.perf_counter()
        for batch in batches:
            ort_embedder.embed_batch(batch)
        bare = len(decoded) / (time.perf_counter() - started)
        e2e_ort = ex.embed_path(onnx_dir / file, images, os.cpu_count() or 1, settings.workers,
                                tmp / f"{provider}.npy", provider=provider,
                                batch=sizes.embed_batch)  # fmt: skip
        rows.append(row(name, ", ".join(record["providers"]), e2e_ort,
                        "bare session, same graph", bare, goals, **record))  # fmt: skip
    return {
        "what": f"{sizes.arch} {sizes.image_size} px, {len(paths)} JPEGs "
        f"{sizes.jpeg_size[0]}x{sizes.jpeg_size[1]}, batch {sizes.embed_batch}",
        "rows": rows,
    }


def bench_embed_processes(
    device: Any, sizes: Sizes, images: Path, model_dir: Path, precision: str, tmp: Path
) -> dict[str, Any]:
    """``mocohub embed --nproc-per-node N`` (one process per GPU) against one process.

    Both are whole commands (interpreters, model loads and, for N, torchrun and the
    merge included), so the ratio is what a user's wall clock sees.
    """
    import socket

    import torch

    from mocohub.embed_outputs import output_files

    count = torch.cuda.device_count() if device.type == "cuda" else 2
    name = f"mocohub embed --nproc-per-node {count}, torch {precision}"
    if count < 2:
        return row(name, "unavailable", None, reason=f"needs 2 or more GPUs; found {count}")
    base = [sys.executable, "-m", "mocohub", "embed", str(images), "--model", str(model_dir),
            "--precision", precision, "--batch-size", str(sizes.embed_batch), "--quiet",
            "--restart"]  # fmt: skip
    env = dict(os.environ)
    if device.type == "cpu":  # the dry run: two one-thread processes share the CPU
        env["OMP_NUM_THREADS"] = "1"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    speeds = {}
    for who, extra in (
        ("one", []),
        ("many", ["--nproc-per-node", str(count), "--master-port", port]),
    ):
        started = time.perf_counter()
        done = subprocess.run([*base, "--out", str(tmp / f"{who}.npy"), *extra], env=env,
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return row(name, "failed", None, reason=tail)
        rows_written = len(output_files(tmp / f"{who}.npy")["manifest"].read_text().splitlines())
        speeds[who] = rows_written / (time.perf_counter() - started)
    first, second = output_files(tmp / "one.npy"), output_files(tmp / "many.npy")
    identical = all(
        first[r].read_bytes() == second[r].read_bytes() for r in ("features", "manifest")
    )
    return row(name, f"{count} processes, one device each", speeds["many"],
               "the same command, one process", speeds["one"], {"ratio": 0.7 * count},
               identical_outputs=identical)  # fmt: skip


# --------------------------------------------------------------------------
# 5. Fashion-MNIST, as many epochs as fit
# --------------------------------------------------------------------------


def bench_fmnist(
    device: Any, sizes: Sizes, tmp: Path, budget: Budget, source: str | None = None
) -> dict[str, Any]:
    import torch

    from mocohub.training.config import preset
    from mocohub.training.data import FASHION_MNIST_DIR, resolve_dataset
    from mocohub.training.train import train

    if source is None:
        source = "fashion-mnist" if FASHION_MNIST_DIR.is_dir() else str(FMNIST_SAMPLES)
    samples = Path(source).resolve() == FMNIST_SAMPLES.resolve()
    data: Any = source
    if sizes.fmnist_images is not None:
        dataset = resolve_dataset(source, "train")[0]
        data = dataset.batch(torch.arange(min(sizes.fmnist_images, len(dataset))))
    # 300 samples make one step of batch 256 per epoch: a smaller batch there.
    batch = min(sizes.fmnist_batch, 64) if samples else sizes.fmnist_batch
    config = preset("fashion_mnist", width=sizes.fmnist_width, batch_size=batch,
                    lr=0.12, crop_min=0.85,  # the shipped moco_r18_fashion_mnist's recipe
                    K=4096 if device.type == "cuda" else 64, epochs=1, knn_every=1,
                    knn_k=200 if device.type == "cuda" else 20, workers=0,
                    precision=sizes.precision)  # fmt: skip
    run = tmp / "fmnist"
    started = time.perf_counter()
    train(config, data, run, knn_data=(data, data), progress=False)
    first = time.perf_counter() - started
    # Later epochs skip the set-up and compilation: the first one bounds them.
    more = min(sizes.fmnist_max_epochs - 1, int((budget.left() - 20) / max(first, 1e-3)))
    if more > 0:
        longer = dataclasses.replace(config, epochs=1 + more)
        train(longer, data, run, resume="auto", knn_data=(data, data), progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("event") == "epoch"]
    return {
        "data": "samples/fashion-mnist" if samples else source,
        "images": len(resolve_dataset(data, "train")[0]),
        "epochs": len(epochs),
        "config": {k: getattr(config, k) for k in ("width", "batch_size", "lr", "crop_min", "K")},
        "seconds": round(time.perf_counter() - started, 1),
        "knn_top1_per_epoch": [r.get("knn_top1") for r in epochs],
        "loss_per_epoch": [r.get("loss") for r in epochs],
        "rows": [],
    }


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"`{report['command']}` on {m.get('gpu', m['device'])} (torch {m['torch']}, CUDA "
        f"{m['cuda']}, onnxruntime {m['onnxruntime']} with "
        f"{', '.join(m['onnxruntime_available_providers'])}; CPU {m['host']['cpu']['model']}), "
        f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget"
        + (
            " (dry run: tiny sizes on the CPU, not figures to publish)" if report["dry_run"] else ""
        ),
        "",
        "| part | row | ran on | img/s | baseline (same run) | ratio | goal | met |",
        "| --- | --- | --- | ---: | --- | ---: | --- | --- |",
    ]
    for part, result in report["parts"].items():
        if "not_run" in result or "error" in result:
            why = result.get("not_run") or result.get("error")
            lines.append(f"| {part} | {why} | | | | | | |")
            continue
        if part == "tests":
            lines.append(
                f"| tests | `pytest -m gpu`: {result['passed']} passed, {result['failed']} "
                f"failed, {result['skipped']} skipped (exit {result['exit_code']}) | | | | | | |"
            )
        if part == "fmnist":
            knn = ", ".join(f"{v:.3f}" for v in result["knn_top1_per_epoch"] if v is not None)
            lines.append(
                f"| fmnist | {result['epochs']} epochs on {result['data']} "
                f"({result['images']} images) in "
                f"{result['seconds']:.0f} s, k-NN top-1 per epoch: {knn} | | | | | | |"
            )
        for r in result.get("rows", []):
            speed = f"{r['img_per_s']:.1f}" if r["img_per_s"] else r.get("unavailable", "-")
            base = ""
            if r["baseline"]:
                base = f"{r['baseline']}: {r['baseline_img_per_s']:.1f}"
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] else ""
            goal = ", ".join(
                f">= {v}x" if k == "ratio" else f">= {v:.0f} img/s" for k, v in r["goals"].items()
            )
            met = "" if r["met"] is None else ("yes" if r["met"] else "no")
            lines.append(
                f"| {part} | {r['row']} | {r['ran_on']} | {speed} | {base} | {ratio} | {goal} "
                f"| {met} |"
            )
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def part_guard(
    report: dict[str, Any], name: str, budget: Budget, minimum_s: float
) -> Iterator[dict[str, Any]]:
    """Run a part when ``minimum_s`` of the budget is left; record its failure, go on."""
    holder: dict[str, Any] = {}
    if budget.left() < minimum_s:
        report["parts"][name] = {"not_run": f"not run: {budget.left():.0f} s of the budget left"}
        holder["skip"] = True
        yield holder
        return
    started = time.monotonic()
    print(f"[{name}] starting, {budget.left():.0f} s of the budget left", flush=True)
    try:
        yield holder
        result = holder.get("result", {})
    except Exception as error:  # one part's failure must not cost the others' figures
        result = {"error": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    result["part_seconds"] = round(time.monotonic() - started, 1)
    report["parts"][name] = result
    print(f"[{name}] done in {result['part_seconds']:.0f} s", flush=True)


def write_report(report: dict[str, Any], out: Path) -> str:
    """Write ``gpu.json`` and ``gpu.md`` in ``out`` (atomically); return the table."""
    from mocohub.fileio import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    atomic_write_text(out / "gpu.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "gpu.md", table)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every part, tiny, on the CPU")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds for all parts (default 420, so that a part started near the end still "
        "finishes within 8 minutes; 300 for --dry-run)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="gpu.json and gpu.md here")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--fmnist-data",
        help="Fashion-MNIST IDX folder for the fmnist part (default: Debian's "
        "/usr/share/datasets/fashion-mnist where it exists, else the 300 committed samples)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network, whatever a part tries
    budget = Budget(args.budget_s or (300.0 if args.dry_run else 420.0))
    # Minimum budget left to start each part (the GPU's, then the dry run's).
    minimum = {"tests": (60, 5), "step": (150, 5), "train": (60, 5), "embed": (90, 5),
               "fmnist": (30, 3)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mocohub-gpu-") as temp:
        tmp = Path(temp)
        installed = ensure_package()
        import torch

        if not args.dry_run and not torch.cuda.is_available():
            print("No CUDA device here: run with --dry-run for the CPU rehearsal.", file=sys.stderr)
            return 2
        device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
        sizes = DRY_SIZES if args.dry_run else GPU_SIZES
        if args.dry_run:
            torch.set_num_threads(min(2, torch.get_num_threads()))
        report: dict[str, Any] = {
            "command": " ".join(
                ["python", "bench/gpu.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            "dry_run": args.dry_run,
            "budget_s": budget.seconds,
            "installed_from_source_into": installed,
            "machine": machine(device),
            "sizes": dataclasses.asdict(sizes),
            "parts": {},
        }
        step_speed: float | None = None
        for name in args.parts:
            with part_guard(report, name, budget, minimum[name][1 if args.dry_run else 0]) as slot:
                if slot.get("skip"):
                    continue
                folder = tmp / name
                folder.mkdir()
                if name == "tests":
                    slot["result"] = run_gpu_tests(folder, min(budget.left() * 0.4, 180))
                elif name == "step":
                    slot["result"] = bench_step(device, sizes)
                    step_speed = slot["result"]["rows"][0]["img_per_s"]
                elif name == "train":
                    slot["result"] = bench_train(device, sizes, folder, step_speed)
                elif name == "embed":
                    slot["result"] = bench_embed(device, sizes, folder)
                else:
                    slot["result"] = bench_fmnist(device, sizes, folder, budget, args.fmnist_data)
            # After every part: a call cut short by its machine's limit keeps what ran.
            report["elapsed_s"] = round(budget.seconds - budget.left(), 1)
            table = write_report(report, args.out)
    print("\n" + table)
    print(f"wrote {args.out / 'gpu.json'} and {args.out / 'gpu.md'}")
    failed = [n for n, r in report["parts"].items() if "error" in r]
    tests = report["parts"].get("tests", {})
    return 1 if failed or tests.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
