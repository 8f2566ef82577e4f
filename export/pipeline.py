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
``verify.json``                   the parity checks (unless ``--no-verify``) and
                                  ``weights_sha256``
================================  ===============================================

Every ONNX graph's metadata and ``verify.json`` name the SHA-256 of the
``model.safetensors`` they were made from (``weights_sha256``; also for an
ONNX-only export, whose weights are not shipped), and every loader refuses a
folder whose files disagree (:class:`~mocohub.artifact.ArtifactMismatchError`).

The folder is built and verified beside the target and swapped in as a whole
(:mod:`mocohub.export.publish`), so an interrupted export (even during
verification) leaves the earlier export complete, and one that fails
verification leaves it too (its files go to ``OUT.rejected``). Model files of
an earlier export that this one does not write are gone with the old folder;
other files in it (notes, subfolders) are carried over.

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
import torch

from mocohub.artifact import (
    CONFIG_NAME,
    VERIFY_NAME,
    WEIGHTS_DIGEST_KEY,
    WEIGHTS_NAME,
    ModelConfig,
    get_config,
)
from mocohub.errors import ConfigError
from mocohub.fileio import atomic_write_text, disk_errors
from mocohub.loading import load
from mocohub.publish import file_sha256

from .model_files import MODEL_FILES
from .onnx import add_metadata, export_onnx, save_onnx, to_fp16
from .onnx import with_preprocessing as pixels_graph
from .publish import prepare_target, publish, reject, staging_folder
from .quantize import VIT_OP_TYPES, ImageSet, load_image_folder, quantize_int8
from .verify import VerifyReport, verify_files

__all__ = ["FORMATS", "ExportResult", "export_model", "parse_formats"]

FORMATS = ("onnx", "safetensors")
#: the files an export writes; others found in the target folder are kept
ARTIFACT_FILES = frozenset({WEIGHTS_NAME, CONFIG_NAME, "README.md", VERIFY_NAME, *MODEL_FILES})


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: ``files`` (name -> what it is) and the verification."""

    folder: Path
    files: dict[str, str] = field(default_factory=dict)
    report: VerifyReport | None = None
    int8_mode: str | None = None
    weights_sha256: str = ""


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

    The folder is built and verified beside ``out`` and swapped in only when
    complete (see :mod:`mocohub.export.publish`): an interrupted or failed
    export leaves ``out`` as it was.

    Args:
        formats: ``onnx`` and/or ``safetensors``.
        with_preprocessing: also write ``pixels`` graphs (uint8 in, normalised out).
        fp16, int8: also write those precisions of every ONNX graph.
        calibration: a folder of images for static int8 quantization.
        calibration_size: how many of its images to use.
        verify: run the parity checks (a failure raises
            :class:`~mocohub.export.verify.VerificationError`; the files go to
            ``OUT.rejected`` beside ``out``, with verify.json).
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
    target = prepare_target(out)
    model = load(source, head=head)
    config = get_config(model)
    prep = config.preprocessing
    calib: ImageSet | None = None
    if calibration is not None:
        calib = load_image_folder(calibration, prep, limit=calibration_size)
        _log_skipped(log, calibration, calib)
    images = calib
    if verify and "onnx" in chosen and verify_images is not None:
        images = load_image_folder(verify_images, prep, limit=calibration_size)
        _log_skipped(log, verify_images, images)
    with disk_errors(target), staging_folder(target) as staging:
        result = ExportResult(target)
        _write_files(
            model, config, chosen, staging, result, with_preprocessing, fp16, int8, calib, log
        )
        if verify and "onnx" in chosen:
            onnx_files = {n: p for n, p in result.files.items() if n.endswith(".onnx")}
            report = verify_files(
                model, onnx_files, folder=staging, images=images, providers=providers
            )
            record = {**report.to_dict(), WEIGHTS_DIGEST_KEY: result.weights_sha256}
            atomic_write_text(staging / VERIFY_NAME, json.dumps(record, indent=2) + "\n")
            result.files[VERIFY_NAME] = "verification"
            result.report = report
            log(report.table())
            if images is None:
                log("(no real images given: pass --verify-images DIR to check on real images)")
            if not report.passed:
                report.folder = str(reject(staging, target))
                report.raise_for_failure()
        for name in publish(staging, target, ARTIFACT_FILES):
            log(f"removed {target / name}, left by an earlier export")
    for name in result.files:
        log(f"wrote {target / name}")
    if result.report is not None:
        log(f"verified: every file within its bound; details in {target / VERIFY_NAME}")
    return result


def _write_files(
    model: torch.nn.Module,
    config: ModelConfig,
    chosen: tuple[str, ...],
    folder: Path,
    result: ExportResult,
    with_preprocessing: bool,
    fp16: bool,
    int8: bool,
    calib: ImageSet | None,
    log: Callable[[str], None],
) -> None:
    """Write the model files into ``folder`` (the staging folder); fill ``result``."""
    from mocohub.hf import save_pretrained

    # The weights are written (and hashed) even for an ONNX-only export: the hash ties
    # the graphs to the weights they were made from and to verify.json.
    save_pretrained(model, folder, config=config)
    result.weights_sha256 = file_sha256(folder / WEIGHTS_NAME)
    if "safetensors" in chosen:
        result.files.update(
            {WEIGHTS_NAME: "weights", CONFIG_NAME: "config", "README.md": "model card"}
        )
    else:
        for name in (WEIGHTS_NAME, "README.md"):
            (folder / name).unlink()
        result.files[CONFIG_NAME] = "config"
    if "onnx" not in chosen:
        return
    log(f"exporting {config.arch} to ONNX ...")
    core = export_onnx(model)
    variants: dict[str, onnx.ModelProto] = {"fp32": core}
    if fp16:
        variants["fp16"] = to_fp16(core)
    if int8:
        calibration_data = None if calib is None else calib.tensors.numpy()
        result.int8_mode = "dynamic" if calib is None else f"static ({len(calib.names)} images)"
        log(f"quantizing to int8, {result.int8_mode} ...")
        op_types = VIT_OP_TYPES if config.is_vit else None  # a ViT: its matrix products only
        variants["int8"] = quantize_int8(core, calibration=calibration_data, op_types=op_types)
    for precision, proto in variants.items():
        suffix = "" if precision == "fp32" else f".{precision}"
        graphs = {f"model{suffix}.onnx": proto}
        if with_preprocessing:
            graphs[f"model.preprocess{suffix}.onnx"] = pixels_graph(proto, config.preprocessing)
        for name, graph in graphs.items():
            digest = result.weights_sha256
            save_onnx(
                add_metadata(graph, config, precision=precision, weights_sha256=digest),
                folder / name,
            )
            result.files[name] = precision


def _log_skipped(
    log: Callable[[str], None], folder: str | os.PathLike[str], images: ImageSet
) -> None:
    if images.skipped:
        shown = ", ".join(images.skipped[:3]) + (" ..." if len(images.skipped) > 3 else "")
        log(f"skipped {len(images.skipped)} unreadable file(s) in {folder}: {shown}")
