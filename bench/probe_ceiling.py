"""How far a linear probe can go on a model's frozen features: a converged logistic regression.

`mocohub lincls` trains its linear head by SGD for a fixed schedule. This asks
whether a better probe recipe alone could score higher: it extracts the
pooled features of the train split (and, with ``--flip``, of its horizontal
flips) and of the val split once, then fits a multinomial logistic regression
to convergence by L-BFGS (torch.optim.LBFGS with a strong-Wolfe line search)
for each feature normalisation and weight decay asked for. Each fit is scored
on ``--holdout`` training images it did not see (chosen at random), then refit
on the whole train split and scored on the val split, the figure `mocohub
lincls` reports.

    python bench/probe_ceiling.py --model moco_r18_fashion_mnist \
        --data ../shared/data/fashion-mnist --flip --threads 2

Prints one markdown row per fit and, with ``--json``, writes every figure there.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mocohub.artifact import get_config
from mocohub.fileio import atomic_write_text
from mocohub.sysinfo import cpu_model, speed_flags
from mocohub.training.data import resolve_dataset
from mocohub.training.distributed import init_from_env
from mocohub.training.eval_data import (
    EvalBatches,
    backbone_features,
    freeze_backbone,
    load_backbone,
    place_backbone,
)
from mocohub.training.eval_transforms import preprocessing_at

Features = dict[str, torch.Tensor]


@dataclass
class Fit:
    """One logistic regression: its setting and its scores (fractions)."""

    normalisation: str
    weight_decay: float
    flips: bool
    holdout_top1: float
    val_top1: float
    train_top1: float
    iterations: int
    gradient_norm: float


def extract(model: str, data: str, flip: bool, batch_size: int) -> Features:
    """Pooled float32 features and labels of ``data``'s train and val splits, in data-set
    order; with ``flip`` also ``train_flip``, the same images mirrored left to right."""
    env = init_from_env()
    backbone = freeze_backbone(place_backbone(load_backbone(model), env.device))
    prep = preprocessing_at(get_config(backbone).preprocessing, None)
    out: Features = {}
    for split in ("train", "val"):
        dataset, info = resolve_dataset(data, split)
        batches = EvalBatches(dataset, info, prep, "auto", env, batch_size=batch_size)
        plain, flipped, labels = [], [], []
        for images, targets in batches:
            plain.append(backbone_features(backbone, images))
            if flip and split == "train":
                flipped.append(backbone_features(backbone, images.flip(-1)))
            labels.append(targets)
        out[split] = torch.cat(plain)[: batches.num_samples].cpu()
        out[f"{split}_labels"] = torch.cat(labels)[: batches.num_samples].cpu()
        if flipped:
            out["train_flip"] = torch.cat(flipped)[: batches.num_samples].cpu()
    return out


def normaliser(kind: str, reference: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``l2``: unit-length rows (as lincls and k-NN see them); ``standard``: each feature
    centred and scaled by ``reference``'s mean and standard deviation."""
    if kind == "l2":
        return lambda x: F.normalize(x, dim=1)
    mean, std = reference.mean(0), reference.std(0).clamp_min(1e-6)
    return lambda x: (x - mean) / std


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Weights and bias minimising mean cross-entropy + ``weight_decay`` * |W|^2, with the
    iterations taken and the final gradient norm."""
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    closure()
    assert weight.grad is not None and bias.grad is not None
    gradient = torch.cat([weight.grad.flatten(), bias.grad]).norm().item()
    iterations = int(optimizer.state[weight]["n_iter"])  # LBFGS: state of its first param
    return weight.detach(), bias.detach(), iterations, gradient


def top1(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x @ weight + bias).argmax(1) == y).double().mean().item()


def training_set(
    features: Features,
    norm: Callable[[torch.Tensor], torch.Tensor],
    index: torch.Tensor,
    flips: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised training features at ``index`` and their labels (with ``flips``,
    followed by the mirrored images' features and the same labels again)."""
    x, y = norm(features["train"][index]), features["train_labels"][index]
    if flips:
        x = torch.cat([x, norm(features["train_flip"][index])])
        y = torch.cat([y, y])
    return x, y


def probe(
    features: Features,
    normalisations: list[str],
    weight_decays: list[float],
    holdout: int,
    max_iter: int,
    seed: int = 0,
) -> list[Fit]:
    """Every (normalisation, weight decay, with/without flips) fit, scored as the module says."""
    train, labels = features["train"], features["train_labels"]
    val, val_labels = features["val"], features["val_labels"]
    if not 0 < holdout < len(train):
        raise SystemExit(f"--holdout must be between 1 and {len(train) - 1}, got {holdout}.")
    classes = int(max(labels.max(), val_labels.max())) + 1
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:holdout], order[holdout:]
    fits = []
    for kind in normalisations:
        norm = normaliser(kind, train[kept])
        for flips in [False, True] if "train_flip" in features else [False]:
            for decay in weight_decays:
                x, y = training_set(features, norm, kept, flips)
                w, b, _, _ = fit_logistic(x, y, classes, decay, max_iter)
                held_top1 = top1(w, b, norm(train[held]), labels[held])
                x, y = training_set(features, norm, torch.arange(len(train)), flips)
                w, b, iterations, gradient = fit_logistic(x, y, classes, decay, max_iter)
                val_top1 = top1(w, b, norm(val), val_labels)
                train_top1 = top1(w, b, x, y)
                fits.append(
                    Fit(kind, decay, flips, held_top1, val_top1, train_top1, iterations, gradient)
                )
    return fits


def main(argv: list[str] | None = None) -> list[Fit]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="anything mocohub.load accepts")
    parser.add_argument("--data", required=True, help="labelled data with train and val splits")
    parser.add_argument("--flip", action="store_true", help="also fit with mirrored copies")
    parser.add_argument("--normalisation", nargs="+", default=["l2", "standard"])
    parser.add_argument("--weight-decay", nargs="+", type=float, default=[0.0, 1e-5, 1e-4])
    parser.add_argument("--holdout", type=int, default=10000)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    features = extract(args.model, args.data, args.flip, args.batch_size)
    extracted = time.perf_counter() - started
    fits = probe(features, args.normalisation, args.weight_decay, args.holdout, args.max_iter)
    fitted = time.perf_counter() - started - extracted
    flags = ", ".join(speed_flags()) or "no AVX2"
    print(
        f"{args.model} on {args.data}: {len(features['train'])} train images (holdout "
        f"{args.holdout}), {len(features['val'])} val images, "
        f"{features['train'].shape[1]} features; extraction {extracted:.0f} s, fits "
        f"{fitted:.0f} s, {torch.get_num_threads()} threads, {cpu_model()} ({flags})"
    )
    print(
        "| features | weight decay | mirrored copies | held-out top-1 | val top-1 | train top-1 |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for fit in fits:
        print(
            f"| {fit.normalisation} | {fit.weight_decay:g} | {'yes' if fit.flips else 'no'} | "
            f"{fit.holdout_top1:.4f} | {fit.val_top1:.4f} | {fit.train_top1:.4f} |"
        )
    if args.json:
        record = {
            "model": args.model,
            "data": args.data,
            "holdout": args.holdout,
            "extraction_s": extracted,
            "fits_s": fitted,
            "cpu": cpu_model(),
            "cpu_flags": speed_flags(),
            "threads": torch.get_num_threads(),
            "fits": [asdict(fit) for fit in fits],
        }
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return fits


if __name__ == "__main__":
    main()
