"""``mocohub export`` and ``mocohub serve``: the command-line face of :mod:`mocohub.export`."""

from __future__ import annotations

import click

from mocohub.errors import ConfigError

__all__ = ["export_command", "serve_command"]


@click.command("export")
@click.argument("model")
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder. It is built beside it and replaces it only once complete and "
    "verified; other files in it are kept.",
)
@click.option(
    "--format",
    "formats",
    default="onnx,safetensors",
    show_default=True,
    help="Comma-separated: onnx, safetensors.",
)
@click.option(
    "--with-preprocessing",
    is_flag=True,
    help="Also write graphs taking uint8 (N, H, W, 3) images, returning L2-normalised embeddings.",
)
@click.option("--fp16", is_flag=True, help="Also write fp16 graphs (for GPUs).")
@click.option("--int8", is_flag=True, help="Also write int8 graphs (for CPUs).")
@click.option(
    "--calibration",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of images for static int8 quantization (dynamic without it).",
)
@click.option(
    "--calibration-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Images used for calibration and verification.",
)
@click.option(
    "--verify-images",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of real images for the parity checks (default: the calibration folder).",
)
@click.option("--verify/--no-verify", default=True, show_default=True, help="Run parity checks.")
@click.option("--head", is_flag=True, help="Keep the projection head (export the MoCo embedding).")
@click.option(
    "--providers",
    default="auto",
    show_default=True,
    help="onnxruntime providers for the checks: auto, cpu, cuda, tensorrt.",
)
def export_command(
    model: str,
    out: str,
    formats: str,
    with_preprocessing: bool,
    fp16: bool,
    int8: bool,
    calibration: str | None,
    calibration_size: int,
    verify_images: str | None,
    verify: bool,
    head: bool,
    providers: str,
) -> None:
    """Export MODEL (anything mocohub.load takes) as safetensors and ONNX, verified.

    The ONNX graphs are run in onnxruntime against PyTorch (cosine >= 0.9999 for
    fp32, 0.999 fp16, 0.98 int8); a failed check exits non-zero naming the worst case,
    leaves --out as it was and keeps the new files in OUT.rejected. Each graph and
    verify.json record the SHA-256 of model.safetensors; loaders refuse a folder
    whose files disagree.

    Example: mocohub export runs/fmnist/model --out out/fmnist --int8 --calibration samples/
    """
    from .pipeline import export_model

    export_model(
        model,
        out,
        formats=formats,
        with_preprocessing=with_preprocessing,
        fp16=fp16,
        int8=int8,
        calibration=calibration,
        calibration_size=calibration_size,
        verify=verify,
        verify_images=verify_images,
        head=head,
        providers=providers,
        log=click.echo,
    )


@click.command("serve")
@click.argument("model", type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", "-p", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default=None,
    help="Which exported graph of the folder (default: fp16 on a GPU, else fp32).",
)
@click.option("--providers", default="auto", show_default=True, help="auto, cpu, cuda, tensorrt.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=32.0, show_default=True)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=40_000_000,
    show_default=True,
    help="Largest image (width x height) accepted.",
)
@click.option(
    "--max-aspect-ratio",
    type=click.FloatRange(min=1),
    default=50.0,
    show_default=True,
    help="Most elongated image accepted (long side / short side); resizing the short side "
    "to the model's size multiplies the long one.",
)
@click.option(
    "--max-request-pixels",
    type=click.IntRange(min=1),
    default=100_000_000,
    show_default=True,
    help="Most pixels all images of one request may hold together (its decode work).",
)
@click.option("--max-images", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Most images in one model call.",
)
@click.option(
    "--batch-wait-ms",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="How long a request waits for others to share its model call.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0.001),
    default=15.0,
    show_default=True,
    help="Seconds a connection may take to send a request's headers (and stay idle).",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0.001),
    default=60.0,
    show_default=True,
    help="Seconds a request may take to send its body; slower ones get 408.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Most connections open at once; more are answered 503 (keep it under ulimit -n).",
)
@click.option(
    "--decode-threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads decoding images (default: one per CPU, up to 4).",
)
def serve_command(
    model: str,
    host: str,
    port: int,
    precision: str | None,
    providers: str,
    threads: int | None,
    max_body_mb: float,
    max_pixels: int,
    max_aspect_ratio: float,
    max_request_pixels: int,
    max_images: int,
    max_batch: int,
    batch_wait_ms: float,
    header_timeout: float,
    body_timeout: float,
    max_connections: int,
    decode_threads: int | None,
) -> None:
    """Serve embeddings of an exported MODEL (folder or .onnx) over HTTP.

    POST /embed (an image body, multipart images, or JSON base64) returns
    L2-normalised embeddings as JSON, or raw float32 with
    `Accept: application/octet-stream`; GET /health; GET /info.
    Abusive clients get a 4xx and the server carries on: image sizes are checked
    from headers before decoding, slow clients time out, compressed bodies are
    refused (415), and each request decodes at most --decode-threads images at once.

    Example: mocohub serve out/fmnist --port 8000
    """
    try:
        from .serve import ServeSettings, open_served_model, serve
    except ImportError as e:
        raise ConfigError(
            f"mocohub serve needs aiohttp ({e}); run `pip install 'mocohub[serve]'`."
        ) from e
    settings = ServeSettings(
        max_body_bytes=int(max_body_mb * 2**20),
        max_pixels=max_pixels,
        max_aspect_ratio=max_aspect_ratio,
        max_request_pixels=max_request_pixels,
        max_images=max_images,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
        max_connections=max_connections,
        decode_threads=decode_threads,
    )
    embedder = open_served_model(
        model, precision=precision, providers=providers, threads=threads, max_batch=max_batch
    )
    serve(embedder, host=host, port=port, settings=settings, echo=lambda s: click.echo(s, err=True))
