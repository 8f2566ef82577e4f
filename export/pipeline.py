"""``mocohub export``'s work: load a model, write its artifacts, verify them.

The output folder (every file written atomically):

================================  ===============================================
``model.safetensors``             weights; header metadata: format, arch,
                                  embedding_dim, mocohub_version (``safetensors``)
``config.json``                   the ModelConfig: architecture, preprocessing, meta
``README.md``                     the model card (``safetensors``)
``model.onnx``                    plain fp32 graph: ``images`` -> ``features`` (``onnx``)
``model.fp16.onnx``               the same in fp16, float32 I/O (``--fp16``)
``model.int8.onnx``               int8: static QDQ with ``--calibration``, else dynamic
``model.preprocess[.P].onnx``     uint8 ``pixels`` -> L2-normalised ``embeddings``, for
                                  each precision P above (``--with-preprocessing``)
``verify.json``                   the parity checks (unless ``--no-verify``)
================================  ===============================================

Model files (and ``verify.json``) that an earlier export left in the folder
and this one did not write are removed, so the folder never mixes two models.

Example:
    >>> result = export_model("runs/fmnist/model", "out/fmnist", fp16=True, int8=True)
    >>> sorted(result.files)
    ['config.json', 'model.fp16.onnx', 'model.int8.onnx', 'model.onnx', ...]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from mocohub.errors import ConfigError
from mocohub.fileio import atomic_write_text
from mocohub.hub import load
from mocohub.models import CONFIG_NAME, get_config

from .onnx import add_metadata, export_onnx, save_onnx, to_fp16
from .onnx import with_preprocessing as pixels_graph
from .onnx_embedder import MODEL_FILES
from .quantize import ImageSet, load_image_folder, quantize_int8
from .verify import VerifyReport, verify_files

__all__ = ["FORMATS", "ExportResult", "export_model", "parse_formats"]

FORMATS = ("onnx", "safetensors")


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: ``files`` (name -> what it is) and the verification."""

    folder: Path
    files: dict[str, str] = field(default_factory=dict)
    report: VerifyReport | None = None
    int8_mode: str | None = None


def parse_formats(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"onnx,safetensors"`` (or a list) -> a checked tuple of formats."""
    items = value.split(",") if isinstance(value, str) else list(value)
    formats = tuple(dict.fromkeys(v.strip().lower() for v in items if v.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(
            f"Unknown export format(s) {', '.join(unknown) or '(none)'}; use a comma-separated "
            f"list of {', '.join(FORMATS)}."
        )
    return formats


def export_model(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    formats: str | Sequence[str] = FORMATS,
    with_preprocessing: bool = False,
    fp16: bool = False,
    int8: bool = False,
    calibration: str | os.PathLike[str] | None = None,
    calibration_size: int = 256,
    verify: bool = True,
    verify_images: str | os.PathLike[str] | None = None,
    head: bool = False,
    providers: str = "auto",
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export the model at ``source`` (anything :func:`mocohub.load` takes) into ``out``.

    Args:
        formats: ``onnx`` and/or ``safetensors``.
        with_preprocessing: also write ``pixels`` graphs (uint8 in, normalised out).
        fp16, int8: also write those precisions of every ONNX graph.
        calibration: a folder of images for static int8 quantization.
        calibration_size: how many of its images to use.
        verify: run the parity checks (a failure raises
            :class:`~mocohub.export.verify.VerificationError` after writing verify.json).
        verify_images: real images for the checks (default: the calibration folder).
        head: keep the projection head (the graphs then output the MoCo embedding).
        providers: onnxruntime providers for the checks.
        log: where progress lines go.
    """
    chosen = parse_formats(formats)
    if "onnx" not in chosen and (with_preprocessing or fp16 or int8 or calibration):
        raise ConfigError(
            "--with-preprocessing, --fp16, --int8 and --calibration make ONNX files; add onnx "
            "to --format."
        )
    if calibration is not None and not int8:
        raise ConfigError("--calibration is for int8 quantization; add --int8.")
    model = load(source, head=head)
    config = get_config(model)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result = ExportResult(folder)
    prep = config.preprocessing
    calib: ImageSet | None = None
    if calibration is not None:
        calib = load_image_folder(calibration, prep, limit=calibration_size)
        _log_skipped(log, calibration, calib)
    if "safetensors" in chosen:
        from mocohub.hf import save_pretrained

        save_pretrained(model, folder, config=config)
        result.files.update(
            {"model.safetensors": "weights", CONFIG_NAME: "config", "README.md": "model card"}
        )
        log(f"wrote {folder / 'model.safetensors'}, config.json, README.md")
    else:
        atomic_write_text(folder / CONFIG_NAME, json.dumps(config.to_dict(), indent=2) + "\n")
        result.files[CONFIG_NAME] = "config"
    if "onnx" in chosen:
        log(f"exporting {config.arch} to ONNX ...")
        core = export_onnx(model)
        variants: dict[str, onnx.ModelProto] = {"fp32": core}
        if fp16:
            variants["fp16"] = to_fp16(core)
        if int8:
            calibration_data = None if calib is None else calib.tensors.numpy()
            result.int8_mode = "dynamic" if calib is None else f"static ({len(calib.names)} images)"
            log(f"quantizing to int8, {result.int8_mode} ...")
            variants["int8"] = quantize_int8(core, calibration=calibration_data)
        for precision, proto in variants.items():
            suffix = "" if precision == "fp32" else f".{precision}"
            graphs = {f"model{suffix}.onnx": proto}
            if with_preprocessing:
                graphs[f"model.preprocess{suffix}.onnx"] = pixels_graph(proto, prep)
            for name, graph in graphs.items():
                save_onnx(add_metadata(graph, config, precision=precision), folder / name)
                result.files[name] = precision
                log(f"wrote {folder / name}")
    for name in [*MODEL_FILES, "verify.json"]:  # a folder describes one model, checked once
        stale = folder / name
        if name not in result.files and stale.is_file():
            stale.unlink()
            log(f"removed {stale}, left by an earlier export")
    if verify and "onnx" in chosen:
        images = calib
        if verify_images is not None:
            images = load_image_folder(verify_images, prep, limit=calibration_size)
            _log_skipped(log, verify_images, images)
        onnx_files = {n: p for n, p in result.files.items() if n.endswith(".onnx")}
        report = verify_files(model, onnx_files, folder=folder, images=images, providers=providers)
        result.report = report
        atomic_write_text(folder / "verify.json", json.dumps(report.to_dict(), indent=2) + "\n")
        result.files["verify.json"] = "verification"
        log(report.table())
        if images is None:
            log("(no real images given: pass --verify-images DIR to check on your own images)")
        report.raise_for_failure()
        log(f"verified: every file within its bound; details in {folder / 'verify.json'}")
    return result


def _log_skipped(
    log: Callable[[str], None], folder: str | os.PathLike[str], images: ImageSet
) -> None:
    if images.skipped:
        shown = ", ".join(images.skipped[:3]) + (" ..." if len(images.skipped) > 3 else "")
        log(f"skipped {len(images.skipped)} unreadable file(s) in {folder}: {shown}")
