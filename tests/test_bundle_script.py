"""scripts/bundle_model.py records a training command users can run, and the shipped card does."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path
from types import ModuleType

import pytest

from mocohub.registry import WEIGHTS_DIR

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = WEIGHTS_DIR / "moco_r18_fashion_mnist"


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
    data = tmp_path / "shared" / "data" / "fashion-mnist"  # where the bundling run read it
    data.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (data / name).write_bytes(b"")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    command = (
        "OMP_NUM_THREADS=1 python -m mocohub train ../shared/data/fashion-mnist --out runs/fm "
        "--knn-val=../shared/data/fashion-mnist --knn-train /usr/share/datasets/fashion-mnist"
    )
    assert bundle.portable_command(command) == (
        "OMP_NUM_THREADS=1 python -m mocohub train fashion-mnist --out runs/fm "
        "--knn-val=fashion-mnist --knn-train fashion-mnist"
    )
    for elsewhere in ("../shared/data", "/home/me/images", "--knn-val=../x"):
        with pytest.raises(SystemExit, match="a path users do not have"):
            bundle.portable_command(f"mocohub train {elsewhere} --out runs/fm")


def test_the_shipped_card_and_config_record_a_runnable_command(bundle: ModuleType) -> None:
    command = json.loads((SHIPPED / "config.json").read_text())["meta"]["command"]
    words = shlex.split(command)
    assert words[words.index("train") + 1] == "fashion-mnist"
    assert words[words.index("--knn-val") + 1] == "fashion-mnist"
    assert bundle.portable_command(command) == command  # no path only one machine has
    assert f"Training command: `{command}`" in (SHIPPED / "README.md").read_text()
