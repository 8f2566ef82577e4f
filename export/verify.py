"""Does an exported graph give the PyTorch model's embeddings? Parity checks and their table.

Each exported file is run in onnxruntime (:class:`~mocohub.export.OnnxEmbedder`,
default providers) on two input sets and compared with the fp32 PyTorch model
on the same inputs:

- ``random``: 21 images of uniform noise, fed in batches of 1, 3 and 17
  (this also checks the dynamic batch dimension);
- ``images``: real images (``--verify-images`` or the calibration folder), or,
  when none are given, ``synthetic`` smooth random images (the table says which).

Per set: the lowest and the mean cosine similarity between matching rows, the
largest absolute difference, and the top-10 neighbour agreement (for each
image, the share of its 10 nearest neighbours in the PyTorch embeddings that
are also among its 10 nearest in the exported ones). A file passes when its
lowest cosine reaches :data:`BOUNDS` for its precision on every set.

Example:
    >>> report = verify_files(model, {"model.onnx": "fp32"}, folder="out/onnx")
    >>> print(report.table())
    >>> report.raise_for_failure()
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mocohub.artifact import get_config
from mocohub.errors import MocohubError

from .onnx import PIXELS
from .onnx_embedder import OnnxEmbedder
from .quantize import ImageSet

__all__ = ["BOUNDS", "Check", "VerificationError", "VerifyReport", "neighbour_agreement"]

#: the lowest cosine similarity to PyTorch fp32 each precision must reach
BOUNDS = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}
RANDOM_BATCHES = (1, 3, 17)


class VerificationError(MocohubError):
    """An exported graph's embeddings are further from PyTorch's than its bound allows."""


@dataclass
class Check:
    """One exported file on one input set."""

    file: str
    precision: str
    inputs: str
    n: int
    cosine_min: float
    cosine_mean: float
    max_abs_error: float
    top10_agreement: float | None
    bound: float
    providers: str

    @property
    def passed(self) -> bool:
        return math.isfinite(self.cosine_min) and self.cosine_min >= self.bound


@dataclass
class VerifyReport:
    """The checks of one export; :meth:`table` prints them, :meth:`raise_for_failure` judges."""

    checks: list[Check]
    folder: str

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def worst(self) -> Check | None:
        """The failing check furthest under its bound (relative to 1 - bound), or None."""
        failed = [c for c in self.checks if not c.passed]
        return max(failed, key=_shortfall, default=None)

    def table(self) -> str:
        """A fixed-width text table, one row per check."""
        head = (
            "file",
            "prec",
            "inputs",
            "n",
            "cos min",
            "cos mean",
            "max abs err",
            "top-10 (info)",
            "cos bound",
            "ok",
        )
        rows = [
            (
                c.file,
                c.precision,
                c.inputs,
                str(c.n),
                f"{c.cosine_min:.6f}",
                f"{c.cosine_mean:.6f}",
                f"{c.max_abs_error:.3g}",
                "-" if c.top10_agreement is None else f"{c.top10_agreement:.3f}",
                f"{c.bound:g}",
                "yes" if c.passed else "NO",
            )
            for c in self.checks
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in [head, *rows]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "bounds": BOUNDS,
            "checks": [{**asdict(c), "passed": c.passed} for c in self.checks],
        }

    def raise_for_failure(self) -> None:
        """Raise :class:`VerificationError` naming the worst case when any check failed."""
        worst = self.worst()
        if worst is None:
            return
        count = sum(not c.passed for c in self.checks)
        raise VerificationError(
            f"Verification failed ({count} check(s)); worst: {worst.file} on {worst.inputs} "
            f"inputs has cosine {worst.cosine_min:.6f} to PyTorch, under its {worst.precision} "
            f"bound {worst.bound:g} (max abs error {worst.max_abs_error:.3g}). The files are in "
            f"{self.folder} with verify.json; do not ship them as they are."
        )


def _shortfall(check: Check) -> float:
    if not math.isfinite(check.cosine_min):
        return math.inf
    return (check.bound - check.cosine_min) / (1.0 - check.bound)


def neighbour_agreement(reference: np.ndarray, other: np.ndarray, k: int = 10) -> float | None:
    """Mean share of each row's ``k`` nearest neighbours (cosine, itself excluded) kept."""
    n = len(reference)
    if n < 2:
        return None
    k = min(k, n - 1)

    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1, kind="stable")[:, :k]

    a, b = neighbours(reference.astype(np.float64)), neighbours(other.astype(np.float64))
    return float(np.mean([len(set(r) & set(o)) / k for r, o in zip(a, b, strict=True)]))


def _compare(reference: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    ref, got = reference.astype(np.float64), out.astype(np.float64)
    if not np.all(np.isfinite(got)):
        return math.nan, math.nan, math.inf
    cos = (ref * got).sum(1) / np.maximum(
        np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-30
    )
    return float(cos.min()), float(cos.mean()), float(np.abs(ref - got).max())


def noise_pixels(size: int, n: int = sum(RANDOM_BATCHES), seed: int = 0) -> np.ndarray:
    """``n`` images of uniform noise, uint8 (n, size, size, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def synthetic_pixels(size: int, n: int = 64, seed: int = 1) -> np.ndarray:
    """``n`` smooth random colour images (bilinear-upsampled 4x4 grids), uint8 (n, S, S, 3)."""
    grid = torch.from_numpy(np.random.default_rng(seed).random((n, 3, 4, 4), dtype=np.float32))
    up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    return (up.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def _torch_reference(model: torch.nn.Module, pixels: np.ndarray, normalise: bool) -> np.ndarray:
    prep = get_config(model).preprocessing
    x = prep.batch()(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    return _run_torch(model, x, normalise)


def _run_torch(model: torch.nn.Module, x: torch.Tensor, normalise: bool) -> np.ndarray:
    with torch.inference_mode():
        out = torch.cat([model(chunk) for chunk in x.split(64)])
        return (F.normalize(out, dim=1) if normalise else out).float().numpy()


def _run_onnx(embedder: OnnxEmbedder, x: np.ndarray, batches: tuple[int, ...]) -> np.ndarray:
    outs, start = [], 0
    sizes = list(batches) if batches else [64] * math.ceil(len(x) / 64)
    for size in sizes:
        chunk = x[start : start + size]
        start += size
        if len(chunk):
            out = embedder.embed_batch(chunk)
            if out.shape != (len(chunk), embedder.dim):
                raise VerificationError(
                    f"{embedder.path.name} returned shape {out.shape} for a batch of "
                    f"{len(chunk)}; expected ({len(chunk)}, {embedder.dim})."
                )
            outs.append(out)
    return np.concatenate(outs)


def verify_files(
    model: torch.nn.Module,
    files: dict[str, str],
    *,
    folder: str | os.PathLike[str],
    images: ImageSet | None = None,
    providers: str = "auto",
) -> VerifyReport:
    """Check every ``files`` entry (file name in ``folder`` -> precision) against ``model``.

    Example:
        >>> verify_files(model, {"model.int8.onnx": "int8"}, folder="out", images=imgs).passed
        True
    """
    model = model.float().eval()
    prep = get_config(model).preprocessing
    noise = noise_pixels(prep.image_size)
    if images is not None:
        real_name, real_pixels, real_tensors = "images", images.pixels, images.tensors
    else:
        real_name, real_pixels = "synthetic", synthetic_pixels(prep.image_size)
        real_tensors = prep.batch()(torch.from_numpy(real_pixels).permute(0, 3, 1, 2))
    noise_tensors = prep.batch()(torch.from_numpy(noise).permute(0, 3, 1, 2))
    references: dict[tuple[str, bool], np.ndarray] = {}
    for normalise in (False, True):
        references["random", normalise] = _run_torch(model, noise_tensors, normalise)
        if normalise:
            references[real_name, True] = _torch_reference(model, real_pixels, True)
        else:
            references[real_name, False] = _run_torch(model, real_tensors, False)
    checks = []
    for name, precision in files.items():
        embedder = OnnxEmbedder(Path(folder) / name, providers)
        pixels = embedder.input == PIXELS
        inputs = {
            "random": noise if pixels else noise_tensors.numpy(),
            real_name: real_pixels if pixels else real_tensors.numpy(),
        }
        for set_name, x in inputs.items():
            batches = RANDOM_BATCHES if set_name == "random" else ()
            out = _run_onnx(embedder, x, batches)
            reference = references[set_name, pixels]
            cos_min, cos_mean, err = _compare(reference, out)
            checks.append(
                Check(
                    file=name,
                    precision=precision,
                    inputs=set_name,
                    n=len(x),
                    cosine_min=cos_min,
                    cosine_mean=cos_mean,
                    max_abs_error=err,
                    top10_agreement=neighbour_agreement(reference, out),
                    bound=BOUNDS[precision],
                    providers=",".join(embedder.providers),
                )
            )
    return VerifyReport(checks, str(folder))
