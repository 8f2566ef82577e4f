from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

import mocohub
from mocohub import cli
from mocohub.errors import ConfigError

NO_TORCH = (
    "import sys, runpy; sys.argv = ['mocohub', {arg!r}];"
    "from mocohub.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    "assert 'torch' not in sys.modules, 'torch was imported'\n"
    "assert 'mocohub.training' not in sys.modules\n"
    "print('NO_TORCH_OK')"
)


@pytest.mark.parametrize("arg", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(arg: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH.format(arg=arg)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "NO_TORCH_OK" in run.stdout
    if arg == "--version":
        assert f"mocohub, version {mocohub.__version__}" in run.stdout
    else:
        assert "Commands:" in run.stdout and "env" in run.stdout


def test_every_commands_help_and_the_weights_listing_do_not_import_torch() -> None:
    """``mocohub CMD --help``, ``list`` and ``info`` answer at once: none imports PyTorch
    (about 0.2 s a command, where importing torch and torchvision takes seconds)."""
    code = (
        "import sys\n"
        "from mocohub.cli import COMMANDS, main\n"
        "runs = [[name, '--help'] for name in COMMANDS]\n"
        "runs += [['list'], ['list', '--json'], ['info', 'moco_r18_fashion_mnist']]\n"
        "for args in runs:\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as stop:\n"
        "        assert not stop.code, (args, stop.code)\n"
        "    assert 'torch' not in sys.modules, f'mocohub {args} imported torch'\n"
        "    assert 'torchvision' not in sys.modules, f'mocohub {args} imported torchvision'\n"
        "print('NO_TORCH_OK', len(runs))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"NO_TORCH_OK {len(cli.COMMANDS) + 3}" in run.stdout
    assert "moco_r18_fashion_mnist" in run.stdout and "Usage: mocohub train" in run.stdout


def test_python_dash_m_and_console_script_agree() -> None:
    module = subprocess.run(
        [sys.executable, "-m", "mocohub", "--version"], capture_output=True, text=True
    )
    assert module.returncode == 0, module.stderr
    assert module.stdout.strip() == f"mocohub, version {mocohub.__version__}"


def test_import_mocohub_is_light() -> None:
    code = "import sys, mocohub; assert 'torch' not in sys.modules; print(mocohub.__version__)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_every_command_resolves_to_the_click_command_of_its_name() -> None:
    group = cli.cli
    with click.Context(group) as ctx:
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            assert isinstance(command, click.Command), name
            assert command.name == name, (name, cli.COMMANDS[name][0])


def test_library_modules_do_not_import_the_command_line() -> None:
    """The library (CPU flags, precision, index, grid, k-NN) is usable without click."""
    modules = "mocohub.sysinfo, mocohub.precision, mocohub.index, mocohub.grid, mocohub.knn"
    code = f"import sys, {modules}; assert 'click' not in sys.modules, 'click was imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_env_command_reports_json(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["env", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["mocohub"] == mocohub.__version__
    assert info["torch"].split("+")[0].count(".") == 2
    assert isinstance(info["cuda"]["available"], bool)
    assert len(info["onnxruntime"]) == 1, "exactly one onnxruntime build must be installed"


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "No such command" in capsys.readouterr().err


def test_mocohub_errors_become_one_line_and_an_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    @click.command("fail")
    def fail() -> None:
        raise ConfigError("K=10 is not a multiple of 4; choose another K.")

    monkeypatch.setitem(cli.COMMANDS, "fail", ("test_cli:fail", "Fails."))
    monkeypatch.setitem(sys.modules, "test_cli", sys.modules[__name__])
    monkeypatch.setattr(sys.modules[__name__], "fail", fail, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fail"])
    assert exit_info.value.code == ConfigError.exit_code != 0
    err = capsys.readouterr().err
    assert err == "Error: K=10 is not a multiple of 4; choose another K.\n"


WARNS = """
import warnings, click
from mocohub import cli

@click.command("warn")
def warn():
    warnings.warn("mocohub: sync_bn runs as plain BatchNorm because ...", stacklevel=1)
    warnings.warn("a deprecated thing", DeprecationWarning, stacklevel=1)

cli.COMMANDS["warn"] = ("__main__:warn", "Warns.")
before = warnings.formatwarning
cli.main(["warn"])
assert warnings.formatwarning is before, "the format is put back for in-process callers"
"""


def test_warnings_print_as_one_line_while_a_command_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", WARNS], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        "Warning: sync_bn runs as plain BatchNorm because ...\n"
        "Warning (DeprecationWarning): a deprecated thing\n"
    )


def test_a_command_that_succeeds_leaves_the_process_group_it_joined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command leaves a group it joined once it succeeds (a worker that exits with
    gloo's threads running can abort); a command that fails leaves it to the error path."""
    import torch.distributed as dist

    @click.command("joins")
    @click.option("--fail", is_flag=True)
    def joins(fail: bool) -> None:
        store = dist.FileStore(str(tmp_path / f"store{fail}"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        if fail:
            raise ConfigError("failed after joining")

    monkeypatch.setitem(cli.COMMANDS, "joins", ("test_cli:joins", "Joins a group."))
    monkeypatch.setitem(sys.modules, "test_cli", sys.modules[__name__])
    monkeypatch.setattr(sys.modules[__name__], "joins", joins, raising=False)
    try:
        cli.main(["joins"])
        assert not dist.is_initialized()
        with pytest.raises(SystemExit):
            cli.main(["joins", "--fail"])
        assert dist.is_initialized()  # no barrier on the way out of a failure
        assert "failed after joining" in capsys.readouterr().err
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
