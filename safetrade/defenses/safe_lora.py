"""Safe LoRA (Hsu et al., NeurIPS 2024): project the fine-tuning update of the layers least aligned with the
"alignment direction" onto it, post hoc and without data.

    params, report = safe_lora(aligned, unaligned, finetuned)                    # official default: 10 layers
    params, report = safe_lora(aligned, unaligned, finetuned, threshold=0.5)     # or by similarity threshold

The rule, per selected weight matrix (one "layer"; a stacked [L, in, out] leaf is L layers), written in the
paper's torch layout W [out, in]:

    V  = W_aligned − W_unaligned                    alignment matrix
    C  = V Vᵀ / ‖V‖_F                               [out, out], acts on the output side: ΔW ← C ΔW
    ΔW = W_finetuned − W_aligned                    (full fine-tune), or ΔW = B·A from a LoRA adapter
    s  = ⟨C ΔW, ΔW⟩_F / (‖C ΔW‖_F ‖ΔW‖_F)           cosine similarity of the flattened matrices
    layers with s ≤ τ (threshold mode) or the k smallest s (number mode): W ← W_aligned + C ΔW

Our kernels are [in, out] (y = x @ W), the transposes: with V' = Vᵀ, ΔW' = ΔWᵀ the same rule reads
ΔW' ← ΔW' · V'ᵀV' / ‖V'‖_F, so C multiplies from the *right* in layout="in_out" and from the *left* in
layout="out_in"; both give the same matrices up to transposition (tested). C itself is never formed when the
cheaper association (ΔW' V'ᵀ) V' avoids it; in LoRA form only lora_b is changed (lora_b ← lora_b · C, ours
[r, out]; PEFT's lora_B [out, r] ← C · lora_B), so ΔW ← C ΔW and lora_a is untouched.

Verified from the paper / official code (IBM/SafeLoRA model.py, config.py; see docs/defenses.md):
  - V = W_aligned − W_unaligned per adapted module, C = V Vᵀ / ‖V‖_F with the Frobenius norm *not squared*.
    C is not a projector: with singular values σᵢ of V its eigenvalues are σᵢ²/‖V‖_F. It is a scaled projector
    when V's r nonzero σᵢ are equal (C² = (‖V‖_F / r) C; rank 1: C² = ‖V‖_F C) and idempotent only if moreover
    σ = √r. It is kept exactly as defined — the exact projector V(VᵀV)⁻¹Vᵀ would be the identity for a
    full-rank square V, i.e. no defense at all.
  - the cosine between C·ΔW and ΔW decides; a module is projected when s ≤ τ (≤, not <); only lora_B changes.
  - defaults: select_layers_type = "number" with num_proj_layers k = 10; threshold τ = 0.5.
  - "layers" are the adapted modules (q_proj and v_proj of 32 blocks are 64 candidates), ranked globally.
Our choices:
  - full fine-tuning deltas are handled by the same rule (ΔW ← C ΔW; the official code is LoRA only).
  - number mode projects exactly the k least similar layers (stable order on ties); the official code sets τ to
    the k-th smallest cosine *rounded to 5 decimals* and projects every s ≤ τ, so ties can project more than k.
    We do not round. k larger than the number of layers projects them all.
  - a layer whose ΔW is exactly zero has similarity 1.0 (nothing to project); a layer with V = 0 (aligned equal
    to unaligned) is an error naming the kernel and layer, since C would be 0/0.
  - in LoRA form the fine-tuned tree's kernels are taken to be the aligned ones (they are not read): ΔW is the
    adapter product alone, and every leaf but the projected lora_b is returned unchanged.
  - all products in float32 at HIGHEST precision; kernels keep their dtype. The PEFT port's double projection in
    number mode (a known bug there) is not reproduced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safetrade.defenses.common import DefenseError, Layout, check_same_structure, choose_kernels, layouts_of
from safetrade.paths import SEP, leaves_by_path
from safetrade.safedelta.tree import LORA_LEAVES, Kernels, as_in_out

OFFICIAL_NUM_LAYERS = 10  # IBM/SafeLoRA config.py: num_proj_layers, with select_layers_type = "number"
OFFICIAL_THRESHOLD = 0.5  # IBM/SafeLoRA config.py: threshold, used when select_layers_type = "threshold"
# Full deltas, kernels=None: the weight matrices by name (Flax "kernel", torch "weight"), not every leaf with two
# axes: a stacked norm scale [L, d] or an embedding table is no linear map with an output space for C to act on.
DEFAULT_KERNELS = r"(.*/)?(kernel|weight)"

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SafeLoraConfig:
    """Safe LoRA's knobs (defaults: the official code's). Set at most one of threshold / num_layers."""

    threshold: float | None = None
    """Project every layer whose cosine similarity s ≤ threshold (official value when used: 0.5)."""
    num_layers: int | None = None
    """Project the num_layers least similar layers; with both None, the official default: 10."""
    kernels: Kernels = None
    """Which weight matrices are candidates: a regex (full match over paths of leaves with >= 2 axes), a predicate
    over path strings, or a path list. None: every kernel carrying lora_a/lora_b in the fine-tuned tree, else
    DEFAULT_KERNELS (leaves named "kernel" or "weight" with >= 2 axes)."""
    layout: str = "in_out"
    """"in_out" for y = x @ W (Flax, ours), "out_in" for y = W x (torch)."""

    def run(self, aligned, unaligned, finetuned) -> tuple[Any, dict]:
        return safe_lora(aligned, unaligned, finetuned, **dataclasses.asdict(self))


# ----------------------------------------------------------------------------------------------------------------
# Per-layer algebra on [L, ..., out] arrays in the [in, out] view


def _times_c(x, v):
    """x · C for C = VᵀV / ‖V‖_F ([out, out], the in_out form of the paper's V Vᵀ / ‖V‖_F), per layer.

    x [L, n, out], v [L, in, out]. (x Vᵀ) V costs 2·n·in·out, x (VᵀV) costs out²·(in + n): take the cheaper.
    """
    n, d_in, d_out = x.shape[-2], v.shape[-2], v.shape[-1]
    if 2 * n * d_in <= d_out * (d_in + n):
        y = jnp.einsum("lni,lio->lno", jnp.einsum("lno,lio->lni", x, v, precision=_HIGHEST), v, precision=_HIGHEST)
    else:
        gram = jnp.einsum("lio,lip->lop", v, v, precision=_HIGHEST)
        y = jnp.einsum("lno,lop->lnp", x, gram, precision=_HIGHEST)
    return y / _frobenius(v)[:, None, None]


def _frobenius(x):
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))


def _cosine(inner, sq_a, sq_b):
    """inner / sqrt(sq_a · sq_b), 1.0 where the update is zero (an unchanged layer has nothing to project)."""
    denominator = jnp.sqrt(sq_a * sq_b)
    return jnp.where(sq_b > 0, inner / jnp.where(denominator > 0, denominator, 1.0), 1.0)


@jax.jit
def _full_similarity(w_a, w_u, w_f):
    """([L] cosines, [L] ‖V‖_F) for full deltas; inputs [L, in, out]."""
    v = w_a.astype(jnp.float32) - w_u.astype(jnp.float32)
    delta = w_f.astype(jnp.float32) - w_a.astype(jnp.float32)
    projected = _times_c(delta, v)
    axes = (1, 2)
    cos = _cosine(jnp.sum(projected * delta, axes), jnp.sum(projected * projected, axes),
                  jnp.sum(delta * delta, axes))
    return cos, _frobenius(v)


@jax.jit
def _full_project(w_a, w_u, w_f, mask):
    """W_aligned + C ΔW on the masked layers, W_finetuned (bit for bit) elsewhere."""
    v = w_a.astype(jnp.float32) - w_u.astype(jnp.float32)
    delta = w_f.astype(jnp.float32) - w_a.astype(jnp.float32)
    new = (w_a.astype(jnp.float32) + _times_c(delta, v)).astype(w_f.dtype)
    return jnp.where(mask[:, None, None], new, w_f)


@jax.jit
def _lora_similarity(w_a, w_u, a, b):
    """Cosines for ΔW = A B (a [L, in, r], b [L, r, out]) without forming ΔW: ⟨A X, A Y⟩_F = Σ (AᵀA) ⊙ (X Yᵀ).

    The adapter's scale alpha/r multiplies ΔW and C ΔW alike, so it cancels in the cosine and is not needed.
    """
    v = w_a.astype(jnp.float32) - w_u.astype(jnp.float32)
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    pb = _times_c(b, v)  # (A B) C = A (B C)
    gram_a = jnp.einsum("lir,lis->lrs", a, a, precision=_HIGHEST)

    def inner(x, y):
        return jnp.sum(gram_a * jnp.einsum("lro,lso->lrs", x, y, precision=_HIGHEST), axis=(1, 2))

    return _cosine(inner(pb, b), inner(pb, pb), inner(b, b)), _frobenius(v)


@jax.jit
def _lora_project(w_a, w_u, b, mask):
    """lora_b · C on the masked layers (so A B ← A B C, the in_out form of ΔW ← C ΔW), lora_b elsewhere."""
    v = w_a.astype(jnp.float32) - w_u.astype(jnp.float32)
    new = _times_c(b.astype(jnp.float32), v).astype(b.dtype)
    return jnp.where(mask[:, None, None], new, b)


# ----------------------------------------------------------------------------------------------------------------
# The tree driver


def _stacked(x, layout: str) -> tuple[jax.Array, tuple[int, ...]]:
    """x as [L, in, out] (any leading axes flattened into L) and its leading shape."""
    x = as_in_out(jnp.asarray(x), layout)
    lead = tuple(x.shape[:-2])
    return x.reshape(int(np.prod(lead, dtype=np.int64)), *x.shape[-2:]), lead


def _unstacked(x, lead: tuple[int, ...], layout: str):
    return as_in_out(x.reshape(*lead, *x.shape[-2:]), layout)


def _adapter_modules(leaves_f: dict) -> dict[str, tuple[str, str]]:
    """{kernel path: (lora_a path, lora_b path)} for every module of the fine-tuned tree carrying adapters."""
    modules: dict[str, dict[str, str]] = {}
    for path in leaves_f:
        parent, _, name = path.rpartition(SEP)
        if name.lower() in LORA_LEAVES:
            modules.setdefault(parent, {})[name.lower()] = path
    out = {}
    for parent, pair in modules.items():
        if set(pair) != set(LORA_LEAVES):
            raise DefenseError(f"{parent}: has {sorted(pair)} but a LoRA adapter needs both {list(LORA_LEAVES)}")
        kernel = f"{parent}{SEP}kernel" if parent else "kernel"
        if kernel not in leaves_f:
            raise DefenseError(f"{parent}: LoRA adapters without a 'kernel' leaf beside them")
        out[kernel] = (pair["lora_a"], pair["lora_b"])
    return out


def _check_ranks(path: str, w, a, b) -> None:
    """a [L, in, r] and b [L, r, out] (in_out view) fit the kernel w [L, in, out]."""
    ok = (a.ndim == 3 and b.ndim == 3 and a.shape[0] == b.shape[0] == w.shape[0] and a.shape[1] == w.shape[1]
          and b.shape[2] == w.shape[2] and a.shape[2] == b.shape[1])
    if not ok:
        raise DefenseError(f"{path}: adapters of shapes {tuple(a.shape)} / {tuple(b.shape)} (as [L, in, r] / "
                           f"[L, r, out]) do not fit the kernel {tuple(w.shape)} (as [L, in, out])")


def _select(similarities: dict[str, np.ndarray], threshold: float | None, num_layers: int | None):
    """{path: [L] bools}: s ≤ threshold, or the num_layers smallest s over all layers of all kernels."""
    if threshold is not None:
        return {path: s <= threshold for path, s in similarities.items()}
    flat = np.concatenate([s for s in similarities.values()])
    chosen = np.zeros(flat.shape, bool)
    chosen[np.argsort(flat, kind="stable")[:num_layers]] = True
    out, start = {}, 0
    for path, s in similarities.items():
        out[path] = chosen[start:start + s.size]
        start += s.size
    return out


def safe_lora(aligned, unaligned, finetuned, *, threshold: float | None = None, num_layers: int | None = None,
              kernels: Kernels = None, layout: Layout = "in_out") -> tuple[Any, dict]:
    """Safe LoRA on any params pytrees; returns (params with the structure of `finetuned`, JSON-ready report).

    `aligned` and `unaligned` have the same structure. `finetuned` either has it too (full fine-tune: ΔW is the
    kernel difference) or additionally carries lora_a [.., in, r] / lora_b [.., r, out] leaves beside the kernels
    (safetrade.models.lora's layout; in layout="out_in", PEFT's [r, in] / [out, r]): then ΔW = A·B and only
    lora_b of projected layers changes. Every leaf not projected is `finetuned`'s, unchanged.
    Set at most one of `threshold` (project s ≤ τ) and `num_layers` (the k least similar; both None: k = 10).
    The report lists per kernel the per-layer similarities and which layers were projected.
    """
    if threshold is not None and num_layers is not None:
        raise DefenseError("safe_lora: give threshold or num_layers, not both")
    if threshold is None and num_layers is None:
        num_layers = OFFICIAL_NUM_LAYERS
    if num_layers is not None and num_layers < 0:
        raise DefenseError(f"safe_lora: num_layers must be >= 0, got {num_layers}")
    leaves_a, leaves_u = leaves_by_path(aligned), leaves_by_path(unaligned)
    leaves_f, treedef_f = leaves_by_path(finetuned), jax.tree.structure(finetuned)
    adapters = _adapter_modules(leaves_f)
    adapter_leaves = {p for pair in adapters.values() for p in pair}
    base_f = {p: x for p, x in leaves_f.items() if p not in adapter_leaves}
    check_same_structure({"aligned": leaves_a, "unaligned": leaves_u, "fine-tuned": base_f})

    if kernels is None:
        candidates = list(adapters) if adapters else choose_kernels(leaves_a, DEFAULT_KERNELS)
    else:
        candidates = choose_kernels(leaves_a, kernels)
        if adapters:
            without = [p for p in candidates if p not in adapters]
            if without:
                raise DefenseError(f"{without[0]}: selected, but the fine-tuned params carry LoRA adapters and this "
                                   f"kernel has none (kernels with adapters: {sorted(adapters)[:5]})")
    layouts = layouts_of(candidates, layout)

    similarities, stacked = {}, {}
    for path in candidates:
        w_a, lead = _stacked(leaves_a[path], layouts[path])
        w_u, _ = _stacked(leaves_u[path], layouts[path])
        if adapters:
            a, _ = _stacked(leaves_f[adapters[path][0]], layouts[path])
            b, _ = _stacked(leaves_f[adapters[path][1]], layouts[path])
            _check_ranks(path, w_a, a, b)
            cos, v_norm = _lora_similarity(w_a, w_u, a, b)
        else:
            cos, v_norm = _full_similarity(w_a, w_u, _stacked(leaves_f[path], layouts[path])[0])
        flat = [int(i) for i in np.flatnonzero(np.asarray(v_norm) == 0)]
        if flat:
            raise DefenseError(f"{path}: aligned equals unaligned in layer(s) {flat}, so V = 0 and C = VVᵀ/‖V‖_F "
                               "is undefined; check the aligned / unaligned pair or leave this kernel out")
        similarities[path], stacked[path] = np.asarray(cos, np.float64), bool(lead)

    masks = _select(similarities, threshold, num_layers)
    out = dict(leaves_f)
    for path, mask in masks.items():
        if not mask.any():
            continue
        w_a, lead = _stacked(leaves_a[path], layouts[path])
        w_u, _ = _stacked(leaves_u[path], layouts[path])
        if adapters:
            b_path = adapters[path][1]
            b, b_lead = _stacked(leaves_f[b_path], layouts[path])
            out[b_path] = _unstacked(_lora_project(w_a, w_u, b, jnp.asarray(mask)), b_lead, layouts[path])
        else:
            w_f, _ = _stacked(leaves_f[path], layouts[path])
            out[path] = _unstacked(_full_project(w_a, w_u, w_f, jnp.asarray(mask)), lead, layouts[path])

    def per_layer(values, path):
        values = np.asarray(values).tolist()
        return values if stacked[path] else values[0]

    report = {
        "method": "safe_lora",
        "mode": "threshold" if threshold is not None else "number",
        "threshold": threshold, "num_layers": num_layers,
        "delta": "lora" if adapters else "full",
        "kernels": {path: {"similarity": per_layer(similarities[path], path),
                           "projected": per_layer(masks[path], path), "layout": layouts[path]}
                    for path in candidates},
        "projected": [{"kernel": path, "layer": int(i) if stacked[path] else None,
                       "similarity": float(similarities[path][i])}
                      for path in candidates for i in np.flatnonzero(masks[path])],
        "layers_total": int(sum(s.size for s in similarities.values())),
    }
    report["layers_projected"] = len(report["projected"])
    return jax.tree_util.tree_unflatten(treedef_f, list(out.values())), report
