"""``mocohub embed --engine ray``: the embed pipeline's work spread over a Ray cluster by Ray Data.

The run is the local one (:func:`mocohub.embed.embed_files`: the same input
list, batches, parts, resume key, manifest, errors file and record); only the
running of its pending parts moves to Ray:

- each batch of the global input list (the same ``batch_size`` paths a local
  run puts in it) is one row of a Ray dataset; a Ray task decodes it with the
  local path's decoder (:class:`~mocohub.embed_decode.DecodedFiles` and
  :class:`~mocohub.embed_decode.Collate`), unreadable files becoming records;
- ``map_batches`` with a callable class runs the model in a pool of
  ``concurrency`` actors, each holding ``num_gpus_per_worker`` GPUs and
  loading the model once (the ``open_embedder`` a local run uses);
- the driver collects the features, batch by batch in any order, and saves
  each part, once all its batches are back, through the local path's own
  code, which keeps and L2-normalises the rows and writes the part.

So the outputs are those of a local run with the same settings, row for row,
written by the same writer: with the same precision and the same threads per
model, the same bytes (each image is embedded in the same batch), and the
record is the same, so a later local run finds them up to date and the other
way round. A finished part survives a failure of the job: rerunning the same
command resumes. With ``precision="auto"`` each actor checks the precision it
picked on its first batch (:class:`~mocohub.features.TorchEmbedder`); parts of
batches that disagree with the one the run recorded are embedded again with it.

With GPUs, decoding runs in CPU tasks while the actors hold the GPUs. On a
CPU-only cluster the decoding tasks and the actors ask for the same resources,
and Ray Data fuses the two steps into the actors (its operator fusion), which
saves copying each decoded batch through the object store.

Inputs are those of a local run (folders, image files, ``.txt`` lists,
webdataset shards, Parquet/CSV tables): every worker opens the files itself, so
the paths must name the same files on every node (a shared file system).

Example:
    >>> result = embed_files_ray(scan_sources(["photos/"]), "feats.npy", settings, opener,
    ...                          RayOptions(address="auto", num_gpus_per_worker=1))
    >>> result.rows, result.skipped
    (1998, 2)
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mocohub.embed import EmbedResult, EmbedSettings, _embed_part, embed_files
from mocohub.embed_ray_runtime import (
    DecodeTask,
    ModelActor,
    batch_items,
    mocohub_error,
    quiet_ray_data,
    ray_session,
    require_ray,
)
from mocohub.embed_sources import Inputs
from mocohub.errors import ConfigError, InputError, MocohubError
from mocohub.features import Embedder
from mocohub.fileio import atomic_write_text
from mocohub.preprocessing import Preprocessing

__all__ = ["RayOptions", "check_ray_command", "embed_files_ray"]

# what a decoding task says of a file it cannot find (mocohub.imageio, mocohub.embed_sources)
_NOT_FOUND = ("file not found", "cannot read its tar file")


def check_ray_command(launched: bool, workers: int | None) -> None:
    """What ``mocohub embed --engine ray`` checks first: Ray is there, and no other engine is asked.

    ``launched``: torchrun or srun started this process, or ``--nproc-per-node``
    would; ``workers``: the ``--workers`` given (None: not given).

    Example:
        >>> check_ray_command(launched=False, workers=None)  # ConfigError when Ray is missing
    """
    require_ray()
    if launched:
        raise ConfigError(
            "--engine ray spreads the work over the Ray cluster itself; run it as one "
            "process, without torchrun, srun or --nproc-per-node."
        )
    if workers is not None:
        raise ConfigError(
            "--workers sets the local engine's decoding processes; with --engine ray, Ray "
            "tasks decode: drop --workers (--concurrency sets the model actors)."
        )


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs.

    Args:
        address: the Ray cluster to join (``"auto"``: the one running on this
            node; ``"ray://host:10001"``...); None: ``RAY_ADDRESS`` or a new
            local instance. Ignored when this process already joined one.
        num_gpus_per_worker: GPUs each model actor holds; None: 1 when the
            cluster has GPUs, else 0.
        concurrency: model actors; None: as many as the cluster's GPUs allow
            (``GPUs // num_gpus_per_worker``), or one per CPU (one thread each)
            on a CPU-only cluster.

    Example:
        >>> RayOptions(address="auto", num_gpus_per_worker=1, concurrency=8).concurrency
        8
    """

    address: str | None = None
    num_gpus_per_worker: float | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if self.num_gpus_per_worker is not None and self.num_gpus_per_worker < 0:
            raise ConfigError(
                f"--num-gpus-per-worker must be 0 or more, got {self.num_gpus_per_worker}."
            )
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"--concurrency must be at least 1, got {self.concurrency}.")


def embed_files_ray(
    paths: Sequence[str] | Inputs,
    out: str | os.PathLike[str],
    settings: EmbedSettings,
    open_embedder: Callable[..., Embedder],
    options: RayOptions | None = None,
    *,
    shard: tuple[int, int] = (0, 1),
    dtype: str = "float32",
    restart: bool = False,
    progress: bool = False,
    verify_content: bool = False,
) -> EmbedResult:
    """:func:`mocohub.embed.embed_files`, the pending parts run on Ray (see the module docstring).

    ``open_embedder(precision)`` opens the model in each actor, on
    ``settings.device`` (with GPUs, the actor's own); the driver calls
    ``open_embedder("fp32", device="cpu")`` once, to read the model's
    preprocessing and width. Ray is started (or joined) only when there is
    work to do. A failure inside Ray is one :class:`MocohubError`; the finished
    parts are kept, so rerunning resumes.

    Example:
        >>> embed_files_ray(paths, "feats.npy", settings, opener, RayOptions(concurrency=2)).rows
        1998
    """
    require_ray()
    engine = _RayEngine(open_embedder, options or RayOptions())
    return embed_files(
        paths,
        out,
        settings,
        engine.open,
        shard=shard,
        dtype=dtype,
        restart=restart,
        progress=progress,
        verify_content=verify_content,
        run_parts=engine.run_parts,
    )


@dataclass
class _Model:
    """The model as the driver sees it: what decoding needs, and the actors' features.

    ``embed_batch`` hands the features the actors computed through, so that the
    local path's :func:`~mocohub.embed._embed_part` keeps, normalises and saves
    them exactly as it does its own.
    """

    preprocessing: Preprocessing
    dim: int
    asked: str  # the precision the actors open the model in
    takes_uint8: bool
    channels_last: bool
    precision: str | None = field(default=None)  # what the actors ran

    def embed_batch(self, images: Any) -> np.ndarray:
        return np.asarray(images)  # the actors' features of a batch (the model ran there)


class _RayEngine:
    def __init__(self, open_embedder: Callable[..., Embedder], options: RayOptions) -> None:
        self.open_embedder, self.options = open_embedder, options

    def open(self, precision: str) -> _Model:
        """What :func:`embed_files` calls ``open_embedder``: a CPU copy read once, then dropped."""
        probe = self.open_embedder("fp32", device="cpu")
        return _Model(
            probe.preprocessing,
            probe.dim,
            precision,
            getattr(probe, "takes_uint8", False),
            getattr(probe, "channels_last", False),
        )

    def run_parts(
        self,
        names: Sequence[str],
        source: Inputs | None,
        owned: range,
        folder: Path,
        pending: list[tuple[int, range, str]],  # (part, its batches, its inputs digest)
        model: _Model,
        settings: EmbedSettings,
        run: dict[str, Any],
        workers: int,  # the local engine's decoding processes: Ray decodes in its tasks
        progress: bool,
    ) -> int:
        """Run the ``pending`` parts on Ray and save each; returns this shard's images in them."""
        from tqdm.auto import tqdm

        b = settings.batch_size
        todo = sum(
            i in owned
            for _, group, _ in pending
            for j in group
            for i in range(j * b, min((j + 1) * b, len(names)))
        )
        bar = tqdm(total=todo, unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1)
        waiting = {k: (group, inputs) for k, group, inputs in pending}
        try:
            with ray_session(self.options.address) as ray, quiet_ray_data(ray):
                width = _actor_resources(ray, self.options)
                # auto may settle differently in two actors (each checks its first batch):
                # the parts that disagree with the run's precision go again, in that one
                for _ in range(2):
                    precision = run["precision"] or model.asked
                    batches = sorted(j for group, _ in waiting.values() for j in group)
                    work = (ray, names, source, batches, model, settings, precision, width)
                    with contextlib.closing(self._results(*work)) as results:
                        checked = _unseen_files(results, names, source)
                        self._save(checked, waiting, folder, model, settings, run, owned, bar)
                    if not waiting or run["precision"] in (None, precision):
                        break
        finally:
            bar.close()
        if waiting:
            raise MocohubError(
                f"The Ray actors ran parts {sorted(waiting)[:5]} in another precision than "
                f"{run['precision']}; rerun with --precision {run['precision']}."
            )
        return todo

    def _results(
        self,
        ray: Any,
        names: Sequence[str],
        source: Inputs | None,
        batches: list[int],
        model: _Model,
        settings: EmbedSettings,
        precision: str,
        width: tuple[float, int],
    ) -> Generator[dict[str, Any], None, None]:
        """The actors' features of ``batches``, one record per batch, in the order they finish."""
        gpus, actors = width
        b = settings.batch_size
        rows = [{"batch": j, "items": batch_items(names, source, j, b)} for j in batches]
        # one block per batch (up to a limit) so that decoding spreads over the tasks
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4096)))
        # on a GPU, a backend that normalises on its device gets uint8 crops, as locally
        uint8 = gpus > 0 and settings.device != "cpu" and model.takes_uint8
        decode = DecodeTask(
            model.preprocessing, settings.max_pixels, not uint8, model.channels_last
        )
        embed_args = (self.open_embedder, precision, model.channels_last)
        dataset = dataset.map_batches(decode, batch_size=1, batch_format="numpy").map_batches(
            ModelActor,
            fn_constructor_args=embed_args,
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
        )
        try:
            for row in dataset.iter_rows():
                record = json.loads(str(row["record"]))
                if "error" in record:  # a mocohub error in an actor: raised here, as it is
                    raise pickle.loads(bytes.fromhex(record["error"]))
                j = int(row["batch"])
                yield {
                    "batch": j,
                    "rows": [j * b + i for i in record["rows"]],
                    "failed": [(j * b + i, reason) for i, reason in record["failed"]],
                    "features": np.asarray(row["features"], np.float32),
                    "precision": record["precision"],
                }
        except ray.exceptions.RayError as e:
            raise mocohub_error(e) from e

    @staticmethod
    def _save(
        results: Iterator[dict[str, Any]],
        waiting: dict[int, tuple[range, str]],
        folder: Path,
        model: _Model,
        settings: EmbedSettings,
        run: dict[str, Any],
        owned: range,
        bar: Any,
    ) -> None:
        """Save each part of ``waiting`` whose batches are all back (and in the run's precision)."""
        part_of = {j: k for k, (group, _) in waiting.items() for j in group}
        back: dict[int, dict[int, dict[str, Any]]] = {}
        for result in results:
            k = part_of[result["batch"]]
            back.setdefault(k, {})[result["batch"]] = result
            group, inputs = waiting[k]
            if len(back[k]) < len(group):
                continue
            arrived = back.pop(k)
            done = [arrived[j] for j in group]
            ran = {r["precision"] for r in done}
            if run["precision"] is None and ran != {None}:
                # the first part back sets the run's precision; actors that disagree
                # within it fell back from a reduced one (auto's check): fp32
                run["precision"] = ran.pop() if len(ran) == 1 else "fp32"
                atomic_write_text(folder / "run.json", json.dumps(run, indent=2) + "\n")
            if {r["precision"] for r in done} != {run["precision"]}:
                continue  # another precision than the run's: embedded again, in it
            items = iter(
                {"rows": r["rows"], "failed": r["failed"], "images": r["features"]} for r in done
            )
            stem = folder / f"{k:06d}"
            _embed_part(stem, len(group), items, model, settings.normalize, owned, bar, inputs)
            del waiting[k]
            model.precision = run["precision"]


def _unseen_files(
    results: Iterator[dict[str, Any]], names: Sequence[str], source: Inputs | None
) -> Iterator[dict[str, Any]]:
    """``results``, refused at a file a worker did not find but this machine has: the nodes
    do not share the inputs, and the run would record every such image as skipped."""
    for result in results:
        for i, reason in result["failed"]:
            path = names[i] if source is None else source.files[i]
            if reason.startswith(_NOT_FOUND) and os.path.isfile(path):
                raise InputError(
                    f"A Ray worker found no file {path}, which this machine has: every node "
                    "of the Ray cluster must see the inputs under the same paths (a shared "
                    "file system); the finished parts are kept."
                )
        yield result


def _actor_resources(ray: Any, options: RayOptions) -> tuple[float, int]:
    """(GPUs per actor, actors) from the options and the cluster's resources."""
    cluster = ray.cluster_resources()
    gpus_there = float(cluster.get("GPU", 0))
    gpus = options.num_gpus_per_worker
    if gpus is None:
        gpus = 1.0 if gpus_there else 0.0
    if gpus > gpus_there:
        raise ConfigError(
            f"--num-gpus-per-worker {gpus:g} asks for more GPUs than the Ray cluster has "
            f"({gpus_there:g}); lower it (0 runs the model on CPUs)."
        )
    actors = options.concurrency
    if actors is None:
        # without GPUs: an actor (one thread) per CPU, decoding fused into them (see above)
        actors = max(1, int(gpus_there // gpus) if gpus else int(cluster.get("CPU", 1)))
    elif gpus and actors * gpus > gpus_there:
        raise ConfigError(
            f"--concurrency {actors} actors of {gpus:g} GPUs need {actors * gpus:g} GPUs; the "
            f"Ray cluster has {gpus_there:g}: lower --concurrency or --num-gpus-per-worker."
        )
    return gpus, actors
