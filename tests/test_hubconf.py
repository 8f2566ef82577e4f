"""torch.hub entry points, from a plain checkout (mocohub not installed) and in-process."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import site
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from hub_helpers import backbone_features, reference_checkpoint, reference_encoder
from torch import nn

from mocohub.errors import ConfigError, InputError
from mocohub.registry import WeightsFile, get_weights

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = {  # entry point: (registry name, ImageNet linear top-1 in its docstring)
    "moco_r50": ("moco_v2_r50_800ep", "71.1"),
    "moco_v2_r50": ("moco_v2_r50_800ep", "71.1"),
    "moco_v2_r50_200ep": ("moco_v2_r50_200ep", "67.7"),
    "moco_v1_r50": ("moco_v1_r50_200ep", "60.6"),
    "moco_v3_r50": ("moco_v3_r50_1000ep", "74.6"),
    "moco_v3_r50_300ep": ("moco_v3_r50_300ep", "72.8"),
    "moco_v3_r50_100ep": ("moco_v3_r50_100ep", "68.9"),
    "moco_v3_vit_s": ("moco_v3_vit_s", "73.2"),
    "moco_v3_vit_b": ("moco_v3_vit_b", "76.7"),
}

FROM_CHECKOUT = """
import importlib.util, json, sys, torch
assert importlib.util.find_spec("mocohub") is None, "mocohub must not be installed here"
model = torch.hub.load(sys.argv[1], "moco_r50", source="local", pretrained=False)
import mocohub
with torch.no_grad():
    out = model(torch.rand(1, 3, 64, 64))
print(json.dumps({
    "shape": list(out.shape),
    "fc": type(model.fc).__name__,
    "mocohub": mocohub.__file__,
    "name": model.mocohub_config.meta["name"],
}))
"""


def test_torch_hub_load_from_a_plain_checkout(tmp_path: Path) -> None:
    """python -S skips site-packages' .pth files (so the editable install of mocohub is
    invisible); PYTHONPATH still gives torch. torch.hub puts the checkout on sys.path."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(site.getsitepackages()),
        "MOCOHUB_OFFLINE": "1",
    }
    run = subprocess.run(
        [sys.executable, "-S", "-c", FROM_CHECKOUT, str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 2048] and result["fc"] == "Identity"
    assert Path(result["mocohub"]).resolve().parent == ROOT / "mocohub"
    assert result["name"] == "moco_v2_r50_800ep (random init)"  # its architecture, not weights


def test_torch_hub_lists_only_the_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.hub.list offers every public callable of hubconf.py (typing names included);
    it fetches GitHub repos only, so the fetch is pointed at this checkout."""
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *args, **kwargs: str(ROOT))
    listed = torch.hub.list("org/mocohub", trust_repo=True, verbose=False)
    assert sorted(listed) == sorted(
        [*ENTRIES, "moco_r18_fashion_mnist", "resnet18", "resnet34", "resnet50"]
    )


@pytest.fixture(scope="module")
def hubconf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_points_state_their_weights(hubconf: ModuleType) -> None:
    assert {"torch", "torchvision", "timm"} <= set(hubconf.dependencies)
    for dependency in hubconf.dependencies:
        assert importlib.util.find_spec(dependency) is not None, dependency
    for entry, (name, top1) in ENTRIES.items():
        function = getattr(hubconf, entry)
        assert function.__name__ == entry
        assert f"ImageNet linear classification top-1 {top1}%" in function.__doc__
        assert function.__doc__.endswith(get_weights(name).summary())  # generated, not copied
        signature = inspect.signature(function)
        assert signature.parameters["pretrained"].default is True
        assert signature.parameters["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
        assert get_weights(name).meta["imagenet_linear_top1"] == float(top1)
    for entry in ("resnet18", "resnet34", "resnet50"):
        assert callable(getattr(hubconf, entry))
    # pretrained=True, as torchvision's entry points take it: one clear refusal
    with pytest.raises(ConfigError, match=r"randomly initialised backbone.*mocohub list"):
        hubconf.resnet18(pretrained=True)
    assert hubconf.resnet18(pretrained=False, width=8).fc is not None


def test_entry_points_pass_keywords_to_mocohub_load(
    hubconf: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOCOHUB_OFFLINE", "1")  # random weights need no download
    v1 = hubconf.moco_v1_r50(pretrained=False, head=True)
    assert isinstance(v1.fc, nn.Linear) and v1.fc.out_features == 128
    v2 = hubconf.moco_v2_r50_200ep(pretrained=False, head=True)
    assert isinstance(v2.fc, nn.Sequential)
    assert v2.mocohub_config.meta["name"] == "moco_v2_r50_200ep (random init)"
    with pytest.raises(TypeError):
        hubconf.moco_r50(pretrained=False, no_such_option=1)


def test_pretrained_entry_point_loads_verified_registry_weights(
    hubconf: ModuleType, tmp_path: Path, registry_rows: Callable[..., Any]
) -> None:
    """moco_r50 with the v2 800ep entry pointed at a small local stand-in file."""
    encoder = reference_encoder("resnet18", mlp=True, dim=128, width=8)  # small stand-in
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(reference_checkpoint(encoder), path)
    md5 = hashlib.md5(path.read_bytes()).hexdigest()[:8]
    entry = get_weights("moco_v2_r50_800ep")
    small = replace(entry.model, arch="resnet18", width=8)
    registry_rows(replace(entry, model=small, files=(WeightsFile(str(path), f"md5:{md5}"),)))
    model = hubconf.moco_r50(progress=False)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), backbone_features(encoder, images))
    assert model.mocohub_config.meta["imagenet_linear_top1"] == 71.1
    with open(path, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(InputError, match="tampered with"):
        hubconf.moco_r50()
