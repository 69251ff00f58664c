"""Context overlap between two prompt sets on a real model, in the framework's own quantity.

The framework's overlap is the mass Σ_x min(p_s(x), p_f(x)) the safety and capability distributions share over
contexts x (`bounds.context_overlap`; the synthetic setting's dial ω is exactly this). Real prompts never repeat,
so an estimate needs a partition of context space: here k-means cells of prompt features (e.g. the aligned model's
final hidden state, `safetrade.sqsd.baselines.unit_features`), with p_s and p_f the two sets' histograms over the
cells and the overlap their common mass.

What the estimate depends on: k. One cell gives 1 for any two sets; one cell per prompt gives 0. An estimate is
therefore compared across sets at the *same* k and features (the study reports several k); its absolute value is
not a property of the data alone. Cells are fitted on the pooled features, so neither set defines them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from theory import bounds


def kmeans(features: np.ndarray, k: int, seed: int = 0, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, D], labels [N]): Lloyd's algorithm from a k-means++ start, squared Euclidean distance.

    Deterministic for a seed. An emptied cell is re-seeded at the point farthest from its centroid, so k cells
    always stay in use (k ≤ number of distinct points)."""
    x = np.asarray(features, np.float64)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of points), got {k}")
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.asarray(centroids)[None]) ** 2).sum(-1), axis=1)
        centroids.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)])
    c = np.asarray(centroids)
    labels = np.full(n, -1)
    for _ in range(iters):
        d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        new = d2.argmin(axis=1)
        for j in range(k):
            if not np.any(new == j):  # re-seed an empty cell at the worst-served point
                far = int(d2[np.arange(n), new].argmax())
                new[far] = j
        if np.array_equal(new, labels):
            break
        labels = new
        c = np.stack([x[labels == j].mean(axis=0) for j in range(k)])
    return c, labels


@dataclasses.dataclass(frozen=True)
class OverlapEstimate:
    overlap: float  # Σ_cells min(p_a, p_b) = 1 − TV(p_a, p_b) over the cells
    k: int
    p_a: tuple[float, ...]  # set a's histogram over the cells
    p_b: tuple[float, ...]


def cell_overlap(features_a: np.ndarray, features_b: np.ndarray, k: int, seed: int = 0) -> OverlapEstimate:
    """The two sets' common mass over k k-means cells of their pooled features (see the module docstring)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"features must be two non-empty [N, D] arrays of one width, got {a.shape} and {b.shape}")
    _, labels = kmeans(np.concatenate([a, b]), k, seed)
    p_a = np.bincount(labels[: len(a)], minlength=k) / len(a)
    p_b = np.bincount(labels[len(a):], minlength=k) / len(b)
    return OverlapEstimate(bounds.context_overlap(p_a, p_b), k, tuple(p_a.tolist()), tuple(p_b.tolist()))
