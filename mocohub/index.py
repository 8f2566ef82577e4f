"""Cosine nearest-neighbour search over embeddings: exact with PyTorch, or with faiss.

An :class:`Index` holds L2-normalised vectors and an id per vector (file
paths, or row numbers). Kinds:

- ``"exact"``: PyTorch matrix products, chunked over queries and vectors, so
  memory stays at ``query_chunk x vector_chunk`` scores whatever the size;
  needs nothing beyond torch.
- ``"flat"``: faiss ``IndexFlatIP`` (exact, BLAS).
- ``"ivf"``: faiss ``IndexIVFFlat`` (approximate: ``nlist`` clusters, ``nprobe``
  of them searched per query).
- ``"hnsw"``: faiss ``IndexHNSWFlat`` (approximate graph search).
- ``"auto"``: ``"exact"`` without faiss; with faiss, ``"flat"`` up to
  :data:`IVF_FROM` vectors and ``"ivf"`` above (see BENCHMARKS.md for the
  speeds and recall behind the threshold).

Example:
    >>> paths = Path("feats.manifest.txt").read_text().splitlines()
    >>> index = Index.build(np.load("feats.npy"), ids=paths)
    >>> ids, scores = index.search(np.load("queries.npy"), k=10)
    >>> index.save("feats.index"); Index.load("feats.index").kind
    'flat'
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocohub.errors import ConfigError, InputError
from mocohub.fileio import disk_errors, remove_dead_temporaries
from mocohub.publish import Publication, check_files

__all__ = ["IVF_FROM", "KINDS", "Index", "faiss_available", "knn_classify"]

KINDS = ("auto", "exact", "flat", "ivf", "hnsw")
#: with faiss, ``kind="auto"`` switches from exact ``flat`` to ``ivf`` at this many vectors
IVF_FROM = 500_000
FORMAT = "mocohub-index"
_QUERY_CHUNK = 1024
_VECTOR_CHUNK = 4096  # with _QUERY_CHUNK: 16 MiB of float32 scores, reused (cache-friendly)
_DATA = {"exact": "vectors.npy", "faiss": "index.faiss"}  # the vectors' file, by kind
_FILES = frozenset({"ids.json", "index.json", *_DATA.values()})


def faiss_available() -> bool:
    """True when ``import faiss`` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ConfigError(
            "This index kind needs faiss; install it with `pip install faiss-cpu` "
            "(or `pip install mocohub[faiss]`), or use kind 'exact'."
        ) from e
    return faiss


def _as_matrix(x: Any, name: str) -> np.ndarray:
    array = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{name} must be a 2-D numeric array (count x dims), got {array.shape}.")
    array = np.ascontiguousarray(array, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.ascontiguousarray(array / np.maximum(norms, 1e-12))


class Index:
    """Vectors + ids, searchable by cosine similarity; build with :meth:`Index.build`.

    Example:
        >>> index = Index.build(np.random.randn(1000, 64), kind="exact")
        >>> ids, scores = index.search(np.random.randn(3, 64), k=5)
        >>> ids.shape, scores.shape
        ((3, 5), (3, 5))
    """

    def __init__(
        self,
        kind: str,
        ids: np.ndarray,
        dim: int,
        *,
        vectors: torch.Tensor | None = None,
        faiss_index: Any = None,
        params: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self.kind, self.ids, self.dim = kind, ids, dim
        self.vectors, self.faiss_index = vectors, faiss_index
        self.params = dict(params or {})
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Index(kind={self.kind!r}, count={len(self)}, dim={self.dim}, params={self.params})"

    @classmethod
    def build(
        cls,
        embeddings: Any,
        ids: Sequence[Any] | np.ndarray | None = None,
        *,
        kind: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 100,
        ef_search: int = 128,
        seed: int = 0,
        meta: Mapping[str, Any] | None = None,
    ) -> Index:
        """An index over ``embeddings`` (N x dims; rows are L2-normalised in a copy).

        Args:
            ids: one id per row (paths, labels, numbers); default: row numbers.
            kind: see the module docstring.
            nlist, nprobe: IVF clusters (default ``4 * sqrt(N)``) and clusters searched
                per query (default ``nlist / 40``, at least 16: recall@10 0.97 on the
                100k-vector benchmark, at a quarter of the exact search's time).
            hnsw_m, ef_construction, ef_search: HNSW links per node, and the breadth
                of its build and search (faiss's default build breadth, 40, lost about
                7 points of recall@10 in the tests' clustered data).
            meta: free-form facts saved with the index (e.g. the model that made the vectors).
        """
        if kind not in KINDS:
            raise ConfigError(f"Unknown index kind {kind!r}; use one of {', '.join(KINDS)}.")
        vectors = _as_matrix(embeddings, "embeddings")
        count, dim = vectors.shape
        if count == 0:
            raise InputError("Cannot build an index from zero embeddings.")
        id_array = np.arange(count) if ids is None else np.asarray(list(ids), dtype=object)
        if ids is not None and all(isinstance(i, (int, np.integer)) for i in id_array):
            id_array = id_array.astype(np.int64)
        if len(id_array) != count:
            raise InputError(f"Got {count} embeddings but {len(id_array)} ids; pass one per row.")
        if kind == "auto":
            kind = "exact" if not faiss_available() else ("flat" if count < IVF_FROM else "ivf")
        if kind == "exact":
            return cls(kind, id_array, dim, vectors=torch.from_numpy(vectors), meta=meta)
        faiss = _faiss()
        params: dict[str, Any] = {}
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = nlist or max(1, min(count // 39, round(4 * math.sqrt(count))))
            params = {"nlist": nlist, "nprobe": min(nlist, nprobe or max(16, nlist // 40))}
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT
            )
            # k-means on 50 points per list (faiss asks for at least 39): minutes less at 1M
            sample = np.random.default_rng(seed).permutation(count)[: 50 * nlist]
            index.cp.seed = seed
            index.train(vectors[np.sort(sample)])
            index.nprobe = params["nprobe"]
        else:
            params = {"M": hnsw_m, "efConstruction": ef_construction, "efSearch": ef_search}
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
        index.add(vectors)
        return cls(kind, id_array, dim, faiss_index=index, params=params, meta=meta)

    def search_positions(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers (int64, -1 where an approximate index found fewer) and cosine scores."""
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            made_by = self.meta.get("embeddings", {}).get("model")
            by = f" (made with {made_by})" if made_by else ""
            raise InputError(
                f"The queries have {q.shape[1]} dims but the index has {self.dim}{by}; embed "
                "them with the model (and output) that made the index, or, if that model's "
                "weights have changed since (a named model retrained), embed the images again "
                "with `mocohub embed` and rebuild the index with `mocohub index`."
            )
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}.")
        k = min(k, len(self))
        if self.faiss_index is not None:
            scores, positions = self.faiss_index.search(q, k)
            return positions.astype(np.int64), scores.astype(np.float32)
        return _exact_search(self.vectors, torch.from_numpy(q), k)

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest ids and their cosine scores for each query, best first.

        Returns ``(ids, scores)``, both ``(len(queries), min(k, len(index)))``:
        ids as given to :meth:`build` (int64, or an object array for other
        ids), with -1 / None where an approximate index found fewer than k.
        """
        positions, scores = self.search_positions(queries, k)
        found = self.ids[np.maximum(positions, 0)]
        missing = positions < 0
        if missing.any():
            found = found.copy()
            found[missing] = -1 if found.dtype == np.int64 else None
            scores = np.where(missing, -np.inf, scores).astype(np.float32)
        return found, scores

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the index into ``directory``, its files published together.

        ``index.json`` records the size and SHA-256 of the ids and the vectors
        (:class:`mocohub.publish.Publication`), so an interrupted save over an
        earlier index leaves it whole, or refused by :meth:`load`. A full,
        read-only or unwritable disk is one :class:`InputError`.
        """
        folder = Path(directory)
        with disk_errors(folder / "index.json"), Publication() as publication:
            folder.mkdir(parents=True, exist_ok=True)
            remove_dead_temporaries(
                folder, {"ids.json", "index.json", *_DATA.values()}.__contains__
            )
            with publication.writer(folder / "ids.json", "ids") as f:
                f.write((json.dumps(self.ids.tolist(), ensure_ascii=False) + "\n").encode())
            if self.faiss_index is not None:
                with publication.writer(folder / _DATA["faiss"], "data") as f:
                    f.write(_faiss().serialize_index(self.faiss_index))
            else:
                with publication.writer(folder / _DATA["exact"], "data") as f:
                    np.save(f, self.vectors.numpy())  # type: ignore[union-attr]
            publication.publish(folder / "index.json", self._header())
        stale = folder / _DATA["exact" if self.faiss_index is not None else "faiss"]
        stale.unlink(missing_ok=True)  # of an earlier index of the other kind
        return folder

    def _header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "count": len(self),
            "dim": self.dim,
            "metric": "cosine",
            "params": self.params,
            "meta": self.meta,
        }

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Index:
        """An index written by :meth:`save`."""
        folder = Path(directory)
        try:
            header = json.loads((folder / "index.json").read_text())
            ids_list = json.loads((folder / "ids.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(
                f"{folder} is not a readable mocohub index ({e}); build one with `mocohub index`."
            ) from e
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise InputError(f"{folder}/index.json does not describe a mocohub index.")
        data = folder / _DATA["exact" if header.get("kind") == "exact" else "faiss"]
        problem = check_files(header, {"ids": folder / "ids.json", "data": data})
        if problem is not None:
            raise InputError(
                f"The files of the index {folder} do not belong together: {problem}; "
                "build it again with `mocohub index`."
            )
        ids = np.asarray(ids_list, dtype=object)
        if all(isinstance(i, int) for i in ids_list):
            ids = ids.astype(np.int64)
        kind, dim = header["kind"], int(header["dim"])
        params, meta = header.get("params"), header.get("meta")
        if kind == "exact":
            vectors = np.load(folder / "vectors.npy")
            index = cls(kind, ids, dim, vectors=torch.from_numpy(vectors), params=params, meta=meta)
        else:
            raw = np.frombuffer((folder / "index.faiss").read_bytes(), dtype=np.uint8)
            found = _faiss().deserialize_index(raw)
            index = cls(kind, ids, dim, faiss_index=found, params=params, meta=meta)
        count = len(index.vectors) if index.vectors is not None else index.faiss_index.ntotal
        if count != len(ids) or count != header["count"]:
            raise InputError(f"{folder} is inconsistent: {count} vectors, {len(ids)} ids.")
        return index


@torch.no_grad()
def _exact_search(vectors: Any, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    all_scores, all_positions = [], []
    # one score buffer, reused: fresh 16-64 MiB allocations page-fault on every chunk
    buffer = torch.empty(min(_QUERY_CHUNK, len(queries)), min(_VECTOR_CHUNK, len(vectors)))
    for q0 in range(0, len(queries), _QUERY_CHUNK):
        q = queries[q0 : q0 + _QUERY_CHUNK]
        best_s = torch.empty(len(q), 0)
        best_i = torch.empty(len(q), 0, dtype=torch.int64)
        for v0 in range(0, len(vectors), _VECTOR_CHUNK):
            chunk = vectors[v0 : v0 + _VECTOR_CHUNK]
            scores = torch.matmul(q, chunk.T, out=buffer[: len(q), : len(chunk)])
            s, i = scores.topk(min(k, len(chunk)), dim=1)
            merged_s, pick = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), 1)
            best_i = torch.cat([best_i, i + v0], 1).gather(1, pick)
            best_s = merged_s
        all_scores.append(best_s)
        all_positions.append(best_i)
    return torch.cat(all_positions).numpy(), torch.cat(all_scores).numpy()


def knn_classify(
    index: Index,
    labels: Any,
    queries: Any,
    *,
    k: int = 20,
    t: float = 0.1,
    num_classes: int | None = None,
) -> np.ndarray:
    """Weighted k-NN labels of ``queries`` (InstDisc votes, as :mod:`mocohub.knn`).

    ``labels[i]`` is the class of the index's row ``i``. An exact index runs
    :func:`mocohub.knn.knn_predict` itself on its vectors; a faiss index takes
    its (possibly approximate) neighbours to the same vote,
    :func:`mocohub.knn.knn_vote`.

    Example:
        >>> knn_classify(index, train_labels, test_features, k=20).shape
        (1000,)
    """
    from mocohub.knn import knn_predict, knn_vote

    label_tensor = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if len(label_tensor) != len(index):
        raise InputError(f"Got {len(label_tensor)} labels for an index of {len(index)} vectors.")
    classes = int(num_classes or int(label_tensor.max()) + 1)
    q = torch.from_numpy(_as_matrix(queries, "queries"))
    if index.vectors is not None:
        return knn_predict(index.vectors, label_tensor, q, k=k, t=t, num_classes=classes).numpy()
    positions, scores = index.search_positions(q.numpy(), k)
    neighbours, similarity = torch.from_numpy(positions), torch.from_numpy(scores)
    votes = knn_vote(similarity, neighbours, label_tensor, t=t, num_classes=classes)
    return votes.argmax(1).numpy()
