"""The README's main job: embed -> index -> k-NN -> search with the bundled model, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_offline_and_reports_real_results(tmp_path: Path) -> None:
    env = {**os.environ, "MOCOHUB_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for command in ("$ mocohub embed", "$ mocohub index", "$ mocohub search"):
        assert command in out
    found = re.search(r"\(leave-one-out, k=20\): ([\d.]+) with .*, ([\d.]+) with the same", out)
    assert found, out
    trained, untrained = float(found[1]), float(found[2])
    assert trained > untrained + 0.05 and trained > 0.65
    # Each query finds itself first, with score 1.
    for query in ("00000_ankle-boot.png", "00002_trouser.png", "00008_sandal.png"):
        block = out.split(f"query: {ROOT / 'samples' / 'fashion-mnist' / query}")[1]
        first = block.splitlines()[1].split()
        assert first[0] == "1" and float(first[1]) > 0.999 and first[2].endswith(query)
    assert np.load(tmp_path / "feats.npy").shape == (300, 128)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 5 * 28 and grid.height > 3 * 28
