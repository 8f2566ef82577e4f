"""The docstring examples of the modules whose examples are self-contained run as written.

Other modules' examples name files and objects of a user's session (``runs/a``, ``model``)
and are read, not run. A module joins the list once every example in it runs.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

RUNNABLE = [
    "mocohub.backbones",
    "mocohub.detection.build",
    "mocohub.detection.norms",
    "mocohub.knn",
    "mocohub.model_config",
    "mocohub.preprocessing",
    "mocohub.registry",
    "mocohub.training.augment",
    "mocohub.training.batch_augment",
    "mocohub.training.batch_ops",
    "mocohub.training.datasets",
    "mocohub.training.det_config",
    "mocohub.training.lincls_config",
    "mocohub.training.recipes",
    "mocohub.training.schedule",
]


@pytest.mark.parametrize("name", RUNNABLE)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False, report=True)
    assert result.attempted > 0, f"{name} has no examples to run"
    assert result.failed == 0, f"{result.failed} of {name}'s examples fail (see the output above)"
