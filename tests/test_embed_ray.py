"""mocohub embed --engine ray: the same files as the local engine, on a local Ray instance.

The tests that need Ray start one instance for the whole file (``ray.init(num_cpus=2)``,
about 10 s) and skip, saying why, where Ray Data is not installed. Both engines run at
``--precision fp32`` with one thread per model (the local run under the ``one_thread``
fixture, each Ray actor on its one CPU), so their features must be the same bytes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import run_cli
from embed_helpers import copy_samples, make_model, write_broken_files

from mocohub.embed import EmbedSettings, output_files
from mocohub.embed_ray import _RayEngine
from mocohub.embed_ray_runtime import INSTALL


@pytest.fixture(scope="module")
def ray_installed() -> Any:
    """The ray module; the test is skipped, saying why, where Ray Data is not installed."""
    ray = pytest.importorskip("ray", reason='the Ray engine needs `pip install "mocohub[ray]"`')
    pytest.importorskip("ray.data", reason='the Ray engine needs `pip install "mocohub[ray]"`')
    return ray


@pytest.fixture(scope="module")
def ray_instance(ray_installed: Any) -> Iterator[Any]:
    """One local Ray instance of 2 CPUs for every test of this file that runs Ray."""
    ray = ray_installed
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "gray")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 real images (PNG, JPEG, WebP) and 8 unreadable files (corrupt, truncated, a bomb...)."""
    root = tmp_path_factory.mktemp("data") / "images"
    copy_samples(root, 10)
    write_broken_files(root / "broken")
    return root


def embed(data: Path, out: Path, model: Path, capsys: Any, *extra: str) -> str:
    """``mocohub embed`` at fp32, batches of 4 (one holds only broken files), parts of 8."""
    args = ["embed", data, "--out", out, "--model", model, "--precision", "fp32", "-q"]
    code, stdout, stderr = run_cli([*args, "--batch-size", "4", "--part-size", "8", *extra], capsys)
    assert code == 0, stderr
    return stdout


def same_files(local: Path, ray_out: Path) -> None:
    """Every output file of the Ray run is byte for byte the local run's."""
    mine, theirs = output_files(local), output_files(ray_out)
    for role in ("features", "manifest", "errors", "meta"):
        assert theirs[role].read_bytes() == mine[role].read_bytes(), role
    assert not theirs["parts"].exists()


def test_ray_writes_the_local_engines_npy_manifest_errors_and_record(
    ray_instance: Any, images: Path, model_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    local, ray_out = tmp_path / "local" / "feats.npy", tmp_path / "ray" / "feats.npy"
    embed(images, local, model_dir, capsys, "--workers", "0")
    said = embed(images, ray_out, model_dir, capsys, "--engine", "ray", "--concurrency", "2")
    assert "embedded 10 images, skipped 8" in said
    same_files(local, ray_out)
    errors = [json.loads(line) for line in output_files(ray_out)["errors"].read_text().splitlines()]
    broken = write_broken_files(tmp_path / "kinds")  # name -> what its reason says
    assert sorted(Path(e["path"]).name for e in errors) == sorted(broken)
    assert len(np.load(ray_out)) == 10
    # the same record: the local engine finds the Ray engine's output up to date
    assert "is up to date" in embed(images, ray_out, model_dir, capsys, "--workers", "0")


def write_shard(path: Path, images: list[Path]) -> None:
    """A webdataset shard: the images as samples, one sample without an image, one whose
    .jpg is text."""
    webdataset = pytest.importorskip("webdataset", reason="webdataset inputs need mocohub[wds]")
    path.parent.mkdir(parents=True)
    with webdataset.TarWriter(str(path)) as sink:
        for n, image in enumerate(images):
            sink.write({"__key__": f"sample{n:03d}", "png": image.read_bytes(), "cls": str(n)})
            if n == 2:
                sink.write({"__key__": "labels-only", "cls": "1"})
                sink.write({"__key__": "text-as-jpeg", "jpg": b"not an image\n"})


def test_ray_writes_the_local_engines_parquet_from_webdataset_shards(
    ray_instance: Any, model_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    shard = tmp_path / "shards" / "000000.tar"
    write_shard(shard, sorted(copy_samples(tmp_path / "png", 6)))
    local, ray_out = tmp_path / "local" / "feats.parquet", tmp_path / "ray" / "feats.parquet"
    embed(shard, local, model_dir, capsys, "--workers", "0")
    ray = ("--engine", "ray", "--concurrency", "1")
    embed(shard, ray_out, model_dir, capsys, *ray, "--output-format", "parquet")
    same_files(local, ray_out)
    manifest = output_files(ray_out)["manifest"].read_text().splitlines()
    assert manifest == [f"sample{n:03d}" for n in range(6)]  # the keys, in shard order
    errors = output_files(ray_out)["errors"].read_text()
    assert "labels-only" in errors and "text-as-jpeg" in errors


def test_a_model_that_fails_in_the_actors_is_its_own_error(
    ray_instance: Any, images: Path, model_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    """The driver reads the model on its CPU; the actors open it on --device, which fails."""
    out = tmp_path / "feats.npy"
    args = ["embed", images, "--out", out, "--model", model_dir, "-q", "--engine", "ray"]
    code, _, stderr = run_cli([*args, "--concurrency", "1", "--device", "tpu9"], capsys)
    assert code == 2  # the ConfigError raised in the actor, as it is
    assert stderr.strip() == "Error: Unknown device 'tpu9'; use auto, cpu, cuda or cuda:N."
    assert not out.exists()


def test_parts_in_another_precision_than_the_runs_are_left_to_embed_again(
    tmp_path: Path,
) -> None:
    """auto: two actors may settle on different precisions; a part is saved in the run's only."""
    from mocohub.embed_ray import _Model
    from mocohub.preprocessing import Preprocessing

    prep = Preprocessing(28, 32, (0.5,), (0.5,), channels=1)
    model = _Model(prep, 2, "auto", False, False)
    run: dict[str, Any] = {"key": "k", "precision": None}
    (tmp_path / "run.json").write_text("{}")
    waiting = {0: (range(0, 2), "d0"), 1: (range(2, 3), "d1"), 2: (range(3, 4), "d2")}

    def back(batch: int, precision: str) -> dict[str, Any]:
        features = np.full((1, 2), float(batch + 1), np.float32)
        return {"batch": batch, "rows": [batch], "failed": [], "features": features,
                "precision": precision}  # fmt: skip

    results = [back(0, "bf16"), back(2, "fp32"), back(1, "fp32"), back(3, "bf16")]
    bar = type("Bar", (), {"update": lambda self, n: None})()
    settings = EmbedSettings(model="m")
    _RayEngine._save(iter(results), waiting, tmp_path, model, settings, run, range(4), bar)
    # part 0 came back mixed: the run goes on in fp32 (what auto falls back to), part 0 is
    # not saved; part 1 (fp32) is; part 2 (bf16) waits for the fp32 pass
    assert run["precision"] == "fp32"
    assert json.loads((tmp_path / "run.json").read_text())["precision"] == "fp32"
    assert sorted(waiting) == [0, 2]
    assert json.loads((tmp_path / "000001.json").read_text())["rows"] == [2]
    assert not (tmp_path / "000000.json").exists()
    assert not (tmp_path / "000002.json").exists()


def test_without_ray_the_engine_says_how_to_install_it(
    images: Path, model_dir: Path, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    out = tmp_path / "feats.npy"
    args = ["embed", images, "--out", out, "--model", model_dir, "--engine", "ray"]
    code, _, stderr = run_cli(args, capsys)
    assert code != 0
    assert INSTALL in stderr
    assert "Traceback" not in stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--concurrency", "2"], "options of --engine ray"),
        (["--address", "auto"], "options of --engine ray"),
    ],
)
def test_ray_options_without_the_ray_engine_are_refused(
    extra: list[str], said: str, images: Path, model_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    args = ["embed", images, "--out", tmp_path / "f.npy", "--model", model_dir, *extra]
    code, _, stderr = run_cli(args, capsys)
    assert code != 0
    assert said in stderr


def test_the_ray_engine_refuses_workers_and_a_second_launcher(
    ray_installed: Any,
    images: Path,
    model_dir: Path,
    tmp_path: Path,
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ["embed", images, "--out", tmp_path / "f.npy", "--model", model_dir, "--engine", "ray"]
    code, _, stderr = run_cli([*args, "--workers", "2"], capsys)
    assert code != 0
    assert "drop --workers" in stderr
    code, _, stderr = run_cli([*args, "--nproc-per-node", "2"], capsys)
    assert code != 0
    assert "without torchrun" in stderr
    monkeypatch.setenv("LOCAL_RANK", "0")
    code, _, stderr = run_cli(args, capsys)
    assert code != 0
    assert "without torchrun" in stderr


def test_a_failure_inside_ray_names_the_exception_the_worker_raised() -> None:
    from mocohub.embed_ray_runtime import mocohub_error

    text = (
        "ray::MapWorker(MapBatches(_Embed)).submit() (pid=1, ip=10.0.0.2)\n"
        '  File "model.py", line 3, in forward\n'
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
        "\n"
        "The above exception was the direct cause of the following exception:\n"
        "\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
    )
    said = str(mocohub_error(RuntimeError(text)))
    assert "(torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB)" in said
    assert "rerun the same command to resume" in said


def test_a_file_the_workers_do_not_find_but_the_driver_has_stops_the_run(tmp_path: Path) -> None:
    """Nodes that do not share the inputs: refused, not recorded as skipped images."""
    from mocohub.embed_ray import _unseen_files
    from mocohub.errors import InputError

    here, gone = tmp_path / "a.png", tmp_path / "b.png"
    here.write_bytes(b"png")
    names = [str(gone), str(here)]
    missing = {"batch": 0, "failed": [(0, "file not found (or a broken link)")]}
    assert list(_unseen_files(iter([missing]), names, None)) == [missing]  # gone everywhere
    unseen = {"batch": 0, "failed": [(1, "file not found (or a broken link)")]}
    with pytest.raises(InputError, match="must see the inputs under the same paths"):
        list(_unseen_files(iter([unseen]), names, None))
