"""The scorers SQSD is compared with, for any model's per-example loss (and features).

    random_scores(examples, seed=0)
    representation_scores(features_fn, params, examples, harmful_anchors)              # He et al. 2024
    gradient_matching_scores(loss_fn, params, examples, harmful_anchors, refusal_sets)  # He et al. 2024
    self_influence_scores(loss_fn, params, examples)                                    # Self-Inf-N

`loss_fn(params, example) -> scalar` and `features_fn(params, example) -> [D]` see one example (vmapped over a
batch); `examples` and anchors are anything samples.as_samples takes. Each returns `SampleScores`; bind options with
functools.partial for the common interface `scorer(examples) -> SampleScores`. He et al.'s harmful anchors keep
only their first response tokens in the loss: pass `only_first_targets(anchors, 10)` for token rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safetrade.sqsd.directions import HIGHEST, SQSDError
from safetrade.paths import PathError, Selector, select_paths
from safetrade.sqsd.samples import DEFAULT_MAX_LEN, SampleScores, Samples, as_samples
from safetrade.sqsd.updates import LossFn, per_example_grads

__all__ = ["FeaturesFn", "gradient_matching_scores", "random_scores", "representation_scores",
           "self_influence_scores", "unit_features"]

FeaturesFn = Callable[[Any, Any], jax.Array]  # (params, one example) -> feature vector [D]


def random_scores(examples, *, seed: int = 0, max_len: int | None = DEFAULT_MAX_LEN) -> SampleScores:
    """Uniform [0, 1) scores from numpy's generator seeded with `seed` (the random-selection baseline)."""
    samples = as_samples(examples, max_len)
    return samples.finish("random", np.random.default_rng(seed).random(len(samples)), {})


@functools.partial(jax.jit, static_argnames=("features_fn",))
def _unit_features(features_fn: FeaturesFn, params, batch) -> jax.Array:
    """Each row's features scaled to unit norm (a zero vector stays zero), [S, D]."""
    h = jax.vmap(features_fn, in_axes=(None, 0))(params, batch).astype(jnp.float32)
    norm = jnp.linalg.norm(h, axis=-1, keepdims=True)
    return h / jnp.where(norm > 0, norm, 1.0)


def _features(features_fn, params, samples: Samples, batch_size: int) -> np.ndarray:
    rows = []
    for chosen, batch in samples.batches(batch_size):
        rows.append((chosen, np.asarray(_unit_features(features_fn, params, batch))[: len(chosen)]))
    width = rows[0][1].shape[1] if rows else 0
    out = np.zeros((len(samples), width), np.float64)
    for chosen, values in rows:
        out[chosen] = values
    return out


def unit_features(features_fn: FeaturesFn, params, examples, *, batch_size: int = 8,
                  max_len: int | None = DEFAULT_MAX_LEN) -> np.ndarray:
    """[N, D] unit-norm features of each example (a zero row for an example that cannot be scored), the vectors
    representation_scores compares; batched and jitted once per batch shape."""
    return _features(features_fn, params, as_samples(examples, max_len), batch_size)


def representation_scores(features_fn: FeaturesFn, params, examples, harmful_anchors, *, top_n: int = 1,
                          batch_size: int = 8, max_len: int | None = DEFAULT_MAX_LEN) -> SampleScores:
    """He et al. (2024) representation matching: the mean of the top-n cosines between a sample's features and
    the harmful anchors' (n = 1: the maximum). He et al. use the final-layer hidden state at the last token."""
    anchors = as_samples(harmful_anchors, max_len)
    anchors.require_valid("representation_scores")
    if not 1 <= top_n <= len(anchors):
        raise SQSDError(f"top_n must be in 1..{len(anchors)} (the anchor count), got {top_n}")
    samples = as_samples(examples, max_len)
    cosines = _features(features_fn, params, samples, batch_size) @ _features(
        features_fn, params, anchors, batch_size).T
    top = -np.sort(-cosines, axis=1)[:, :top_n].mean(axis=1)
    return samples.finish("representation", top, {})


@jax.jit
def _row_norms(grads: dict) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
                        for g in grads.values()))


@jax.jit
def _weighted_row_sum(grads: dict, weights: jax.Array) -> dict:
    return {k: jnp.einsum("s,s...->...", weights, g.astype(jnp.float32), precision=HIGHEST)
            for k, g in grads.items()}


@jax.jit
def _row_dot(grads: dict, target: dict) -> jax.Array:
    """[S]: ⟨grads[s], target⟩ over all leaves (one anchor set per call, so one compile for any number of sets)."""
    return sum(jnp.einsum("s...,...->s", g.astype(jnp.float32), target[k], precision=HIGHEST)
               for k, g in grads.items())


def _paths(params, wrt: Selector) -> tuple[str, ...]:
    try:
        return select_paths(params, wrt)
    except PathError as err:
        raise SQSDError(str(err)) from None


def _mean_unit_gradient(loss_fn, params, samples: Samples, wrt, batch_size, what: str) -> dict:
    """Mean over the anchors of ∇ℓ/‖∇ℓ‖ (not renormalised, as in He et al.'s average_gradient.py)."""
    samples.require_valid(what)
    total = None
    for chosen, batch in samples.batches(batch_size):
        _, grads = per_example_grads(loss_fn, params, batch, wrt=wrt)
        norms = np.asarray(_row_norms(grads))[: len(chosen)]
        if not np.all(norms > 0) or not np.all(np.isfinite(norms)):
            bad = [samples.ids[i] for i, n in zip(chosen, norms) if not (n > 0 and np.isfinite(n))]
            raise SQSDError(f"{what}: anchor(s) with a zero or non-finite gradient: {', '.join(bad)}")
        weights = np.zeros(batch_size, np.float32)
        weights[: len(chosen)] = 1.0 / norms
        part = _weighted_row_sum(grads, jnp.asarray(weights))
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return jax.tree.map(lambda x: x / len(samples), total)


def gradient_matching_scores(loss_fn: LossFn, params, examples, harmful_anchors,
                             refusal_anchor_sets: Sequence = (), *, weights: Sequence[float] | None = None,
                             wrt: Selector = "all", batch_size: int = 4,
                             max_len: int | None = DEFAULT_MAX_LEN) -> SampleScores:
    """He et al. (2024) gradient matching with bidirectional anchoring.

    score(z) = Σ_k w_k ⟨ĝ(z), ḡ_k⟩ with ĝ = ∇ℓ/‖∇ℓ‖, ḡ_0 the mean unit gradient of the harmful anchors and ḡ_1..
    those of each refusal anchor set (the same prompts with a refusal); weights default to (1, −1, −1, ...) as in
    their rank.sh. `wrt`: the leaves differentiated ("all": their full-parameter gradient; a sequence of paths or a
    predicate, e.g. only the LoRA factors: LESS-style, cheaper).
    """
    weights = (1.0, *(-1.0,) * len(refusal_anchor_sets)) if weights is None else tuple(map(float, weights))
    if len(weights) != 1 + len(refusal_anchor_sets):
        raise SQSDError(f"{len(weights)} weights for {1 + len(refusal_anchor_sets)} anchor sets")
    paths = _paths(params, wrt)
    anchor_means = [_mean_unit_gradient(loss_fn, params, as_samples(harmful_anchors, max_len), paths, batch_size,
                                        "harmful anchors")]
    for k, refusals in enumerate(refusal_anchor_sets, start=1):
        anchor_means.append(_mean_unit_gradient(loss_fn, params, as_samples(refusals, max_len), paths, batch_size,
                                                f"refusal anchor set {k}"))
    samples = as_samples(examples, max_len)
    dots = np.zeros((len(samples), len(anchor_means)), np.float64)
    for chosen, batch in samples.batches(batch_size):
        _, grads = per_example_grads(loss_fn, params, batch, wrt=paths)
        norms = np.asarray(_row_norms(grads), np.float64)[: len(chosen)]
        raw = np.stack([np.asarray(_row_dot(grads, mean), np.float64) for mean in anchor_means], 1)[: len(chosen)]
        with np.errstate(divide="ignore", invalid="ignore"):
            dots[chosen] = raw / norms[:, None]  # a zero gradient gives NaN: flagged, never a silent 0
    names = ["harmful", *(f"refusal_{k}" for k in range(1, len(anchor_means)))]
    return samples.finish("gradient_matching", dots @ np.asarray(weights),
                          {name: dots[:, k] for k, name in enumerate(names)})


def self_influence_scores(loss_fn: LossFn, params, examples, *, wrt: Selector = "all", batch_size: int = 4,
                          max_len: int | None = DEFAULT_MAX_LEN,
                          lengths: Sequence[int] | None = None) -> SampleScores:
    """Self-Inf-N ("Benign Samples Matter!", 2025): log(‖∇ℓ(z)‖² + 1) + log(response tokens + 1).

    The length term offsets self-influence's bias towards short answers; token rows count their loss-mask tokens
    (with the end-of-turn token). For other examples pass `lengths` (one per example), or the score is the
    self-influence term alone (method "self_influence", component response_tokens absent).
    """
    samples = as_samples(examples, max_len)
    paths = _paths(params, wrt)
    squared = np.zeros(len(samples), np.float64)
    for chosen, batch in samples.batches(batch_size):
        _, grads = per_example_grads(loss_fn, params, batch, wrt=paths)
        squared[chosen] = np.asarray(_row_norms(grads), np.float64)[: len(chosen)] ** 2
    counts = samples.lengths if lengths is None else np.asarray(lengths)
    if counts is None:
        return samples.finish("self_influence", np.log(squared + 1.0), {"self_influence": squared})
    counts = counts.astype(np.float64)
    if counts.shape != (len(samples),):
        raise SQSDError(f"{counts.size} lengths for {len(samples)} examples")
    score = np.log(squared + 1.0) + np.log(counts + 1.0)
    return samples.finish("self_influence", score, {"self_influence": squared, "response_tokens": counts})
