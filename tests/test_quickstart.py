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
    """The README's ``python examples/quickstart.py``, typed in a clone with no network:
    it writes runs/quickstart/ and prints what the README quotes."""
    env = {**os.environ, "MOCOHUB_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the clone, less what it writes
    run = subprocess.run(
        [sys.executable, "examples/quickstart.py"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    written = tmp_path / "runs" / "quickstart"
    for command in ("$ mocohub embed", "$ mocohub index", "$ mocohub search"):
        assert command in out
    pattern = r"\(leave-one-out, k=20\):\s+([\d.]+) with .*,\s+([\d.]+) with the same"
    found = re.search(pattern, out)
    assert found, out
    trained, untrained = float(found[1]), float(found[2])
    assert trained > untrained + 0.05 and trained > 0.65
    # The figures the README quotes, within 6 of the 300 samples: precision "auto" embeds in
    # bf16 on CPUs with bf16 units (0.773 / 0.623 there) and in fp32 elsewhere (0.773 / 0.617).
    quoted = re.search(pattern, (ROOT / "README.md").read_text())
    assert quoted, "the README no longer quotes the quickstart's k-NN figures"
    assert abs(trained - float(quoted[1])) <= 0.02 and abs(untrained - float(quoted[2])) <= 0.02
    # Each query finds itself first, with score 1.
    for query in ("00000_ankle-boot.png", "00002_trouser.png", "00008_sandal.png"):
        block = out.split(f"query: {ROOT / 'samples' / 'fashion-mnist' / query}")[1]
        first = block.splitlines()[1].split()
        assert first[0] == "1" and float(first[1]) > 0.999 and first[2].endswith(query)
    assert np.load(written / "feats.npy").shape == (300, 256)
    grid = Image.open(written / "grid.png")
    assert grid.width > 5 * 28 and grid.height > 3 * 28
