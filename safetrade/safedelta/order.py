"""The order in which a layer's delta entries are offered to the safety budget, and the budget's prefix rule.

Both rules rank whole input columns (official: 1/d_j², paper: 2[H⁻¹]_jj); ties between equal keys resolve as a
stable sort of the row-major entries of W [out, in]. The ablations replace only the order ("random": a uniform
permutation; "magnitude": |δw| descending).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def stable_positions(column_key: jax.Array, rows: int) -> jax.Array:
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


def positions_of_order(order: jax.Array, shape) -> jax.Array:
    """The inverse permutation of a flat order, shaped like the kernel: pos[entry] = its place in `order`."""
    n = order.shape[0]
    return jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True).reshape(shape)


def selection_positions(column_key: jax.Array, delta_w: jax.Array, knobs: dict, key) -> jax.Array:
    """pos[i, j]: the place of entry (i, j) in the order entries are offered to the budget, best first.

    `column_key` [cols] is ascending-is-better (official 1/d_j², paper −2[H⁻¹]_jj; both rules rank whole columns)
    and ties resolve as a stable sort of the row-major entries. The ablations replace only this order.
    """
    n = delta_w.size
    # Branch i is order code i of config.py (ORDER_RATIO, ORDER_RANDOM, ORDER_MAGNITUDE).
    return jax.lax.switch(knobs["order"], [
        lambda: stable_positions(column_key, delta_w.shape[0]),
        lambda: positions_of_order(jax.random.permutation(key, n).astype(jnp.int32), delta_w.shape),
        lambda: positions_of_order(jnp.argsort(-jnp.abs(delta_w).reshape(-1), stable=True).astype(jnp.int32),
                                    delta_w.shape),
    ])


def prefix_mask(costs, positions, budget, allowed, strict: bool):
    """Entries of the longest prefix (in `positions` order) whose cumulative cost stays within budget, and within
    the first `allowed` places. Costs are >= 0, so the entries within budget are themselves a prefix."""
    n = costs.size
    in_order = jnp.zeros(n, costs.dtype).at[positions.reshape(-1)].set(costs.reshape(-1), unique_indices=True)
    cumulative = jnp.cumsum(in_order)
    within = cumulative < budget if strict else cumulative <= budget
    taken = jnp.sum(within & (jnp.arange(n) < allowed))
    return positions < taken

