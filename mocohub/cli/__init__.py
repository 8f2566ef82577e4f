"""The ``mocohub`` command line: the command group, and one module per family of commands.

``mocohub.cli.hub`` (list, info, convert, push), ``mocohub.cli.search`` (index,
search) and ``mocohub.cli.env`` (env) hold click commands only; what they do
lives in the library (:mod:`mocohub.loading`, :mod:`mocohub.index`,
:mod:`mocohub.grid`, :mod:`mocohub.sysinfo`, ...). Each command's code is
imported only when that command runs, so ``mocohub --help`` and ``mocohub
--version`` answer without importing PyTorch. A
:class:`~mocohub.errors.MocohubError` becomes one line on stderr and a non-zero
exit code, never a traceback.

Example:
    >>> main(["list", "--json"])  # what `mocohub list --json` runs
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import click

from mocohub import __version__
from mocohub.errors import MocohubError, Stopped, original_message

# name -> (module:attribute of the click command, one-line help for --help).
# The help is repeated here so that listing commands imports nothing.
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("mocohub.cli.env:env_command", "Show versions, devices and onnxruntime builds."),
    "train": ("mocohub.training.cli:train_command", "Pre-train MoCo (one CPU to many GPU nodes)."),
    "knn": ("mocohub.training.eval_cli:knn_command", "k-NN accuracy of a model's features."),
    "lincls": (
        "mocohub.training.eval_cli:lincls_command",
        "Linear evaluation of a model (reference MoCo protocol).",
    ),
    "finetune-det": (
        "mocohub.training.det_cli:finetune_det_command",
        "Fine-tune a Mask/Faster R-CNN with a MoCo backbone on COCO data.",
    ),
    "eval-det": (
        "mocohub.training.det_cli:eval_det_command",
        "COCO box and mask AP of a finetune-det run.",
    ),
    "list": ("mocohub.cli.hub:list_command", "List the named MoCo weights and their metrics."),
    "info": ("mocohub.cli.hub:info_command", "Show one named weight set."),
    "convert": (
        "mocohub.cli.hub:convert_command",
        "Convert a MoCo checkpoint to a mocohub folder, torchvision, timm, DeiT or detectron2.",
    ),
    "push": ("mocohub.cli.hub:push_command", "Publish a model folder on the Hugging Face Hub."),
    "embed": (
        "mocohub.cli.embed:embed_command",
        "Embed images (folders, lists, shards, tables) into a .npy or .parquet file.",
    ),
    "embed-merge": (
        "mocohub.cli.embed:merge_command",
        "Merge the outputs of `mocohub embed --shard i/n` runs.",
    ),
    "index": ("mocohub.cli.search:index_command", "Build a search index from embeddings."),
    "search": ("mocohub.cli.search:search_command", "Find the images nearest to query images."),
    "export": (
        "mocohub.export.cli:export_command",
        "Export a model as safetensors and ONNX (fp32/fp16/int8), verified.",
    ),
    "serve": ("mocohub.export.cli:serve_command", "Serve an exported model's embeddings (HTTP)."),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only to run it."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS:
            module_name, attribute = COMMANDS[cmd_name][0].split(":")
            command = getattr(importlib.import_module(module_name), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{module_name}:{attribute} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in sorted(COMMANDS)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="mocohub")
def cli() -> None:
    """mocohub: MoCo (Momentum Contrast) backbones, training, embeddings and export.

    Run `mocohub COMMAND --help` for a command's options.
    """


@cli.result_callback()
def _leave_process_group(*_: Any, **__: Any) -> None:
    """After a command succeeds, leave the process group it joined under torchrun or srun.

    One place for every command (train, knn, lincls, finetune-det, eval-det,
    embed): without it gloo's threads can outlive the interpreter, and the
    worker aborts with "terminate called without an active exception" after a
    run that succeeded. Commands that never imported torch.distributed skip it.
    """
    if "torch.distributed" in sys.modules:
        from mocohub.launch import leave_process_group

        leave_process_group()


@contextlib.contextmanager
def hint_on_interrupt(hint: Callable[[], str | None]) -> Iterator[None]:
    """On Ctrl-C or SIGTERM, say what a long command kept and how to go on: ``hint()``'s
    line, when it returns one (it is asked only then, so it can look at what is on disk).

    Ctrl-C goes on as ``KeyboardInterrupt`` (exit 130); SIGTERM (``timeout``, Slurm,
    Kubernetes) ends the command with exit code 143, as it would have without the
    line.

    Example:
        >>> with hint_on_interrupt(lambda: "the parts are kept in P; rerun to resume."):
        ...     embed_everything()
    """

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: leave SIGTERM alone
        previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except (KeyboardInterrupt, _Terminated) as stop:
        line, by_sigterm = hint(), isinstance(stop, _Terminated)
        if line:
            click.echo(f"{'Stopped by SIGTERM' if by_sigterm else 'Interrupted'}: {line}", err=True)
        if by_sigterm:
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM inside :func:`hint_on_interrupt` (a BaseException, as KeyboardInterrupt)."""


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """A warning as the command line shows it: one line, without the source line."""
    kind = "" if category is UserWarning else f" ({category.__name__})"
    return f"Warning{kind}: {str(message).removeprefix('mocohub: ')}\n"


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_lost(error: RuntimeError) -> str | None:
    """One line for a process of a multi-process run whose peer stopped first, else None.

    When one process stops on an error of its own (printed by that process), the
    others fail in their next collective with gloo's or NCCL's error and a long
    traceback that says nothing new.
    """
    if "torch.distributed" not in sys.modules or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    import torch.distributed as dist

    if not (isinstance(error, dist.DistError) or any(s in str(error) for s in _PEER_GONE)):
        return None
    rank = os.environ.get("RANK", "?")
    return (
        f"rank {rank} lost contact with another process of the run, which stopped first "
        "(its own message is above)."
    )


def _not_first_on_this_machine() -> bool:
    """Whether another process of this run on this machine (local rank 0) speaks for it.

    Every process of a stopped run stops at the same step with the same line; one
    line per machine says it (rank 0's names the checkpoint it saved).
    """
    from mocohub.launch import process_place

    return process_place().local_rank > 0


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the ``mocohub`` script and ``python -m mocohub``.

    Warnings print as one line each while a command runs (the caller's format
    is put back afterwards, for callers that run commands in-process).
    """
    import warnings

    previous = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return cli.main(args=argv, prog_name="mocohub", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except MocohubError as error:
        if not (isinstance(error, Stopped) and _not_first_on_this_machine()):
            click.echo(f"{error.prefix}{original_message(error)}", err=True)
        sys.exit(error.exit_code)
    except RuntimeError as error:
        lost = _peer_lost(error)
        if lost is None:
            raise
        click.echo(f"Error: {lost}", err=True)
        sys.exit(1)
    finally:
        warnings.formatwarning = previous
