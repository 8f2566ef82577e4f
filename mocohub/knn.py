"""Weighted k-nearest-neighbour classification on L2-normalised features.

The InstDisc-style classifier that MoCo's reference demo uses as a monitor:
each of a query's ``k`` most cosine-similar training features votes for its
label with weight ``exp(similarity / t)``. Queries are processed in chunks, so
memory stays at ``chunk x len(train)`` similarities whatever the query count.

Example:
    >>> import torch, torch.nn.functional as F
    >>> train = F.normalize(torch.randn(100, 16), dim=1)
    >>> labels = torch.randint(0, 5, (100,))
    >>> knn_predict(train, labels, train[:3], k=1).tolist() == labels[:3].tolist()
    True
"""

from __future__ import annotations

import torch

from mocohub.errors import InputError

__all__ = ["knn_accuracy", "knn_predict", "knn_scores", "knn_vote"]


@torch.no_grad()
def knn_vote(
    similarity: torch.Tensor,
    neighbours: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    t: float,
    num_classes: int,
) -> torch.Tensor:
    """The weighted vote: per-class scores, ``len(similarity) x num_classes``.

    Row ``i`` of ``neighbours`` holds the positions (in ``train_labels``) of
    query ``i``'s nearest training features, and row ``i`` of ``similarity``
    their cosine similarities; each neighbour adds ``exp(similarity / t)`` to
    its label's score. A negative position (faiss' "no neighbour found") does
    not vote. The one definition of the vote: :func:`knn_scores` and
    :func:`mocohub.index.knn_classify` both call it.

    Example:
        >>> knn_vote(torch.tensor([[0.0, 0.0]]), torch.tensor([[1, -1]]),
        ...          torch.tensor([0, 2]), t=0.1, num_classes=3)
        tensor([[0., 0., 1.]])
    """
    found = neighbours >= 0
    weights = torch.where(found, (similarity / t).exp(), 0.0)
    # votes add up in at least float32, whatever the features' dtype
    weights = weights.to(torch.promote_types(weights.dtype, torch.float32))
    labels = train_labels.to(neighbours.device)[neighbours.clamp(min=0)]
    votes = torch.zeros(len(similarity), num_classes, dtype=weights.dtype, device=weights.device)
    return votes.scatter_add_(1, labels, weights)


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 1024,
    leave_one_out: bool = False,
) -> torch.Tensor:
    """Per-class vote scores, ``len(query) x num_classes``.

    Features must be L2-normalised (rows of unit length); similarity is the dot
    product. ``k`` is capped at the number of training features.
    ``leave_one_out``: the queries are the training features themselves, and
    each query's own row does not vote for it.
    """
    if leave_one_out and query_features.shape != train_features.shape:
        raise InputError("leave_one_out needs the training features as the queries.")
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise InputError("k-NN features must be 2-D (samples x dims); flatten them first.")
    if train_features.shape[1] != query_features.shape[1]:
        raise InputError(
            f"Training features have {train_features.shape[1]} dims but queries have "
            f"{query_features.shape[1]}; embed both with the same model."
        )
    if len(train_features) != len(train_labels) or len(train_features) == 0:
        raise InputError(
            f"Got {len(train_features)} training features and {len(train_labels)} labels; "
            "pass one label per feature, and at least one."
        )
    if k < 1 or t <= 0:
        raise InputError(f"k must be >= 1 and t > 0, got k={k}, t={t}.")
    classes = int(num_classes or int(train_labels.max()) + 1)
    k = min(k, len(train_features) - int(leave_one_out))
    if k < 1:
        raise InputError("Leave-one-out k-NN needs at least two training features.")
    train_labels = train_labels.to(train_features.device)
    scores = []
    for start in range(0, len(query_features), chunk):
        queries = query_features[start : start + chunk].to(train_features)
        similarity = queries @ train_features.T
        if leave_one_out:
            own = torch.arange(len(queries), device=similarity.device)
            similarity[own, own + start] = float("-inf")
        similarity, neighbours = similarity.topk(k, dim=1)
        scores.append(knn_vote(similarity, neighbours, train_labels, t=t, num_classes=classes))
    return torch.cat(scores)


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
) -> torch.Tensor:
    """The predicted label of each query (options as :func:`knn_scores`)."""
    scores = knn_scores(
        train_features, train_labels, query_features, k=k, t=t, num_classes=num_classes
    )
    return scores.argmax(1)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    leave_one_out: bool = False,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of the weighted k-NN classifier on labelled queries.

    Example (each sample classified by all the others):
        >>> feats, labels = torch.eye(4).repeat(5, 1), torch.arange(4).repeat(5)
        >>> knn_accuracy(feats, labels, feats, labels, k=4, leave_one_out=True)["top1"]
        1.0
    """
    scores = knn_scores(
        train_features,
        train_labels,
        query_features,
        k=k,
        t=t,
        num_classes=num_classes,
        leave_one_out=leave_one_out,
    )
    ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices.cpu()
    hits = ranked == query_labels.view(-1, 1).cpu()
    return {"top1": float(hits[:, 0].double().mean()), "top5": float(hits.any(1).double().mean())}
