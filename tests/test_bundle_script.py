"""scripts/bundle_model.py records a training command users can run, and the shipped card does."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
from pathlib import Path
from types import ModuleType

import pytest

from mocohub.registry import WEIGHTS_DIR
from mocohub.training.data import resolve_dataset

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = WEIGHTS_DIR / "moco_r18_fashion_mnist"
FIXTURE = ROOT / "tests" / "fixtures" / "fashion-mnist"  # 8 sample images as IDX files


@pytest.fixture(scope="module")
def bundle() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bundle_model", ROOT / "scripts/bundle_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fashion_mnist_folders_become_the_name_the_cli_accepts(
    bundle: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Fashion-MNIST IDX folder outside the checkout (as the bundling run read it) is
    written as `fashion-mnist`; any other path only this machine has is refused."""
    data, labels = resolve_dataset(FIXTURE)  # the fixture is real Fashion-MNIST IDX data
    assert data.images.shape == (8, 1, 28, 28) and labels.kind == "idx"
    monkeypatch.chdir(tmp_path)
    upward = os.path.relpath(FIXTURE, tmp_path)  # ../../.../tests/fixtures/fashion-mnist
    assert upward.startswith("../")
    command = (
        f"OMP_NUM_THREADS=1 python -m mocohub train {upward} --out runs/fm "
        f"--knn-val={FIXTURE} --knn-train /usr/share/datasets/fashion-mnist"
    )
    assert bundle.portable_command(command) == (
        "OMP_NUM_THREADS=1 python -m mocohub train fashion-mnist --out runs/fm "
        "--knn-val=fashion-mnist --knn-train fashion-mnist"
    )
    (tmp_path / "images").mkdir()  # a folder, but not Fashion-MNIST
    for elsewhere in ("../images", str(tmp_path / "images"), "/home/me/images", "--knn-val=../x"):
        with pytest.raises(SystemExit, match="a path users do not have"):
            bundle.portable_command(f"mocohub train {elsewhere} --out runs/fm")


def test_the_shipped_card_and_config_record_a_runnable_command(bundle: ModuleType) -> None:
    command = json.loads((SHIPPED / "config.json").read_text())["meta"]["command"]
    words = shlex.split(command)
    assert words[words.index("train") + 1] == "fashion-mnist"
    assert words[words.index("--knn-val") + 1] == "fashion-mnist"
    assert bundle.portable_command(command) == command  # no path only one machine has
    assert f"Training command: `{command}`" in (SHIPPED / "README.md").read_text()
