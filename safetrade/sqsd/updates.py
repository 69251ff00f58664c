"""Per-sample induced updates of any model's loss, and their alignment with directions in rank space.

    losses, grads = per_example_grads(loss_fn, params, batch, wrt=("hidden/lora_a", "hidden/lora_b"))
    terms = alignment_terms(params, grads, directions, lr, sites=tuple(sorted(resolved.items())))
    cosines = module_metric(terms, "cosine")          # {module: [S, layers]}

`loss_fn(params, example) -> scalar` is one example's loss; `per_example_grads` is `jax.vmap` over the batch's
rows of `jax.grad` of it, so every row's gradient is exactly its batch-of-one gradient.

Induced update of one SGD step of rate lr on a sample z (the first-order change of the module's weight):
  * LoRA site (A, B; in/out layout): δW(z) = −lr · (∇_A ℓ(z) · B + A · ∇_B ℓ(z)); the second-order term
    lr²·∇_A·∇_B is dropped, and the adapter's scale s is not applied: the gradients already carry one factor s,
    and a positive constant per state changes no cosine. With B = 0 (a fresh adapter) δW = −lr·A·∇_B ℓ lies in
    the span of a random A, which is why SQSD's danger side is scored at a benignly fine-tuned adapter.
  * Kernel site: δW(z) = −lr · ∇_W ℓ(z).

Rank-space algebra (no per-sample d×k matrix is ever formed). With A [n, r], B [r, k], per-sample gradients
G_A [n, r], G_B [r, k], and a factored direction D = c·P·Q (P [n, q], Q [q, k]), using
⟨X·Y, P·Q⟩_F = Σ (XᵀP) ⊙ (Y Qᵀ) and ‖X·Y‖_F² = Σ (XᵀX) ⊙ (Y Yᵀ):

    ⟨δW, D⟩  = −lr·c · [ Σ (G_Aᵀ P) ⊙ (B Qᵀ)  +  Σ (Aᵀ P) ⊙ (G_B Qᵀ) ]                     (r×q matrices)
    ‖δW‖²    = lr² · [ Σ (G_Aᵀ G_A) ⊙ (B Bᵀ) + Σ (Aᵀ A) ⊙ (G_B G_Bᵀ) + 2 Σ (G_Aᵀ A) ⊙ (B G_Bᵀ) ]   (r×r)
    ‖D‖²     = c² · Σ (Pᵀ P) ⊙ (Q Qᵀ)                                                      (q×q)

and for a dense direction D [n, k]: ⟨δW, D⟩ = −lr·[Σ G_A ⊙ (D Bᵀ) + Σ G_B ⊙ (Aᵀ D)], where D Bᵀ and Aᵀ D are
per-state constants. Per sample that is O((n + k)·r·(r + q)) work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safetrade.sqsd.directions import (HIGHEST, DenseDirection, Directions, FactoredDirection, KernelSite,
                                       LoraSite, SQSDError, to_in_out)
from safetrade.paths import leaves_by_path, with_leaves

__all__ = ["METRICS", "LossFn", "alignment_terms", "module_metric", "per_example_grads", "site_paths"]

METRICS = ("cosine", "projection")
LossFn = Callable[[Any, Any], jax.Array]  # (params, one example) -> scalar loss


@functools.partial(jax.jit, static_argnames=("loss_fn", "wrt"))
def per_example_grads(loss_fn: LossFn, params, batch, *, wrt: tuple[str, ...]):
    """(losses [S], grads {leaf path: [S, ...]}) of each row's own loss, for the leaves at the paths `wrt`.

    `batch` is a pytree whose leaves have a leading row axis. `wrt` is a tuple (a static argument: jit compiles
    once per distinct tuple and loss_fn, so pass the same loss_fn object every time, e.g. a frozen dataclass).
    """
    leaves = leaves_by_path(params)
    trainable = {path: leaves[path] for path in wrt}

    def row_loss(chosen, row):
        return loss_fn(with_leaves(params, chosen), row)

    return jax.vmap(jax.value_and_grad(row_loss), in_axes=(None, 0))(trainable, batch)


def site_paths(sites) -> tuple[str, ...]:
    """The leaf paths a gradient is needed for, module by module in sorted order (`sites`: (module, site) pairs)."""
    paths = []
    for _, site in sites:
        paths.extend((site.a, site.b) if isinstance(site, LoraSite) else (site.path,))
    return tuple(paths)


def _dot(spec: str, x, y):
    return jnp.einsum(spec, x, y, precision=HIGHEST)


def _stacked(x: jax.Array, per_sample: bool) -> jax.Array:
    """Leading (layer) axes as one: [(S,) L, m, n] (a 2-D weight is one layer)."""
    head = x.shape[:1] if per_sample else ()
    return x.reshape(*head, -1, *x.shape[-2:])


def _lora_terms(a, b, grad_a, grad_b, direction, lr):
    """(⟨δW, D⟩ [S, L], ‖δW‖² [S, L], ‖D‖² [L]) in rank space for δW = −lr·(G_A·B + A·G_B); see module doc."""
    f32 = jnp.float32
    a, b, grad_a, grad_b = a.astype(f32), b.astype(f32), grad_a.astype(f32), grad_b.astype(f32)
    gram_ga = _dot("slnr,slnq->slrq", grad_a, grad_a)
    gram_gb = _dot("slrk,slqk->slrq", grad_b, grad_b)
    gram_a = _dot("lnr,lnq->lrq", a, a)
    gram_b = _dot("lrk,lqk->lrq", b, b)
    cross = _dot("slnr,lnq->slrq", grad_a, a) * _dot("lrk,slqk->slrq", b, grad_b)
    delta_sq = lr**2 * jnp.sum(gram_ga * gram_b[None] + gram_a[None] * gram_gb + 2.0 * cross, axis=(-2, -1))
    delta_sq = jnp.maximum(delta_sq, 0.0)  # the expansion can round a tiny norm below zero
    if isinstance(direction, FactoredDirection):
        p, q, c = _stacked(direction.a.astype(f32), False), _stacked(direction.b.astype(f32), False), direction.scale
        inner = (jnp.sum(_dot("slnr,lnq->slrq", grad_a, p) * _dot("lrk,lqk->lrq", b, q)[None], axis=(-2, -1))
                 + jnp.sum(_dot("lnr,lnq->lrq", a, p)[None] * _dot("slrk,lqk->slrq", grad_b, q), axis=(-2, -1)))
        dot = -lr * c * inner
        direction_sq = c**2 * jnp.sum(_dot("lnq,lnp->lqp", p, p) * _dot("lqk,lpk->lqp", q, q), axis=(-2, -1))
    else:
        d = _stacked(direction.matrix.astype(f32), False)
        d_bt = _dot("lnk,lrk->lnr", d, b)  # D·Bᵀ
        at_d = _dot("lnr,lnk->lrk", a, d)  # Aᵀ·D
        dot = -lr * (jnp.sum(grad_a * d_bt[None], axis=(-2, -1)) + jnp.sum(grad_b * at_d[None], axis=(-2, -1)))
        direction_sq = jnp.sum(d * d, axis=(-2, -1))
    return dot, delta_sq, jnp.maximum(direction_sq, 0.0)


def _full_terms(grad_w, direction: DenseDirection, lr):
    g = grad_w.astype(jnp.float32)
    d = _stacked(direction.matrix.astype(jnp.float32), False)
    dot = -lr * jnp.sum(g * d[None], axis=(-2, -1))
    return dot, lr**2 * jnp.sum(g * g, axis=(-2, -1)), jnp.sum(d * d, axis=(-2, -1))


@functools.partial(jax.jit, static_argnames=("sites",))
def alignment_terms(params, grads: dict, directions: Directions, lr, *, sites: tuple):
    """Per-sample, per-module inner products and squared norms from `per_example_grads` output.

    `sites`: (module, LoraSite | KernelSite) pairs in sorted module order (static). Returns {"dot": {module:
    [S, L]}, "update_sq": {module: [S, L]}, "direction_sq": {module: [L]}}, L the module's layers (leading axes
    flattened; 1 for a 2-D weight). Kernel sites need dense directions (`Directions.dense`).
    """
    leaves = leaves_by_path(params)
    out = {"dot": {}, "update_sq": {}, "direction_sq": {}}
    for module, site in sites:
        direction = directions.modules[module]
        if isinstance(site, LoraSite):
            a, b = (_stacked(to_in_out(leaves[p], site.layout), False) for p in (site.a, site.b))
            grad_a, grad_b = (_stacked(to_in_out(grads[p], site.layout), True) for p in (site.a, site.b))
            terms = _lora_terms(a, b, grad_a, grad_b, direction, lr)
        elif isinstance(site, KernelSite):
            if not isinstance(direction, DenseDirection):
                raise SQSDError(f"module {module!r}: a kernel site needs a dense direction (Directions.dense())")
            terms = _full_terms(_stacked(to_in_out(grads[site.path], site.layout), True), direction, lr)
        else:
            raise SQSDError(f"module {module!r}: unknown site {site!r}")
        for name, value in zip(("dot", "update_sq", "direction_sq"), terms):
            out[name][module] = value
    return out


def module_metric(terms: dict, metric: str = "cosine") -> dict[str, np.ndarray]:
    """Per-sample, per-module scores {module: [S, L]}: cos(δW, D) or ⟨δW, D⟩/‖D‖; 0 where a needed norm is 0,
    NaN where the update or direction is not finite."""
    if metric not in METRICS:
        raise SQSDError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return {module: _metric(terms["dot"][module], terms["update_sq"][module], terms["direction_sq"][module], metric)
            for module in terms["dot"]}


def _metric(dot, update_sq, direction_sq, metric: str) -> np.ndarray:
    dot = np.asarray(dot, np.float64)
    direction_norm = np.sqrt(np.asarray(direction_sq, np.float64))[None]
    denominator = direction_norm if metric == "projection" else (
        np.sqrt(np.asarray(update_sq, np.float64)) * direction_norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(denominator > 0, dot / np.where(denominator > 0, denominator, 1.0), 0.0)
    # A NaN/inf update fails `denominator > 0` and would read as a zero-norm module (a silent 0): keep it NaN,
    # so the sample is flagged "non_finite" downstream.
    finite = np.isfinite(dot) & np.isfinite(denominator)
    return np.where(finite, values, np.nan)


def total_metric(per_module: dict[str, np.ndarray]) -> np.ndarray:
    """Σ over modules (sorted) and layers, per sample: SQSD's P."""
    return np.concatenate([per_module[k] for k in sorted(per_module)], axis=1).sum(axis=1)
