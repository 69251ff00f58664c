"""theory/overlap.py: k-means cells and the cell-histogram overlap, on point clouds whose overlap is known."""

from __future__ import annotations

import numpy as np
import pytest

from theory import overlap


def blobs(centers, n, seed, spread=0.05):
    rng = np.random.default_rng(seed)
    return np.concatenate([c + spread * rng.normal(size=(n, 2)) for c in np.asarray(centers, np.float64)])


def test_kmeans_recovers_separated_blobs_and_is_deterministic():
    x = blobs([[0, 0], [5, 0], [0, 5]], 30, seed=0)
    centroids, labels = overlap.kmeans(x, 3, seed=1)
    assert sorted(np.bincount(labels).tolist()) == [30, 30, 30]
    assert all(len(set(labels[i * 30:(i + 1) * 30])) == 1 for i in range(3))  # each blob is one cell
    np.testing.assert_allclose(sorted(map(tuple, np.round(centroids))), [(0, 0), (0, 5), (5, 0)], atol=0.1)
    again = overlap.kmeans(x, 3, seed=1)
    assert np.array_equal(again[1], labels)
    with pytest.raises(ValueError, match="k must be in"):
        overlap.kmeans(x, 0)


def test_cell_overlap_equals_the_shared_mass_of_the_two_sets():
    # a: all in blob A; b: a fraction ω in blob A, the rest in blob B far away -> overlap = ω exactly
    a = blobs([[0, 0]], 40, seed=0)
    for omega, n_shared in ((0.0, 0), (0.25, 10), (0.5, 20), (1.0, 40)):
        b = np.concatenate([blobs([[0, 0]], n_shared, seed=1), blobs([[9, 9]], 40 - n_shared, seed=2)])
        est = overlap.cell_overlap(a, b, k=2 if 0 < n_shared < 40 else 1 + (n_shared == 0), seed=0)
        assert est.overlap == pytest.approx(omega)
        assert sum(est.p_a) == pytest.approx(1.0) and sum(est.p_b) == pytest.approx(1.0)
    # the estimate depends on k: one cell always reads full overlap
    assert overlap.cell_overlap(a, blobs([[9, 9]], 40, seed=3), k=1).overlap == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one width"):
        overlap.cell_overlap(a, np.zeros((3, 5)), k=2)
