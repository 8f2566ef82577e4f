"""mocohub.load from URLs and registry names: download, cache, hashes, offline, safe pickles.

Everything is served from 127.0.0.1; no test touches the network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hub_helpers import (
    backbone_features,
    no_retries,
    reference_checkpoint,
    reference_encoder,
    serve,
    short_chain,
)
from torch import nn

import mocohub
from mocohub import cli, registry
from mocohub.artifact import HeadConfig, ModelConfig
from mocohub.download import NotAvailableError
from mocohub.errors import InputError
from mocohub.hf import save_pretrained
from mocohub.registry import Weights, WeightsFile

NAME = "moco_small.pth.tar"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, downloads allowed, no proxy for 127.0.0.1."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("MOCOHUB_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def served(tmp_path: Path, cache: Path) -> tuple[Path, nn.Module]:
    """A folder with a small reference-format MoCo v2 checkpoint (ResNet-18, width 8), to
    be downloaded into the empty ``cache``."""
    folder = tmp_path / "www"
    folder.mkdir()
    encoder = reference_encoder("resnet18", mlp=True, dim=16, width=8)
    torch.save(reference_checkpoint(encoder), folder / NAME)
    return folder, encoder


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def hashed(folder: Path, base: str) -> WeightsFile:
    """The served checkpoint at server ``base``, with the md5 prefix of its file in ``folder``."""
    return WeightsFile(f"{base}/{NAME}", f"md5:{md5(folder / NAME)[:8]}")


Register = Callable[..., Weights]


@pytest.fixture
def register(registry_rows: Callable[..., Any]) -> Register:
    """``register(*files, width=8)``: registers ``test_moco_r18`` with those files."""

    def add(*files: WeightsFile, width: int = 8) -> Weights:
        weights = Weights(
            "test_moco_r18",
            ModelConfig("resnet18", width=width, head=HeadConfig("mlp", 16)),
            files,
            meta={"epochs": 200, "imagenet_linear_top1": 12.5},
        )
        registry_rows(weights)
        return weights

    return add


def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def test_url_is_downloaded_once_with_progress(
    cache: Path, served: tuple[Path, nn.Module], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, encoder = served
    images = torch.rand(2, 3, 32, 32)
    with serve(folder) as (base, requests):
        url = f"{base}/{NAME}"
        model = mocohub.load(url)
        err = capsys.readouterr().err
        assert NAME in err and "100%" in err  # the progress bar
        assert requests == [f"/{NAME}"]
        assert (cache / NAME).read_bytes() == (folder / NAME).read_bytes()
        assert [p.name for p in cache.iterdir()] == [NAME]  # no temporary file left
        again = mocohub.load(url, progress=False)
        assert requests == [f"/{NAME}"], "a cache hit makes no request"
    torch.testing.assert_close(features(model, images), backbone_features(encoder, images))
    torch.testing.assert_close(features(again, images), backbone_features(encoder, images))
    assert model.mocohub_config.meta["source"] == url


def test_registered_name_is_fetched_verified_and_described(
    served: tuple[Path, nn.Module], register: Register
) -> None:
    folder, encoder = served
    images = torch.rand(2, 3, 32, 32)
    with serve(folder) as (base, requests):
        url = f"{base}/{NAME}"
        weights = register(hashed(folder, base))
        model = mocohub.load("test_moco_r18", progress=False)
        with_head = mocohub.load(url, head=True, progress=False)  # the URL of a registry file
        assert requests == [f"/{NAME}"]
    config = model.mocohub_config
    assert config == replace(weights.config(), meta=config.meta)
    assert config.meta["name"] == "test_moco_r18" and config.meta["imagenet_linear_top1"] == 12.5
    assert config.meta["file"] == url
    torch.testing.assert_close(features(model, images), backbone_features(encoder, images))
    assert with_head.mocohub_config.head == HeadConfig("mlp", 16)
    torch.testing.assert_close(features(with_head, images), features(encoder, images))


def test_hash_mismatch_is_refused_and_nothing_is_cached(
    cache: Path, served: tuple[Path, nn.Module], register: Register
) -> None:
    folder, _ = served
    with serve(folder) as (base, _requests):
        url = f"{base}/{NAME}"
        register(WeightsFile(url, "md5:0123abcd"))
        for source in ("test_moco_r18", url):
            with pytest.raises(InputError, match="tampered with") as error:
                mocohub.load(source, progress=False)
            assert "0123abcd" in str(error.value) and "\n" not in str(error.value)
            assert not cache.exists() or list(cache.iterdir()) == []


def test_tampered_cached_file_is_refused(
    cache: Path, served: tuple[Path, nn.Module], register: Register
) -> None:
    folder, _ = served
    with serve(folder) as (base, _requests):
        register(hashed(folder, base))
        mocohub.load("test_moco_r18", progress=False)
        with open(cache / NAME, "ab") as f:
            f.write(b"\0")
        with pytest.raises(InputError, match=r"cached copy .* tampered with.*delete"):
            mocohub.load("test_moco_r18", progress=False)


@pytest.mark.parametrize("switch", ["MOCOHUB_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_uses_the_cache_and_says_what_is_missing(
    switch: str,
    cache: Path,
    served: tuple[Path, nn.Module],
    monkeypatch: pytest.MonkeyPatch,
    register: Register,
) -> None:
    folder, _ = served
    with serve(folder) as (base, requests):
        register(hashed(folder, base))
        monkeypatch.setenv(switch, "1")
        with pytest.raises(NotAvailableError) as error:
            mocohub.load("test_moco_r18")
        message = str(error.value)
        assert f"{switch}=1" in message and NAME in message and str(cache) in message
        assert "local path" in message and f"unset {switch}" in message
        # The published entries fail the same way, naming their file.
        with pytest.raises(NotAvailableError, match=r"moco_v2_800ep_pretrain\.pth\.tar"):
            mocohub.load("moco_v2_r50_800ep")
        assert requests == []
        monkeypatch.delenv(switch)
        mocohub.load("test_moco_r18", progress=False)
        monkeypatch.setenv(switch, "1")
        assert mocohub.load("test_moco_r18").mocohub_config.meta["name"] == "test_moco_r18"
        assert len(requests) == 1


def test_random_weights_of_a_name_need_no_download(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOCOHUB_OFFLINE", "1")
    model = mocohub.load("moco_v1_r50_200ep", pretrained=False, head=True)
    assert "imagenet_linear_top1" not in model.mocohub_config.meta  # random weights: no figures
    assert model.mocohub_config.meta["name"] == "moco_v1_r50_200ep (random init)"
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 128
    assert not cache.exists()


def test_download_failures_are_clear(
    cache: Path, served: tuple[Path, nn.Module], free_port: int
) -> None:
    folder, _ = served
    with serve(folder) as (base, _requests), pytest.raises(NotAvailableError, match="404"):
        mocohub.load(f"{base}/missing.pth.tar", progress=False)
    with pytest.raises(NotAvailableError, match=r"Cannot download .*Check the network"):
        mocohub.load(f"http://127.0.0.1:{free_port}/{NAME}", progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_registered_name_without_network_fails_at_once_saying_what_to_do(
    cache: Path, free_port: int, monkeypatch: pytest.MonkeyPatch, registry_rows: Callable[..., Any]
) -> None:
    """moco_v2_r50_800ep with its download URL on a closed port: no retries, one error
    that names the cache file, how to supply it by hand and the offline switches."""
    no_retries(monkeypatch)
    entry = registry.get_weights("moco_v2_r50_800ep")
    (file,) = entry.files
    name = file.location.rsplit("/", 1)[-1]
    closed = replace(file, location=f"http://127.0.0.1:{free_port}/{name}")
    registry_rows(replace(entry, files=(closed,)))
    with pytest.raises(NotAvailableError) as error:
        mocohub.load("moco_v2_r50_800ep", progress=False)
    message = str(error.value)
    assert message.startswith(f"Cannot download http://127.0.0.1:{free_port}/{name} (")
    assert f"put it at {cache / name}" in message and "local path" in message
    assert "MOCOHUB_OFFLINE=1" in message and "HF_HUB_OFFLINE=1" in message
    assert "\n" not in message and short_chain(error.value)
    assert not cache.exists() or list(cache.iterdir()) == []
    # A server in trouble answers once; the error still says where the file would go.
    with serve(cache.parent, status=503) as (base, requests):
        with pytest.raises(NotAvailableError, match=r"answered 503 .*put it at"):
            mocohub.load(f"{base}/{name}", progress=False)
        assert requests == [f"/{name}"]


def test_safetensors_copy_is_preferred(
    served: tuple[Path, nn.Module], tmp_path: Path, register: Register
) -> None:
    folder, encoder = served
    artifact = save_pretrained(mocohub.load(folder / NAME), tmp_path / "artifact")
    images = torch.rand(2, 3, 32, 32)
    with serve(folder) as (base, requests):
        url = hashed(folder, base)
        digest = hashlib.sha256((artifact / "model.safetensors").read_bytes()).hexdigest()
        local = WeightsFile(str(artifact), f"sha256:{digest[:16]}")
        register(url, local)  # the pickle is listed first
        model = mocohub.load("test_moco_r18")
        assert requests == [] and model.mocohub_config.meta["file"] == str(artifact)
        torch.testing.assert_close(features(model, images), backbone_features(encoder, images))
        # Without the safetensors copy, the pickle is the fallback.
        register(url, WeightsFile(str(tmp_path / "gone")))
        assert (
            mocohub.load("test_moco_r18", progress=False).mocohub_config.meta["file"]
            == url.location
        )
        assert len(requests) == 1


def test_bare_safetensors_url_is_described_by_its_entry(
    served: tuple[Path, nn.Module], tmp_path: Path, register: Register
) -> None:
    folder, encoder = served
    artifact = save_pretrained(mocohub.load(folder / NAME, head=True), tmp_path / "artifact")
    shutil.copy(artifact / "model.safetensors", folder / "moco_small.safetensors")
    images = torch.rand(2, 3, 32, 32)
    with serve(folder) as (base, requests):
        pickled = hashed(folder, base)
        bare = WeightsFile(f"{base}/moco_small.safetensors")
        register(pickled, bare)
        backbone = mocohub.load("test_moco_r18", progress=False)
        with_head = mocohub.load("test_moco_r18", head=True, progress=False)
        assert requests == ["/moco_small.safetensors"]  # the pickle is never fetched
    assert backbone.mocohub_config.meta["file"] == bare.location
    torch.testing.assert_close(features(backbone, images), backbone_features(encoder, images))
    torch.testing.assert_close(features(with_head, images), features(encoder, images))


def test_a_file_unlike_its_registry_entry_is_refused(
    served: tuple[Path, nn.Module], register: Register
) -> None:
    folder, _ = served
    register(WeightsFile(str(folder / NAME)), width=16)
    with pytest.raises(InputError, match="other than the registered test_moco_r18"):
        mocohub.load("test_moco_r18")


class RunsCode:
    """Unpickling this runs a shell command: exactly what weights_only must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"epoch": 1, "state_dict": {"module.encoder_q.x": RunsCode(marker)}}, path)
    with pytest.raises(InputError, match="safe \\(weights_only\\) loading refuses"):
        mocohub.load(path)
    assert not marker.exists()


def test_unknown_source_suggests_names() -> None:
    with pytest.raises(InputError, match="did you mean moco_v2_r50_800ep") as error:
        mocohub.load("moco_v2_r50_80ep")
    assert "mocohub list" in str(error.value)


def test_cli_shows_cached_copies_and_offline_errors_in_one_line(
    cache: Path,
    served: tuple[Path, nn.Module],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    register: Register,
) -> None:
    folder, _ = served
    with serve(folder) as (base, _requests):
        register(hashed(folder, base))
        for cached in ("no", "yes"):
            cli.main(["list"])
            lines = capsys.readouterr().out.splitlines()
            (row,) = [line.split() for line in lines if line.startswith("test_moco_r18")]
            assert row[-1] == cached
            mocohub.load("test_moco_r18", progress=False)
    cli.main(["info", "test_moco_r18"])
    out = capsys.readouterr().out
    size = (cache / NAME).stat().st_size / 1e6
    assert str(cache / NAME) in out and f"{size:.1f} MB" in out

    monkeypatch.setenv("MOCOHUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["convert", "moco_v1_r50_200ep", "--out", str(cache.parent / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("Error: MOCOHUB_OFFLINE=1 forbids downloads and moco_v1_200ep_pretrain")


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"TORCH_HOME": "th"},
        {"XDG_CACHE_HOME": "xdg"},
        {"TORCH_HOME": "th", "XDG_CACHE_HOME": "x"},
    ],
)
def test_the_weights_cache_is_torch_hubs_with_or_without_torch_hub_imported(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mocohub list`` finds cached weights without importing torch: the folder found from
    the environment is the one ``torch.hub.get_dir()`` gives once torch.hub is imported."""
    import sys

    import torch.hub

    from mocohub.download import cache_dir

    for name in ("TORCH_HOME", "XDG_CACHE_HOME", "TORCH_HUB"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    expected = Path(torch.hub.get_dir()) / "checkpoints"
    assert cache_dir() == expected
    monkeypatch.delitem(sys.modules, "torch.hub")  # as in a process that never imported it
    assert cache_dir() == expected
    assert "torch.hub" not in sys.modules


def test_torch_hub_set_dir_moves_the_weights_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.hub

    from mocohub.download import cache_dir

    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # set_dir's, undone after
    torch.hub.set_dir(str(tmp_path / "set"))
    assert cache_dir() == tmp_path / "set" / "checkpoints"
