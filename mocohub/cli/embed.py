"""``mocohub embed`` and ``mocohub embed-merge``: the command-line face of :mod:`mocohub.embed`.

Backends are opened by name through :mod:`mocohub.backends`, so that
``mocohub`` never imports ``mocohub.export`` unless ``--backend onnxruntime``
asks for it.
"""

from __future__ import annotations

import os
from typing import Any

import click

from mocohub.backends import BACKENDS, open_backend
from mocohub.errors import ConfigError, InputError, MocohubError
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


@click.command("embed")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .npy file.")
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
def embed_command(
    inputs: tuple[str, ...],
    out: str,
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
) -> None:
    """Embed images into OUT.npy (+ .manifest.txt, .errors.jsonl, .meta.json).

    INPUTS are folders (searched recursively), image files, or .txt files listing
    paths. Unreadable images are skipped and listed in OUT.errors.jsonl. An
    interrupted run resumes when rerun with the same arguments. Each file is
    known by its path, size and modification time (or its content, with
    --verify-content): a rerun embeds again the files that changed, and only
    those parts of the work. The files of OUT are published together; `mocohub
    index` refuses ones that do not belong together.

    Example: mocohub embed photos/ --out feats.npy --model runs/fmnist/model
    """
    from mocohub.embed import EmbedSettings, default_workers, embed_files, output_files
    from mocohub.imageio import DEFAULT_MAX_PIXELS, scan_inputs

    shard_index = _parse_shard(shard)
    if os.path.exists(model):  # recorded in the output's meta: make it work from anywhere
        model = os.path.abspath(model)
    output_files(out)  # checks the name before any work
    opener = open_backend(backend)
    if backend != "torch" and (output != "pooled" or precision != "auto"):
        raise ConfigError(
            f"--output and --precision apply to the torch backend; the {backend} "
            "backend runs the model file as it was exported."
        )

    def open_embedder(chosen: str) -> Any:
        if backend == "torch":
            return opener(model, device=device, precision=chosen, output=output)
        # --device cuda:N: each process of a multi-GPU embed runs on its own GPU;
        # max_batch: TensorRT's profile covers the batches this run makes
        return opener(model, device=None if device == "auto" else device, max_batch=batch_size)

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
    paths = scan_inputs(inputs)
    result = embed_files(
        paths,
        out,
        settings,
        open_embedder,
        shard=shard_index,
        workers=default_workers(device) if workers is None else workers,
        dtype=dtype,
        restart=restart,
        progress=not quiet,
        verify_content=verify_content,
    )
    files = output_files(out)
    skipped = f", skipped {result.skipped} (see {files['errors']})" if result.skipped else ""
    if result.up_to_date:
        click.echo(
            f"{result.out} is up to date (same inputs and settings): {result.rows} rows{skipped}; "
            "add --restart to embed again."
        )
    else:
        kept = (
            f" ({result.kept} unchanged files kept from the earlier output)" if result.kept else ""
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
