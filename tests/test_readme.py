"""The README walkthrough: every command and snippet of README.md, run as a user types it.

Each ``mocohub`` line runs through the real command line in this process
(``mocohub.cli.main``, what ``python -m mocohub`` runs), so that a whole
walkthrough costs one interpreter start. Lines that start processes run as the
user's would: ``--nproc-per-node``/``--nodes``/``torchrun`` launch their workers
as processes (the launcher itself runs here; the second "machine" of ``--nodes
2`` is a process), ``serve`` is a process that ``curl`` queries, and ``push``,
the benchmarks and the quickstart run as processes with the environment a user
sets. Only the data is replaced, by tiny stand-ins shaped as a user's would be
(``readme_helpers.py``): ``imagenet/`` is an ImageFolder tree (with and without
``train/``/``val/``), ``fashion-mnist`` a folder of IDX files (Debian's location
is redirected to it), ``photos/`` a few JPEGs and PNGs, ``ref.pth.tar`` and
``moco_v2_800ep_pretrain.pth.tar`` a reference-format checkpoint of a narrow
ResNet-18, the download of ``moco_v2_r50_800ep`` that checkpoint served from
127.0.0.1 under the registry's name and md5 check, ``hf-hub:org/name@v1`` a
pre-filled Hugging Face cache read offline.

:data:`COMMANDS` and :data:`SNIPPETS` map each README command line and Python
block, exactly as written (whitespace normalised, bash comments dropped), to the
test that runs it, with the flags that test adds (sizes only, each with its
reason) and the placeholder words it fills in. The first test checks that the
README shows exactly these: change a README line and this module fails until
the line's test changes with it.

``test_readme_matrix.py`` runs what the README promises for every kind of input
(each preset on each kind of data, each kind of model source).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hub_helpers import serve
from PIL import Image
from readme_helpers import (
    REFERENCE,
    ROOT,
    Result,
    UserData,
    environment,
    fill_hf_cache,
    finish,
    free_ports,
    launch_here,
    mocohub,
    ok,
    readme_commands,
    readme_python_blocks,
    run_python,
    start,
    user_data,
)

README = ROOT / "README.md"


# --------------------------------------------------------------------------
# The table: README line -> the test that runs it
# --------------------------------------------------------------------------


def flags(text: str) -> tuple[str, ...]:
    return tuple(text.split())


@dataclasses.dataclass(frozen=True)
class Line:
    """How a test runs one README command.

    Args:
        test: the test function that runs it (``test_x`` here, or ``tests/FILE.py::test_x``).
        add: flags appended to the line: sizes only (``why`` says which and why).
        fill: README word -> the words that replace it (placeholders such as
            ``HOST``; ``{port}`` is a free port chosen by the test).
        why: why each added flag and filled word is there.
        prelude: for an inline Python call, the code that defines its undefined names.
    """

    test: str
    add: tuple[str, ...] = ()
    fill: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    why: str = ""
    prelude: str = ""


TINY_TRAIN = flags(
    "--arch resnet18 --width 8 --dim 16 --queue-size 16 --batch-size 8 --epochs 1 --image-size 32"
)
WHY_TINY_TRAIN = (
    "sizes only: a ResNet-18 of width 8 instead of the preset's ResNet-50, 16-d keys, a queue "
    "of 16, a global batch of 8 crops of 32 px, one epoch: one step on the 8 training images"
)
TINY_LINCLS = flags("--epochs 1 --batch-size 8")

COMMANDS: dict[str, Line] = {
    # From a fresh clone
    "pip install -e . && python examples/quickstart.py": Line(
        "tests/test_quickstart.py::test_quickstart_runs_offline_and_reports_real_results",
        why="run as written from a folder holding the checkout's examples/; the pip part is "
        "checked by test_install_commands_name_this_checkout_and_its_extras",
    ),
    'pip install -e ".[dev]" && python -m pytest -n auto': Line(
        "test_install_commands_name_this_checkout_and_its_extras",
        why="`python -m pytest -n auto` is the command running this test; .ci/run runs the "
        "same line, checked there",
    ),
    # Install
    "pip install mocohub": Line("test_install_commands_name_this_checkout_and_its_extras"),
    'pip install -e ".[dev]"': Line("test_install_commands_name_this_checkout_and_its_extras"),
    'pip install "mocohub[faiss]"': Line("test_install_commands_name_this_checkout_and_its_extras"),
    "pip install --no-deps mocohub": Line(
        "test_install_commands_name_this_checkout_and_its_extras"
    ),
    'pip install "mocohub[det]"': Line("test_install_commands_name_this_checkout_and_its_extras"),
    'pip install "mocohub[wds]"': Line("test_install_commands_name_this_checkout_and_its_extras"),
    'pip install "mocohub[ray]"': Line("test_install_commands_name_this_checkout_and_its_extras"),
    'pip install "mocohub[parquet]"': Line(
        "test_install_commands_name_this_checkout_and_its_extras"
    ),
    "mocohub env": Line("test_command_line_basics"),
    "DistributedDataParallel(model)": Line(
        "test_moco_under_distributed_data_parallel",
        prelude="from torch.nn.parallel import DistributedDataParallel\n",
        why="model: a narrow MoCo, in a process group of one (gloo); test_distributed.py "
        "checks two processes",
    ),
    # Pre-training
    "mocohub train imagenet/ --out runs/v2": Line(
        "test_train_one_process", add=TINY_TRAIN, why=WHY_TINY_TRAIN
    ),
    "mocohub train": Line(
        "test_train_one_process", why="names the command; the lines above run it in full"
    ),
    "mocohub train imagenet/ --out runs/v2 --nproc-per-node 8": Line(
        "test_train_nproc_per_node",
        add=(*TINY_TRAIN, "--master-port", "{port}"),
        fill={"8": ("2",)},
        why=f"2 CPU processes (gloo) stand for 8 GPUs; {WHY_TINY_TRAIN} (4 per process); "
        "--master-port: a free port, as the default 29500 may be taken on a shared machine",
    ),
    "mocohub train imagenet/ --out runs/v2 --nodes 2 --node-rank 0 --master-addr HOST "
    "--nproc-per-node 8": Line(
        "test_train_two_nodes",
        add=(*TINY_TRAIN, "--master-port", "{port}"),
        fill={"HOST": ("127.0.0.1",), "8": ("1",)},
        why="both nodes on this machine: HOST is 127.0.0.1, one CPU process per node, and the "
        f"second node runs the same line with --node-rank 1; {WHY_TINY_TRAIN}; --master-port: "
        "a free port",
    ),
    "mocohub train fashion-mnist --preset fashion_mnist --out runs/fm --knn-val fashion-mnist": (
        Line(
            "test_train_fashion_mnist",
            add=flags("--width 8 --dim 16 --queue-size 16 --batch-size 8 --epochs 1"),
            why="sizes only: width 8, 16-d keys, a queue of 16, batches of 8, one epoch; "
            "fashion-mnist is 8 training and 8 test images in IDX files",
        )
    ),
    "mocohub train imagenet/ --out runs/v2 --resume auto": Line(
        "test_train_resume_auto",
        add=(*TINY_TRAIN[:-4], "--epochs", "2", "--image-size", "32"),
        why="the sizes of the run it continues (which ended after epoch 1), one epoch more",
    ),
    "mocohub train fashion-mnist --preset fashion_mnist_v3 --out runs/fm-v3": Line(
        "tests/test_train_v3.py::test_train_and_lincls_v3_from_the_command_line",
        why="that test runs this preset on the bundled samples with sizes only (width 8, "
        "16-d keys, 32-wide MLPs, 16 px crops, one epoch of batches of 32), then lincls",
    ),
    # Embedding at scale
    "mocohub embed photos/ --out feats.npy --model M --nproc-per-node 8": Line(
        "tests/test_embed_dist.py::test_torchrun_with_two_processes_writes_the_one_process_files",
        why="2 CPU processes stand for 8 GPUs, on an ImageFolder tree with an undecodable "
        "file; the merged files equal a one-process run's byte for byte",
    ),
    "torchrun --nproc-per-node 8 -m mocohub embed photos/ --out feats.npy --model M": Line(
        "tests/test_embed_dist.py::test_torchrun_with_two_processes_writes_the_one_process_files",
        why="--nproc-per-node starts torchrun, whose workers run `python -m mocohub embed` "
        "exactly as this line's do; srun's variables: test_under_srun_...",
    ),
    "mocohub embed photos/ --out feats.npy --model M --engine ray --address auto "
    "--num-gpus-per-worker 1": Line(
        "tests/test_embed_ray.py::test_ray_writes_the_local_engines_npy_manifest_errors_and_record",
        why="a local Ray instance of 2 CPUs stands for the cluster (no --address auto: none "
        "is running; no GPU, so 0 GPUs per worker) on a folder with unreadable files; the "
        "files equal the local engine's byte for byte",
    ),
    "mocohub embed 'shards/{000000..000999}.tar' --out shards.parquet --model M": Line(
        "tests/test_embed_sources.py::test_webdataset_shards_round_trip_their_keys",
        why="a brace pattern over tiny shards; parquet output: "
        "test_parquet_output_holds_ids_and_the_npy_rows",
    ),
    "mocohub embed items.parquet --id-column id --path-column path --out feats.npy --model M": (
        Line(
            "tests/test_embed_sources.py::test_tables_of_ids_and_paths_round_trip_their_ids",
            why="a Parquet and a CSV table of a few sample images",
        )
    ),
    # Detection
    "python -m mocohub.detection.synthetic --out fmnist-det": Line(
        "tests/test_detection_synthetic.py::test_the_same_command_writes_byte_identical_files",
        why="that test writes a small set twice and compares the bytes",
    ),
    "mocohub finetune-det fmnist-det --model moco_r18_fashion_mnist --out runs/det": Line(
        "tests/test_finetune_det.py::test_finetune_then_eval_det",
        why="sizes only: 4 iterations of 2 images of 64 px on a tiny COCO folder, a width-8 "
        "backbone, fp32 pinned; test_two_processes_under_gloo runs --nproc-per-node 2",
    ),
    "mocohub eval-det runs/det --data fmnist-det": Line(
        "tests/test_finetune_det.py::test_finetune_then_eval_det",
        why="evaluates the run that test fine-tunes",
    ),
    # Evaluation
    "mocohub knn --model runs/fm --train fashion-mnist": Line("test_knn_of_the_run"),
    "mocohub lincls imagenet/ --model moco_v2_800ep_pretrain.pth.tar --out lincls/": Line(
        "test_lincls_of_a_reference_checkpoint",
        add=(*TINY_LINCLS, "--image-size", "32"),
        why="sizes only: one epoch of batches of 8, crops of 32 px",
    ),
    "mocohub lincls fashion-mnist --model runs/fm --out runs/fm/lincls --preset small": Line(
        "test_lincls_small_of_the_run", add=TINY_LINCLS, why="sizes only: one epoch of 8"
    ),
    "torchrun --nproc-per-node 8 -m mocohub lincls imagenet/ --model M --out lincls/": Line(
        "test_torchrun_lincls",
        add=(*TINY_LINCLS, "--image-size", "32"),
        fill={"8": ("2", "--master-port", "{port}"), "M": (REFERENCE,)},
        why="2 CPU processes (gloo) for 8 GPUs, on a free port; M is the reference checkpoint; "
        "sizes only: one epoch of 8, crops of 32 px",
    ),
    # Pretrained models
    "torch.load(weights_only=True)": Line(
        "tests/test_loading.py::test_pickle_that_would_run_code_is_refused",
        why="says how mocohub reads pickles; that test shows a code-running pickle refused",
    ),
    "mocohub list": Line("test_command_line_basics"),
    "mocohub info NAME": Line(
        "test_command_line_basics", fill={"NAME": ("moco_v2_r50_800ep",)}, why="NAME: a name"
    ),
    "mocohub convert ref.pth.tar --out DIR": Line("test_convert_and_push_offline"),
    "mocohub push DIR org/name": Line(
        "test_convert_and_push_offline", why="offline: must fail with one clear line"
    ),
    # Embedding and search
    "mocohub embed photos/ --out feats.npy --model moco_v2_r50_800ep": Line(
        "test_embed_index_search"
    ),
    "mocohub index feats.npy --out feats.index": Line("test_embed_index_search"),
    "mocohub search feats.index --query shoe.jpg --k 10 --grid shoe.png": Line(
        "test_embed_index_search"
    ),
    "mocohub embed-merge": Line(
        "test_embed_shards_and_merge", why="names the command; the test runs it in full"
    ),
    'mocohub.FeatureExtractor(model)(["a.png", image, tensor])': Line(
        "test_python_feature_extractor",
        prelude='import mocohub\nmodel = "moco_r18_fashion_mnist"\n'
        'image = PIL.Image.open("shoe.jpg")\ntensor = torch.rand(3, 40, 40)\n',
        why="model: the bundled model's name (FeatureExtractor takes what mocohub.load takes)",
    ),
    "PIL.ImageOps.exif_transpose(image)": Line(
        "tests/test_embed.py::test_a_path_gets_its_exif_orientation_and_a_pil_image_is_taken_as_it_is",
        why="a JPEG whose EXIF says to rotate it: the transposed image's rows equal the path's",
    ),
    "mocohub.Index.build(feats, ids).search(queries, k=10)": Line(
        "test_python_index",
        prelude="import mocohub\n"
        "feats = np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32)\n"
        'ids = [f"img{i}.jpg" for i in range(20)]\n'
        "queries = feats[:3]\n",
    ),
    # Export and serving
    "mocohub export moco_r18_fashion_mnist --out out/fm --int8 --calibration "
    "samples/fashion-mnist --with-preprocessing": Line(
        "test_export_embed_serve",
        add=flags("--calibration-size 32"),
        why="size only: calibrate and verify on 32 of the 300 samples (default 256)",
    ),
    "mocohub embed photos/ --out feats.npy --model out/fm --backend onnxruntime": Line(
        "test_export_embed_serve"
    ),
    'pip install "mocohub[serve]" && mocohub serve out/fm --port 8000': Line(
        "test_export_embed_serve",
        fill={"8000": ("{port}",)},
        why="a free port; the pip part is checked by test_install_commands_...",
    ),
    "curl --data-binary @shoe.png -H 'Content-Type: image/png' localhost:8000/embed": Line(
        "test_export_embed_serve", fill={"localhost:8000/embed": ("localhost:{port}/embed",)}
    ),
    "mocohub.export.OnnxEmbedder(path)": Line(
        "test_export_embed_serve",
        prelude='import mocohub.export\npath = "out/fm/model.onnx"\n',
        why="path: the fp32 graph that the export line above wrote",
    ),
    # Command line, torch.hub
    "mocohub --help": Line("test_command_line_basics"),
    "mocohub --version": Line("test_command_line_basics"),
    'torch.hub.load(checkout, "moco_r50", source="local", pretrained=False)': Line(
        "test_torch_hub_from_a_checkout", prelude="checkout = str(ROOT)  # this checkout\n"
    ),
    # Faster than the reference
    "python bench/bench_moco_step.py": Line(
        "test_benchmarks_run",
        add=flags(
            "--warmup 1 --momentum-repeats 1 --momentum-models resnet18 --shuffle-shapes 2x3x8x8 "
            "--shuffle-repeats 1 --dim 16 --step-batch 8 --step-size 16 --step-width 4 --queue 16 "
            "--step-warmup 1 --step-repeats 1 --json bench.json"
        ),
        why="sizes only (one repeat of each part, the momentum update of ResNet-18 alone, 8x8 "
        "images to shuffle, a width-4 ResNet-18 on "
        "16 px for the step); --json: write the figures in the test's folder",
    ),
    "python bench/train_step.py": Line(
        "test_benchmarks_run",
        add=flags("--batch 8 --size 16 --warmup 1 --repeats 1 --no-bf16 --json train_step.json"),
        why="sizes only (batches of 8 images of 16 px, one step per row; the script has no "
        "width option, so its ResNet-18 stays 64 wide); --no-bf16: skip the rows of forced "
        "bf16, which take most of the run on CPUs without bf16 units; --json as above",
    ),
}

BACKBONES = """\
import mocohub, torchvision

net = mocohub.resnet50()  # exactly torchvision's ResNet-50
torchvision.models.resnet50().load_state_dict(net.state_dict())  # loads as is
small = mocohub.resnet18(num_classes=128, small_stem=True, in_channels=1, width=32)"""

MOCO = """\
import torch, torch.nn.functional as F, torchvision
from mocohub.training import MoCo

model = MoCo(torchvision.models.resnet50, dim=128, K=65536, m=0.999, T=0.2, mlp=True)
logits, labels = model(im_q, im_k)  # positive in column 0
loss = F.cross_entropy(logits, labels)"""

PRETRAINED = """\
import mocohub, torch

model = mocohub.load("moco_v2_r50_800ep")  # downloaded once, md5-checked, cached
model = mocohub.load("moco_r18_fashion_mnist")  # ships in the package: no network
model = mocohub.load("hf-hub:org/name@v1")  # a Hugging Face Hub repo
model = mocohub.load("moco_v2_800ep_pretrain.pth.tar")  # a reference checkpoint
model = mocohub.load("runs/fm")  # a mocohub train run (or a folder, .safetensors, URL)
transform = model.mocohub_config.preprocessing.transform()  # PIL image -> tensor
features = model(transform(image).unsqueeze(0))  # 2048-d for ResNet-50 (fc is Identity)

model = torch.hub.load("org/mocohub", "moco_r50")  # torch.hub: moco_r50, moco_v1_r50, ..."""


@dataclasses.dataclass(frozen=True)
class Snippet:
    """How a test runs one README Python block: ``prelude`` defines its undefined names."""

    test: str
    prelude: str = ""


SNIPPETS: dict[str, Snippet] = {
    BACKBONES: Snippet("test_backbones_snippet"),
    MOCO: Snippet(
        "test_moco_snippet",
        # Two views of a batch of 2; 64 px keep the ResNet-50 forward short on a CPU.
        prelude="im_q, im_k = torch.rand(2, 2, 3, 64, 64)\n",
    ),
    PRETRAINED: Snippet("test_pretrained_snippet", prelude='image = PIL.Image.open("shoe.jpg")\n'),
}


def normalise_snippet(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def test_the_readme_shows_exactly_the_commands_and_snippets_of_the_table() -> None:
    text = README.read_text(encoding="utf-8")
    commands = set(readme_commands(text))
    assert commands - set(COMMANDS) == set(), "README commands with no test: add them above"
    assert set(COMMANDS) - commands == set(), "commands no longer in the README: update"
    snippets = {normalise_snippet(block) for block in readme_python_blocks(text)}
    assert snippets - set(SNIPPETS) == set(), "README Python blocks with no test: add them"
    assert set(SNIPPETS) - snippets == set(), "Python blocks no longer in the README: update"


def test_the_table_names_tests_that_exist_and_fills_words_the_lines_have() -> None:
    entries: list[Any] = [*COMMANDS.values(), *SNIPPETS.values()]
    for entry in entries:
        file, _, name = entry.test.rpartition("::")
        source = (ROOT / file).read_text() if file else Path(__file__).read_text()
        assert re.search(rf"^def {name}\(", source, re.MULTILINE), entry.test
    for command, line in COMMANDS.items():
        words = command.split()
        assert all(word in words for word in line.fill), (command, line.fill)
        assert not line.add or line.why, f"{command}: say why each flag is added"


# --------------------------------------------------------------------------
# Running a line as typed
# --------------------------------------------------------------------------


def typed(command: str, **values: object) -> list[str]:
    """The words of README ``command`` as the test runs it: placeholders filled and size
    flags added as :data:`COMMANDS` says, ``{port}`` and the like from ``values``."""
    line = COMMANDS[command]
    words: list[str] = []
    for word in shlex.split(command, comments=True):
        words += line.fill.get(word, (word,))
    return [w.format(**values) if "{" in w else w for w in (*words, *line.add)]


def run_line(command: str, **values: object) -> Result:
    """README ``command`` (a ``mocohub`` line) in this process, as :func:`typed` says."""
    return mocohub(typed(command, **values))


def run_inline(call: str, result: str, **names: Any) -> dict[str, Any]:
    """The README's inline Python ``call`` as ``result = CALL`` after its prelude."""
    return run_python(f"{result} = {call}", COMMANDS[call].prelude, **names)


def readme_snippet(key: str) -> str:
    """The README block that equals ``key`` (so that the README's own text is what runs)."""
    blocks = [b for b in readme_python_blocks(README.read_text()) if normalise_snippet(b) == key]
    assert blocks, "this block is no longer in the README"
    return blocks[0]


def last_state(run: Path) -> dict[str, Any]:
    from mocohub.training import checkpoint as ckpt

    latest = ckpt.find_latest_checkpoint(run)
    assert latest is not None, f"no checkpoint in {run}"
    return ckpt.load_checkpoint(latest)


def epochs_logged(run: Path) -> list[int]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in records if r.get("event") == "epoch"]


# --------------------------------------------------------------------------
# The user's files and machine
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserData]:
    """The user's files; Debian's Fashion-MNIST location pointed at the tiny IDX folder;
    downloads into a fresh torch hub cache, online (127.0.0.1 only is ever reached)."""
    from mocohub.training import data as training_data

    made = user_data(tmp_path_factory.mktemp("readme"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training_data, "FASHION_MNIST_DIR", made.fashion_mnist)
        patch.setenv("TORCH_HOME", str(made.root / "torch"))
        for name in ("MOCOHUB_OFFLINE", "HF_HUB_OFFLINE"):
            patch.delenv(name, raising=False)
        for name in ("NO_PROXY", "no_proxy"):
            patch.setenv(name, "127.0.0.1,localhost")
        yield made


FASHION_MNIST = (
    "mocohub train fashion-mnist --preset fashion_mnist --out runs/fm --knn-val fashion-mnist"
)


@pytest.fixture(scope="module")
def fm_run(data: UserData) -> tuple[Path, Result]:
    """What the README's Fashion-MNIST training command writes (run once for the module):
    the run folder and the command's result."""
    folder = data.root / "fm-user"
    folder.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        result = run_line(FASHION_MNIST)
    return folder / "runs" / "fm", result


@pytest.fixture
def user(data: UserData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder, the current directory, with the user's files in it."""
    folder = data.working_folder(tmp_path / "user", "imagenet", "photos", REFERENCE, "ref.pth.tar")
    monkeypatch.chdir(folder)
    return folder


def copy_fm_run(fm_run: tuple[Path, Result], user: Path) -> None:
    """``runs/fm`` in the user's folder: a copy, as the commands may write into it."""
    ok(fm_run[1])
    shutil.copytree(fm_run[0], user / "runs" / "fm", symlinks=True)


def tiny_moco_v2_r50_800ep(
    data: UserData, registry_rows: Callable[..., Any], location: str | None = None
) -> None:
    """Registry entry ``moco_v2_r50_800ep`` with the reference checkpoint's tiny network
    (ResNet-18 of width 8, 16-d MLP head) and md5 in place of the 200 MB ResNet-50's; its
    name, file name, preprocessing and md5 check stay. ``location``: where its file is
    downloaded from (default: the real URL)."""
    from mocohub import registry
    from mocohub.artifact import HeadConfig

    real = registry.get_weights("moco_v2_r50_800ep")
    md5 = hashlib.md5(data.reference.read_bytes()).hexdigest()
    file = registry.WeightsFile(location or real.files[0].location, f"md5:{md5[:8]}")
    small = dataclasses.replace(real.model, arch="resnet18", width=8, head=HeadConfig("mlp", 16))
    registry_rows(dataclasses.replace(real, model=small, files=(file,)))


@pytest.fixture
def served_weights(
    data: UserData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry_rows: Callable[..., Any],
) -> Iterator[list[str]]:
    """``moco_v2_r50_800ep`` (tiny) downloads from 127.0.0.1 into an empty torch hub cache;
    yields the paths requested from the server."""
    with serve(data.reference.parent) as (base, requests):
        tiny_moco_v2_r50_800ep(data, registry_rows, f"{base}/{REFERENCE}")
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        yield requests


# --------------------------------------------------------------------------
# From a fresh clone, Install, Command line
# --------------------------------------------------------------------------


def _pip_targets(command: str) -> list[list[str]]:
    """The arguments of each ``pip install`` in a README line."""
    targets = []
    for part in command.split("&&"):
        words = shlex.split(part)
        if words[:2] == ["pip", "install"]:
            targets.append(words[2:])
    return targets


def test_install_commands_name_this_checkout_and_its_extras() -> None:
    """pip cannot run offline in a test; what each README ``pip install`` promises is checked
    instead: the package's name, an editable install of this checkout, the extras named, and
    that the extras this suite needs are installed. ``python -m pytest -n auto`` runs this."""
    from packaging.markers import Marker
    from packaging.requirements import Requirement

    # The installed copy (a mocohub.egg-info in the checkout may shadow it on sys.path).
    installed = importlib.metadata.distributions(name="mocohub")
    dist = next(d for d in installed if d.read_text("direct_url.json"))
    extras = set(dist.metadata.get_all("Provides-Extra") or [])
    requirements = [Requirement(r) for r in dist.requires or []]
    targets = [t for c in COMMANDS for t in _pip_targets(c)]
    assert len(targets) == 11
    for target in targets:
        name, _, extra = target[-1].strip(".").partition("[")
        extra = extra.rstrip("]")
        assert name in ("mocohub", ""), target
        if extra:
            assert extra in extras, f"README installs mocohub[{extra}]; pyproject has {extras}"
        if "-e" in target:  # pip install -e . from a clone: this checkout, editable
            direct = json.loads(dist.read_text("direct_url.json") or "{}")
            assert direct.get("dir_info", {}).get("editable"), direct
            assert Path(direct["url"].removeprefix("file://")).resolve() == ROOT
        if extra in ("dev", "serve"):  # what the tests need is there
            for requirement in requirements:
                marker = requirement.marker or Marker("extra == 'none'")
                if marker.evaluate({"extra": extra}):
                    version = importlib.metadata.version(requirement.name)
                    assert requirement.specifier.contains(version, prereleases=True)
    # CI runs the README's test command as written (with pytest's exit status kept).
    (test_command,) = [c.split(" && ")[1] for c in COMMANDS if " && python -m pytest" in c]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^{re.escape(test_command)} \|\| status=\$\?$", ci, re.MULTILINE), (
        f"CI runs the README's test command, {test_command!r}"
    )


def test_command_line_basics(user: Path) -> None:
    import mocohub as package
    from mocohub.registry import list_models

    help_ = ok(mocohub(typed("mocohub --help")))
    for name in ("train", "knn", "lincls", "embed", "export", "serve", "push"):
        assert re.search(rf"^\s+{name}\s", help_.out, re.MULTILINE), name
    assert package.__version__ in ok(mocohub(typed("mocohub --version"))).out
    env = ok(mocohub(typed("mocohub env"))).out
    assert "torch" in env and "onnxruntime" in env
    listing = ok(mocohub(typed("mocohub list"))).out
    assert all(weights.name in listing for weights in list_models())
    info = ok(mocohub(typed("mocohub info NAME"))).out
    assert info.startswith("moco_v2_r50_800ep:") and "71.1" in info


def test_torch_hub_from_a_checkout() -> None:
    call = 'torch.hub.load(checkout, "moco_r50", source="local", pretrained=False)'
    model = run_inline(call, "model", ROOT=ROOT)["model"]
    assert model.mocohub_config.meta["name"] == "moco_v2_r50_800ep (random init)"
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2048)


# --------------------------------------------------------------------------
# Use: backbones and MoCo
# --------------------------------------------------------------------------


def test_backbones_snippet() -> None:
    namespace = run_python(readme_snippet(BACKBONES), SNIPPETS[BACKBONES].prelude)
    small = namespace["small"]
    assert small.conv1.in_channels == 1 and small.fc.out_features == 128
    assert small(torch.rand(2, 1, 28, 28)).shape == (2, 128)


def test_moco_snippet() -> None:
    namespace = run_python(readme_snippet(MOCO), SNIPPETS[MOCO].prelude)
    logits, labels, loss = namespace["logits"], namespace["labels"], namespace["loss"]
    assert logits.shape == (2, 1 + 65536) and labels.tolist() == [0, 0]
    assert torch.isfinite(loss)
    # The bullet below it: a reference state_dict (module. stripped) loads unchanged.
    keys = set(namespace["model"].state_dict())
    assert {"queue", "queue_ptr", "encoder_q.conv1.weight", "encoder_k.fc.0.weight"} <= keys


def test_moco_under_distributed_data_parallel() -> None:
    """ "Wrap it as the reference does": one training step of MoCo in DDP, in a process group."""
    import functools

    import torch.distributed as dist
    import torch.nn.functional as F

    from mocohub.backbones import resnet18
    from mocohub.training import MoCo

    (port,) = free_ports(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = MoCo(functools.partial(resnet18, width=8), dim=16, K=16, mlp=True)
        wrapped = run_inline("DistributedDataParallel(model)", "ddp", model=model)["ddp"]
        logits, labels = wrapped(torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32))
        F.cross_entropy(logits, labels).backward()
    finally:
        dist.destroy_process_group()
    assert logits.shape == (4, 17) and int(model.queue_ptr) == 4
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())


# --------------------------------------------------------------------------
# Pre-training
# --------------------------------------------------------------------------


@pytest.mark.parametrize("tree", ["train-and-val", "one-tree"])
def test_train_one_process(data: UserData, user: Path, tree: str) -> None:
    """The default preset (moco_v2) on an ImageFolder tree, decoded in DataLoader workers."""
    if tree == "one-tree":
        (user / "imagenet").unlink()
        (user / "imagenet").symlink_to(data.imagenet_flat)
    assert "done: loss" in ok(run_line("mocohub train imagenet/ --out runs/v2")).out
    run = user / "runs" / "v2"
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "moco_v2" and config["augmentation"] == "v2"
    state = last_state(run)
    assert state["epoch"] == 1 and state["model"]["encoder_q.conv1.weight"].shape[1] == 3


def test_train_resume_auto(user: Path) -> None:
    ok(run_line("mocohub train imagenet/ --out runs/v2"))
    result = ok(run_line("mocohub train imagenet/ --out runs/v2 --resume auto"))
    assert "done: loss" in result.out
    assert last_state(user / "runs" / "v2")["epoch"] == 2
    assert epochs_logged(user / "runs" / "v2") == [1, 2]


def test_train_nproc_per_node(user: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (port,) = free_ports(1)
    command = "mocohub train imagenet/ --out runs/v2 --nproc-per-node 8"
    result = ok(launch_here(typed(command, port=port), capfd))
    assert result.out.count("done: loss") == 1  # rank 0 reports
    state = last_state(user / "runs" / "v2")
    assert state["epoch"] == 1 and state["config"]["batch_size"] == 8


def test_train_two_nodes(user: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (port,) = free_ports(1)
    command = (
        "mocohub train imagenet/ --out runs/v2 --nodes 2 --node-rank 0 --master-addr HOST "
        "--nproc-per-node 8"
    )
    first = typed(command, port=port)
    second = list(first)
    second[second.index("--node-rank") + 1] = "1"
    other_node = start(second)  # the second machine
    try:
        result = ok(launch_here(first, capfd))
    finally:
        other = ok(finish(other_node))
    assert "done: loss" in result.out
    # Node 0 says what it waits for, once; node 1 says nothing. Neither prints torch's
    # broadcast_buffers deprecation warning (once per rank).
    waiting = f"waiting for 2 nodes at 127.0.0.1:{port}"
    assert result.err.count(waiting) == 1 and "waiting" not in other.err
    assert "broadcast_buffers" not in result.err + other.err
    # One set of checkpoints (rank 0's): epoch 1 and the "last" link to it.
    run = user / "runs" / "v2"
    checkpoints = sorted(p.name for p in run.glob("checkpoint_*.pt"))
    assert checkpoints == ["checkpoint_0001_00000000.pt", "checkpoint_last.pt"]
    state = last_state(run)  # the global batch, as given, over both nodes
    assert state["epoch"] == 1 and state["config"]["batch_size"] == 8


def test_train_fashion_mnist(fm_run: tuple[Path, Result]) -> None:
    """The README's Fashion-MNIST command, with the k-NN monitor (run by ``fm_run``)."""
    run, result = fm_run
    assert "done: loss" in ok(result).out and "knn_top1" in result.out
    assert json.loads((run / "config.json").read_text())["preset"] == "fashion_mnist"
    assert epochs_logged(run) == [1]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= records[-1]["knn_top1"] <= 1
    assert last_state(run)["model"]["encoder_q.conv1.weight"].shape[1] == 1


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def test_knn_of_the_run(fm_run: tuple[Path, Result], user: Path) -> None:
    copy_fm_run(fm_run, user)
    result = ok(run_line("mocohub knn --model runs/fm --train fashion-mnist"))
    found = re.search(r"top-1 ([\d.]+)%.*\((\d+) queries, (\d+) neighbours\)", result.out)
    assert found, result.out
    assert 0 <= float(found[1]) <= 100 and (found[2], found[3]) == ("8", "8")
    # k=200 of the README with 8 neighbours: every one votes, and the user is told so.
    assert "(k=8," in result.out and "200" in result.err, (result.out, result.err)


def test_lincls_of_a_reference_checkpoint(user: Path) -> None:
    command = "mocohub lincls imagenet/ --model moco_v2_800ep_pretrain.pth.tar --out lincls/"
    assert "top-1" in ok(run_line(command)).out
    report = json.loads((user / "lincls" / "lincls.json").read_text())
    assert report["protocol"] == "reference" and 0 <= report["top1"] <= 1
    assert report["val_samples"] == 8  # imagenet/val


def test_lincls_small_of_the_run(fm_run: tuple[Path, Result], user: Path) -> None:
    copy_fm_run(fm_run, user)
    command = "mocohub lincls fashion-mnist --model runs/fm --out runs/fm/lincls --preset small"
    result = ok(run_line(command))
    report = json.loads((user / "runs" / "fm" / "lincls" / "lincls.json").read_text())
    assert 0 <= report["top1"] <= 1 and report["val_samples"] == 8
    # --preset small is not the reference protocol: neither the file nor the line says it is.
    assert report["protocol"] != "reference" and "reference protocol" not in result.out


def test_torchrun_lincls(user: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (port,) = free_ports(1)
    command = "torchrun --nproc-per-node 8 -m mocohub lincls imagenet/ --model M --out lincls/"
    result = ok(launch_here(typed(command, port=port), capfd))
    assert result.out.count("top-1") == 1  # rank 0 only
    report = json.loads((user / "lincls" / "lincls.json").read_text())
    assert report["val_samples"] == 8 and 0 <= report["top1"] <= 1


# --------------------------------------------------------------------------
# Pretrained models, convert, push
# --------------------------------------------------------------------------


def test_convert_and_push_offline(fm_run: tuple[Path, Result], user: Path) -> None:
    """``convert``, then ``push`` with no network: one clear line and a non-zero exit,
    for a user who set HF_HUB_OFFLINE=1 and for one whose network is down (the Hub's port
    closed); also for a training run folder, which push converts or says to convert."""
    ok(run_line("mocohub convert ref.pth.tar --out DIR"))
    written = {p.name for p in (user / "DIR").iterdir()}
    assert written == {"model.safetensors", "config.json", "README.md"}
    copy_fm_run(fm_run, user)
    (closed,) = free_ports(1)
    push = typed("mocohub push DIR org/name")
    run_folder = [*push[:2], "runs/fm", *push[3:]]
    cases = [
        (push, {"HF_HUB_OFFLINE": "1"}),
        (push, {"HF_ENDPOINT": f"http://127.0.0.1:{closed}"}),
        (run_folder, {"HF_HUB_OFFLINE": "1"}),
    ]
    processes = [start(words, env=environment(**env)) for words, env in cases]
    for (words, env), process in zip(cases, processes, strict=True):
        result = finish(process, timeout=120)
        lines = [line for line in result.err.splitlines() if line.strip()]
        assert result.code != 0 and "Traceback" not in result.err, (env, result.err[-2000:])
        # One line; for a run folder, a note that it is converted on the way may come first.
        assert len(lines) == (1 if words is push else len(lines[:2])), (words, env, lines)
        assert lines[-1].startswith("Error:") and "org/name" in lines[-1], lines
        assert "Malformed" not in result.err, lines
        if "HF_HUB_OFFLINE" in env:
            assert "HF_HUB_OFFLINE" in lines[-1] and "hf auth login" not in lines[-1], lines


def test_pretrained_snippet(
    data: UserData,
    fm_run: tuple[Path, Result],
    user: Path,
    monkeypatch: pytest.MonkeyPatch,
    registry_rows: Callable[..., Any],
) -> None:
    """Every source of the README's ``mocohub.load`` block, and torch.hub from GitHub, with
    no network: the reference download already in the torch hub cache (a previous
    session's), the Hub repo in a pre-filled HF cache (HF_HUB_OFFLINE=1), the GitHub repo
    in torch.hub's cache (as after an earlier torch.hub.load)."""
    from huggingface_hub import constants

    copy_fm_run(fm_run, user)
    ok(mocohub(["mocohub", "convert", "ref.pth.tar", "--out", "artifact"]))
    fill_hf_cache(user / "hf", "org/name", "v1", user / "artifact")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(user / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = user / "torch" / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(user / "torch"))
    (hub / "org_mocohub_main").symlink_to(ROOT)

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    # The reference ResNet-50 download (200 MB): the tiny checkpoint, cached under its name.
    shutil.copy(data.reference, hub / "checkpoints" / REFERENCE)
    tiny_moco_v2_r50_800ep(data, registry_rows)
    loaded: list[Any] = []  # every model the block loads, in order
    real_load = importlib.import_module("mocohub").load

    def load(*args: Any, **kwargs: Any) -> Any:
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr("mocohub.load", load)
    namespace = run_python(readme_snippet(PRETRAINED), SNIPPETS[PRETRAINED].prelude)
    assert [m.mocohub_config.meta.get("name") for m in (loaded[0], loaded[1])] == [
        "moco_v2_r50_800ep",
        "moco_r18_fashion_mnist",
    ]
    assert loaded[2].mocohub_config.meta["hub_repo"] == "hf-hub:org/name@v1"
    assert loaded[1].conv1.in_channels == 1 and loaded[3].conv1.in_channels == 3
    assert namespace["features"].shape == (1, 64)  # runs/fm: width 8, 8 x 8 channels at the end
    assert namespace["model"].mocohub_config.meta["name"] == "moco_v2_r50_800ep"


# --------------------------------------------------------------------------
# Embedding and search
# --------------------------------------------------------------------------


def test_embed_index_search(user: Path, served_weights: list[str]) -> None:
    command = "mocohub embed photos/ --out feats.npy --model moco_v2_r50_800ep"
    assert "embedded 6 images" in ok(run_line(command)).out
    assert served_weights == [f"/{REFERENCE}"]  # downloaded (and md5-checked) once
    feats = np.load(user / "feats.npy")
    assert feats.shape == (6, 64)  # the served ResNet-18 of width 8
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, rtol=1e-3)
    manifest = (user / "feats.manifest.txt").read_text().splitlines()
    assert len(manifest) == 6 and sum("holiday" in line for line in manifest) == 1
    assert (user / "feats.errors.jsonl").read_text() == ""
    ok(run_line("mocohub index feats.npy --out feats.index"))
    result = ok(run_line("mocohub search feats.index --query shoe.jpg --k 10 --grid shoe.png"))
    assert result.out.startswith("query: shoe.jpg")
    assert len(re.findall(r"^\s+\d+\s+-?[\d.]+\s+\S", result.out, re.MULTILINE)) == 6
    assert Image.open(user / "shoe.png").width > 36
    assert served_weights == [f"/{REFERENCE}"]  # search used the cached copy


def test_embed_shards_and_merge(user: Path) -> None:
    """``--shard i/n`` gives each process about 1/n of the images; ``mocohub embed-merge``
    joins the parts into what one run writes."""
    embed = ["mocohub", "embed", "photos/", "--model", "moco_r18_fashion_mnist", "--quiet"]
    embed += ["--precision", "fp32"]
    ok(mocohub([*embed, "--out", "all.npy"]))
    for i in (0, 1):
        ok(mocohub([*embed, "--out", f"part{i}.npy", "--shard", f"{i}/2"]))
        assert len(np.load(user / f"part{i}.npy")) == 3, f"shard {i}/2 of 6 images"
    ok(mocohub(["mocohub", "embed-merge", "part0.npy", "part1.npy", "--out", "merged.npy"]))
    np.testing.assert_array_equal(np.load(user / "merged.npy"), np.load(user / "all.npy"))


def test_python_feature_extractor(user: Path) -> None:
    """A list that mixes a path, a PIL image and a (C, H, W) tensor: one row each."""
    feats = run_inline('mocohub.FeatureExtractor(model)(["a.png", image, tensor])', "feats")
    assert feats["feats"].shape == (3, 256)
    np.testing.assert_allclose(np.linalg.norm(feats["feats"], axis=1), 1, rtol=1e-3)


def test_python_index() -> None:
    namespace = run_inline("mocohub.Index.build(feats, ids).search(queries, k=10)", "found")
    found, scores = namespace["found"]
    assert [next(iter(row)) for row in found] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert np.asarray(scores).shape == (3, 10)


# --------------------------------------------------------------------------
# Export and serving
# --------------------------------------------------------------------------


def _wait_until_serving(server: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert server.poll() is None, finish(server).err[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert time.monotonic() < deadline, "the server did not answer within 3 minutes"
        time.sleep(0.3)


def test_export_embed_serve(user: Path) -> None:
    (user / "samples").symlink_to(ROOT / "samples")
    export = (
        "mocohub export moco_r18_fashion_mnist --out out/fm --int8 --calibration "
        "samples/fashion-mnist --with-preprocessing"
    )
    ok(run_line(export))
    names = {p.name for p in (user / "out" / "fm").iterdir()}
    assert {"model.onnx", "model.safetensors", "config.json"} <= names
    assert any("int8" in n for n in names) and any("preprocess" in n for n in names)

    command = "mocohub embed photos/ --out feats.npy --model out/fm --backend onnxruntime"
    assert "embedded 6 images" in ok(run_line(command)).out
    assert np.load(user / "feats.npy").shape == (6, 256)

    embedder = run_inline("mocohub.export.OnnxEmbedder(path)", "embedder")["embedder"]
    assert embedder.embed_images([Image.open(user / "shoe.png")]).shape == (1, 256)

    (port,) = free_ports(1)
    words = typed('pip install "mocohub[serve]" && mocohub serve out/fm --port 8000', port=port)
    server = start(words[words.index("&&") + 1 :])  # the pip part: see the install test
    try:
        _wait_until_serving(server, port)
        curl = typed(
            "curl --data-binary @shoe.png -H 'Content-Type: image/png' localhost:8000/embed",
            port=port,
        )
        if shutil.which("curl"):
            answer = subprocess.run(curl, capture_output=True, text=True, timeout=60, check=True)
            reply = json.loads(answer.stdout)
        else:  # the same request without curl
            request = urllib.request.Request(
                f"http://{curl[-1]}",
                data=(user / "shoe.png").read_bytes(),
                headers={"Content-Type": "image/png"},
            )
            with urllib.request.urlopen(request, timeout=60) as answer:
                reply = json.loads(answer.read())
        assert reply["count"] == 1 and reply["dim"] == 256
        np.testing.assert_allclose(np.linalg.norm(reply["embeddings"][0]), 1, rtol=1e-3)
    finally:
        server.send_signal(signal.SIGINT)
        finish(server, timeout=30)


# --------------------------------------------------------------------------
# Faster than the reference
# --------------------------------------------------------------------------


def test_benchmarks_run(data: UserData, tmp_path: Path) -> None:
    """The README's two benchmark commands, tiny: they run, check ours against the reference
    transcription (each script fails on a mismatch) and write their figures."""
    folder = data.working_folder(tmp_path / "user", "bench")
    benches = {"python bench/bench_moco_step.py": "bench.json"}
    benches["python bench/train_step.py"] = "train_step.json"
    processes = {command: start(typed(command), cwd=folder) for command in benches}
    for command, process in processes.items():
        ok(finish(process))
        assert json.loads((folder / benches[command]).read_text()), command
