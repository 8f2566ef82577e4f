"""mocohub.artifact (config.json + model.safetensors) and mocohub.preprocessing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mocohub.artifact import (
    HeadConfig,
    ModelConfig,
    build_model,
    get_config,
    load_pretrained,
    save_pretrained,
)
from mocohub.errors import ConfigError, InputError, MissingHeadError
from mocohub.preprocessing import Preprocessing

GRAY = Preprocessing(28, 32, (0.3,), (0.35,), channels=1)


def tiny_config(head: HeadConfig | None = None) -> ModelConfig:
    return ModelConfig(
        "resnet18", small_stem=True, in_channels=1, width=8, head=head, preprocessing=GRAY
    )


def test_config_round_trips_through_json() -> None:
    config = ModelConfig(
        "resnet50", head=HeadConfig("linear", 128), meta={"name": "x", "epochs": 3}
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert ModelConfig.from_dict(data) == config
    assert (data["feature_dim"], data["embedding_dim"]) == (2048, 128)
    assert data["preprocessing"]["resize_size"] == 256


def test_inconsistent_or_foreign_configs_are_refused() -> None:
    data = tiny_config().to_dict()
    with pytest.raises(InputError, match="feature_dim 512"):
        ModelConfig.from_dict({**data, "feature_dim": 512})
    with pytest.raises(InputError, match="not 'mocohub'"):
        ModelConfig.from_dict({**data, "model_type": "bert"})
    with pytest.raises(InputError, match="needs at least arch and preprocessing"):
        ModelConfig.from_dict({"arch": "resnet18"})
    with pytest.raises(ConfigError, match="takes 3 channels"):
        ModelConfig("resnet18", preprocessing=GRAY)
    with pytest.raises(ConfigError, match="Unknown architecture"):
        ModelConfig("vit_b", preprocessing=GRAY)


def test_save_and_load_give_the_same_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(HeadConfig("mlp", 16)))
    old_umask = os.umask(0o022)
    try:
        save_pretrained(model, tmp_path)
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    # Readable by others, as the umask says (safetensors' save_file would make it 0600).
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644

    x = torch.randn(3, 1, 28, 28)
    with_head = load_pretrained(tmp_path, head=True)
    assert torch.equal(with_head(x), model(x)) and with_head(x).shape == (3, 16)
    backbone = load_pretrained(tmp_path)
    assert backbone(x).shape == (3, 64) and get_config(backbone).head is None
    assert get_config(with_head) == model.mocohub_config


def test_half_precision_weights_load_as_float32(tmp_path: Path) -> None:
    model = build_model(tiny_config())
    save_pretrained(model.half(), tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.conv1.weight.dtype == torch.float32
    assert torch.equal(loaded.conv1.weight, model.conv1.weight.float())


def test_damaged_folders_give_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_pretrained(tmp_path)
    save_pretrained(build_model(tiny_config()), tmp_path)
    with pytest.raises(MissingHeadError, match="holds no projection head"):
        load_pretrained(tmp_path, head=True)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_pretrained(tmp_path)
    with pytest.raises(InputError, match="no mocohub config"):
        get_config(torch.nn.Linear(2, 2))


def test_per_image_and_batched_preprocessing_agree() -> None:
    rgb = Preprocessing.imagenet(32)
    image = Image.fromarray(torch.randint(0, 256, (48, 40, 3), dtype=torch.uint8).numpy())
    one = rgb.transform()(image)
    batch = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    assert one.shape == (3, 32, 32)
    torch.testing.assert_close(rgb.batch()(batch)[0], one, atol=2e-2, rtol=0)
    # Images at the crop size are used as they are; gray models get luma.
    small = Image.new("RGB", (28, 28), (255, 0, 0))
    x = GRAY.transform()(small)
    assert x.shape == (1, 28, 28)
    assert x[0, 0, 0].item() == pytest.approx((0.2989 - 0.3) / 0.35, abs=1e-2)
    with pytest.raises(ConfigError, match="one value per channel"):
        Preprocessing(28, 32, (0.3, 0.3), (0.3,), channels=1)
    assert Preprocessing.from_dict(GRAY.to_dict()) == GRAY
