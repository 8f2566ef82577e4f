"""Cosine search over N 128-d vectors: mocohub's torch exact search against faiss, and IVF recall.

Rows, all through :class:`mocohub.index.Index` (so the figures include what
mocohub adds: normalisation, id mapping, chunking):

- ``exact (torch)``: chunked matrix products + running top-k, bounded memory.
- ``flat (faiss)``: ``IndexFlatIP``, exact.
- ``ivf (faiss)``: ``IndexIVFFlat`` with ``nlist = 4 sqrt(N)``, at several ``nprobe``;
  recall@10 is measured against the exact results.
- ``hnsw (faiss)``: ``IndexHNSWFlat`` (M=32, efConstruction=100), at ``efSearch``
  64 and 128; only with ``--hnsw`` (building it on 1M vectors takes many minutes).

Data: a mixture of ``--clusters`` Gaussian clusters in 128-d (unit-normalised),
a stand-in for real embeddings, which are clustered; queries are drawn from
the same mixture. Search time is the median of ``--repeats`` runs over all
``--queries`` queries at once (a batch, as ``mocohub search`` and the k-NN
monitor issue them); build time is reported separately.

Run (from the repository root)::

    python bench/retrieval.py                          # 100k vectors, 1000 queries
    python bench/retrieval.py --sizes 100000 1000000   # the issue's sizes (1M: ~2 GB RAM)
    OMP_NUM_THREADS=1 python bench/retrieval.py --threads 1

Writes every figure as JSON to ``--json`` (default ``bench/results/retrieval.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocohub.index import Index, faiss_available
from mocohub.sysinfo import cpu_model, package_version


def mixture(count: int, dim: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, count)]
    x += 0.6 * rng.standard_normal((count, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed_search(index: Index, queries: np.ndarray, k: int, repeats: int) -> tuple[float, Any]:
    times, found = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        found = index.search_positions(queries, k)
        times.append(time.perf_counter() - started)
    return statistics.median(times), found


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def add_row(
    rows: list[dict[str, Any]],
    size: int,
    queries: int,
    kind: str,
    setting: str,
    build_s: float,
    search_s: float,
    rec: float,
) -> None:
    rows.append(
        {
            "vectors": size,
            "kind": kind,
            "setting": setting,
            "build_s": build_s,
            "search_s": search_s,
            "queries_per_s": queries / search_s,
            "recall_at_k": rec,
        }
    )
    print(
        f"| {size:>9,} | {kind:<13} | {setting:<24} | {build_s:7.2f} | "
        f"{search_s * 1e3:9.1f} | {queries / search_s:9.0f} | {rec:.3f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--hnsw", action="store_true", help="Also build HNSW (slow to build).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench/results/retrieval.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not faiss_available():
        print("faiss is not installed (pip install faiss-cpu): only the torch rows run")
    else:
        import faiss

        if args.threads:
            faiss.omp_set_num_threads(args.threads)

    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        rng = np.random.default_rng(0)
        vectors = mixture(size, args.dim, args.clusters, rng)
        queries = mixture(args.queries, args.dim, args.clusters, rng)

        if size == args.sizes[0]:
            print(
                f"| vectors | index | setting | build s | search ms ({args.queries} queries) "
                f"| queries/s | recall@{args.k} |"
            )
            print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
        started = time.perf_counter()
        exact = Index.build(vectors, kind="exact")
        build = time.perf_counter() - started
        seconds, (truth, _) = timed_search(exact, queries, args.k, args.repeats)
        add_row(rows, size, args.queries, "exact (torch)", "", build, seconds, 1.0)
        del exact
        if not faiss_available():
            continue
        started = time.perf_counter()
        flat = Index.build(vectors, kind="flat")
        build = time.perf_counter() - started
        seconds, (found, _) = timed_search(flat, queries, args.k, args.repeats)
        add_row(rows, size, args.queries, "flat (faiss)", "", build, seconds, recall(found, truth))
        del flat
        started = time.perf_counter()
        ivf = Index.build(vectors, kind="ivf")
        build = time.perf_counter() - started
        for nprobe in args.nprobe:
            ivf.faiss_index.nprobe = min(nprobe, ivf.params["nlist"])
            seconds, (found, _) = timed_search(ivf, queries, args.k, args.repeats)
            setting = f"nlist {ivf.params['nlist']}, nprobe {nprobe}"
            add_row(
                rows,
                size,
                args.queries,
                "ivf (faiss)",
                setting,
                build,
                seconds,
                recall(found, truth),
            )
        default = ivf.params["nprobe"]
        ivf.faiss_index.nprobe = default
        seconds, (found, _) = timed_search(ivf, queries, args.k, args.repeats)
        add_row(
            rows,
            size,
            args.queries,
            "ivf (faiss)",
            f"default nprobe {default}",
            build,
            seconds,
            recall(found, truth),
        )
        del ivf
        if args.hnsw:
            started = time.perf_counter()
            hnsw = Index.build(vectors, kind="hnsw")
            build = time.perf_counter() - started
            for ef in (64, 128):
                hnsw.faiss_index.hnsw.efSearch = ef
                seconds, (found, _) = timed_search(hnsw, queries, args.k, args.repeats)
                add_row(
                    rows,
                    size,
                    args.queries,
                    "hnsw (faiss)",
                    f"efSearch {ef}",
                    build,
                    seconds,
                    recall(found, truth),
                )
            del hnsw

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": package_version("faiss-cpu"),
        "load_average": os.getloadavg(),
        "dim": args.dim,
        "queries": args.queries,
        "clusters": args.clusters,
        "k": args.k,
        "rows": rows,
    }
    print(f"load average at the end: {result['load_average']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
