"""``mocohub embed`` and ``mocohub embed-merge``: the command-line face of :mod:`mocohub.embed`.

Backends are opened by name through :mod:`mocohub.backends`, so that
``mocohub`` never imports ``mocohub.export`` unless ``--backend onnxruntime``
asks for it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from mocohub.backends import BACKENDS, open_backend
from mocohub.cli import hint_on_interrupt
from mocohub.errors import ConfigError, InputError, MocohubError
from mocohub.launch import inside_launcher, launch_options, launch_workers, worker_args
from mocohub.precision import PRECISIONS

__all__ = ["embed_command", "merge_command"]


def _parse_shard(value: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise ConfigError(f"--shard takes i/n (e.g. 0/4), got {value!r}.") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard i/n needs 0 <= i < n, got {value}.")
    return index, count


def _output_format(out: str, given: str | None) -> str:
    found = {".npy": "npy", ".parquet": "parquet"}.get(os.path.splitext(out)[1])
    if found is None:
        raise ConfigError(f"--out must be a .npy (or .parquet) file name, got {out}.")
    if given not in (None, found):
        raise ConfigError(
            f"--output-format {given} writes a .{given} file; name one in --out "
            f"(e.g. --out feats.{given}), got {out}."
        )
    return found


@click.command("embed")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output file: .npy (or .parquet, see --output-format).",
)
@click.option(
    "--output-format",
    type=click.Choice(["npy", "parquet"]),
    default=None,
    help="npy: OUT.npy + OUT.manifest.txt; parquet: OUT.parquet with an id and an embedding "
    "column (and the manifest too).  [default: from the --out suffix]",
)
@click.option(
    "--id-column",
    default="id",
    show_default=True,
    help="Parquet/CSV inputs: the column of ids (the manifest entries).",
)
@click.option(
    "--path-column",
    default="path",
    show_default=True,
    help="Parquet/CSV inputs: the column of image paths (relative to the table's folder).",
)
@click.option("--model", "-m", required=True, help="Anything mocohub.load takes (folder, file...).")
@click.option(
    "--backend",
    type=click.Choice(sorted(BACKENDS)),
    default="torch",
    show_default=True,
    help="onnxruntime: --model is a folder or .onnx file written by `mocohub export`.",
)
@click.option(
    "--output",
    type=click.Choice(["pooled", "head"]),
    default="pooled",
    show_default=True,
    help="Pooled backbone features, or the projection head's output.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Decoding processes (0: decode each batch in the main process, on the model's "
    "threads).  [default: with CUDA min(8, cores); on a CPU the cores the model's threads "
    "leave free, up to 4, so 0 when it uses them all]",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="auto: bf16/fp16 where the hardware runs it fast and it matches fp32, else fp32.",
)
@click.option(
    "--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True
)
@click.option("--normalize/--no-normalize", default=True, show_default=True, help="L2 rows.")
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=None,
    help="Skip images with more pixels (decompression bombs).  [default: 178956970]",
)
@click.option("--shard", default="0/1", show_default=True, help="Do share i of n (i/n).")
@click.option(
    "--part-size",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Images per saved part: what an interrupted run can lose.",
)
@click.option("--strict", is_flag=True, help="Exit non-zero when any file was skipped.")
@click.option("--restart", is_flag=True, help="Discard an unfinished run with other settings.")
@click.option(
    "--verify-content",
    is_flag=True,
    help="Know each file by a SHA-256 of its content, not its size and modification time "
    "(where times cannot be trusted; reads every file on each run).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: decode in Ray tasks and run the model in a pool of Ray actors, on a Ray "
    'cluster (pip install "mocohub[ray]"); the same output files as local.',
)
@click.option(
    "--address",
    default=None,
    help="--engine ray: the Ray cluster to join (auto: the one running here).  "
    "[default: RAY_ADDRESS, else a new local Ray instance]",
)
@click.option(
    "--num-gpus-per-worker",
    type=click.FloatRange(min=0),
    default=None,
    help="--engine ray: GPUs each model actor holds.  [default: 1 when the cluster has "
    "GPUs, else 0]",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="--engine ray: model actors.  [default: the cluster's GPUs / --num-gpus-per-worker; "
    "without GPUs, one per CPU]",
)
@launch_options
@click.pass_context
def embed_command(
    ctx: click.Context,
    inputs: tuple[str, ...],
    out: str,
    output_format: str | None,
    id_column: str,
    path_column: str,
    model: str,
    backend: str,
    output: str,
    batch_size: int,
    workers: int | None,
    device: str,
    precision: str,
    dtype: str,
    normalize: bool,
    max_pixels: int | None,
    shard: str,
    part_size: int,
    strict: bool,
    restart: bool,
    verify_content: bool,
    quiet: bool,
    engine: str,
    address: str | None,
    num_gpus_per_worker: float | None,
    concurrency: int | None,
    nodes: int,
    nproc_per_node: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    max_restarts: int,
) -> None:
    """Embed images into OUT.npy (+ .manifest.txt, .errors.jsonl, .meta.json).

    INPUTS are folders (searched recursively for .jpg, .jpeg, .png, .bmp, .webp,
    .tif, .tiff and .gif files; other files and hidden ones are passed over), image
    files, .txt files listing paths (a relative one is taken from the list's
    folder), webdataset shards (a .tar file, a folder of them, or a
    brace pattern such as 'shards/{000000..000999}.tar': each sample's key is
    its manifest entry), or Parquet/CSV tables of ids and paths. Unreadable images are
    skipped and listed in OUT.errors.jsonl. An interrupted run resumes when
    rerun with the same arguments. Each file is known by its path, size and
    modification time (or its content, with --verify-content): with the same
    list of inputs, a rerun embeds again only the parts of the work whose files
    changed; an added or removed input embeds everything again. The files of
    OUT are published together; `mocohub index` refuses ones that do not belong
    together.

    Under torchrun or srun (or with --nproc-per-node N, which starts torchrun),
    each process embeds its own share on its own GPU and rank 0 merges them
    into OUT: the same files as one process writes. With --engine ray, a Ray
    cluster does the work (--address auto joins the one running here): the
    same files again.

    Example: mocohub embed photos/ --out feats.npy --model runs/fmnist/model
    """
    from mocohub.embed import EmbedSettings, default_workers, embed_files, output_files
    from mocohub.embed_outputs import check_side_files_free
    from mocohub.embed_sources import scan_sources
    from mocohub.imageio import DEFAULT_MAX_PIXELS
    from mocohub.launch import process_place

    shard_index = _parse_shard(shard)
    _output_format(out, output_format)
    check_side_files_free(output_files(out))  # the name, and files of no other output
    if nodes < 1 or nproc_per_node < 1:
        raise ConfigError("--nodes and --nproc-per-node must be at least 1.")
    ray_options = None
    if engine == "ray":
        from mocohub.embed_ray import RayOptions, check_ray_command

        check_ray_command(nodes * nproc_per_node > 1 or inside_launcher(), workers)
        ray_options = RayOptions(address, num_gpus_per_worker, concurrency)
    elif (address, num_gpus_per_worker, concurrency) != (None, None, None):
        raise ConfigError(
            "--address, --num-gpus-per-worker and --concurrency are options of --engine ray."
        )
    if nodes * nproc_per_node > 1 and not inside_launcher():
        launch = (nodes, nproc_per_node, node_rank, master_addr, master_port, max_restarts)
        launch_workers(worker_args(ctx), *launch)
        return
    place = process_place()
    if place.world_size > 1 and shard_index != (0, 1):
        raise ConfigError(
            "--shard and torchrun/srun both split the work; under torchrun or srun each "
            "process takes its share by itself: drop --shard."
        )
    if os.path.exists(model):  # recorded in the output's meta: make it work from anywhere
        model = os.path.abspath(model)
    opener = open_backend(backend)
    if backend != "torch" and (output != "pooled" or precision != "auto"):
        raise ConfigError(
            f"--output and --precision apply to the torch backend; the {backend} "
            "backend runs the model file as it was exported."
        )

    # one GPU per process under torchrun/srun (LOCAL_RANK); the settings keep --device as given
    default: Any = default_workers
    run_device = device
    if place.world_size > 1:
        from mocohub.embed_dist import process_device, process_workers

        run_device, default = process_device(device, place.local_rank), process_workers

    def open_embedder(chosen: str, device: str | None = None) -> Any:
        on = run_device if device is None else device  # device: the Ray driver's CPU copy
        if backend == "torch":
            return opener(model, device=on, precision=chosen, output=output)
        # --device cuda:N: each process of a multi-GPU embed runs on its own GPU;
        # max_batch: TensorRT's profile covers the batches this run makes
        ort_device = None if on == "auto" else on
        return opener(model, device=ort_device, max_batch=batch_size)

    settings = EmbedSettings(
        model=model,
        backend=backend,
        output=output,
        precision=precision,
        device=device,
        normalize=normalize,
        batch_size=batch_size,
        part_size=part_size,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
    )
    paths = scan_sources(inputs, id_column=id_column, path_column=path_column)
    options: dict[str, Any] = {
        "dtype": dtype,
        "restart": restart,
        "progress": not quiet,
        "verify_content": verify_content,
    }
    if ray_options is None:  # Ray decodes in its own tasks
        options["workers"] = default(run_device) if workers is None else workers
    before = _record(out)
    earlier_shard = tuple((before or {}).get("shard") or (0, 1))
    if not restart and earlier_shard[1] > 1 and earlier_shard != shard_index:
        raise InputError(
            f"{out} holds share {earlier_shard[0]}/{earlier_shard[1]} of an embed, and this is "
            f"share {shard_index[0]}/{shard_index[1]}: give each share its own --out (then "
            "mocohub embed-merge them), or pass --restart to replace it."
        )
    parts = output_files(out)["parts"]
    kept = f"the finished parts are kept in {parts}; rerun the same command to resume."
    with hint_on_interrupt(lambda: kept if any(parts.glob("[0-9]*.json")) else None):
        if ray_options is not None:
            from mocohub.embed_ray import embed_files_ray

            run = (paths, out, settings, open_embedder, ray_options)
            result = embed_files_ray(*run, shard=shard_index, **options)
        elif place.world_size > 1:
            from mocohub.embed_dist import embed_distributed

            result = embed_distributed(paths, out, settings, open_embedder, place, **options)
            if place.rank != 0:  # rank 0 reports for all
                return
        else:
            result = embed_files(paths, out, settings, open_embedder, shard=shard_index, **options)
    files = output_files(out)
    skipped = f", skipped {result.skipped} (see {files['errors']})" if result.skipped else ""
    if result.up_to_date:
        click.echo(
            f"{result.out} is up to date (same inputs and settings): {result.rows} rows{skipped}; "
            "add --restart to embed again."
        )
    else:
        done = result.embedded_now  # inputs read in this run, skipped ones included
        kept = ""
        if result.kept:
            kept = (
                f" ({done} read in this run, {result.kept} unchanged kept from the earlier output)"
            )
        if place.world_size > 1:  # what the earlier, interrupted run had done is not redone
            kept = f" by {place.world_size} processes ({done} read in this run)"
        elif not result.kept and done < result.rows + result.skipped:
            kept = f" ({done} read in this run, the rest resumed from its parts)"
        after = _record(out)
        if before is not None and after is not None and before.get("key") != after.get("key"):
            why = "made with other settings"
            if before.get("inputs_sha256") != after.get("inputs_sha256"):
                why = f"of other inputs ({before.get('inputs')} files, now {after.get('inputs')})"
            kept += f" (replacing an output {why}: {before.get('rows')} rows)"
        if result.rows == 0 and result.skipped:
            raise InputError(
                f"None of the {result.skipped} inputs could be embedded; {files['errors']} says "
                f"why for each.{_list_hint(inputs)}"
            )
        click.echo(
            f"embedded {result.rows} images{skipped}{kept} in {result.seconds:.1f} s "
            f"({result.images_per_s:.1f} images/s, precision {result.precision or 'n/a'}) "
            f"-> {result.out}"
        )
    if strict and result.skipped:
        raise InputError(
            f"{result.skipped} files were skipped (--strict); see {files['errors']} for why."
        )


def _list_hint(inputs: Sequence[str]) -> str:
    """Where relative paths in the input lists were looked for (a common surprise)."""
    from mocohub.imageio import LIST_EXTENSIONS

    lists = [Path(i) for i in inputs if Path(i).suffix.lower() in LIST_EXTENSIONS]
    if not lists:
        return ""
    folders = ", ".join(sorted({str(p.parent.resolve()) for p in lists}))
    return f" Relative paths in a list are taken from the list's folder ({folders})."


def _record(out: str) -> dict[str, Any] | None:
    """The embed record of ``out`` (``OUT.meta.json``), or None when there is none."""
    from mocohub.embed_outputs import read_meta

    try:
        return read_meta(out)
    except InputError:
        return None


@click.command("embed-merge")
@click.argument("parts", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Merged .npy file.")
def merge_command(parts: tuple[str, ...], out: str) -> None:
    """Merge the outputs of `mocohub embed --shard i/n` runs into one.

    Example: mocohub embed-merge f0.npy f1.npy f2.npy --out feats.npy
    """
    from mocohub.embed_merge import merge_outputs

    if os.path.abspath(out) in {os.path.abspath(p) for p in parts}:
        raise MocohubError("--out must differ from the shard files being merged.")
    meta = merge_outputs(parts, out)
    click.echo(
        f"merged {len(parts)} shards: {meta['rows']} rows, {meta['skipped']} skipped -> {out}"
    )
