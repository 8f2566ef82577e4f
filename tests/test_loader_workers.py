"""DataLoader workers under `training.progress.ignore_stop_signals`: deaf to a
group SIGTERM (the main process stops them), never to the main process's own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "sigwaitinfo"), reason="the sender of a signal is unknown here"
)

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch.utils.data import DataLoader, Dataset
    from mocohub.training.progress import ignore_stop_signals

    class Images(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, index):
            if index == 5 and sys.argv[1] == "fail":
                raise ValueError("image 5 is corrupt")
            return torch.zeros(2)

    loader = DataLoader(Images(), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals)
    batches = iter(loader)
    next(batches), next(batches)  # one batch from each worker: both have run their init
    print(" ".join(str(w.pid) for w in batches._workers), flush=True)
    if sys.argv[1] == "serve":
        sys.stdin.readline()  # until the test has signalled the workers
    served = sum(1 for _ in batches)  # raises in the main process, as a bad image does
    print(f"served {served} more batches", flush=True)
    """
)


def _start(mode: str) -> tuple[subprocess.Popen[str], list[int]]:
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    workers = [int(pid) for pid in process.stdout.readline().split()]
    assert len(workers) == 2, process.communicate()
    return process, workers


def test_an_error_in_the_main_process_still_ends_the_workers_and_the_process() -> None:
    """multiprocessing stops leftover workers at exit with SIGTERM from the main
    process; a worker that ignored it made the exit wait for ever."""
    process, _ = _start("fail")
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the process did not exit: its workers ignored its SIGTERM")
    assert process.returncode == 1 and "image 5 is corrupt" in err


def test_a_sigterm_from_another_process_leaves_the_workers_serving() -> None:
    """As `timeout` or Slurm signal the whole group: the main process decides."""
    process, workers = _start("serve")
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    time.sleep(1)
    for pid in workers:
        os.kill(pid, 0)  # still alive: raises ProcessLookupError otherwise
    out, err = process.communicate("go\n", timeout=60)  # the main process reads the rest
    assert process.returncode == 0, err
    assert out.strip() == "served 30 more batches"
