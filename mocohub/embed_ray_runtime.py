"""Ray's side of ``mocohub embed --engine ray``: Ray itself, and the code its workers run.

- :func:`require_ray`: Ray Data is installed, or one error saying how to install it;
- :func:`ray_session`: the Ray cluster joined (or a local instance started) for a
  run, :func:`quiet_ray_data`: Ray Data's console kept to warnings while mocohub
  reports progress and errors itself;
- :func:`batch_items`, :class:`DecodeTask`, :class:`ModelActor`: a batch's items
  as a dataset row, the task that decodes them with the local engine's decoder,
  and the actor that runs the model on the decoded batch;
- :func:`mocohub_error`: a failure inside Ray as one mocohub error.

What the driver does with them is :mod:`mocohub.embed_ray`'s.

Example:
    >>> with ray_session("auto") as ray, quiet_ray_data(ray):
    ...     ray.cluster_resources()["CPU"]
    64.0
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from mocohub.embed_decode import Collate, DecodedFiles
from mocohub.embed_sources import Inputs
from mocohub.errors import ConfigError, MocohubError
from mocohub.features import Embedder
from mocohub.preprocessing import Preprocessing

__all__ = [
    "INSTALL",
    "DecodeTask",
    "ModelActor",
    "batch_items",
    "mocohub_error",
    "quiet_ray_data",
    "ray_session",
    "require_ray",
]

INSTALL = 'pip install "mocohub[ray]"'
_RAISED = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt): ")  # a traceback's last line


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or a :class:`ConfigError` saying how to install it.

    Example:
        >>> require_ray().__name__
        'ray'
    """
    try:
        import ray
        import ray.data  # ray[data]: its pandas and pyarrow
    except ImportError as e:
        raise ConfigError(
            f"--engine ray needs Ray Data, which is not installed ({e}); run `{INSTALL}`."
        ) from e
    return ray


def batch_items(names: Sequence[str], source: Inputs | None, j: int, b: int) -> str:
    """Batch ``j``'s items, as a decoding task rebuilds them (JSON: no schema to infer)."""
    span = range(j * b, min((j + 1) * b, len(names)))
    if source is None:
        return json.dumps({"names": [names[i] for i in span]})
    return json.dumps(
        {
            "names": [source.names[i] for i in span],
            "files": [source.files[i] for i in span],
            "spans": [source.spans[i] for i in span],
            "problems": {
                str(n): source.problems[i] for n, i in enumerate(span) if i in source.problems
            },
        }
    )


class DecodeTask:
    """A Ray task's job: one batch's files -> its crops (one array) and its failures."""

    def __init__(
        self, prep: Preprocessing, max_pixels: int | None, normalise: bool, channels_last: bool
    ) -> None:
        self.prep, self.max_pixels, self.normalise = prep, max_pixels, normalise
        self.collate = Collate(prep, channels_last)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        items = json.loads(str(batch["items"][0]))
        names = items["names"]
        source = None
        if "files" in items:
            spans = [None if s is None else (s[0], s[1]) for s in items["spans"]]
            problems = {int(n): reason for n, reason in items["problems"].items()}
            source = Inputs(names, items["files"], spans, problems)
        files = DecodedFiles(names, self.prep, self.max_pixels, 1, self.normalise, source)
        record = self.collate(files.__getitems__(list(range(len(names)))))
        s, c = self.prep.image_size, self.prep.channels
        if record["images"] is None:
            crops = np.zeros((0, s, s, c), np.float32 if self.normalise else np.uint8)
        else:  # (N, C, S, S) in channels_last order -> the (N, S, S, C) array it views
            crops = record["images"].permute(0, 2, 3, 1).numpy()
        decoded = {"rows": record["rows"], "failed": record["failed"]}
        return {"batch": batch["batch"], "decoded": [json.dumps(decoded)], "crops": crops[None]}


class ModelActor:
    """A Ray actor's job: the model, opened once, run on each decoded batch.

    A mocohub error (a model that does not open on ``--device``, ...) comes
    back as the batch's answer, and the driver raises it: Ray would hand it
    over as text only (an exception's cause does not survive its pickling).
    """

    def __init__(
        self, open_embedder: Callable[..., Embedder], precision: str, channels_last: bool
    ) -> None:
        self.failure: MocohubError | None = None
        try:
            self.embedder = open_embedder(precision)
            self.collate = Collate(self.embedder.preprocessing, channels_last)
        except MocohubError as e:
            self.failure = e

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        record = json.loads(str(batch["decoded"][0]))
        features = np.zeros((1, 0, 0), np.float32)
        try:
            if self.failure is not None:
                raise self.failure
            crops = np.asarray(batch["crops"][0])
            if len(crops):
                raw = self.embedder.embed_batch(self.collate.stack(list(crops)))
            else:
                raw = np.zeros((0, self.embedder.dim), np.float32)
            features = np.asarray(raw, np.float32)[None]
            record["precision"] = getattr(self.embedder, "precision", None)
        except MocohubError as e:
            record["error"] = pickle.dumps(e).hex()
        return {"batch": batch["batch"], "record": [json.dumps(record)], "features": features}


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, joined (or started) for this run, and shut down after it if this run started it."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,  # the workers' output is in the session's logs
                logging_level=logging.WARNING,
            )
        except Exception as e:  # Ray raises plain Exception too (a node that did not start)
            where = f"at {address}" if address else "on this machine"
            raise MocohubError(
                f"Cannot start or join a Ray cluster {where} ({e}); start one (`ray start "
                "--head`) and pass --address auto, or check --address."
            ) from e
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


class _ConsoleFilter(logging.Filter):
    """Ray Data's console lines while mocohub runs it: warnings only (mocohub reports errors)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return logging.WARNING <= record.levelno < logging.ERROR


@contextlib.contextmanager
def quiet_ray_data(ray: Any) -> Iterator[None]:
    """No Ray Data progress bars and progress lines (mocohub's own bar counts the images), and
    no error tracebacks on the console: the run ends with one mocohub error instead (Ray Data's
    log file, in the Ray session's logs folder, keeps everything)."""
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False
    console = [  # Ray Data's log files (its own handler class) keep everything
        h
        for h in logging.getLogger("ray.data").handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    quiet = _ConsoleFilter()
    for handler in console:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        context.enable_progress_bars = bars
        for handler in console:
            handler.removeFilter(quiet)


def mocohub_error(error: BaseException) -> MocohubError:
    """A failure inside Ray (a worker that died, a bug) as one mocohub error.

    Its line names the exception the worker raised, found in the text Ray
    gives (``ValueError: ...``); Ray's logs hold the rest.
    """
    text = str(error)
    raised = [
        line.strip()
        for line in text.splitlines()
        if _RAISED.match(line) and not line.startswith("ray.")
    ]
    what = raised[0] if raised else (text.strip().splitlines() or [type(error).__name__])[0]
    return MocohubError(
        f"The Ray job failed ({what}); the finished parts are kept: rerun the same command "
        "to resume (Ray's logs: /tmp/ray/session_latest/logs)."
    )
