"""The global random generators' state: capture it into a checkpoint, put it back on resume.

Covers Python's ``random``, NumPy's legacy global generator, torch's CPU
generator and, once CUDA is initialised, every CUDA device's generator, in a
form that loads with ``torch.load(..., weights_only=True)``. Generators owned
by a module (MoCo's shuffle-BN generator) travel in that module's state
instead (``MoCo.get_extra_state``).

Example:
    >>> state = capture_rng_state()
    >>> a = torch.rand(1); restore_rng_state(state); bool(torch.rand(1) == a)
    True
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch

from mocohub.errors import InputError

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """The state of every global random generator, in a ``weights_only``-loadable form.

    Under DDP each process has its own state: this is the calling process's.

    Example:
        >>> sorted(capture_rng_state())
        ['cuda', 'numpy', 'python', 'torch']
    """
    version, internal, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=True)  # noqa: NPY002 (the global generator)
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], numpy_state)
    return {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "bit_generator": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        # Only once CUDA is in use: reading the states would otherwise start CUDA.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put every global random generator back to ``state`` from :func:`capture_rng_state`.

    CUDA states are restored for the devices present in both the checkpoint
    and this machine; on another device count the run continues, not bit for
    bit. An incomplete state is an :class:`~mocohub.errors.InputError`.

    Example:
        >>> restore_rng_state(load_checkpoint("runs/a/checkpoint_last.pt")["rng"])
    """
    try:
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
        np.random.set_state(  # noqa: NPY002 (the global generator)
            (
                npy["bit_generator"],
                npy["keys"].numpy().astype(np.uint32),
                npy["pos"],
                npy["has_gauss"],
                npy["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        what = f"no {e.args[0]!r} entry" if isinstance(e, KeyError) and e.args else type(e).__name__
        raise InputError(
            f"The checkpoint's random-generator state is incomplete ({what}); "
            "resume from a checkpoint written by mocohub."
        ) from e
