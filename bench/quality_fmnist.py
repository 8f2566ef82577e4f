"""Fashion-MNIST quality: pre-train MoCo on the train split, then report k-NN
(k=200, T=0.1, cosine) and linear-probe top-1 on the 10,000 test images, with
the wall time and the machine.

    python bench/quality_fmnist.py --data /usr/share/datasets/fashion-mnist \\
        --epochs 2 --width 32 --out runs/fmnist

``--data`` is a folder with the four IDX files (Debian's dataset-fashion-mnist
installs them in /usr/share/datasets/fashion-mnist). The run folder keeps
checkpoints, so ``--resume`` continues a longer run. Reference figures on the
same test split: raw-pixel k-NN 0.855 (k=5, L2), random-init ResNet-18 (width
32, small stem) about 0.72 (k=200 cosine), SVC 0.897, supervised ResNet-18 0.949.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from mocohub.sysinfo import cpu_model, speed_flags
from mocohub.training.config import preset
from mocohub.training.knn_eval import knn_evaluate
from mocohub.training.lincls import LinclsConfig, linear_eval
from mocohub.training.train import TrainingInterrupted, train

# The MoCo reference demo's k-NN monitor: 200 neighbours, vote temperature 0.1, cosine.
KNN_K = 200
KNN_T = 0.1


def evaluate(
    run_dir: Path, data: Any, linear: LinclsConfig, *, resume_linear: bool = True
) -> dict[str, Any]:
    """k-NN and linear-probe top-1 of the newest checkpoint in ``run_dir``, on ``data``'s
    test split, with the train split as the k-NN memory bank and the probe's training set.

    The probe writes to ``run_dir / "lincls"``; ``resume_linear=False`` starts it afresh
    instead of continuing a saved probe there.

    Example:
        >>> result = evaluate(Path("runs/fmnist"), "fashion-mnist",
        ...                   LinclsConfig(preset="small", cached_features=True))
        >>> sorted(result)
        ['knn', 'linear', 'seconds']
    """
    start = time.perf_counter()
    knn = knn_evaluate(run_dir, data, k=KNN_K, t=KNN_T, precision="fp32")
    knn_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = linear_eval(run_dir, data, run_dir / "lincls", linear, resume=resume_linear)
    linear_seconds = time.perf_counter() - start
    seconds = {"knn": round(knn_seconds, 1), "linear": round(linear_seconds, 1)}
    return {"knn": knn, "linear": result, "seconds": seconds}


def epoch_records(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch summaries (``"event": "epoch"``) of ``run_dir``'s ``metrics.jsonl``."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "epoch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="fashion-mnist", help="IDX folder or 'fashion-mnist'")
    parser.add_argument("--out", type=Path, default=Path("runs/quality_fmnist"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--queue-size", type=int, default=4096)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.06, help="for batch 512, scaled linearly")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--stop-after-steps", type=int, default=None)
    parser.add_argument("--linear-epochs", type=int, default=10)
    parser.add_argument("--linear-lr", type=float, default=30.0)
    parser.add_argument(
        "--linear-cached",
        action="store_true",
        help="linear probe on features extracted once (no augmentation): much faster on a CPU, "
        "but not the reference protocol",
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate --out as it is")
    parser.add_argument("--json", type=Path, default=Path("bench/results/quality_fmnist.json"))
    args = parser.parse_args()

    config = preset(
        "fashion_mnist",
        epochs=args.epochs,
        width=args.width,
        batch_size=args.batch_size,
        K=args.queue_size,
        T=args.temperature,
        lr=args.lr,
        precision=args.precision,
        workers=0,
        knn_every=1,
    )
    start = time.perf_counter()
    if not args.eval_only:
        try:
            train(
                config,
                args.data,
                args.out,
                resume="auto" if args.resume else None,
                knn_data=(args.data, args.data),  # bank: train split; queries: test split
                stop_after_steps=args.stop_after_steps,
            )
        except TrainingInterrupted as stopped:
            print(stopped)
            return
    train_seconds = time.perf_counter() - start
    # Evaluate the newest checkpoint in the run folder, whoever wrote it.
    evaluation = evaluate(
        args.out,
        args.data,
        LinclsConfig(
            preset="small",
            epochs=args.linear_epochs,
            lr=args.linear_lr,
            lr_steps=(int(args.linear_epochs * 0.6), int(args.linear_epochs * 0.8)),
            workers=0,
            cached_features=args.linear_cached,
        ),
    )
    epochs = epoch_records(args.out)
    flags = speed_flags()
    result = {
        "config": config.to_dict(),
        "epochs_trained": epochs[-1]["epoch"] if epochs else 0,
        "knn_top1": evaluation["knn"]["top1"],
        "linear_top1": evaluation["linear"]["top1"],
        "linear_protocol": "cached features" if args.linear_cached else "augmented (reference)",
        "knn_per_epoch": [(r["epoch"], r.get("knn_top1")) for r in epochs],
        "seconds": {
            "train_this_call": round(train_seconds, 1),
            **evaluation["seconds"],
        },
        "machine": {
            "cpu": cpu_model(),
            "cpu_flags": flags,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__,
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
