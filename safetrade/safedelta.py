"""Safe Delta (Lu et al., ICML 2025, arXiv 2505.12038): keep the parts of a fine-tuning delta that are cheap in
safety, and compensate the rest, one linear layer at a time.

Given an aligned model W_orig, its fine-tuned version W_sft and, per linear layer, the Hessian H of a safety loss
L_safe(W) = ‖W X_safe − W_orig X_safe‖² over that layer's inputs (H = (2/N) Σ_n X_nᵀ X_n from the *aligned* model's
activations on safety data), Safe Delta returns

    W_sd = W_orig + M ⊙ ΔW + C,        ΔW = W_sft − W_orig,

with a binary mask M chosen under a per-layer safety budget and a compensation C on the unselected entries.

Layouts. Our kernels are [in, out] (y = x @ kernel). The paper and the official code use torch's W [out, in], and
H is over the *input* dimension. Every routine below works internally on W = kernel.T, so "rows" are output units,
"columns" are input features (the axis H lives on), and the flattened order of entries is row-major over that W,
as in the official code.

Two modes (SafeDeltaConfig.mode):

"official": what the released code does (ColinLu50/SafeDelta @ c30ff4a, llama2/safedelta/safedelta_runner.py,
    `adjust_delta`, called with blocksize=2048, percdamp=0.01; see shared/research/safedelta.md §1b). Per layer:
      1. columns with diag(H) = 0 get H_jj = 1; H += damp · mean(diag H) · I;
      2. U = upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU); d_j = U_jj. Note d_j² = [(H_{j:,j:})⁻¹]_00, the
         *sequential* OBS quantity (columns before j treated as fixed), not the paper's [H⁻¹]_jj;
      3. for each block of `block_size` input columns (the last block may be narrower):
           loss_ij = (W_sft − W_cur)²_ij / d_j²   (W_cur already carries compensation from earlier blocks;
                                                  the paper's ½ is dropped here and in the budget, so it cancels)
           sort the block's entries by 1/d_j² ascending (stable, row-major: see "ties" below), drop the last
           int(exclude_frac · entries) of them (the most safety-sensitive columns can never be selected; not in
           the paper), and select the longest prefix whose cumulative loss is ≤
                budget = mean_block(1/d_j²) · (s/2) · (rows/4096)
           The s/2 is hard-coded in the official code ("2 = 4096/blocksize=2048") and applies to every block,
           narrow tail blocks and other block sizes included; we keep it literally.
      4. a sequential OBS pass over the block in groups of `lazy_group` (4) columns: selected entries are set to
         W_sft exactly; err = (W_cur − q) / d_j is pushed into the block's columns *after the group* through the
         rows of U (no propagation between columns of the same group: unlike GPTQ's lazy batching, the official
         loop never updates the rest of its own 4-column group), then into the later blocks via
         W[:, i2:] −= Err @ U[block, i2:].
    Only the seven projections of every decoder layer are edited; embeddings, norms, biases and lm_head keep their
    *aligned* values (the official code edits the aligned model in place), so fine-tuning changes to them are
    discarded. `other_params="finetuned"` is offered as a documented deviation.

    Ties: the sort key is constant down each column, so which rows of a boundary column are selected depends on
    the tie order. torch's argsort is not stable (the research notes measured 4-33 % of output entries moving
    between runs). We use a stable sort over the row-major flattened W, i.e. ties in ascending row order, and
    between equal-key columns the row-major interleaving. `int(0.15 · n)` = 0 (fewer than 7 entries) makes the
    official slice `sorted[0:-0]` empty, so nothing is selected; we reproduce that for exclude_frac > 0 and treat
    exclude_frac = 0 as "exclude nothing".

"paper": the rule as the paper states it (method figure and second-hand summaries; the PDF text was not
    available, so the budget formula ε is second-hand). With h_j = [H⁻¹]_jj of the damped H (exact inverse,
    no sequential factor; entry m = (i, j) has [H⁻¹]_mm = h_j because rows decouple):
        per-entry safety cost     δL_m = δw_m² / (2 h_j)
        utility value             δw_m²   (L_util approximated by parameter distance)
        utility/safety ratio      r_m = 2 h_j
        budget                    ε = s · mean_m 1/(2 h_j)                         (per layer, no blocks)
        selection                 sort by r_m descending (stable, row-major), take the longest prefix with
                                  Σ δL_m < ε (strict, "while Σ δL < ε")
        compensation              C = (I − M) ⊙ Σ_{m∈S} C_m,  C_m = δw_m / h_j · H⁻¹_{:,j} placed in row i,
                                  i.e. C = (I − M) ⊙ ( ((M ⊙ ΔW) / h) @ H⁻¹ )
    Each C_m is the exact OBS completion for entry m alone (the compensated quadratic increase of one entry is
    exactly δL_m). With several selected entries in one row the sum of single-entry completions is neither the
    joint optimum nor additive in cost; the paper's rule is used as stated, and `quadratic_increase` in the
    stats reports the exact ½ tr(Δ H Δᵀ) so the gap is visible. The 1 % damping is ours (the paper only says H⁻¹
    is precomputed); exclude_frac, block_size and lazy_group are unused in this mode.

Ablations (SafeDeltaConfig.ablation), in either mode; only the named part changes:
    "no_compensation"  same selection rule, C = 0 (official mode: the loss of later blocks is then measured
                       against the uncompensated W_orig, since nothing was pushed into them);
    "random"           the ratio order is replaced by a uniformly random order of the entries; the same budget
                       prefix rule (and, in official mode, the same drop of the last exclude_frac of that order)
                       is applied: *equal estimated safety cost*, not equal count (kept_fraction shows the count);
    "magnitude"        order by |δw| descending (H still prices each entry, only the order ignores it).

Where the paper and the official code disagree (official mode follows the code, paper mode the paper):
    * safety cost of entry (i, j): code δw²/d_j² with d_j² the sequential [(H_{j:,j:})⁻¹]_00; paper
      δw²/(2[H⁻¹]_jj) with the full inverse;
    * budget: code mean(1/d_j²)·(s/2)·(rows/4096) per block of 2048 input columns (so it grows with the number
      of output rows and is s/2 even for a narrow tail block); paper ε = s·mean 1/(2[H⁻¹]_jj) per layer (that
      formula is second-hand: from summaries of the PDF). Neither scales with the size of ΔW;
    * candidates: the code never selects the last 15 % of each block's ratio order; the paper has no exclusion;
    * prefix test: code cumsum ≤ budget; paper Σ δL < ε;
    * compensation: code = sequential OBS from left to right (only later columns of a row receive it, a
      selected later entry is overwritten with W_sft, losses of later blocks are measured on compensated
      weights, no propagation inside a 4-column group); paper = Σ of single-entry OBS completions, applied at
      once to every unselected entry of the row, earlier columns included;
    * other parameters: the code keeps the aligned embeddings/norms/lm_head; the paper does not say;
    * H: the code recomputes it per request from 128 self-generated safety samples; the paper describes H⁻¹ as
      computed once and cached. (`adjust_delta`'s own default blocksize is 1024; the runner passes 2048.)

Stats per layer (all float32 scalars): kept_fraction; utility_fraction = Σ_{m∈S} δw_m² / Σ_m δw_m² (the paper's
utility proxy, δw = W_sft − W_orig); spent and budget, both in ½ΔᵀHΔ units (the official code's own numbers are
twice these, since it drops the ½); quadratic_increase = ½ tr(Δ H_d Δᵀ) of the returned weights and
quadratic_increase_finetuned of W_sft, with H_d the damped H the method used (in paper mode with many selected
entries per row quadratic_increase can far exceed spent: the additive estimate is exact only for one entry per
row); damping (the fraction of mean(diag H) actually added, > cfg.damp when the fallback fired);
factor_residual (‖H·(H⁻¹v) − v‖/‖v‖ for a fixed probe v through the factor actually used: ~eps·cond(H), a cheap
warning sign of an ill-conditioned H); factor_ok.

Damping fallback: in float32 an ill-conditioned or (through rounding) indefinite H shows up as a Cholesky factor
with non-finite entries. The damping fraction is then multiplied by 10 until the factor is finite with a positive
diagonal or damp_limit is passed; `safe_delta` records every fallback in its report and raises if the limit fails.

Hessians: `collect_hessians` runs the aligned model once per calibration batch (one jitted function) and
accumulates X_safeᵀ X_safe for the four distinct linear inputs of every layer. Like the official code, all real
tokens count (prompt and response), padding does not, N counts sequences, and every layer's inputs come from the
aligned model. q/k/v share one input (key "attn_input"), gate/up another ("mlp_input"); o_proj and down_proj have
their own ("o_proj_input", "down_proj_input").
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safetrade.errors import SafetradeError
from safetrade.models import io, llama
from safetrade.models.llama import LlamaConfig, Params

MODES = ("official", "paper")
ABLATIONS = (None, "no_compensation", "random", "magnitude")
PROJECTIONS = llama.LORA_TARGETS  # q, k, v, o, gate, up, down: every linear layer of a decoder block

# Which layer input each projection reads: q/k/v share the attention norm's output, gate/up the MLP norm's output.
HESSIAN_INPUTS = {
    "q_proj": "attn_input", "k_proj": "attn_input", "v_proj": "attn_input",
    "o_proj": "o_proj_input",
    "gate_proj": "mlp_input", "up_proj": "mlp_input",
    "down_proj": "down_proj_input",
}
HESSIAN_KEYS = ("attn_input", "o_proj_input", "mlp_input", "down_proj_input")

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products: the official code disables TF32 for the same reason
_CACHE_VERSION = "safetrade-safedelta-hessians-v1"


class SafeDeltaError(SafetradeError):
    """Bad Safe Delta input: mismatched checkpoints, a missing or broken Hessian, a non-finite delta."""


@dataclasses.dataclass(frozen=True)
class SafeDeltaConfig:
    """Safe Delta settings; the defaults are the official run's (s = 0.1, 1 % damping, blocks of 2048, 15 %)."""

    s: float = 0.1  # budget scale (official CLI --scale default 0.1; its scripts use 0.1 or 0.11)
    mode: str = "official"
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    damp_limit: float = 1.0  # largest damping fraction the ×10 fallback may reach
    block_size: int = 2048  # official: input columns per selection block
    exclude_frac: float = 0.15  # official: fraction of each block's sorted entries that can never be selected
    lazy_group: int = 4  # official: columns per lazy OBS group
    ablation: str | None = None
    seed: int = 0  # for ablation="random"
    other_params: str = "aligned"  # non-projection params: "aligned" (official) or "finetuned"
    layer_batch: int = 1  # safe_delta: layers processed together (vmapped) inside lax.map; 1 = one at a time

    def __post_init__(self):
        if self.mode not in MODES:
            raise SafeDeltaError(f"Safe Delta mode {self.mode!r} is unknown; choose from {', '.join(MODES)}")
        if self.ablation not in ABLATIONS:
            raise SafeDeltaError(f"Safe Delta ablation {self.ablation!r} is unknown; choose from {ABLATIONS}")
        if self.other_params not in ("aligned", "finetuned"):
            raise SafeDeltaError(f"other_params={self.other_params!r}; choose 'aligned' or 'finetuned'")
        if self.s < 0 or self.damp < 0 or not 0 <= self.exclude_frac < 1:
            raise SafeDeltaError(f"need s >= 0, damp >= 0 and 0 <= exclude_frac < 1; got {self}")
        if self.damp > self.damp_limit:
            raise SafeDeltaError(f"damp={self.damp} exceeds damp_limit={self.damp_limit}")
        if self.block_size < 1 or self.lazy_group < 1 or self.layer_batch < 1:
            raise SafeDeltaError("block_size, lazy_group and layer_batch must be >= 1")


# ----------------------------------------------------------------------------------------------------------------
# Hessian preparation


def _regularised(hessian: jax.Array, damp: jax.Array) -> jax.Array:
    """H with zero-diagonal (dead) inputs set to 1, plus damp · mean(diag H) on the diagonal (official order)."""
    h = hessian.astype(jnp.float32)
    eye = jnp.eye(h.shape[0], dtype=jnp.float32)
    dead = jnp.diagonal(h) == 0
    h = h + eye * dead  # diag is 0 there, so adding 1 sets it to 1 (elementwise: cheaper to compile than scatter)
    return h + eye * (damp * jnp.mean(jnp.diagonal(h)))


def _upper_factor_of_inverse(h: jax.Array) -> jax.Array:
    """U upper triangular with H⁻¹ = UᵀU (torch: cholesky(cholesky_inverse(cholesky(H)), upper=True)).

    Computed without forming H⁻¹: with J the order-reversing permutation and J H J = L Lᵀ, H = R Rᵀ for the upper
    triangular R = J L J, so H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹ = J L⁻¹ J. Same factor (unique for SPD H), one Cholesky and
    one triangular inverse instead of three cubic steps; on a 1536² H it is ~2x faster on CPU and its UᵀU is
    closer to H⁻¹ than the double round trip's (5e-7 vs 8e-7 max relative, measured against float64).
    """
    n = h.shape[0]
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    lower_inv = jax.scipy.linalg.solve_triangular(lower, jnp.eye(n, dtype=h.dtype), lower=True)
    return lower_inv[::-1, ::-1]


def _inverse_via_factor(h: jax.Array) -> jax.Array:
    """H⁻¹ = UᵀU from the upper factor above (symmetric by construction)."""
    u = _upper_factor_of_inverse(h)
    return jnp.matmul(u.T, u, precision=_HIGHEST)


def _probe_residual(h: jax.Array, apply_inverse) -> jax.Array:
    """‖H · apply_inverse(v) − v‖ / ‖v‖ for a fixed ±1 probe v: an O(n²) check of how well the factor inverts H.

    Reported, never acted on: fp32 factors of ill-conditioned H carry a residual of roughly eps · cond(H), and
    the official code uses them as they are; only a non-finite factor (where torch would raise) triggers the
    damping fallback.
    """
    probe = jnp.where(jnp.arange(h.shape[0]) % 3 == 1, -1.0, 1.0).astype(jnp.float32)
    recovered = jnp.matmul(h, apply_inverse(probe), precision=_HIGHEST)
    return jnp.linalg.norm(recovered - probe) / jnp.linalg.norm(probe)


def _factor_is_usable(factor: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(factor)) & jnp.all(jnp.diagonal(factor) > 0)


def _damping_schedule(damp: jax.Array, attempt: jax.Array) -> jax.Array:
    """damp · 10^attempt; from a zero damp the retries go 1e-3, 1e-2, ..."""
    attempt = attempt.astype(jnp.float32)
    return jnp.where(damp > 0, damp * 10.0**attempt, jnp.where(attempt == 0, 0.0, 1e-3 * 10.0 ** (attempt - 1)))


def _damped_factor(hessian: jax.Array, knobs: dict, make_factor):
    """(H_d, make_factor(H_d), damping used, ok): retries with ×10 damping while the factor is unusable.

    One while_loop whose body makes each attempt, so the factorisation is compiled once.
    """
    n = hessian.shape[0]

    def keep_trying(state):
        attempt, _, _, ok = state
        return (~ok) & (_damping_schedule(knobs["damp"], attempt) <= knobs["damp_limit"] * (1 + 1e-6))

    def try_next(state):
        attempt, _, _, _ = state
        h = _regularised(hessian, _damping_schedule(knobs["damp"], attempt))
        factor = make_factor(h)
        return attempt + 1, h, factor, _factor_is_usable(factor)

    empty = jnp.zeros((n, n), jnp.float32)
    attempts, h, factor, ok = jax.lax.while_loop(keep_trying, try_next, (jnp.int32(0), empty, empty, False))
    return h, factor, _damping_schedule(knobs["damp"], attempts - 1), ok


def _quadratic_increase(delta_w: jax.Array, h: jax.Array) -> jax.Array:
    """½ Σ_i Δ_i H Δ_iᵀ for Δ [rows, cols] (official layout): the exact rise of the quadratic safety loss."""
    return 0.5 * jnp.sum(jnp.matmul(delta_w, h, precision=_HIGHEST) * delta_w)


# ----------------------------------------------------------------------------------------------------------------
# Static structure vs. traced knobs
#
# Only what changes the program's shape is a compile-time constant (mode, block_size, lazy_group, whether the mask
# is returned). s, the damping, the exclusion and the ablation are traced values, so sweeping s (the paper's
# sensitivity study) or switching ablations reuses one compiled function per layer shape.

_ORDER_RATIO, _ORDER_RANDOM, _ORDER_MAGNITUDE = 0, 1, 2


def _structure(cfg: SafeDeltaConfig) -> SafeDeltaConfig:
    """cfg with every traced field reset to its default: the static (hashable) key of the compiled functions.

    Paper mode has no blocks or groups, so those are reset too.
    """
    if cfg.mode == "paper":
        return SafeDeltaConfig(mode="paper", layer_batch=cfg.layer_batch)
    return SafeDeltaConfig(mode=cfg.mode, block_size=cfg.block_size, lazy_group=cfg.lazy_group,
                           layer_batch=cfg.layer_batch)


def _block_bounds(cols: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_size, cols)) for start in range(0, cols, block_size)]


def _candidate_count(n: int, exclude_frac: float) -> int:
    """Entries of a block that may be selected: official `sorted[0:-int(exclude_frac*n)]`, in Python float64."""
    dropped = int(exclude_frac * n)
    if dropped == 0:
        # The official slice `sorted[0:-0]` is empty (n < 7 at 15 %): nothing can be selected. exclude_frac = 0
        # means "exclude nothing" here, which the official code never does.
        return 0 if exclude_frac > 0 else n
    return n - dropped


def _knobs(cfg: SafeDeltaConfig, kernel_shape) -> dict:
    d_in, d_out = kernel_shape[-2:]
    # Paper mode ignores these; its structure's default block size keeps the array's shape (and so the compiled
    # function) the same whatever block_size the caller's config carries.
    candidates = [_candidate_count(d_out * (stop - start), cfg.exclude_frac)
                  for start, stop in _block_bounds(d_in, _structure(cfg).block_size)]
    return {
        "s": jnp.float32(cfg.s),
        "damp": jnp.float32(cfg.damp),
        "damp_limit": jnp.float32(cfg.damp_limit),
        "order": jnp.int32({"random": _ORDER_RANDOM, "magnitude": _ORDER_MAGNITUDE}.get(cfg.ablation, _ORDER_RATIO)),
        "compensate": jnp.float32(cfg.ablation != "no_compensation"),
        "candidates": jnp.asarray(candidates, jnp.int32),  # per official block
    }


def _stable_positions(column_key: jax.Array, rows: int) -> jax.Array:
    """pos[i, j]: where entry (i, j) lands in a stable ascending argsort of `column_key` broadcast to [rows, cols]
    and flattened row-major — computed from one argsort over the columns instead of one over all entries.

    A stable flat sort orders by (key, i, j). Columns with distinct keys are therefore taken whole, one after the
    other; columns whose keys tie form a group taken row by row across the group. So an entry's position is
    (columns in earlier groups) · rows + i · (group size) + (rank of j within its group). Same result as
    `argsort(flat, stable=True)` inverted, but a cols-sized sort and no n-sized gather: the flat sort of ~10⁶
    entries per kernel was most of the official transform's time on CPU.
    """
    cols = column_key.shape[0]
    column_order = jnp.argsort(column_key, stable=True)
    sorted_key = column_key[column_order]
    starts_group = jnp.concatenate([jnp.ones(1, bool), sorted_key[1:] != sorted_key[:-1]])
    slot = jnp.arange(cols, dtype=jnp.int32)
    group_start = jax.lax.cummax(jnp.where(starts_group, slot, 0))
    group_id = jnp.cumsum(starts_group.astype(jnp.int32)) - 1
    group_size = jax.ops.segment_sum(jnp.ones(cols, jnp.int32), group_id, num_segments=cols)[group_id]

    def per_column(values):
        return jnp.zeros(cols, jnp.int32).at[column_order].set(values, unique_indices=True)

    rank_in_group = slot - group_start
    row = jnp.arange(rows, dtype=jnp.int32)[:, None]
    return (per_column(group_start) * rows)[None, :] + row * per_column(group_size)[None, :] \
        + per_column(rank_in_group)[None, :]


def _positions_of_order(order: jax.Array, shape) -> jax.Array:
    """The inverse permutation of a flat order, shaped like the kernel: pos[entry] = its place in `order`."""
    n = order.shape[0]
    return jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True).reshape(shape)


def _selection_positions(column_key: jax.Array, delta_w: jax.Array, knobs: dict, key) -> jax.Array:
    """pos[i, j]: the place of entry (i, j) in the order entries are offered to the budget, best first.

    `column_key` [cols] is ascending-is-better (official 1/d_j², paper −2[H⁻¹]_jj; both rules rank whole columns)
    and ties resolve as a stable sort of the row-major entries. The ablations replace only this order.
    """
    n = delta_w.size
    return jax.lax.switch(knobs["order"], [
        lambda: _stable_positions(column_key, delta_w.shape[0]),
        lambda: _positions_of_order(jax.random.permutation(key, n).astype(jnp.int32), delta_w.shape),
        lambda: _positions_of_order(jnp.argsort(-jnp.abs(delta_w).reshape(-1), stable=True).astype(jnp.int32),
                                    delta_w.shape),
    ])


def _prefix_mask(costs, positions, budget, allowed, strict: bool):
    """Entries of the longest prefix (in `positions` order) whose cumulative cost stays within budget, and within
    the first `allowed` places. Costs are >= 0, so the entries within budget are themselves a prefix."""
    n = costs.size
    in_order = jnp.zeros(n, costs.dtype).at[positions.reshape(-1)].set(costs.reshape(-1), unique_indices=True)
    cumulative = jnp.cumsum(in_order)
    within = cumulative < budget if strict else cumulative <= budget
    taken = jnp.sum(within & (jnp.arange(n) < allowed))
    return positions < taken


# ----------------------------------------------------------------------------------------------------------------
# Official mode


_SUB_BLOCK = 128  # columns whose pending compensation is carried per scan step (a GPTQ-style two-level loop)


def _lazy_obs_pass(w_block, w_sft_block, u_block, mask, group: int, compensate):
    """One block of the official sequential pass: (Q, Err), Q the block's final weights, Err the scaled errors.

    Columns are processed `group` at a time. A group's weights are read after all earlier groups' errors have
    been pushed in, selected entries become W_sft, err = (w − q)/d_j, and err @ U[group rows, :] is pushed into
    the columns after the group (no propagation inside a group, exactly as the official loop).

    Two implementation choices that do not change the arithmetic being done, only its order:
      * the pushes are accumulated in a separate "pending" array and subtracted when a column is read, instead
        of being subtracted from the weights at every step as the official loop does, so the small updates
        round against the compensation's magnitude rather than the weights' (on 576-1536 wide layers the error
        against a float64 reference drops from ~3e-5 to ~5e-6 of the largest edit, about one ulp of the weights);
      * pushes go first into the current sub-block of _SUB_BLOCK columns, and the sub-block's errors reach the
        rest of the block in one matmul when it is done (GPTQ's lazy batch). Each 4-column step then touches
        128 columns instead of the whole block: an order of magnitude less memory traffic.
    `compensate` (1.0 or 0.0) switches the pushing off for the no-compensation ablation.
    """
    rows, count = w_block.shape
    sub = group * max(1, _SUB_BLOCK // group)
    n_sub = -(-count // sub)
    padded = n_sub * sub
    pad = padded - count
    # Padding columns carry no selection and unit d, so their err is 0 and they change nothing.
    w = jnp.pad(w_block, ((0, 0), (0, pad)))
    w_sft = jnp.pad(w_sft_block, ((0, 0), (0, pad)))
    sel = jnp.pad(mask, ((0, 0), (0, pad)))
    u = jnp.eye(padded, dtype=jnp.float32).at[:count, :count].set(u_block)
    d = jnp.diagonal(u)

    def sub_block(pending, k):
        first = k * sub
        w_sub = jax.lax.dynamic_slice_in_dim(w, first, sub, axis=1)
        w_sub = w_sub - jax.lax.dynamic_slice_in_dim(pending, first, sub, axis=1)
        target_sub = jax.lax.dynamic_slice_in_dim(w_sft, first, sub, axis=1)
        sel_sub = jax.lax.dynamic_slice_in_dim(sel, first, sub, axis=1)
        d_sub = jax.lax.dynamic_slice_in_dim(d, first, sub)
        u_rows = jax.lax.dynamic_slice_in_dim(u, first, sub, axis=0)  # [sub, padded]
        u_sub = jax.lax.dynamic_slice_in_dim(u_rows, first, sub, axis=1)  # [sub, sub]

        def step(local, g):
            start = g * group
            cols = jax.lax.dynamic_slice_in_dim(w_sub, start, group, axis=1)
            cols = cols - jax.lax.dynamic_slice_in_dim(local, start, group, axis=1)
            target = jax.lax.dynamic_slice_in_dim(target_sub, start, group, axis=1)
            chosen = jax.lax.dynamic_slice_in_dim(sel_sub, start, group, axis=1)
            q = jnp.where(chosen, target, cols)
            err = (cols - q) / jax.lax.dynamic_slice_in_dim(d_sub, start, group)
            u_group = jax.lax.dynamic_slice_in_dim(u_sub, start, group, axis=0)
            # U is upper triangular: earlier columns receive nothing; the group's own columns receive an update
            # but are never read again, just as the official loop never revisits them.
            local = local + compensate * jnp.matmul(err, u_group, precision=_HIGHEST)
            return local, (q, err)

        _, (q, err) = jax.lax.scan(step, jnp.zeros_like(w_sub), jnp.arange(sub // group))
        q = jnp.moveaxis(q, 0, 1).reshape(rows, sub)  # scan stacks [groups, rows, group]
        err = jnp.moveaxis(err, 0, 1).reshape(rows, sub)
        # The sub-block's errors reach every later column of the block at once (its own columns get junk
        # they never read; earlier columns get zeros).
        pending = pending + compensate * jnp.matmul(err, u_rows, precision=_HIGHEST)
        return pending, (q, err)

    _, (q, err) = jax.lax.scan(sub_block, jnp.zeros_like(w), jnp.arange(n_sub))
    q = jnp.moveaxis(q, 0, 1).reshape(rows, padded)[:, :count]
    err = jnp.moveaxis(err, 0, 1).reshape(rows, padded)[:, :count]
    return q, err


def _official(w_aligned, w_finetuned, hessian, knobs: dict, key, structure: SafeDeltaConfig, with_mask: bool):
    w0 = w_aligned.T.astype(jnp.float32)  # official layout [rows=out, cols=in]
    w_sft = w_finetuned.T.astype(jnp.float32)
    rows, cols = w0.shape
    h, u, damp, ok = _damped_factor(hessian, knobs, _upper_factor_of_inverse)
    compensate = knobs["compensate"]

    # Compensation pushed into later blocks is kept apart from the weights (see _lazy_obs_pass for why).
    pending = jnp.zeros_like(w0)
    finished, masks = [], []
    spent = budget = kept = utility = jnp.float32(0)
    for block, (start, stop) in enumerate(_block_bounds(cols, structure.block_size)):
        w_block = w0[:, start:stop] - pending[:, start:stop]
        w_sft_block, u_block = w_sft[:, start:stop], u[start:stop, start:stop]
        d = jnp.diagonal(u_block)[None, :]
        inv_d2 = 1.0 / d[0] ** 2  # the official sort key "tmp", constant down each column
        loss = (w_sft_block - w_block) ** 2 / d**2
        positions = _selection_positions(inv_d2, w_sft_block - w_block, knobs, jax.random.fold_in(key, block))
        # Official: tmp.mean() * (s/2) * (rows/4096), the s/2 hard-coded whatever the block width.
        block_budget = jnp.mean(inv_d2) * (knobs["s"] / 2) * (rows / 4096)
        mask = _prefix_mask(loss, positions, block_budget, knobs["candidates"][block], strict=False)

        q, err = _lazy_obs_pass(w_block, w_sft_block, u_block, mask, structure.lazy_group, compensate)
        finished.append(q)
        masks.append(mask)
        if stop < cols:
            pending = pending.at[:, stop:].add(compensate * jnp.matmul(err, u[start:stop, stop:], precision=_HIGHEST))
        spent += jnp.sum(jnp.where(mask, loss, 0.0))
        budget += block_budget
        kept += jnp.sum(mask)
        utility += jnp.sum(jnp.where(mask, (w_sft_block - w0[:, start:stop]) ** 2, 0.0))
    w = jnp.concatenate(finished, axis=1)

    stats = {
        "kept_fraction": kept / w0.size,
        "utility_fraction": utility / jnp.maximum(jnp.sum((w_sft - w0) ** 2), jnp.finfo(jnp.float32).tiny),
        "spent": spent / 2,  # official loss and budget omit the ½ of δL = δw²/(2d²)
        "budget": budget / 2,
        "quadratic_increase": _quadratic_increase(w - w0, h),
        "quadratic_increase_finetuned": _quadratic_increase(w_sft - w0, h),
        "damping": damp,
        "factor_residual": _probe_residual(h, lambda v: jnp.matmul(u.T, jnp.matmul(u, v, precision=_HIGHEST),
                                                                    precision=_HIGHEST)),
        "factor_ok": ok,
    }
    if with_mask:
        stats["mask"] = jnp.concatenate(masks, axis=1).T
    return w.T.astype(w_aligned.dtype), stats


# ----------------------------------------------------------------------------------------------------------------
# Paper mode


def _paper(w_aligned, w_finetuned, hessian, knobs: dict, key, structure: SafeDeltaConfig, with_mask: bool):
    w0 = w_aligned.T.astype(jnp.float32)
    w_sft = w_finetuned.T.astype(jnp.float32)
    delta = w_sft - w0
    h, h_inv, damp, ok = _damped_factor(hessian, knobs, _inverse_via_factor)
    h_mm = jnp.diagonal(h_inv)[None, :]  # [H⁻¹]_mm of entry (i, j) is [H⁻¹]_jj

    cost = delta**2 / (2 * h_mm)  # δL_m
    ratio = 2 * h_mm[0]  # r_m = utility / cost, the same for every entry of a column
    epsilon = knobs["s"] * jnp.mean(1.0 / (2 * h_mm))
    positions = _selection_positions(-ratio, delta, knobs, key)
    mask = _prefix_mask(cost, positions, epsilon, delta.size, strict=True)

    selected = jnp.where(mask, delta, 0.0)
    compensation = jnp.matmul(selected / h_mm, h_inv, precision=_HIGHEST)  # Σ_{m∈S} C_m, row by row
    w = w0 + knobs["compensate"] * compensation
    w = jnp.where(mask, w_sft, w)  # selected entries are exactly the fine-tuned values, as in official mode

    stats = {
        "kept_fraction": jnp.mean(mask.astype(jnp.float32)),
        "utility_fraction": jnp.sum(jnp.where(mask, delta**2, 0.0))
        / jnp.maximum(jnp.sum(delta**2), jnp.finfo(jnp.float32).tiny),
        "spent": jnp.sum(jnp.where(mask, cost, 0.0)),
        "budget": epsilon,
        "quadratic_increase": _quadratic_increase(w - w0, h),
        "quadratic_increase_finetuned": _quadratic_increase(delta, h),
        "damping": damp,
        "factor_residual": _probe_residual(h, lambda v: jnp.matmul(h_inv, v, precision=_HIGHEST)),
        "factor_ok": ok,
    }
    if with_mask:
        stats["mask"] = mask.T
    return w.T.astype(w_aligned.dtype), stats


# ----------------------------------------------------------------------------------------------------------------
# Public per-layer functions


def _impl(structure: SafeDeltaConfig):
    return _official if structure.mode == "official" else _paper


@functools.partial(jax.jit, static_argnames=("structure",))
def _layer_jit(w_aligned, w_finetuned, hessian, knobs, key, structure):
    # The mask is always returned (one compiled program whether or not the caller wants it).
    return _impl(structure)(w_aligned, w_finetuned, hessian, knobs, key, structure, True)


def apply_layer(w_aligned, w_finetuned, hessian, cfg: SafeDeltaConfig, key=None, with_mask: bool = False):
    """Safe Delta on one kernel [in, out] with its input Hessian H [in, in], as cfg.mode says: (kernel, stats).

    Compiled once per (shape, mode, and for official mode block_size and lazy_group); s, damping, exclusion and
    ablation are traced. Callable inside jit. `key` seeds ablation="random" (default: key(cfg.seed)). with_mask adds
    stats["mask"], the selected entries in the kernel's [in, out] layout.
    """
    key = jax.random.key(cfg.seed) if key is None else key
    kernel, stats = _layer_jit(w_aligned, w_finetuned, hessian, _knobs(cfg, jnp.shape(w_aligned)), key,
                               _structure(cfg))
    if not with_mask:
        del stats["mask"]
    return kernel, stats


def official_layer(w_aligned, w_finetuned, hessian, cfg: SafeDeltaConfig = SafeDeltaConfig(), key=None,
                   with_mask: bool = False):
    """The official procedure (module docstring, "official") on one kernel: (new kernel, stats)."""
    return apply_layer(w_aligned, w_finetuned, hessian, dataclasses.replace(cfg, mode="official"), key, with_mask)


def paper_layer(w_aligned, w_finetuned, hessian, cfg: SafeDeltaConfig = SafeDeltaConfig(mode="paper"), key=None,
                with_mask: bool = False):
    """The paper's stated rule (module docstring, "paper") on one kernel: (new kernel, stats)."""
    return apply_layer(w_aligned, w_finetuned, hessian, dataclasses.replace(cfg, mode="paper"), key, with_mask)


@functools.partial(jax.jit, static_argnames=("structure",))
def _stacked_layers(w_aligned, w_finetuned, hessians, keys, knobs, structure: SafeDeltaConfig):
    """The per-layer rule over a leading [L] axis (lax.map: one layer's temporaries live at a time)."""
    impl = _impl(structure)
    return jax.lax.map(lambda xs: impl(xs[0], xs[1], xs[2], knobs, xs[3], structure, False),
                       (w_aligned, w_finetuned, hessians, keys),
                       batch_size=structure.layer_batch if structure.layer_batch > 1 else None)


# ----------------------------------------------------------------------------------------------------------------
# Whole model


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_same_structure(aligned: Params, finetuned: Params) -> None:
    a = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(aligned)[0]}
    f = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(finetuned)[0]}
    lora_leaves = sorted(p for p in f if p.rsplit("/", 1)[-1] in ("lora_a", "lora_b"))
    if lora_leaves:
        raise SafeDeltaError(
            f"fine-tuned params carry LoRA adapters ({lora_leaves[0]}, ...); merge them first "
            "(safetrade.models.lora.merge) so the delta is a plain kernel difference"
        )
    if a.keys() != f.keys():
        only_a, only_f = sorted(a.keys() - f.keys()), sorted(f.keys() - a.keys())
        raise SafeDeltaError(
            "aligned and fine-tuned params differ in structure: "
            f"only in aligned: {only_a[:5] or 'none'}; only in fine-tuned: {only_f[:5] or 'none'}"
        )
    for path in sorted(a):
        if tuple(a[path].shape) != tuple(f[path].shape):
            raise SafeDeltaError(
                f"{path}: aligned shape {tuple(a[path].shape)} != fine-tuned shape {tuple(f[path].shape)}"
            )


def _kernel_specs(cfg: LlamaConfig) -> list[io.WeightSpec]:
    return [s for s in io.weight_specs(cfg) if s.stacked and s.path[-1] == "kernel" and s.path[-2] in PROJECTIONS]


def _find_hessian(hessians: Mapping[str, Any], spec: io.WeightSpec):
    projection = spec.path[-2]
    candidates = ("/".join(spec.path), projection, HESSIAN_INPUTS[projection])
    for name in candidates:
        if name in hessians:
            return name, hessians[name]
    raise SafeDeltaError(
        f"no Hessian for {'/'.join(spec.path)} (looked for keys {list(candidates)}; have {sorted(hessians)})"
    )


@jax.jit
def _finite_per_layer(x, minus=None):
    """[L] bools: layer l of x (or of x − minus, in float32) has only finite entries."""
    x = x.astype(jnp.float32) if minus is None else x.astype(jnp.float32) - minus.astype(jnp.float32)
    return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


def _first_bad_layers(finite_per_layer) -> list[int]:
    return [int(i) for i in np.flatnonzero(~np.asarray(finite_per_layer))]


def safe_delta(cfg_model: LlamaConfig, aligned: Params, finetuned: Params, hessians: Mapping[str, Any],
               sd_cfg: SafeDeltaConfig = SafeDeltaConfig()) -> tuple[Params, dict]:
    """Apply Safe Delta to every q/k/v/o/gate/up/down kernel ([L, in, out]); returns (params, report).

    `hessians` maps a key to [L, in, in]; for a kernel the first of "blocks/attn/q_proj/kernel", "q_proj" and its
    shared input name (HESSIAN_INPUTS, e.g. "attn_input") that is present is used. Other params come from the
    aligned model (official behaviour) unless sd_cfg.other_params == "finetuned". Kernels keep their dtype.

    The report is JSON-ready: per kernel path, lists over layers of the stats described in the module docstring,
    the list of damping fallbacks, and the overall kept fraction.
    """
    _check_same_structure(aligned, finetuned)
    specs = _kernel_specs(cfg_model)
    out = jax.tree.map(lambda x: x, aligned if sd_cfg.other_params == "aligned" else finetuned)
    base_key = jax.random.key(sd_cfg.seed)
    report: dict[str, Any] = {"config": dataclasses.asdict(sd_cfg), "kernels": {}, "damping_fallbacks": []}
    kept_entries = total_entries = 0.0

    for index, spec in enumerate(specs):
        path = "/".join(spec.path)
        try:
            w_a, w_f = io.tree_get(aligned, spec.path), io.tree_get(finetuned, spec.path)
        except (KeyError, TypeError):
            raise SafeDeltaError(f"{path}: not in the params (does cfg_model match the checkpoints?)") from None
        if w_a.ndim != 3:
            raise SafeDeltaError(f"{path}: expected a stacked kernel [L, in, out], got shape {tuple(w_a.shape)}")
        layers, d_in, _ = w_a.shape
        h_name, hessian = _find_hessian(hessians, spec)
        hessian = jnp.asarray(hessian)
        if tuple(hessian.shape) != (layers, d_in, d_in):
            raise SafeDeltaError(
                f"Hessian {h_name!r} for {path} has shape {tuple(hessian.shape)}; expected {(layers, d_in, d_in)}"
            )
        bad = _first_bad_layers(_finite_per_layer(hessian))
        if bad:
            raise SafeDeltaError(f"Hessian {h_name!r} for {path} has non-finite entries in layer(s) {bad}")
        bad = _first_bad_layers(_finite_per_layer(w_f, w_a))
        if bad:
            raise SafeDeltaError(f"{path}: fine-tuned minus aligned has non-finite entries in layer(s) {bad}")

        keys = jax.random.split(jax.random.fold_in(base_key, index), layers)
        new_kernel, stats = _stacked_layers(w_a, w_f, hessian, keys, _knobs(sd_cfg, w_a.shape), _structure(sd_cfg))
        stats = jax.device_get(stats)
        failed = _first_bad_layers(stats["factor_ok"])
        if failed:
            raise SafeDeltaError(
                f"{path}: Hessian {h_name!r} could not be factorised in layer(s) {failed} even with damping "
                f"{sd_cfg.damp_limit} × mean(diag H); check the calibration activations"
            )
        io.tree_set(out, spec.path, new_kernel)
        for layer, damping in enumerate(np.asarray(stats["damping"])):
            if damping > sd_cfg.damp * (1 + 1e-6):
                report["damping_fallbacks"].append({"kernel": path, "layer": layer, "damping": float(damping)})
        report["kernels"][path] = {k: np.asarray(v).tolist() for k, v in stats.items() if k != "factor_ok"}
        report["kernels"][path]["hessian"] = h_name
        kept_entries += float(np.sum(stats["kept_fraction"])) * w_a[0].size
        total_entries += w_a.size

    report["kept_fraction"] = kept_entries / max(total_entries, 1.0)
    report["other_params"] = sd_cfg.other_params
    return out, report


# ----------------------------------------------------------------------------------------------------------------
# Safety Hessians


def hessians_from_activations(activations, attention_mask=None) -> jax.Array:
    """H = (2/N) Σ_n X_nᵀ X_n (float32) for one linear input; X [B, T, d], N = sequences with a real token."""
    x = jnp.asarray(activations).astype(jnp.float32)
    mask = jnp.ones(x.shape[:2], jnp.float32) if attention_mask is None else jnp.asarray(attention_mask, jnp.float32)
    gram = jnp.einsum("btd,bte->de", x * mask[..., None], x, precision=_HIGHEST)
    sequences = jnp.sum(jnp.any(mask > 0, axis=1))
    return 2.0 * gram / jnp.maximum(sequences, 1)


class _InputTap(nnx.Module):
    """Wraps a Linear so that its input is stored in `store[name]` (same trace) before the original call."""

    def __init__(self, inner, name: str, store: dict):
        self.inner = inner
        self.name = name
        self.store = store

    def __call__(self, x):
        self.store[self.name] = x
        return self.inner(x)


_TAPPED = {"attn_input": ("attn", "q_proj"), "o_proj_input": ("attn", "o_proj"),
           "mlp_input": ("mlp", "gate_proj"), "down_proj_input": ("mlp", "down_proj")}


@functools.partial(jax.jit, static_argnums=0)
def _batch_grams(cfg: LlamaConfig, params: Params, input_ids, attention_mask):
    """Σ XᵀX (float32) per tapped input for one batch, [L, d, d] each, from one forward of the given model.

    The block loop mirrors llama.Llama.__call__ (no cache); llama.py has no activation hooks, so each merged
    block gets its q/o/gate/down projections wrapped by _InputTap for the duration of the call.
    """
    model = nnx.merge(llama.graphdef(cfg), params)
    valid = attention_mask.astype(bool)
    positions = llama.positions_from_mask(attention_mask)
    inv_freq = jnp.asarray(llama.rope_inverse_frequencies(cfg))
    weight = valid.astype(jnp.float32)[..., None]
    block_graph, block_state = nnx.split(model.blocks)

    def layer(h, state):
        block = nnx.merge(block_graph, state)
        store: dict = {}
        for name, (parent, child) in _TAPPED.items():
            module = getattr(block, parent)
            setattr(module, child, _InputTap(getattr(module, child), name, store))
        h, _, _ = block(h, positions, inv_freq, valid)
        grams = {}
        for name in _TAPPED:
            x = store[name].astype(jnp.float32)
            grams[name] = jnp.einsum("btd,bte->de", x * weight, x, precision=_HIGHEST)
        return h, grams

    _, grams = jax.lax.scan(layer, model.embed(input_ids), block_state)
    return grams


def _fingerprint(cfg: LlamaConfig, params: Params, batches: list[dict]) -> str:
    digest = hashlib.sha256(_CACHE_VERSION.encode())
    digest.update(repr(cfg).encode())
    for path, leaf in sorted(((_path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]),
                             key=lambda item: item[0]):
        host = np.asarray(jax.device_get(leaf))
        digest.update(f"{path}:{host.dtype}:{host.shape}".encode())
        digest.update(np.ascontiguousarray(host).tobytes())
    for batch in batches:
        for name in ("input_ids", "attention_mask"):
            array = np.ascontiguousarray(np.asarray(batch[name], np.int64))
            digest.update(f"{name}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def _normalised_batches(batches: Iterable[Mapping[str, Any]]) -> list[dict]:
    out = []
    for i, batch in enumerate(batches):
        if "input_ids" not in batch:
            raise SafeDeltaError(f"calibration batch {i} has no 'input_ids' (keys: {sorted(batch)})")
        ids = np.asarray(batch["input_ids"])
        mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise SafeDeltaError(f"calibration batch {i}: input_ids {ids.shape} and attention_mask {mask.shape} "
                                 "must both be [B, T]")
        out.append({"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)})
    if not out:
        raise SafeDeltaError("no calibration batches")
    return out


def collect_hessians(cfg: LlamaConfig, params: Params, batches: Iterable[Mapping[str, Any]], *,
                     cache_dir: str | os.PathLike | None = None) -> dict[str, jax.Array]:
    """Safety Hessians H = (2/N) Σ_n X_nᵀ X_n, [L, d, d] float32, for HESSIAN_KEYS, from the aligned `params`.

    `batches`: dicts with input_ids [B, T] and (optional) attention_mask [B, T]; every real token counts, N counts
    sequences (official convention). With `cache_dir`, the result is stored as
    hessians-<fingerprint>.safetensors, the fingerprint being a sha256 over the config, every param's bytes and
    the batches; a later call with the same inputs loads it instead of running the model.
    """
    if cfg.lora is not None:
        raise SafeDeltaError("collect_hessians needs the aligned model without adapters (cfg.lora is set)")
    batches = _normalised_batches(batches)
    cache_path = None
    if cache_dir is not None:
        fingerprint = _fingerprint(cfg, params, batches)
        cache_path = Path(cache_dir) / f"hessians-{fingerprint[:32]}.safetensors"
        if cache_path.exists():
            return _load_hessians(cache_path, fingerprint)

    sums = None
    sequences = 0
    for batch in batches:
        grams = _batch_grams(cfg, params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
        sums = grams if sums is None else jax.tree.map(jnp.add, sums, grams)
        sequences += int(np.sum(batch["attention_mask"].any(axis=1)))
    hessians = {name: 2.0 * sums[name] / max(sequences, 1) for name in HESSIAN_KEYS}

    if cache_path is not None:
        _save_hessians(cache_path, hessians, fingerprint, sequences)
    return hessians


def _save_hessians(path: Path, hessians: Mapping[str, jax.Array], fingerprint: str, sequences: int) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(np.asarray(jax.device_get(h), np.float32)) for name, h in hessians.items()}
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"fingerprint": fingerprint, "num_sequences": str(sequences),
                                               "format": json.dumps(list(HESSIAN_KEYS))})
    os.replace(partial, path)  # readers never see a half-written cache file


def _load_hessians(path: Path, fingerprint: str) -> dict[str, jax.Array]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        stored = (handle.metadata() or {}).get("fingerprint")
        if stored != fingerprint:
            raise SafeDeltaError(f"{path}: cached Hessians belong to fingerprint {stored}, not {fingerprint}; "
                                 "delete the file")
        return {name: jnp.asarray(handle.get_tensor(name)) for name in handle.keys()}
