"""Resta (Bhardwaj, Anh, Poria, ACL 2024): restore safety after fine-tuning by adding back a safety vector,
optionally after DARE (Yu et al., 2024: drop and rescale) on the fine-tuning delta.

    params, report = resta(aligned, unaligned, finetuned, gamma=1.0)           # θ_ft + γ (θ_al − θ_unal)
    params, report = resta(aligned, unaligned, finetuned, dare_p=0.5, seed=0)  # DARE on θ_ft − θ_al first

The rule, elementwise on every selected leaf:

    δ_safe = θ_aligned − θ_unaligned                       the safety vector
    δ      = θ_finetuned − θ_aligned                       the fine-tuning delta
    DARE:    m ~ Bernoulli(1 − p) per element,  δ' = m ⊙ δ / (1 − p)      (E[δ'] = δ)
    θ      = θ_aligned + δ' + γ δ_safe                    (p = 0: exactly θ_finetuned + γ δ_safe)

Verified from the paper (abstract and method summary; the official repository could not be read): the safety
vector is aligned minus unaligned and is added arithmetically to the fine-tuned model; DARE is applied to the
fine-tuning delta (the paper uses it particularly with PEFT). DARE's drop-and-rescale is the DARE paper's rule.
Our choices (the paper's values are not verified; see docs/defenses.md):
  - γ = 1.0 by default (a third-party wrapper of the official merge passes weights (1, 1, −1); others use 0.5).
    Weights (1, γ, −γ) sum to 1, so mergekit's weight normalisation, which the official merge goes through,
    leaves them unchanged.
  - DARE's p = 0 by default (off); DARE is not applied to the safety vector.
  - which leaves: every floating-point leaf by default (an elementwise merge of all tensors, as a mergekit
    `linear` merge does); non-floating leaves are the fine-tuned ones. `kernels=` narrows it like Safe Delta's.
  - "unaligned" is whatever model the caller passes: a base/chat pair's base, or (as the paper's code appears to
    do) the aligned model briefly fine-tuned on harmful data; the two give different vectors.
  - DARE's mask for a leaf is drawn from fold_in(key(seed), crc32(path)), so it depends only on the seed and the
    leaf's path, not on which other leaves are selected; all arithmetic is float32, cast back to each leaf's dtype.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safetrade.defenses.common import DefenseError, check_same_structure, choose_kernels
from safetrade.paths import leaves_by_path
from safetrade.safedelta.tree import Kernels


@dataclasses.dataclass(frozen=True)
class RestaConfig:
    """Resta's knobs (γ and p are not verified from the official code; these are our defaults)."""

    gamma: float = 1.0
    """Weight γ of the safety vector θ_aligned − θ_unaligned added to the (DARE-ed) fine-tuned model."""
    dare_p: float = 0.0
    """DARE drop probability p in [0, 1) for the fine-tuning delta; 0 turns DARE off."""
    seed: int = 0
    """Seed of DARE's masks (one stream per leaf path)."""
    kernels: Kernels = None
    """Which leaves get the safety vector: None = every floating leaf; else a regex (full match over leaves with
    >= 2 axes), a predicate over path strings, or a path list (any leaf)."""

    def run(self, aligned, unaligned, finetuned) -> tuple[Any, dict]:
        return resta(aligned, unaligned, finetuned, **dataclasses.asdict(self))


def dare_key(seed: int, path: str) -> jax.Array:
    """The key of `path`'s DARE mask: independent of which other leaves are selected."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()))


@jax.jit
def _resta_leaf(w_a, w_u, w_f, gamma):
    safety = w_a.astype(jnp.float32) - w_u.astype(jnp.float32)
    return (w_f.astype(jnp.float32) + gamma * safety).astype(w_f.dtype)


@jax.jit
def _resta_dare_leaf(w_a, w_u, w_f, gamma, p, key):
    a32 = w_a.astype(jnp.float32)
    keep = jax.random.bernoulli(key, 1.0 - p, w_f.shape)
    delta = jnp.where(keep, (w_f.astype(jnp.float32) - a32) / (1.0 - p), 0.0)
    new = (a32 + delta + gamma * (a32 - w_u.astype(jnp.float32))).astype(w_f.dtype)
    return new, jnp.sum(keep, dtype=jnp.int32)


def resta(aligned, unaligned, finetuned, *, gamma: float = 1.0, dare_p: float = 0.0, seed: int = 0,
          kernels: Kernels = None) -> tuple[Any, dict]:
    """θ_ft + γ (θ_aligned − θ_unaligned) on the selected leaves, after DARE (drop rate `dare_p`) on θ_ft − θ_aligned.

    Three pytrees of one structure (any nesting; an nnx.State too); returns (params with that structure and each
    leaf's dtype, a JSON-ready report: the knobs, the leaves edited and the kept fraction of DARE).
    """
    if not 0.0 <= dare_p < 1.0:
        raise DefenseError(f"resta: dare_p must be in [0, 1), got {dare_p}")
    leaves_a, leaves_u = leaves_by_path(aligned), leaves_by_path(unaligned)
    leaves_f, treedef = leaves_by_path(finetuned), jax.tree.structure(finetuned)
    check_same_structure({"aligned": leaves_a, "unaligned": leaves_u, "fine-tuned": leaves_f})
    if kernels is None:
        chosen = [p for p, x in leaves_f.items() if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
        if not chosen:
            raise DefenseError("resta: the params have no floating-point leaf")
    else:
        chosen = choose_kernels(leaves_f, kernels)
        not_float = [p for p in chosen if not jnp.issubdtype(jnp.result_type(leaves_f[p]), jnp.floating)]
        if not_float:
            raise DefenseError(f"{not_float[0]}: selected for Resta but its dtype "
                               f"{jnp.result_type(leaves_f[not_float[0]])} is not floating-point")
    out, kept, total = dict(leaves_f), 0, 0
    for path in chosen:
        w_a, w_u, w_f = (jnp.asarray(t[path]) for t in (leaves_a, leaves_u, leaves_f))
        if dare_p == 0.0:
            out[path] = _resta_leaf(w_a, w_u, w_f, gamma)
        else:
            out[path], kept_here = _resta_dare_leaf(w_a, w_u, w_f, gamma, dare_p, dare_key(seed, path))
            kept += int(kept_here)
        total += int(np.prod(np.shape(w_f), dtype=np.int64))
    report = {"method": "resta", "gamma": gamma, "dare_p": dare_p, "seed": seed, "leaves": chosen,
              "entries": total, "dare_kept_fraction": kept / total if dare_p else 1.0}
    return jax.tree_util.tree_unflatten(treedef, list(out.values())), report
