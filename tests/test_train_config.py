"""`TrainConfig`: settings that cannot work together are refused before a run starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mocohub.errors import ConfigError
from mocohub.training.config import TrainConfig, preset


def test_a_symmetric_loss_needs_a_queue_of_twice_the_batch(tmp_path: Path) -> None:
    # Each step enqueues both views' keys: 64 per step does not divide K=96.
    with pytest.raises(ConfigError, match=r"K=96 must be a multiple of twice the global batch"):
        preset("fashion_mnist", symmetric=True, K=96, batch_size=32)
    assert preset("fashion_mnist", symmetric=False, K=96, batch_size=32).K == 96
    assert preset("fashion_mnist", symmetric=True, K=128, batch_size=32).symmetric


def test_the_saved_config_holds_only_settings_that_are_read(tmp_path: Path) -> None:
    config = preset("fashion_mnist", checkpoint_every="30m")
    config.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "extra" not in saved and saved["checkpoint_every"] == "30m"
    assert TrainConfig.from_dict(saved) == config
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
    with pytest.raises(ConfigError, match="Unknown configuration keys: extra"):
        TrainConfig.from_dict({**saved, "extra": {}})
