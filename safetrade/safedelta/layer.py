"""Safe Delta (Lu et al., ICML 2025, arXiv 2505.12038): keep the parts of a fine-tuning delta that are cheap in
safety, and compensate the rest, one linear layer at a time.

Given an aligned model W_orig, its fine-tuned version W_sft and, per linear layer, the Hessian H of a safety loss
L_safe(W) = ‖W X_safe − W_orig X_safe‖² over that layer's inputs (H = (2/N) Σ_n X_nᵀ X_n from the *aligned* model's
activations on safety data), Safe Delta returns

    W_sd = W_orig + M ⊙ ΔW + C,        ΔW = W_sft − W_orig,

with a binary mask M chosen under a per-layer safety budget and a compensation C on the unselected entries.

Layouts. The functions here take one kernel in the Flax layout [in, out] (y = x @ kernel); the whole-tree driver
(tree.py) transposes torch-layout [out, in] kernels for them. The paper and the official code use torch's W
[out, in], and H is over the *input* dimension. Every routine below works internally on W = kernel.T, so "rows"
are output units, "columns" are input features (the axis H lives on), and the flattened order of entries is
row-major over that W, as in the official code.

Two modes (SafeDeltaConfig.mode):

"official": what the authors' released code does (its `adjust_delta`, called with blocksize=2048, percdamp=0.01;
    docs/safedelta.md records where it departs from the paper). Per layer:
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
    the tie order. torch's argsort is not stable (4-33 % of output entries were measured moving
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

The damping fallback is described in factor.py; where the Hessians come from, in hessians.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from safetrade.safedelta.config import SafeDeltaConfig, block_bounds, static_structure, traced_knobs
from safetrade.safedelta.factor import (
    HIGHEST,
    damped_factor,
    inverse_via_factor,
    probe_residual,
    quadratic_increase,
    upper_factor_of_inverse,
)
from safetrade.safedelta.order import prefix_mask, selection_positions

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

    def columns(x, start, count):
        return jax.lax.dynamic_slice_in_dim(x, start, count, axis=1)

    def sub_block(pending, k):
        first = k * sub
        w_sub = columns(w, first, sub) - columns(pending, first, sub)
        target_sub, sel_sub = columns(w_sft, first, sub), columns(sel, first, sub)
        d_sub = jax.lax.dynamic_slice_in_dim(d, first, sub)
        u_rows = jax.lax.dynamic_slice_in_dim(u, first, sub, axis=0)  # [sub, padded]
        u_sub = columns(u_rows, first, sub)  # [sub, sub]

        def step(local, g):
            start = g * group
            cols = columns(w_sub, start, group) - columns(local, start, group)
            q = jnp.where(columns(sel_sub, start, group), columns(target_sub, start, group), cols)
            err = (cols - q) / jax.lax.dynamic_slice_in_dim(d_sub, start, group)
            u_group = jax.lax.dynamic_slice_in_dim(u_sub, start, group, axis=0)
            # U is upper triangular: earlier columns receive nothing; the group's own columns receive an update
            # but are never read again, just as the official loop never revisits them.
            local = local + compensate * jnp.matmul(err, u_group, precision=HIGHEST)
            return local, (q, err)

        _, (q, err) = jax.lax.scan(step, jnp.zeros_like(w_sub), jnp.arange(sub // group))
        q = jnp.moveaxis(q, 0, 1).reshape(rows, sub)  # scan stacks [groups, rows, group]
        err = jnp.moveaxis(err, 0, 1).reshape(rows, sub)
        # The sub-block's errors reach every later column of the block at once (its own columns get junk
        # they never read; earlier columns get zeros).
        pending = pending + compensate * jnp.matmul(err, u_rows, precision=HIGHEST)
        return pending, (q, err)

    _, (q, err) = jax.lax.scan(sub_block, jnp.zeros_like(w), jnp.arange(n_sub))
    q = jnp.moveaxis(q, 0, 1).reshape(rows, padded)[:, :count]
    err = jnp.moveaxis(err, 0, 1).reshape(rows, padded)[:, :count]
    return q, err


def _official(w_aligned, w_finetuned, hessian, knobs: dict, key, structure: SafeDeltaConfig, with_mask: bool):
    w0 = w_aligned.T.astype(jnp.float32)  # official layout [rows=out, cols=in]
    w_sft = w_finetuned.T.astype(jnp.float32)
    rows, cols = w0.shape
    h, u, damp, ok = damped_factor(hessian, knobs, upper_factor_of_inverse)
    compensate = knobs["compensate"]

    # Compensation pushed into later blocks is kept apart from the weights (see _lazy_obs_pass for why).
    pending = jnp.zeros_like(w0)
    finished, masks = [], []
    spent = budget = kept = utility = jnp.float32(0)
    for block, (start, stop) in enumerate(block_bounds(cols, structure.block_size)):
        w_block = w0[:, start:stop] - pending[:, start:stop]
        w_sft_block, u_block = w_sft[:, start:stop], u[start:stop, start:stop]
        d = jnp.diagonal(u_block)[None, :]
        inv_d2 = 1.0 / d[0] ** 2  # the official sort key "tmp", constant down each column
        loss = (w_sft_block - w_block) ** 2 / d**2
        positions = selection_positions(inv_d2, w_sft_block - w_block, knobs, jax.random.fold_in(key, block))
        # Official: tmp.mean() * (s/2) * (rows/4096), the s/2 hard-coded whatever the block width.
        block_budget = jnp.mean(inv_d2) * (knobs["s"] / 2) * (rows / 4096)
        mask = prefix_mask(loss, positions, block_budget, knobs["candidates"][block], strict=False)

        q, err = _lazy_obs_pass(w_block, w_sft_block, u_block, mask, structure.lazy_group, compensate)
        finished.append(q)
        masks.append(mask)
        if stop < cols:
            pending = pending.at[:, stop:].add(compensate * jnp.matmul(err, u[start:stop, stop:], precision=HIGHEST))
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
        "quadratic_increase": quadratic_increase(w - w0, h),
        "quadratic_increase_finetuned": quadratic_increase(w_sft - w0, h),
        "damping": damp,
        "factor_residual": probe_residual(h, lambda v: jnp.matmul(u.T, jnp.matmul(u, v, precision=HIGHEST),
                                                                    precision=HIGHEST)),
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
    h, h_inv, damp, ok = damped_factor(hessian, knobs, inverse_via_factor)
    h_mm = jnp.diagonal(h_inv)[None, :]  # [H⁻¹]_mm of entry (i, j) is [H⁻¹]_jj

    cost = delta**2 / (2 * h_mm)  # δL_m
    ratio = 2 * h_mm[0]  # r_m = utility / cost, the same for every entry of a column
    epsilon = knobs["s"] * jnp.mean(1.0 / (2 * h_mm))
    positions = selection_positions(-ratio, delta, knobs, key)
    mask = prefix_mask(cost, positions, epsilon, delta.size, strict=True)

    selected = jnp.where(mask, delta, 0.0)
    compensation = jnp.matmul(selected / h_mm, h_inv, precision=HIGHEST)  # Σ_{m∈S} C_m, row by row
    w = w0 + knobs["compensate"] * compensation
    w = jnp.where(mask, w_sft, w)  # selected entries are exactly the fine-tuned values, as in official mode

    stats = {
        "kept_fraction": jnp.mean(mask.astype(jnp.float32)),
        "utility_fraction": jnp.sum(jnp.where(mask, delta**2, 0.0))
        / jnp.maximum(jnp.sum(delta**2), jnp.finfo(jnp.float32).tiny),
        "spent": jnp.sum(jnp.where(mask, cost, 0.0)),
        "budget": epsilon,
        "quadratic_increase": quadratic_increase(w - w0, h),
        "quadratic_increase_finetuned": quadratic_increase(delta, h),
        "damping": damp,
        "factor_residual": probe_residual(h, lambda v: jnp.matmul(h_inv, v, precision=HIGHEST)),
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
    kernel, stats = _layer_jit(w_aligned, w_finetuned, hessian, traced_knobs(cfg, jnp.shape(w_aligned)), key,
                               static_structure(cfg))
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
def stacked_layers(w_aligned, w_finetuned, hessians, keys, knobs, structure: SafeDeltaConfig):
    """The per-layer rule over a leading [L] axis (lax.map: one layer's temporaries live at a time)."""
    impl = _impl(structure)
    return jax.lax.map(lambda xs: impl(xs[0], xs[1], xs[2], knobs, xs[3], structure, False),
                       (w_aligned, w_finetuned, hessians, keys),
                       batch_size=structure.layer_batch if structure.layer_batch > 1 else None)
