"""``mocohub env``: the report of :func:`mocohub.sysinfo.collect`, for bug reports.

Example:
    $ mocohub env
    $ mocohub env --json
"""

from __future__ import annotations

import json

import click

from mocohub.sysinfo import collect

__all__ = ["env_command"]


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def env_command(as_json: bool) -> None:
    """Show versions, devices and onnxruntime builds (for bug reports)."""
    info = collect()
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
            click.echo(f"{key:>{width}}: {value}")
    if len(info["onnxruntime"]) > 1:
        click.echo(
            "warning: several onnxruntime builds are installed "
            f"({', '.join(info['onnxruntime'])}); they overwrite each other's files. "
            "Uninstall all of them, then install exactly one.",
            err=True,
        )
