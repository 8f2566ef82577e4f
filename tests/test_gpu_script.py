"""``bench/gpu.py``, the one-call GPU check: its ``--dry-run`` runs every part at tiny
sizes on the CPU and must write real figures, the providers that really ran, and a
table; and ``bench/export.py`` must never time a row under a provider that did not run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from project_helpers import pyproject
from readme_helpers import idx_folder

ROOT = Path(__file__).resolve().parent.parent


def _bench_export() -> ModuleType:
    return _bench_module("export")


def _bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_bare_source_tree_imports_as_the_installed_package(tmp_path: Path) -> None:
    """The GPU machine runs the tree on PYTHONPATH with nothing installed: ``-S`` keeps
    this environment's editable install (a .pth finder) out, site-packages go on the
    path for torch, and every package pyproject maps must import from the tree."""
    import site

    mapping = pyproject()["tool"]["setuptools"]
    packages = sorted(mapping["package-dir"])
    code = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}]; sys.path += {site.getsitepackages()!r}\n"
        "import importlib, mocohub\n"
        f"for name in {packages!r}: print(importlib.import_module(name).__file__)\n"
        "import mocohub.training.train, mocohub.export.onnx\n"
        "print(mocohub.load('moco_r18_fashion_mnist').width)"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    *files, width = done.stdout.split()
    folders = [mapping["package-dir"][name] for name in packages]
    assert files == [str(ROOT / f / "__init__.py") for f in folders]
    assert width == "32"  # the bundled weights load from the tree too


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu")
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    return {"report": report, "markdown": (out / "gpu.md").read_text(), "stdout": done.stdout}


def _rows(report: dict[str, Any], part: str) -> dict[str, dict[str, Any]]:
    return {r["row"]: r for r in report["parts"][part]["rows"]}


def _real(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_the_dry_run_runs_every_part_and_measures_each_against_its_baseline(
    dry_run: dict[str, Any],
) -> None:
    report = dry_run["report"]
    assert report["dry_run"] is True
    assert list(report["parts"]) == ["tests", "step", "train", "embed", "fmnist"]
    for name, part in report["parts"].items():
        assert "error" not in part and "not_run" not in part, (name, part)

    tests = report["parts"]["tests"]
    assert tests["exit_code"] == 0 and tests["failed"] == 0
    assert "tests/test_gpu.py" in tests["files"]
    assert tests["skipped"] >= 2  # no CUDA here: the GPU tests skip, cleanly

    step = _rows(report, "step")
    ours = next(r for name, r in step.items() if name.startswith("MoCo v2 step, ours ("))
    assert ours["baseline"] == "supervised step, same settings" and ours["goals"] == {"ratio": 0.72}
    for r in step.values():
        assert _real(r["img_per_s"]) and r["ran_on"] == "cpu"
        if r["baseline"]:
            assert r["ratio"] == pytest.approx(r["img_per_s"] / r["baseline_img_per_s"])
            assert r["met"] in (None, r["ratio"] >= 0.72)

    train = report["parts"]["train"]["rows"]
    assert _real(train[0]["img_per_s"]) and train[0]["baseline_img_per_s"] == ours["img_per_s"]
    assert any(r["row"].startswith("JPEG decode, torchvision") for r in train)

    embed = _rows(report, "embed")
    many = embed["mocohub embed --nproc-per-node 2, torch fp32"]
    assert many["baseline"] == "the same command, one process" and many["goals"] == {"ratio": 1.4}
    assert _real(many["img_per_s"]) and _real(many["baseline_img_per_s"])
    assert many["identical_outputs"] is True  # torchrun's shares merge into one process's files

    fmnist = report["parts"]["fmnist"]
    assert fmnist["epochs"] == 2 and len(fmnist["knn_top1_per_epoch"]) == 2
    assert all(0.0 <= v <= 1.0 for v in fmnist["knn_top1_per_epoch"])


def test_a_call_cut_short_keeps_the_parts_that_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU machine's limit ends a call without warning: gpu.json and gpu.md are written
    after every part, so a part that never returns costs only its own figures."""
    gpu = _bench_module("gpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # main() sets it: undone after this test
    tests = {"passed": 3, "failed": 0, "skipped": 1, "exit_code": 0, "files": [], "rows": []}
    monkeypatch.setattr(gpu, "run_gpu_tests", lambda folder, limit_s: dict(tests))

    def killed(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("killed")  # not an Exception: part_guard cannot record it

    monkeypatch.setattr(gpu, "bench_fmnist", killed)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="killed"):
        gpu.main(["--dry-run", "--parts", "tests", "fmnist", "--out", str(out)])
    report = json.loads((out / "gpu.json").read_text())
    assert list(report["parts"]) == ["tests"] and report["parts"]["tests"]["passed"] == 3
    assert "3 passed, 0 failed, 1 skipped" in (out / "gpu.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.md"]  # no partial files


@pytest.mark.slow
def test_the_fmnist_sweep_trains_probes_and_bundles_a_recipe(tmp_path: Path) -> None:
    """bench/fmnist_sweep.sh, rehearsed on the CPU: one recipe (ONLY), shrunk (EXTRA),
    goes through mocohub train, mocohub lincls and bundle_model.py into a loadable model."""
    import tarfile

    import mocohub

    data = idx_folder(tmp_path / "fm", train=64, val=20)
    out = tmp_path / "out"
    env = {**os.environ, "ONLY": "w48_c085_sol04_e20", "HARDWARE": "a test's CPU",
           "EXTRA": "--epochs 1 --width 8 --batch-size 32 --queue-size 64"}  # fmt: skip
    command = ["bash", "bench/fmnist_sweep.sh", str(out), "200", str(data)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "sweep.tar.gz",
        "w48_c085_sol04_e20.safetensors",
    ]
    with tarfile.open(out / "sweep.tar.gz") as tar:
        tar.extractall(tmp_path / "runs", filter="data")
    run = tmp_path / "runs" / "w48_c085_sol04_e20"
    assert "exit 0" in (run / "log.txt").read_text()
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r.get("event") == "epoch"] == [1]
    assert json.loads((run / "lin" / "lincls.json").read_text())["val_is_train"] is False
    assert "a test's CPU" in (run / "README.md").read_text()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(run / "config.json", bundle / "config.json")
    shutil.copy(out / "w48_c085_sol04_e20.safetensors", bundle / "model.safetensors")
    model = mocohub.load(bundle)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 64)  # width 8: 8 * 8 features


def test_the_fmnist_part_trains_on_the_idx_folder_it_is_given(tmp_path: Path) -> None:
    """``--fmnist-data`` (the IDX files carried to the GPU machine) is what the part trains
    on, with the shipped model's recipe, not the 300 committed samples."""
    data = idx_folder(tmp_path / "fm", train=40, val=10)
    out = tmp_path / "out"
    command = [sys.executable, "bench/gpu.py", "--dry-run", "--parts", "fmnist"]
    command += ["--fmnist-data", str(data), "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fmnist = json.loads((out / "gpu.json").read_text())["parts"]["fmnist"]
    assert (fmnist["data"], fmnist["images"], fmnist["epochs"]) == (str(data), 40, 2)
    assert fmnist["config"]["crop_min"] == 0.85 and fmnist["config"]["lr"] == 0.12


@pytest.mark.slow
def test_the_dry_run_records_the_providers_that_really_ran(dry_run: dict[str, Any]) -> None:
    """The CPU row names the CPU provider; CUDA and TensorRT, which cannot run here
    (CPU build: not installed; GPU build: no driver, a silent fallback), are reported
    unavailable with no figure, never timed under their names."""
    report = dry_run["report"]
    embed = _rows(report, "embed")
    torch_row = embed["mocohub embed, torch fp32"]
    assert _real(torch_row["img_per_s"]) and _real(torch_row["baseline_img_per_s"])
    cpu = embed["mocohub embed, onnxruntime CPUExecutionProvider fp32"]
    assert cpu["providers"] == ["CPUExecutionProvider"] and _real(cpu["img_per_s"])
    assert cpu["ran_on"] == "CPUExecutionProvider"
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        r = embed[f"mocohub embed, onnxruntime {provider} fp16"]
        assert r["requested"] == provider and r["img_per_s"] is None and r["ratio"] is None
        assert r["unavailable"] and r["ran_on"] == "unavailable"
        assert r["providers"][:1] != [provider]
    assert report["machine"]["onnxruntime_available_providers"]

    table = dry_run["markdown"].splitlines()
    assert "| part | row | ran on | img/s | baseline (same run) | ratio | goal | met |" in table
    lines = {line.split(" | ")[1]: line for line in table if line.startswith("| embed |")}
    assert "| unavailable | " in lines["mocohub embed, onnxruntime CUDAExecutionProvider fp16"]
    assert (
        "| CPUExecutionProvider | " in lines["mocohub embed, onnxruntime CPUExecutionProvider fp32"]
    )
    assert sum(line.startswith("| step |") for line in table) == 4
    assert "`pytest -m gpu`" in dry_run["markdown"] and "fmnist | 2 epochs" in dry_run["markdown"]


class _FakeEmbedder:
    """Stands in for OnnxEmbedder: its session reports ``providers`` as in use."""

    providers: ClassVar[list[str]] = []

    def __init__(self, path: Path, provider: str, **options: Any) -> None:
        if not self.providers:
            raise RuntimeError("libonnxruntime_providers_cuda.so: cannot open shared object")
        self.session = SimpleNamespace(get_providers=lambda: list(self.providers))


@pytest.mark.parametrize(
    ("provider", "in_use", "unavailable"),
    [
        ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], None),
        ("tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"], "fell back to CUDA"),
        ("cuda", ["CPUExecutionProvider"], "fell back to CPUExecutionProvider"),
        ("cuda", [], "RuntimeError: libonnxruntime_providers_cuda.so"),
    ],
)
def test_an_export_row_is_timed_only_under_the_provider_that_ran(
    monkeypatch: pytest.MonkeyPatch, provider: str, in_use: list[str], unavailable: str | None
) -> None:
    bench_export = _bench_export()
    monkeypatch.setattr(_FakeEmbedder, "providers", in_use)
    monkeypatch.setattr(bench_export, "OnnxEmbedder", _FakeEmbedder)
    embedder, record = bench_export.ort_row(Path("model.fp16.onnx"), provider)
    assert record["requested"] == bench_export.PROVIDER_NAMES[provider]
    assert record["providers"] == in_use
    if unavailable is None:
        assert embedder is not None and "unavailable" not in record
    else:
        assert embedder is None and unavailable in record["unavailable"]
