"""The wheel ships mocohub (with mocohub.cli, mocohub.detection), mocohub.training,
mocohub.export, nothing else."""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile
from pathlib import Path

from project_helpers import pyproject

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = tmp_path.glob("mocohub-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"mocohub"}
    packages = {str(Path(n).parent) for n in names if n.endswith("__init__.py")}
    assert packages == {
        "mocohub",
        "mocohub/cli",
        "mocohub/detection",
        "mocohub/training",
        "mocohub/export",
    }
    assert "mocohub/py.typed" in names
    cli = {
        "mocohub/cli/embed.py",
        "mocohub/cli/hub.py",
        "mocohub/cli/search.py",
        "mocohub/cli/env.py",
    }
    assert cli <= set(names)
    assert "mocohub/training/moco.py" in names
    assert not any(n.startswith(("tests/", "bench/", "hubconf")) for n in names)

    (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = email.message_from_bytes(zipfile.ZipFile(wheel).read(metadata_name))
    requires = metadata.get_all("Requires-Dist") or []
    runtime = [r for r in requires if "extra ==" not in r]
    for name in (
        "torch",
        "torchvision",
        "huggingface-hub",
        "safetensors",
        "onnx",
        "click",
        "pillow",
        "numpy",
        "tqdm",
    ):
        assert any(r.lower().startswith(name) for r in runtime), name
    assert not any("==" in r.split(";")[0] for r in requires), "lower bounds only"
    (top_level_txt,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "mocohub = mocohub.cli:main" in zipfile.ZipFile(wheel).read(top_level_txt).decode()


def test_exactly_one_onnxruntime_build_per_platform() -> None:
    """The two onnxruntime requirements' markers split every platform in two."""
    from packaging.requirements import Requirement

    deps = pyproject()["project"]["dependencies"]
    builds = [Requirement(d) for d in deps if d.startswith("onnxruntime")]
    assert sorted(r.name for r in builds) == ["onnxruntime", "onnxruntime-gpu"]
    platforms = [
        ("linux", "x86_64"),
        ("linux", "aarch64"),
        ("win32", "AMD64"),
        ("win32", "ARM64"),
        ("darwin", "arm64"),
        ("darwin", "x86_64"),
        ("freebsd14", "amd64"),
    ]
    chosen = {}
    for sys_platform, machine in platforms:
        env = {"sys_platform": sys_platform, "platform_machine": machine}
        picked = [r.name for r in builds if r.marker is not None and r.marker.evaluate(env)]
        assert len(picked) == 1, (sys_platform, machine, picked)
        chosen[sys_platform, machine] = picked[0]
    assert chosen["linux", "x86_64"] == chosen["win32", "AMD64"] == "onnxruntime-gpu"
    assert chosen["darwin", "arm64"] == chosen["linux", "aarch64"] == "onnxruntime"


def test_the_readme_states_the_declared_minimum_python_and_pytorch() -> None:
    """README's "Requires Python X+ and PyTorch Y+" is what pip enforces."""
    import re

    from packaging.requirements import Requirement

    project = pyproject()["project"]
    torch = next(Requirement(d) for d in project["dependencies"] if d.startswith("torch>"))
    found = re.search(
        r"Requires Python (\S+)\+ and PyTorch (\S+)\+", (ROOT / "README.md").read_text()
    )
    assert found is not None
    assert project["requires-python"] == f">={found[1]}"
    assert str(torch.specifier) == f">={found[2]}"
