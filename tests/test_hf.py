"""Hugging Face Hub: artifact folders with a model card, repos read from a pre-filled HF
cache offline, and push_to_hub against a stand-in for the Hub's API."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import huggingface_hub
import pytest
import torch
from hub_helpers import no_retries, serve, short_chain, tiny_fmnist_model
from huggingface_hub import constants

import mocohub
from mocohub import hf
from mocohub.artifact import read_config
from mocohub.backbones import resnet18
from mocohub.card import model_card
from mocohub.download import NotAvailableError
from mocohub.errors import InputError
from mocohub.registry import get_weights

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = ("config.json", "model.safetensors", "README.md")


def tiny_model(head: bool = False) -> torch.nn.Module:
    meta = {"name": "tiny-fmnist", "epochs": 5, "knn_top1": 80.8, "license": "mit"}
    return tiny_fmnist_model(meta, head=head)  # its BN statistics must travel too


def fill_hf_cache(cache: Path, repo_id: str, folder: Path, files: tuple[str, ...] = FILES) -> Path:
    """Lay ``folder``'s files out as huggingface_hub's cache does after a download of main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name in files:
        shutil.copy(folder / name, snapshot / name)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache, offline (huggingface_hub read HF_HOME at import, so patch it)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_save_pretrained_writes_the_artifact_with_a_card(tmp_path: Path) -> None:
    model = tiny_model(head=True)
    folder = mocohub.save_pretrained(model, tmp_path / "art", repo_id="me/tiny")
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    assert read_config(folder) == model.mocohub_config
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "license: mit" in card and "library_name: mocohub" in card
    assert 'mocohub.load("hf-hub:me/tiny")' in card and "k-NN top-1 (%): 80.8" in card
    assert "28x28 grayscale" in card and "mean (0.286)" in card
    params = sum(p.numel() for p in model.parameters())
    assert f"| Parameters | {params:,} |" in card


def test_from_pretrained_loads_the_folder_save_pretrained_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model(head=True)
    folder = mocohub.save_pretrained(model, tmp_path / "art")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a folder: nothing to fetch
    for head in (False, True):
        loaded = mocohub.from_pretrained(str(folder), head=head)
        state = model.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
        assert "hub_repo" not in loaded.mocohub_config.meta


def test_registry_card_states_source_metrics_and_licence() -> None:
    card = model_card(get_weights("moco_v2_r50_800ep").config(), repo_id="org/moco")
    for text in ("71.1", "arXiv:2003.04297", "cc-by-nc-4.0", "800", "Intended use", "2048-d"):
        assert text in card, text


def test_hub_repo_loads_from_the_cache_offline(tmp_path: Path, hf_cache: Path) -> None:
    model = tiny_model(head=True)
    hf.save_pretrained(model, tmp_path / "art")
    fill_hf_cache(hf_cache, "org/tiny", tmp_path / "art")
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(images)
        for source in ("hf-hub:org/tiny", f"hf-hub:org/tiny@{COMMIT}"):
            loaded = mocohub.load(source, head=True)
            torch.testing.assert_close(loaded(images), expected)
            assert loaded.mocohub_config.preprocessing == model.mocohub_config.preprocessing
            assert loaded.mocohub_config.meta["hub_repo"] == source
        backbone = hf.from_pretrained("org/tiny")
        assert backbone.mocohub_config.head is None and backbone(images).shape == (3, 64)


def test_config_alone_is_enough_for_random_weights(tmp_path: Path, hf_cache: Path) -> None:
    hf.save_pretrained(tiny_model(), tmp_path / "art")
    fill_hf_cache(hf_cache, "org/tiny", tmp_path / "art", files=("config.json",))
    model = mocohub.load("hf-hub:org/tiny", pretrained=False)
    assert model.mocohub_config.arch == "resnet18" and model.conv1.in_channels == 1
    meta = model.mocohub_config.meta
    assert meta == {"name": "tiny-fmnist (random init)", "random_init": True}
    hf.save_pretrained(model, tmp_path / "random")  # its card claims no trained figures
    card = (tmp_path / "random" / "README.md").read_text()
    assert "tiny-fmnist (random init)" in card and "k-NN top-1 (%): 80.8" not in card
    assert "80.8" in (tmp_path / "art" / "README.md").read_text()  # as the trained one says
    with pytest.raises(NotAvailableError, match=r"model\.safetensors of hf-hub:org/tiny"):
        mocohub.load("hf-hub:org/tiny")


def test_missing_repo_offline_is_one_clear_error(hf_cache: Path) -> None:
    with pytest.raises(NotAvailableError) as error:
        mocohub.load("hf-hub:org/absent@v2")
    message = str(error.value)
    assert "HF_HUB_OFFLINE=1" in message and "hf-hub:org/absent@v2" in message
    assert str(hf_cache) in message and "unset HF_HUB_OFFLINE" in message
    assert "\n" not in message
    for bad in ("hf-hub:no-slash", "hf-hub:org/name@", "hf-hub:a/b/c"):
        with pytest.raises(InputError, match="is not a Hub repo"):
            mocohub.load(bad)


def test_cli_reads_the_hf_cache_named_by_hf_home(tmp_path: Path) -> None:
    """The real environment variables, in a fresh process: HF_HOME + HF_HUB_OFFLINE=1."""
    hf.save_pretrained(tiny_model(), tmp_path / "art")
    fill_hf_cache(tmp_path / "hf" / "hub", "org/tiny", tmp_path / "art")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "mocohub",
            "convert",
            "hf-hub:org/tiny",
            "--out",
            str(tmp_path / "copy"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert read_config(tmp_path / "copy").meta["hub_repo"] == "hf-hub:org/tiny"


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records calls, keeps what was uploaded."""

    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    uploaded: ClassVar[dict[str, bytes]] = {}
    fail: ClassVar[Exception | None] = None

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        if FakeHub.fail is not None:
            raise FakeHub.fail
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs: Any) -> Any:
        FakeHub.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        FakeHub.uploaded = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/c/1"})()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHub]:
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    for name in ("MOCOHUB_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    FakeHub.calls, FakeHub.uploaded, FakeHub.fail = [], {}, None
    return FakeHub


def test_push_uploads_the_artifact_files(
    tmp_path: Path, fake_hub: type[FakeHub], capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_model()
    url = hf.push_to_hub(model, "me/tiny", private=True)
    assert url == "https://huggingface.co/c/1"
    (create, repo), (upload, args) = fake_hub.calls
    assert (create, repo["repo_id"], repo["private"], repo["exist_ok"]) == (
        "create_repo",
        "me/tiny",
        True,
        True,
    )
    assert upload == "upload_folder" and sorted(args["allow_patterns"]) == sorted(FILES)
    assert sorted(fake_hub.uploaded) == sorted(FILES)
    assert b'"arch": "resnet18"' in fake_hub.uploaded["config.json"]

    # `mocohub push DIR REPO`: a folder without a card gets one first.
    folder = tmp_path / "art"
    hf.save_pretrained(model, folder)
    (folder / "README.md").unlink()
    fake_hub.calls.clear()
    from mocohub import cli

    cli.main(["push", str(folder), "me/tiny2", "-m", "first"])
    assert "Pushed" in capsys.readouterr().out
    assert fake_hub.calls[1][1]["commit_message"] == "first"
    assert b"hf-hub:me/tiny2" in fake_hub.uploaded["README.md"]


def test_push_refuses_bad_folders_and_reports_hub_errors(
    tmp_path: Path, fake_hub: type[FakeHub]
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="does not exist; push an artifact folder"):
        hf.push_to_hub(tmp_path / "absent", "me/x")
    with pytest.raises(InputError, match="holds no checkpoint"):
        hf.push_to_hub(tmp_path / "empty", "me/x")
    with pytest.raises(InputError, match="is not a Hub repo"):
        hf.push_to_hub(tmp_path / "empty", "not a repo")
    assert fake_hub.calls == []
    from huggingface_hub.errors import HfHubHTTPError

    response: Any = SimpleNamespace(status_code=401, headers={}, request=None)
    fake_hub.fail = HfHubHTTPError("401 Client Error: Unauthorized for url", response=response)
    with pytest.raises(InputError, match=r"Cannot push .*401.*hf auth login") as error:
        hf.push_to_hub(tiny_model(), "me/x")
    assert "\n" not in str(error.value)


# --- without a network ---------------------------------------------------------------------------


@pytest.fixture
def online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache with downloads allowed, no proxy for 127.0.0.1, and no back-off
    sleeps: a retry fails the test at once. Returns the cache folder."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for name in ("MOCOHUB_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    no_retries(monkeypatch)
    return cache


def point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """What HF_ENDPOINT does (huggingface_hub reads it at import, so patch what it derived)."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


def test_hub_repo_without_network_fails_at_once_saying_what_to_do(
    tmp_path: Path, online: Path, free_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_hub_at(monkeypatch, f"http://127.0.0.1:{free_port}")  # nothing listens there
    with pytest.raises(NotAvailableError) as error:
        mocohub.load("hf-hub:org/name")
    message = str(error.value)
    assert message.startswith(f"Cannot reach the Hugging Face Hub (http://127.0.0.1:{free_port}")
    assert str(online) in message and "HF_HOME" in message  # the cache, and how to move it
    assert "`hf download org/name`" in message and "local model folder" in message
    assert "HF_HUB_OFFLINE=1" in message and "\n" not in message
    assert short_chain(error.value)

    # A server in trouble (503) is asked once: no retries with back-off.
    with serve(tmp_path, status=503) as (base, requests):
        point_hub_at(monkeypatch, base)
        with pytest.raises(NotAvailableError, match=r"answered 503\) and config\.json"):
            mocohub.load("hf-hub:org/name@v1")
        assert requests == ["HEAD /org/name/resolve/v1/config.json"]

    # A repo in the cache loads without the network.
    point_hub_at(monkeypatch, f"http://127.0.0.1:{free_port}")
    model = tiny_model()
    hf.save_pretrained(model, tmp_path / "art")
    fill_hf_cache(online, "org/tiny", tmp_path / "art")
    images = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(mocohub.load("hf-hub:org/tiny")(images), model(images))


def test_push_without_network_is_one_line(
    tmp_path: Path,
    online: Path,
    free_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mocohub import cli

    hf.save_pretrained(tiny_model(), tmp_path / "art")
    point_hub_at(monkeypatch, f"http://127.0.0.1:{free_port}")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["push", str(tmp_path / "art"), "me/tiny"])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(
        f"Error: Cannot reach the Hugging Face Hub at http://127.0.0.1:{free_port} to push "
        "to me/tiny ("
    )
    assert "check the network" in err and "hf auth login" not in err


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "MOCOHUB_OFFLINE"])
def test_push_offline_says_how_to_leave_offline_mode(
    switch: str,
    tmp_path: Path,
    fake_hub: type[FakeHub],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mocohub import cli

    hf.save_pretrained(tiny_model(), tmp_path / "art")
    monkeypatch.setenv(switch, "1")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["push", str(tmp_path / "art"), "me/tiny"])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and err.count("\n") == 1
    assert f"{switch}=1 is set (offline mode)" in err and f"unset {switch}" in err
    assert "hf auth login" not in err and fake_hub.calls == []


def test_push_converts_a_training_run_on_the_fly(
    tmp_path: Path, fake_hub: type[FakeHub], capsys: pytest.CaptureFixture[str]
) -> None:
    from mocohub import cli
    from mocohub.training.checkpoint import save_checkpoint, training_state
    from mocohub.training.config import preset
    from mocohub.training.moco import MoCo

    torch.manual_seed(0)
    encoder = functools.partial(resnet18, small_stem=True, width=8, in_channels=1)
    moco = MoCo(encoder, dim=16, K=32, mlp=True)
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.1)
    values = preset("fashion_mnist", width=8, dim=16, K=32, batch_size=32).to_dict()
    state = training_state(moco, optimizer, None, None, 3, 0, values)
    run = tmp_path / "run"
    save_checkpoint(run, state, epoch=3, step=0)
    (run / "config.json").write_text(json.dumps(values))  # a run's own config.json, as train's

    cli.main(["push", str(run), "me/run"])
    captured = capsys.readouterr()
    assert "is not an artifact folder: converting it" in captured.err
    assert "Pushed" in captured.out
    assert sorted(fake_hub.uploaded) == sorted(FILES)
    config = json.loads(fake_hub.uploaded["config.json"])
    assert config["preprocessing"]["image_size"] == 28 and config["head"] is None
    assert config["meta"]["epochs"] == 3 and config["meta"]["converted_from"] == "run"
    assert config["meta"]["source"].startswith("checkpoint_")  # a file name, not a path
    assert b"hf-hub:me/run" in fake_hub.uploaded["README.md"]
    assert not (run / "README.md").exists()  # the run folder is left as it was
