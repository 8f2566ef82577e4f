"""Index: exact torch search (chunked), faiss kinds, save/load, k-NN classification."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mocohub
from mocohub import index as index_module
from mocohub.errors import ConfigError, InputError
from mocohub.index import Index, knn_classify
from mocohub.knn import knn_predict


def clustered(count: int, dim: int = 32, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, count)] + 0.4 * rng.standard_normal((count, dim))
    return x.astype(np.float32)


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    v = F.normalize(torch.from_numpy(vectors).double(), dim=1)
    q = F.normalize(torch.from_numpy(queries).double(), dim=1)
    scores, positions = (q @ v.T).topk(k, dim=1)
    return positions.numpy(), scores.numpy()


def test_exact_search_is_chunked_and_right(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors, queries = clustered(1000), clustered(70, seed=1)
    # chunks far smaller than the data: the running top-k merge is exercised
    monkeypatch.setattr(index_module, "_VECTOR_CHUNK", 97)
    monkeypatch.setattr(index_module, "_QUERY_CHUNK", 16)
    index = Index.build(vectors, kind="exact")
    assert mocohub.Index is Index
    positions, scores = index.search_positions(queries, k=10)
    expected_positions, expected_scores = brute_force(vectors, queries, 10)
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    ids, id_scores = index.search(queries, k=10)
    np.testing.assert_allclose(id_scores, expected_scores, atol=1e-5)
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, expected_positions)  # default ids are row numbers
    # every vector finds itself first
    self_ids, self_scores = index.search(vectors[:50], k=3)
    np.testing.assert_array_equal(self_ids[:, 0], np.arange(50))
    np.testing.assert_allclose(self_scores[:, 0], 1.0, atol=1e-5)
    # k is capped at the index size
    assert Index.build(vectors[:4], kind="exact").search(queries, k=10)[0].shape == (70, 4)


def test_string_ids_and_save_load(tmp_path: Path) -> None:
    vectors = clustered(300)
    paths = [f"images/{i:04d}.png" for i in range(300)]
    index = Index.build(vectors, paths, kind="exact", meta={"model": "m"})
    ids, scores = index.search(vectors[[5, 17]], k=4)
    assert ids.dtype == object
    assert ids[:, 0].tolist() == ["images/0005.png", "images/0017.png"]
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    assert (loaded.kind, len(loaded), loaded.dim, loaded.meta) == ("exact", 300, 32, {"model": "m"})
    loaded_ids, loaded_scores = loaded.search(vectors[[5, 17]], k=4)
    assert loaded_ids.tolist() == ids.tolist()
    np.testing.assert_array_equal(loaded_scores, scores)


def test_bad_input_gives_clear_errors(tmp_path: Path) -> None:
    vectors = clustered(50)
    with pytest.raises(InputError, match="one per row"):
        Index.build(vectors, ["a", "b"])
    with pytest.raises(InputError, match="2-D"):
        Index.build(np.zeros((2, 3, 4)))
    with pytest.raises(InputError, match="zero embeddings"):
        Index.build(np.zeros((0, 8)))
    with pytest.raises(ConfigError, match="Unknown index kind"):
        Index.build(vectors, kind="annoy")
    index = Index.build(vectors, kind="exact")
    with pytest.raises(InputError, match="31 dims"):
        index.search(np.zeros((1, 31)))
    with pytest.raises(InputError, match="k must be"):
        index.search(vectors[:1], k=0)
    with pytest.raises(InputError, match="mocohub index"):
        Index.load(tmp_path)


def test_auto_kind_without_faiss_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "faiss_available", lambda: False)
    assert Index.build(clustered(100)).kind == "exact"


def test_knn_classify_matches_mocohub_knn() -> None:
    vectors, queries = clustered(400), clustered(60, seed=2)
    labels = np.random.default_rng(0).integers(0, 5, 400)
    index = Index.build(vectors, kind="exact")
    predicted = knn_classify(index, labels, queries, k=15, t=0.07)
    train = F.normalize(torch.from_numpy(vectors), dim=1)
    test = F.normalize(torch.from_numpy(queries), dim=1)
    expected = knn_predict(train, torch.from_numpy(labels), test, k=15, t=0.07)
    np.testing.assert_array_equal(predicted, expected.numpy())
    with pytest.raises(InputError, match="labels"):
        knn_classify(index, labels[:10], queries)


class TorchTopK:
    """Stands in for a faiss index: ``search`` returns faiss' (scores, positions) layout,
    with the last ``missing`` columns unfound (-1, -FLT_MAX) as an approximate index does."""

    def __init__(self, vectors: np.ndarray, missing: int) -> None:
        self.vectors = F.normalize(torch.from_numpy(vectors), dim=1)
        self.missing = missing

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, positions = (torch.from_numpy(queries) @ self.vectors.T).topk(k, dim=1)
        scores[:, k - self.missing :] = -torch.finfo(torch.float32).max
        positions[:, k - self.missing :] = -1
        return scores.numpy(), positions.numpy()


@pytest.mark.parametrize("missing", [0, 3])
def test_faiss_and_exact_paths_vote_alike_on_the_same_neighbours(missing: int) -> None:
    vectors, queries = clustered(300), clustered(50, seed=5)
    labels = np.random.default_rng(1).integers(0, 6, 300)
    searcher = TorchTopK(vectors, missing)
    by_faiss_path = Index("flat", np.arange(300), 32, faiss_index=searcher)
    predicted = knn_classify(by_faiss_path, labels, queries, k=12, t=0.05)
    # unfound neighbours do not vote: the exact path with k - missing neighbours agrees
    exact = Index.build(vectors, kind="exact")
    np.testing.assert_array_equal(
        predicted, knn_classify(exact, labels, queries, k=12 - missing, t=0.05)
    )


# --- faiss -----------------------------------------------------------------


def test_faiss_flat_agrees_with_torch_exact(tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    vectors, queries = clustered(2000, dim=48), clustered(100, dim=48, seed=3)
    exact = Index.build(vectors, kind="exact")
    flat = Index.build(vectors, kind="flat")
    assert Index.build(vectors).kind == "flat"  # auto, small: exact faiss
    e_pos, e_scores = exact.search_positions(queries, k=10)
    f_pos, f_scores = flat.search_positions(queries, k=10)
    np.testing.assert_array_equal(f_pos, e_pos)
    np.testing.assert_allclose(f_scores, e_scores, atol=1e-5)
    flat.save(tmp_path / "flat")
    loaded = Index.load(tmp_path / "flat")
    assert loaded.kind == "flat"
    np.testing.assert_array_equal(loaded.search_positions(queries, k=10)[0], e_pos)
    labels = np.arange(2000) % 7
    np.testing.assert_array_equal(
        knn_classify(flat, labels, queries, k=9), knn_classify(exact, labels, queries, k=9)
    )


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_find_most_true_neighbours(kind: str, tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    vectors, queries = clustered(5000, dim=32), clustered(200, dim=32, seed=4)
    truth, _ = brute_force(vectors, queries, 10)
    index = Index.build(vectors, [f"v{i}" for i in range(5000)], kind=kind)
    positions, scores = index.search_positions(queries, k=10)
    recall = np.mean([len(set(p) & set(t)) / 10 for p, t in zip(positions, truth, strict=True)])
    assert recall > 0.9, f"{kind} recall@10 {recall:.3f}"
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    self_ids, _ = index.search(vectors[:20], k=1)
    assert self_ids[:, 0].tolist() == [f"v{i}" for i in range(20)]
    index.save(tmp_path / kind)
    loaded = Index.load(tmp_path / kind)
    assert (loaded.kind, loaded.params) == (kind, index.params)
    np.testing.assert_array_equal(loaded.search_positions(queries, k=10)[0], positions)
