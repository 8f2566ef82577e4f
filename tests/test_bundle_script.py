"""scripts/bundle_model.py records a training command users can run, and the shipped card does."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
from pathlib import Path
from types import ModuleType

import pytest
import torch
from readme_helpers import idx_folder

import mocohub
from mocohub.registry import WEIGHTS_DIR
from mocohub.training.config import preset
from mocohub.training.data import resolve_dataset
from mocohub.training.lincls import LinclsConfig, linear_eval
from mocohub.training.train import train

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


def test_a_run_and_its_lincls_result_bundle_into_a_loadable_model(
    bundle: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU machine's chain: ``mocohub train``, ``mocohub lincls`` on the test split,
    then this script with ``lincls.json`` as ``--quality`` and the hardware it ran on."""
    data = idx_folder(tmp_path / "fashion-mnist", train=32, val=16)
    run = tmp_path / "run"
    config = preset("fashion_mnist", width=8, dim=16, K=16, batch_size=8, bn_splits=2, epochs=1,
                    workers=0, knn_every=1, knn_k=3, precision="fp32", crop_min=0.6,
                    solarize=0.3)  # fmt: skip
    train(config, data, run, knn_data=(data, data), progress=False)
    probe = LinclsConfig(preset="small", cached_features=True, epochs=2, batch_size=16, workers=0)
    linear = linear_eval(run, data, run / "lincls", probe)
    assert linear["val_is_train"] is False and linear["val_samples"] == 16
    monkeypatch.setattr(bundle, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.chdir(tmp_path)
    command = "python -m mocohub train fashion-mnist --out runs/c --epochs 1"
    quality = str(run / "lincls" / "lincls.json")
    bundle.main([str(run), "--name", "candidate", "--half", "--quality", quality,
                 "--trained-on", "one NVIDIA H200 GPU", "--command", command])  # fmt: skip

    out = tmp_path / "weights" / "candidate"
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert meta["linear_top1"] == round(100 * linear["top1"], 2)
    knn = [json.loads(line) for line in (run / "metrics.jsonl").open()][-1]
    assert meta["knn_top1"] == round(100 * knn["knn_top1"], 2)
    assert meta["description"].endswith(
        "1 epochs on one NVIDIA H200 GPU. Small enough to ship inside the package; loads offline."
    )
    assert meta["metrics_protocol"].endswith("on the frozen features (cached features)")
    # The recipe line is the run's own, not a fixed text.
    assert meta["recipe"] == (
        "preset fashion_mnist: K=16, m=0.99, T=0.1, batch 8, cosine lr, batched small-image "
        "augmentation (smallest crop 0.6, solarize p 0.3), split BN x2"
    )
    model = mocohub.load(out)
    assert model.width == 8 and next(model.parameters()).dtype == torch.float32
    card = (out / "README.md").read_text()
    assert "one NVIDIA H200 GPU" in card and f"{meta['linear_top1']}" in card

    # A probe scored on its own training images is not a test-split figure: refused.
    on_train = dict(json.loads((run / "lincls" / "lincls.json").read_text()), val_is_train=True)
    (tmp_path / "on_train.json").write_text(json.dumps(on_train))
    with pytest.raises(SystemExit, match="evaluated on its training images"):
        bundle.linear_result(tmp_path / "on_train.json")
    (tmp_path / "other.json").write_text(json.dumps({"accuracy": 0.9}))
    with pytest.raises(SystemExit, match="holds no linear-probe result"):
        bundle.linear_result(tmp_path / "other.json")
