"""Inference speed of a backbone: PyTorch's CPU paths against the exported onnxruntime graphs.

What it measures: one model call on a batch already in memory (preprocessed
float32 NCHW), in images per second (batch / median call time) and the call
latency p50/p99, for ResNet-18 and ResNet-50 at 224 px, batch 1 and 32.
The rows run in the same process on the same inputs, in rounds whose order
rotates, so that drifting machine load hits every row alike.

Rows (CPU):

- ``torch eager fp32``: ``model(x)`` under ``torch.inference_mode()``, NCHW;
- ``torch channels_last fp32`` and ``torch channels_last bf16`` (autocast);
- ``torch.compile fp32`` (``--compile``: inductor's first call compiles for a
  minute or more per model and batch size on a small CPU, so it is opt-in);
- ``onnxruntime fp32``: ``model.onnx`` from :func:`mocohub.export.onnx.export_onnx`;
- ``onnxruntime int8``: static QDQ, per-channel, calibrated on real images
  (:func:`mocohub.export.quantize.quantize_int8`), the file ``mocohub export
  --int8 --calibration`` writes.

Both onnxruntime rows go through :class:`mocohub.export.OnnxEmbedder`, as
``mocohub embed`` does. Accuracy of int8: cosine to PyTorch fp32 (lowest,
mean) and the top-10 neighbour agreement on ``--images`` real images
(default: the committed Fashion-MNIST samples, resized to 224 and repeated to
RGB). The whole ``mocohub embed --backend onnxruntime`` path (files on disk,
decoding in ``--workers`` processes, preprocessing, the int8 model, writing
the .npy) is timed on those files at batch 32, against the bare int8 model.

Rows (CUDA, when a GPU is present; batch ``--gpu-batch``, default 256):
``torch bf16`` (autocast, channels_last), ``onnxruntime CUDA fp16``
(``model.fp16.onnx`` with I/O binding) and ``onnxruntime TensorRT fp16``.

Every onnxruntime row records ``providers``, the providers its session really
uses (``session.get_providers()``), and prints them. A row whose provider did
not run is not timed: it is marked ``unavailable`` with the reason (not
installed, failed to load, or the session fell back to another provider,
which onnxruntime does silently; the GPU wheel lists TensorRT even where
TensorRT is not installed). See :func:`ort_row`.

Run (from the repository root)::

    python bench/export.py                          # CPU, all cores
    python bench/export.py --threads 1 --compile    # what BENCHMARKS.md shows
    python bench/export.py --models resnet18 --batches 32 --rounds 1

Caveats: the weights are random (no pretrained weights are reachable
offline); speed does not depend on them, int8 accuracy does somewhat.
Writes every figure to ``--json`` (default ``bench/results/export.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocohub.artifact import ModelConfig, build_model
from mocohub.export.onnx import add_metadata, export_onnx, save_onnx, to_fp16
from mocohub.export.onnx_embedder import OnnxEmbedder
from mocohub.export.quantize import load_image_folder, quantize_int8
from mocohub.export.verify import neighbour_agreement
from mocohub.preprocessing import Preprocessing
from mocohub.sysinfo import collect

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "export.json"
SAMPLES = ROOT / "samples" / "fashion-mnist"
Runner = Callable[[Any], Any]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def torch_runners(model: torch.nn.Module, compile_: bool) -> dict[str, Runner]:
    cl = build_model(model.mocohub_config).to(memory_format=torch.channels_last)
    cl.load_state_dict(model.state_dict())
    runners: dict[str, Runner] = {
        "torch eager fp32": lambda x: model(x),
        "torch channels_last fp32": lambda x: cl(x.contiguous(memory_format=torch.channels_last)),
    }

    def bf16(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cl(x.contiguous(memory_format=torch.channels_last))

    runners["torch channels_last bf16"] = bf16
    if compile_:
        compiled = torch.compile(model)
        runners["torch.compile fp32"] = lambda x: compiled(x)
    return runners


def time_rows(
    runners: dict[str, Runner], inputs: dict[str, Any], calls: int, rounds: int, sync: Runner
) -> dict[str, dict[str, Any]]:
    """Per row: call times over ``rounds`` rotating rounds of ``calls`` calls (+1 warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    errors: dict[str, str] = {}
    names = list(runners)
    with torch.inference_mode():
        for name in names:  # warm-up: allocations, compilation, onnxruntime's first run
            try:
                started = time.perf_counter()
                sync(runners[name](inputs[name]))
                print(f"    warm-up {name}: {time.perf_counter() - started:.2f} s", flush=True)
            except Exception as e:  # torch.compile or a GPU provider may fail: say so, go on
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                print(f"    {name} failed: {errors[name]}", flush=True)
        live = [n for n in names if n not in errors]
        for r in range(rounds if live else 0):
            shift = r % len(live)
            for name in live[shift:] + live[:shift]:
                for _ in range(calls):
                    started = time.perf_counter()
                    sync(runners[name](inputs[name]))
                    times[name].append(time.perf_counter() - started)
    return {
        name: {"error": errors[name]} if name in errors else {"seconds": times[name]}
        for name in names
    }


#: onnxruntime's name for each provider a row asks for
PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def ort_row(
    path: Path, provider: str, **options: Any
) -> tuple[OnnxEmbedder | None, dict[str, Any]]:
    """An embedder of ``path`` on ``provider`` (cpu, cuda, tensorrt) and what really runs.

    Returns ``(embedder, record)``: ``record["providers"]`` is the session's
    ``get_providers()``. When the provider cannot run here (onnxruntime lacks
    it, it fails to load, or the session fell back to another provider), the
    embedder is None and ``record["unavailable"]`` says why: such a row must not
    be timed under the provider's name.

    Example:
        >>> embedder, record = ort_row(Path("out/model.onnx"), "cuda")
        >>> record  # on a machine without the CUDA provider
        {'requested': 'CUDAExecutionProvider', 'providers': [], 'unavailable': '...'}
    """
    wanted = PROVIDER_NAMES[provider]
    record: dict[str, Any] = {"requested": wanted, "providers": []}
    try:
        embedder = OnnxEmbedder(path, provider, **options)
    except Exception as error:  # not installed, or the provider's libraries failed to load
        record["unavailable"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return None, record
    record["providers"] = list(embedder.session.get_providers())
    if record["providers"][:1] != [wanted]:
        record["unavailable"] = (
            f"the session fell back to {record['providers'][0]} ({wanted} did not load)"
        )
        return None, record
    return embedder, record


def export_files(
    model: torch.nn.Module,
    folder: Path,
    calibration: np.ndarray | None,
    gpu: bool,
    *,
    int8: bool = True,
) -> None:
    """model.onnx (fp32), model.int8.onnx (when ``int8``; calibrated on ``calibration``)
    and, when ``gpu``, model.fp16.onnx, in ``folder``."""
    config = model.mocohub_config
    core = export_onnx(model)
    save_onnx(add_metadata(core, config, precision="fp32"), folder / "model.onnx")
    if int8:
        quantized = quantize_int8(core, calibration=calibration)
        save_onnx(add_metadata(quantized, config, precision="int8"), folder / "model.int8.onnx")
    if gpu:
        save_onnx(add_metadata(to_fp16(core), config, precision="fp16"), folder / "model.fp16.onnx")


def int8_accuracy(model: torch.nn.Module, int8: OnnxEmbedder, images: torch.Tensor) -> dict:
    with torch.inference_mode():
        reference = torch.cat([model(c) for c in images.split(32)]).numpy()
    out = np.concatenate([int8.embed_batch(c) for c in images.split(32)])
    cos = (reference * out).sum(1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(out, axis=1)
    )
    return {
        "n": len(images),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "top10_agreement": neighbour_agreement(reference, out),
    }


def embed_path(
    model_file: Path,
    images: Path,
    threads: int,
    workers: int,
    out: Path,
    *,
    provider: str = "cpu",
    batch: int = 32,
) -> float:
    """images/s of the whole `mocohub embed --backend onnxruntime` run on ``provider``."""
    from mocohub.embed import EmbedSettings, embed_files
    from mocohub.imageio import scan_inputs

    paths = scan_inputs([images])
    settings = EmbedSettings(model=str(model_file), backend="onnxruntime", batch_size=batch)
    result = embed_files(
        paths,
        out,
        settings,
        lambda _precision: OnnxEmbedder(model_file, provider, threads=threads),
        workers=workers,
        restart=True,
    )
    return float(result.images_per_s)


def gpu_rows(model: torch.nn.Module, folder: Path, batch: int, calls: int, rounds: int) -> dict:
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    gpu_model = build_model(model.mocohub_config).cuda().to(memory_format=torch.channels_last)
    gpu_model.load_state_dict(model.state_dict())

    def bf16(t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return gpu_model(t.contiguous(memory_format=torch.channels_last))

    runners: dict[str, Runner] = {"torch bf16 (cuda)": bf16}
    records: dict[str, dict[str, Any]] = {}
    for name, provider in (
        ("onnxruntime CUDA fp16", "cuda"),
        ("onnxruntime TensorRT fp16", "tensorrt"),
    ):
        embedder, records[name] = ort_row(folder / "model.fp16.onnx", provider)
        if embedder is not None:
            runners[name] = embedder.embed_batch
    rows = time_rows(
        runners, dict.fromkeys(runners, x), calls, rounds, lambda _: torch.cuda.synchronize()
    )
    for name, record in records.items():
        rows[name] = {**record, **rows.get(name, {})}
    return rows


def summarise(results: dict[str, dict[str, Any]], batch: int) -> None:
    for row in results.values():
        if row.get("seconds"):
            s = row["seconds"]
            row.update(
                img_per_s=batch / statistics.median(s),
                p50_ms=1000 * percentile(s, 50),
                p99_ms=1000 * percentile(s, 99),
                calls=len(s),
            )


def print_table(report: dict[str, Any]) -> None:
    print("\n| model | batch | row | img/s | p50 ms | p99 ms | calls | vs ort fp32 | vs eager |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, rows in report["speed"].items():
        arch, batch = key.split("@")
        base = rows.get("onnxruntime fp32", {}).get("img_per_s")
        eager = rows.get("torch eager fp32", {}).get("img_per_s")
        for name, row in rows.items():
            if "error" in row or "unavailable" in row:
                why = f"failed: {row['error']}" if "error" in row else row["unavailable"]
                print(f"| {arch} | {batch} | {name} | {why[:80]} | | | | | |")
                continue
            if row.get("providers"):
                name = f"{name} [{', '.join(row['providers'])}]"
            ratio = f"{row['img_per_s'] / base:.2f}x" if base else "-"
            vs_eager = f"{row['img_per_s'] / eager:.2f}x" if eager else "-"
            print(
                f"| {arch} | {batch} | {name} | {row['img_per_s']:.1f} | {row['p50_ms']:.1f} | "
                f"{row['p99_ms']:.1f} | {row['calls']} | {ratio} | {vs_eager} |"
            )
    for arch, acc in report["int8_accuracy"].items():
        print(
            f"\n{arch} int8 vs PyTorch fp32 on {acc['n']} real images: cosine min "
            f"{acc['cosine_min']:.4f}, mean {acc['cosine_mean']:.4f}, top-10 neighbour "
            f"agreement {acc['top10_agreement']:.3f}"
        )
    for arch, path in report["embed_path"].items():
        print(
            f"{arch}: mocohub embed --backend onnxruntime (int8, batch 32, {path['workers']} "
            f"decode worker(s)) {path['img_per_s']:.1f} img/s = {path['ratio_to_bare_int8']:.2f}x "
            "the bare int8 model"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=None, help="default: physical cores")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls-batch1", type=int, default=10, help="calls per round at batch 1")
    parser.add_argument("--calls", type=int, default=2, help="calls per round at larger batches")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (slow)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the CPU bf16 rows")
    parser.add_argument("--images", type=Path, default=SAMPLES, help="real images")
    parser.add_argument("--calibration-size", type=int, default=64)
    parser.add_argument("--accuracy-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1, help="decode workers of the embed path")
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)

    from mocohub.sysinfo import physical_cores

    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    gpu = torch.cuda.is_available()
    report: dict[str, Any] = {
        "command": " ".join(["python", "bench/export.py", *(argv or sys.argv[1:])]),
        "machine": collect(),
        "threads": threads,
        "load_start": list(os.getloadavg()),
        "speed": {},
        "int8_accuracy": {},
        "embed_path": {},
        "gpu": {},
    }
    prep = Preprocessing.imagenet()
    n_images = max(args.calibration_size, args.accuracy_size)
    real = load_image_folder(args.images, prep, limit=n_images).tensors
    if real.shape[1] == 1:
        real = real.expand(-1, 3, -1, -1).contiguous()
    with tempfile.TemporaryDirectory(prefix="mocohub-bench-") as tmp:
        for arch in args.models:
            torch.manual_seed(0)
            model = build_model(ModelConfig(arch, preprocessing=prep))
            folder = Path(tmp) / arch
            folder.mkdir()
            print(f"{arch}: exporting and quantizing ...", flush=True)
            export_files(model, folder, real[: args.calibration_size].numpy(), gpu)
            fp32, fp32_record = ort_row(folder / "model.onnx", "cpu", threads=threads)
            int8, int8_record = ort_row(folder / "model.int8.onnx", "cpu", threads=threads)
            if fp32 is None or int8 is None:
                raise SystemExit(
                    f"onnxruntime's CPU provider did not run: {fp32_record}, {int8_record}"
                )
            report["int8_accuracy"][arch] = int8_accuracy(model, int8, real[: args.accuracy_size])
            for batch in args.batches:
                print(f"{arch} batch {batch}:", flush=True)
                runners = torch_runners(model, args.compile)
                if args.no_bf16:
                    runners.pop("torch channels_last bf16")
                runners["onnxruntime fp32"] = fp32.embed_batch
                runners["onnxruntime int8"] = int8.embed_batch
                x = torch.randn(batch, 3, 224, 224)
                inputs = {n: x.numpy() if n.startswith("onnxruntime") else x for n in runners}
                calls = args.calls_batch1 if batch == 1 else args.calls
                rows = time_rows(runners, inputs, calls, args.rounds, lambda _: None)
                rows["onnxruntime fp32"].update(fp32_record)
                rows["onnxruntime int8"].update(int8_record)
                summarise(rows, batch)
                report["speed"][f"{arch}@{batch}"] = rows
            bare = report["speed"].get(f"{arch}@32", {}).get("onnxruntime int8", {})
            if "img_per_s" in bare:
                speed = embed_path(
                    folder / "model.int8.onnx", args.images, threads, args.workers, folder / "e.npy"
                )
                report["embed_path"][arch] = {
                    "img_per_s": speed,
                    "workers": args.workers,
                    "ratio_to_bare_int8": speed / bare["img_per_s"],
                }
            if gpu:
                rows = gpu_rows(model, folder, args.gpu_batch, args.calls, args.rounds)
                summarise(rows, args.gpu_batch)
                report["gpu"][arch] = rows
    report["load_end"] = list(os.getloadavg())
    print_table(report)
    for arch, rows in report["gpu"].items():
        for name, row in rows.items():
            if "img_per_s" in row:
                shown = f"{row['img_per_s']:.0f} img/s"
            else:
                shown = row.get("unavailable") or row.get("error", "no figure")
            ran = f" [{', '.join(row['providers'])}]" if row.get("providers") else ""
            print(f"GPU {arch} batch {args.gpu_batch} {name}{ran}: {shown}")
    print(f"\nload average: start {report['load_start']}, end {report['load_end']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
