"""Watching a run: the metrics log (JSONL, TensorBoard, a PNG of the curves)
and the k-NN monitor.

Only rank 0 writes; the k-NN monitor runs on every rank (each embeds a share
of the data with rank 0's encoder, BN statistics included) and its result is
the same everywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from mocohub.errors import InputError
from mocohub.knn import knn_accuracy

from .config import TrainConfig
from .distributed import DistributedEnv, broadcast_buffers_from_rank0

__all__ = ["KnnMonitor", "MetricsLog", "plot_curves", "pooled_features", "truncate_metrics"]

logger = logging.getLogger(__name__)


def _position(record: dict[str, Any]) -> tuple[int, int] | None:
    """Where a record was written, as a checkpoint's ``(epoch, step)`` (None: unknown).

    A step record ``{"epoch": e, "step": s}`` comes after step ``s`` of epoch
    ``e`` (1-based), i.e. at ``(e - 1, s)``; an epoch summary of epoch ``e``
    is written before the checkpoint ``(e, 0)`` that follows it.
    """
    try:
        epoch = int(record["epoch"])
        if record.get("event") == "epoch":
            return epoch, 0
        return epoch - 1, int(record["step"])
    except (KeyError, TypeError, ValueError):
        return None


def truncate_metrics(path: Path, point: tuple[int, int]) -> int:
    """Cut ``metrics.jsonl`` back to what a run had written when it saved checkpoint ``point``.

    On resume from ``point`` (``(epoch, step)``, see
    :func:`mocohub.training.checkpoint.checkpoint_point`) the records written
    after that checkpoint are written again, so they are dropped here, and so
    is a line torn by a kill: the log then equals an uninterrupted run's.
    The file is replaced atomically. Returns the number of lines dropped.

    Example:
        >>> truncate_metrics(Path("runs/a/metrics.jsonl"), (1, 0))
        3
    """
    from mocohub.fileio import atomic_write_text

    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += bool(line.strip())  # torn by a kill, or not ours: it cannot be placed
            continue
        position = _position(record) if isinstance(record, dict) else None
        if position is not None and position > point:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (and TensorBoard, when installed).

    Example:
        >>> log = MetricsLog(Path("runs/a"))
        >>> log.write({"epoch": 1, "step": 10, "loss": 7.2}); log.close()
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._file = self.path.open("a") if enabled else None
        self._tensorboard: Any = None
        if enabled:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        record = {**record, "time": round(time.time(), 3)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            prefix = "epoch" if record.get("event") == "epoch" else "train"
            position = record["epoch"] if prefix == "epoch" else record.get("global_step", 0)
            for key, value in record.items():
                if isinstance(value, int | float) and key not in (
                    "epoch",
                    "step",
                    "global_step",
                    "time",
                ):
                    self._tensorboard.add_scalar(f"{prefix}/{key}", value, position)

    def close(self, *, quiet: bool = False) -> None:
        """Close the log and draw ``curves.png`` from it.

        The curves are a convenience: when they cannot be drawn or written
        (a full or read-only disk), a warning says so (none when ``quiet``,
        for a run already failing with its own message) and nothing is raised.
        """
        if self._file is not None:
            file, self._file = self._file, None
            file.close()
            try:
                plot_curves(self.path, self.path.with_name("curves.png"))
            except (OSError, ValueError, RuntimeError) as error:
                if not quiet:
                    logger.warning("mocohub: could not draw curves.png (%s).", error)
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


#: Scores drawn beside the loss, when the log has them: the k-NN monitor's, COCO AP.
_SCORES = {"knn_top1": "k-NN top-1", "bbox_AP": "box AP", "segm_AP": "mask AP"}


def plot_curves(metrics: Path, out: Path) -> Path | None:
    """Draw the loss and the scores (k-NN accuracy, COCO AP) per epoch from ``metrics.jsonl``
    as a PNG.

    Uses matplotlib when it is installed (without it, nothing is drawn: the
    JSONL file holds the same numbers), through a bare ``Figure``: pyplot and
    the process's backend (a notebook's, say) are left alone. The PNG is
    written atomically.

    Example:
        >>> plot_curves(Path("runs/a/metrics.jsonl"), Path("runs/a/curves.png"))
        PosixPath('runs/a/curves.png')
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    from mocohub.fileio import atomic_write_bytes

    epochs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    epochs = [r for r in epochs if r.get("event") == "epoch"]
    if not epochs:
        return None
    figure = Figure(figsize=(6, 3.5), dpi=120)
    loss_axis = figure.add_subplot()
    loss_axis.plot([r["epoch"] for r in epochs], [r.get("loss", math.nan) for r in epochs], "C0")
    detection = any("loss_classifier" in r for r in epochs)  # finetune-det's epochs
    loss_axis.set(xlabel="epoch", ylabel="detection loss" if detection else "InfoNCE loss")
    score_axis, labels = None, []
    for color, (key, label) in enumerate(_SCORES.items(), start=1):
        scored = [r for r in epochs if isinstance(r.get(key), int | float)]
        if scored:
            score_axis = score_axis or loss_axis.twinx()
            x, y = [r["epoch"] for r in scored], [r[key] for r in scored]
            score_axis.plot(x, y, f"C{color}o-", label=label)
            labels.append(label)
    if score_axis is not None:
        score_axis.set_ylabel(", ".join(labels))
        if len(labels) > 1:
            score_axis.legend(loc="best", fontsize="small")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    atomic_write_bytes(out, png.getvalue())
    return out


@contextlib.contextmanager
def pooled_features(encoder: nn.Module) -> Iterator[nn.Module]:
    """The encoder with its projection (``fc``) set aside, in eval mode."""
    head, was_training = encoder.fc, encoder.training
    encoder.fc = nn.Identity()
    encoder.eval()
    try:
        yield encoder
    finally:
        encoder.fc = head
        encoder.train(was_training)


class KnnMonitor:
    """Weighted k-NN top-1/top-5 of the query encoder's features on labelled data.

    ``data`` is ``(bank, queries)``: the bank's train split is the memory bank,
    and the queries' val split is classified (for a folder with train/ and
    val/, or IDX files, pass the same source twice; a source without a val split
    is classified leave-one-out, each image by the others). Query labels follow
    the bank's class names (:func:`~mocohub.training.datasets.align_classes`).
    Images are preprocessed as for evaluation: normalised, and resized and
    centre-cropped only when they are not already at the training crop size.
    """

    def __init__(
        self, data: tuple[Any, Any], config: TrainConfig, info: Any, env: DistributedEnv
    ) -> None:
        from mocohub.preprocessing import Preprocessing, eval_resize_size

        from .data import resolve_dataset
        from .datasets import align_classes
        from .eval_data import EvalBatches, same_images
        from .views import channel_stats

        self.config, self.env = config, env
        size = config.image_size
        mean, std = channel_stats(config, info.channels)
        prep = Preprocessing(size, eval_resize_size(size), mean, std, channels=info.channels)
        try:
            bank, bank_info = resolve_dataset(data[0], "train")
            queries, queries_info = resolve_dataset(data[1], "val")
        except InputError as e:  # e.g. a folder a resumed run's config.json names, now gone
            raise InputError(
                f"The k-NN monitor's data: {e} (--knn-train and --knn-val are kept in the run's "
                "config.json: give them again, or --knn-val none to train without the monitor.)"
            ) from e
        queries, queries_info = align_classes(bank_info, queries, queries_info, task="k-NN")
        # The same images on both sides (a folder without a val split): each is classified
        # by the others, never by itself, which would score about 100% at k=1.
        self.leave_one_out = same_images(bank, bank_info, queries, queries_info)
        if self.leave_one_out and env.is_main:
            logger.warning(
                "mocohub: the k-NN monitor's data (%s) has no separate validation split; "
                "each image is classified by the others (leave-one-out).",
                queries_info.source,
            )
        sides = [(bank, bank_info)] + ([] if self.leave_one_out else [(queries, queries_info)])
        self.batches = [
            EvalBatches(dataset, data_info, prep, "auto", env, workers=config.workers)
            for dataset, data_info in sides
        ]

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """k-NN top-1/top-5 of ``encoder``'s pooled features; every rank must call it.

        Under DDP each rank's BatchNorm running statistics follow its own
        batches (no buffer sync per step), so rank 0's are copied to every rank
        first: all shares are embedded by the model that rank 0 saves.

        Example:
            >>> monitor(model.encoder_q)
            {'knn_top1': 0.71, 'knn_top5': 0.97}
        """
        from .eval_data import extract_features

        broadcast_buffers_from_rank0(encoder)
        with pooled_features(encoder) as backbone:
            features = [extract_features(backbone, b, self.env) for b in self.batches]
        bank, queries = features[0], features[-1]
        result = knn_accuracy(*bank, *queries, k=self.config.knn_k, t=self.config.knn_t,
                              leave_one_out=self.leave_one_out)  # fmt: skip
        return {"knn_top1": result["top1"], "knn_top5": result["top5"]}
