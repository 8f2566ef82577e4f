"""``knn_evaluate`` (what ``mocohub knn`` runs) with the backbone in NCHW and in channels_last.

The layout of ``knn``/``lincls`` feature extraction is one rule,
:func:`mocohub.precision.prefers_channels_last`; this forces it each way and times the
whole evaluation (feature extraction of both splits, then the vote), alternating the
layouts ``--rounds`` times so that drift in the machine's speed falls on both. Prints
seconds, images per second and top-1 for each run, the median ratio, and the CPU, and
writes them to ``--json``.

    python bench/knn_layouts.py --data ../shared/data/fashion-mnist --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mocohub.sysinfo import cpu_model, speed_flags
from mocohub.training import eval_data
from mocohub.training.knn_eval import knn_evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="labelled data with a val split")
    parser.add_argument("--model", default="moco_r18_fashion_mnist")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--json", type=Path, default=Path("bench/results/knn_layouts.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rule = eval_data.prefers_channels_last
    seconds: dict[str, list[float]] = {"NCHW": [], "channels_last": []}
    top1: dict[str, list[float]] = {"NCHW": [], "channels_last": []}
    for _ in range(args.rounds):
        for layout in seconds:
            eval_data.prefers_channels_last = (  # type: ignore[assignment]
                rule if layout == "channels_last" else lambda device: False
            )
            started = time.perf_counter()
            result = knn_evaluate(args.model, args.data, precision=args.precision)
            took = time.perf_counter() - started
            seconds[layout].append(took)
            top1[layout].append(result["top1"])
            images = result["train_samples"] + result["val_samples"]
            print(
                f"{layout:13s} {took:6.1f} s  {images / took:6.1f} img/s  "
                f"top-1 {result['top1']:.4f}",
                flush=True,
            )
    eval_data.prefers_channels_last = rule  # type: ignore[assignment]
    ratio = statistics.median(seconds["NCHW"]) / statistics.median(seconds["channels_last"])
    flags = speed_flags()
    machine = f"{cpu_model()}, {torch.get_num_threads()} threads, flags: {' '.join(flags)}"
    print(
        f"\nchannels_last / NCHW speed: {ratio:.2f}x (medians of {args.rounds} runs each); "
        f"{args.model}, {args.precision}; {machine}"
    )
    report = {"model": args.model, "precision": args.precision, "machine": machine,
              "seconds": seconds, "top1": top1, "ratio": ratio}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
