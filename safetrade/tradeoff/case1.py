"""Case I (an alignment-*loss* constraint through a proxy safety loss) on any model and any optax optimiser.

    loss = case1_penalty(capability_loss, proxy_loss, lam=1.0)       # L_cap(θ) + λ·L_proxy(θ): a loss to minimise

    tx = optax.chain(optax.adamw(1e-3), case1_constrained(epsilon=0.05, dual_lr=0.1))
    lam = current_lambda(opt_state)                                    # λ lives in the chain's state
    grads = jax.grad(case1_penalty(capability_loss, proxy_loss, lam))(params)
    updates, opt_state = tx.update(grads, opt_state, params, proxy_loss=proxy_loss(params),
                                   proxy_reference=reference)         # reference: L_proxy(θ_s)

`case1_constrained` solves min L_cap s.t. L_proxy(θ) ≤ L_proxy(θ_s) + ε by primal–dual descent: the optimiser
descends the Lagrangian L_cap + λ·L_proxy at the current λ, and each update ascends λ ← max(0, λ + η·(L_proxy − bound))
with the proxy loss measured at the params the gradient was taken at. It passes the updates through unchanged, so
its place in the chain does not matter. The same λ can be read with `optax.tree_utils.tree_get(opt_state, "lam")`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from safetrade.errors import SafetradeError


def penalized(capability: jax.Array, proxy: jax.Array, lam) -> jax.Array:
    """L_cap + λ·L_proxy from the two loss values."""
    return capability + lam * proxy


def case1_penalty(capability_loss: Callable[..., jax.Array], proxy_loss: Callable[..., jax.Array], lam
                  ) -> Callable[..., jax.Array]:
    """`loss(params, capability_batch=None, proxy_batch=None) = capability_loss(params, capability_batch) +
    lam · proxy_loss(params, proxy_batch)`; a batch left as None calls that loss with the params alone (a loss that
    closes over its data). `lam` may be a float or an array (e.g. `current_lambda(opt_state)`)."""

    def call(fn, params, batch):
        return fn(params) if batch is None else fn(params, batch)

    def loss(params, capability_batch=None, proxy_batch=None):
        return penalized(call(capability_loss, params, capability_batch), call(proxy_loss, params, proxy_batch), lam)

    return loss


class Case1ConstrainedState(NamedTuple):
    lam: jax.Array  # the multiplier λ ≥ 0 of the proxy-loss constraint


def case1_constrained(epsilon: float, dual_lr: float, lam0: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """Projected dual ascent on λ; `update(..., proxy_loss=L_proxy(θ), proxy_reference=L_proxy(θ_s))` each step."""
    for name, value in (("epsilon", epsilon), ("dual_lr", dual_lr), ("lam0", lam0)):
        if not value >= 0:
            raise SafetradeError(f"case1_constrained: {name} must be >= 0, got {value}")

    def init(params):
        del params
        return Case1ConstrainedState(jnp.asarray(lam0, jnp.float32))

    def update(updates, state, params=None, *, proxy_loss=None, proxy_reference=None, **extra_args):
        del params, extra_args
        if proxy_loss is None or proxy_reference is None:
            raise SafetradeError("case1_constrained needs the proxy loss and its reference value with each update: "
                                 "tx.update(grads, state, params, proxy_loss=..., proxy_reference=...)")
        bound = proxy_reference + epsilon
        lam = jnp.maximum(0.0, state.lam + dual_lr * (jax.lax.stop_gradient(proxy_loss) - bound))
        return updates, Case1ConstrainedState(lam)

    return optax.GradientTransformationExtraArgs(init, update)


def current_lambda(opt_state: Any) -> jax.Array:
    """λ of the one case1_constrained transform inside `opt_state` (any nesting of chains)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, Case1ConstrainedState))
             if isinstance(s, Case1ConstrainedState)]
    if len(found) != 1:
        raise SafetradeError(f"current_lambda: the optimiser state holds {len(found)} case1_constrained states; "
                             "expected exactly one")
    return found[0].lam
