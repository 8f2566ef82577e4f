from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mocohub.errors import InputError
from mocohub.knn import knn_accuracy, knn_predict, knn_scores, knn_vote


def test_scores_follow_the_weighted_vote_definition() -> None:
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_scores(train, labels, query, k=3, t=0.5, num_classes=4)
    # neighbours: sim 1.0 (label 0), 0.8 (label 1), 0.0 (label 1)
    expected = torch.tensor([[torch.e**2.0, torch.e**1.6 + 1.0, 0.0, 0.0]])
    torch.testing.assert_close(scores, expected)
    assert knn_predict(train, labels, query, k=3, t=0.5).tolist() == [0]
    # With a hotter vote the two label-1 neighbours win.
    assert knn_predict(train, labels, query, k=3, t=10.0).tolist() == [1]


def test_chunking_does_not_change_results_and_accuracy() -> None:
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 32), dim=1)
    labels = torch.arange(400) % 4
    train = F.normalize(centres[labels] + 0.3 * torch.randn(400, 32), dim=1)
    query_labels = torch.arange(100) % 4
    query = F.normalize(centres[query_labels] + 0.3 * torch.randn(100, 32), dim=1)
    whole = knn_scores(train, labels, query, k=20, t=0.1)
    chunked = knn_scores(train, labels, query, k=20, t=0.1, chunk=7)
    torch.testing.assert_close(whole, chunked, rtol=1e-4, atol=1e-6)  # BLAS blocking differs
    result = knn_accuracy(train, labels, query, query_labels, k=20)
    assert result["top1"] > 0.95 and result["top5"] == 1.0
    shuffled = knn_accuracy(train, labels[torch.randperm(400)], query, query_labels, k=20)
    assert shuffled["top1"] < 0.6


def test_bad_inputs() -> None:
    train = torch.randn(10, 8)
    with pytest.raises(InputError, match="same model"):
        knn_scores(train, torch.zeros(10, dtype=torch.long), torch.randn(2, 4))
    with pytest.raises(InputError, match="one label per feature"):
        knn_scores(train, torch.zeros(9, dtype=torch.long), torch.randn(2, 8))
    with pytest.raises(InputError, match="k must be"):
        knn_scores(train, torch.zeros(10, dtype=torch.long), torch.randn(2, 8), k=0)


def test_leave_one_out_ignores_each_querys_own_row() -> None:
    torch.manual_seed(0)
    features = F.normalize(torch.randn(50, 8), dim=1)
    labels = torch.randint(0, 3, (50,))
    # k=1 without leave-one-out finds each sample itself: a perfect, meaningless score.
    assert knn_accuracy(features, labels, features, labels, k=1)["top1"] == 1.0
    loo = knn_scores(features, labels, features, k=1, leave_one_out=True, chunk=7)
    similarity = features @ features.T
    similarity.fill_diagonal_(float("-inf"))
    nearest_other = similarity.argmax(1)
    assert torch.equal(loo.argmax(1), labels[nearest_other])
    with pytest.raises(InputError, match="leave_one_out needs"):
        knn_scores(features, labels, features[:10], leave_one_out=True)


def test_vote_weights_each_found_neighbour_by_exp_similarity_over_t() -> None:
    similarity = torch.tensor([[0.9, 0.5, 0.2], [0.7, -3.4e38, -3.4e38]])
    # row 1: an approximate index found one neighbour; faiss pads with -1 and -FLT_MAX
    neighbours = torch.tensor([[2, 0, 1], [1, -1, -1]])
    train_labels = torch.tensor([1, 0, 1])
    votes = knn_vote(similarity, neighbours, train_labels, t=0.5, num_classes=3)
    # positions 0 and 2 have label 1, position 1 label 0
    expected = torch.tensor(
        [[torch.e**0.4, torch.e**1.8 + torch.e**1.0, 0.0], [torch.e**1.4, 0, 0]]
    )
    torch.testing.assert_close(votes, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_features_of_any_float_dtype_vote_like_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(3, 16), dim=1)
    labels = torch.arange(90) % 3
    train = F.normalize(centres[labels] + 0.2 * torch.randn(90, 16), dim=1)
    query = F.normalize(centres[torch.arange(12) % 3] + 0.2 * torch.randn(12, 16), dim=1)
    scores = knn_scores(train.to(dtype), labels, query, k=10)
    assert scores.dtype == torch.promote_types(dtype, torch.float32)
    expected = knn_predict(train, labels, query, k=10)
    assert torch.equal(knn_predict(train.to(dtype), labels, query.to(dtype), k=10), expected)
