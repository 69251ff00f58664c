"""The registry's strategies (the pieces the train step composes) against closed-form solutions on small convex
problems."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safetrade import tradeoff
from safetrade.errors import SafetradeError
from safetrade.tradeoff import strategy_config


def quadratic_problem():
    """f(θ) = ½‖θ − a‖² (capability), g(θ) = ½‖θ − b‖² (proxy safety); θ_s = b is the aligned point."""
    a = jnp.asarray([3.0, -1.0, 2.0])
    b = jnp.asarray([0.0, 0.5, -0.5])
    f = lambda t: 0.5 * jnp.sum((t["w"] - a) ** 2)  # noqa: E731
    g = lambda t: 0.5 * jnp.sum((t["w"] - b) ** 2)  # noqa: E731
    return a, b, f, g


def run_primal_dual(cfg, steps=4000, lr=0.05, bound=None, anchor=None):
    """Plain gradient descent on the strategy's objective inside optax.chain(gradient piece, sgd, constraint piece)
    (+ projection, + dual ascent with reference L_proxy(θ_s) = bound, ε = 0), scanned under jit."""
    a, b, f, g = quadratic_problem()
    pieces = tradeoff.build(cfg)
    tx = pieces.chain(optax.sgd(lr))

    def one(carry, _):
        params, opt = carry
        grads = jax.grad(lambda p: pieces.objective(f(p), g(p), opt))(params)
        updates, opt = tx.update(grads, opt, params, anchor=anchor, proxy_loss=g(params), proxy_reference=bound)
        params = optax.apply_updates(params, updates)
        violation = g(params) - bound if bound is not None else jnp.float32(0)
        return (params, opt), violation

    params = {"w": b}
    init = (params, tx.init(params))
    (params, opt), violations = jax.jit(lambda c: jax.lax.scan(one, c, None, length=steps))(init)
    lam = tradeoff.current_lambda(opt) if cfg.uses_proxy_reference else None
    return params, lam, np.asarray(violations)


def project(params, anchor, **kw):
    """Where case2_projection sends params that the optimiser leaves in place (a zero update)."""
    tx = tradeoff.case2_projection(anchor, **kw)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return optax.apply_updates(params, updates)


def test_case1_penalty_reaches_the_weighted_average():
    a, b, _, _ = quadratic_problem()
    lam = 3.0
    params, _, _ = run_primal_dual(strategy_config("case1_penalty", lam=lam))
    np.testing.assert_allclose(params["w"], (a + lam * b) / (1 + lam), atol=1e-5)


def test_case1_constrained_matches_kkt_closed_form():
    """min ½‖θ−a‖² s.t. ½‖θ−b‖² ≤ c: θ* = (a + λ*b)/(1+λ*) with λ* = ‖a−b‖/√(2c) − 1 (active constraint)."""
    a, b, _, g = quadratic_problem()
    c = 0.5
    lam_star = float(jnp.linalg.norm(a - b) / np.sqrt(2 * c) - 1)
    assert lam_star > 0
    cfg = strategy_config("case1_constrained", lam=0.0, dual_lr=0.05)
    params, lam, violations = run_primal_dual(cfg, steps=6000, bound=c)
    assert abs(float(lam) - lam_star) < 1e-3
    np.testing.assert_allclose(params["w"], (a + lam_star * b) / (1 + lam_star), atol=1e-4)
    assert abs(violations[-1]) < 1e-5 and violations.max() > 0.5  # was driven infeasible, then back to the boundary


def test_case1_constrained_inactive_constraint_leaves_lambda_at_zero():
    a, b, _, _ = quadratic_problem()
    cfg = strategy_config("case1_constrained", lam=0.0, dual_lr=0.05)
    params, lam, _ = run_primal_dual(cfg, steps=2000, bound=100.0)
    assert float(lam) == 0.0
    np.testing.assert_allclose(params["w"], a, atol=1e-5)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_case2_projection_matches_closed_form(per_tensor):
    """min ½‖θ−a‖² s.t. ‖θ−b‖ ≤ r: θ* = b + r·(a−b)/‖a−b‖ (projection of a onto the ball)."""
    a, b, _, _ = quadratic_problem()
    r = 0.7
    cfg = strategy_config("case2_projection", radius=r, per_tensor=per_tensor)
    params, _, _ = run_primal_dual(cfg, anchor={"w": b})
    np.testing.assert_allclose(params["w"], b + r * (a - b) / jnp.linalg.norm(a - b), atol=1e-5)


def test_case2_penalty_matches_closed_form():
    a, b, _, _ = quadratic_problem()
    mu = 4.0
    params, _, _ = run_primal_dual(strategy_config("case2_penalty", mu=mu), anchor={"w": b})
    np.testing.assert_allclose(params["w"], (a + mu * b) / (1 + mu), atol=1e-5)


def test_projection_global_vs_per_tensor():
    anchor = {"x": jnp.zeros(2), "y": jnp.zeros(1)}
    params = {"x": jnp.asarray([3.0, 4.0]), "y": jnp.asarray([0.5])}
    glob = project(params, anchor, radius=1.0)
    assert abs(float(optax.tree.norm(glob)) - 1.0) < 1e-6
    per = project(params, anchor, radius=1.0, per_tensor=True)
    np.testing.assert_allclose(per["x"], [0.6, 0.8], atol=1e-6)
    np.testing.assert_allclose(per["y"], [0.5])  # already inside its own ball


def test_bad_strategy_config():
    with pytest.raises(SafetradeError, match="unknown strategy 'case3'"):
        strategy_config("case3")
    with pytest.raises(SafetradeError, match="radius must be >= 0"):
        strategy_config("case2_projection", radius=-1.0)
