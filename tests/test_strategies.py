"""Strategies against closed-form solutions on small convex problems, and their invariants in the LLM step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safetrade.errors import SafetradeError
from safetrade.train import strategies
from safetrade.train.strategies import StrategyConfig


def quadratic_problem():
    """f(θ) = ½‖θ − a‖² (capability), g(θ) = ½‖θ − b‖² (proxy safety); θ_s = b is the aligned point."""
    a = jnp.asarray([3.0, -1.0, 2.0])
    b = jnp.asarray([0.0, 0.5, -0.5])
    f = lambda t: 0.5 * jnp.sum((t["w"] - a) ** 2)  # noqa: E731
    g = lambda t: 0.5 * jnp.sum((t["w"] - b) ** 2)  # noqa: E731
    return a, b, f, g


def run_primal_dual(cfg, steps=4000, lr=0.05, bound=None, anchor=None):
    """Plain gradient descent on the strategy's objective (+ projection, + dual ascent), scanned under jit."""
    a, b, f, g = quadratic_problem()
    tx = optax.sgd(lr)

    def one(carry, _):
        params, opt, state = carry

        def obj(p):
            disp = jax.tree.map(jnp.subtract, p, anchor) if anchor is not None else None
            return strategies.objective(cfg, state, f(p), g(p), disp)

        updates, opt = tx.update(jax.grad(obj)(params), opt, params)
        params = optax.apply_updates(params, updates)
        if anchor is not None:
            params = strategies.project_full(cfg, params, anchor)
        violation = jnp.float32(0)
        if bound is not None:
            state = strategies.dual_update(cfg, state, g(params), bound)
            violation = g(params) - bound
        return (params, opt, state), violation

    params = {"w": b}
    init = (params, tx.init(params), strategies.init_state(cfg))
    (params, _, state), violations = jax.jit(lambda c: jax.lax.scan(one, c, None, length=steps))(init)
    return params, state, np.asarray(violations)


def test_case1_penalty_reaches_the_weighted_average():
    a, b, _, _ = quadratic_problem()
    lam = 3.0
    params, _, _ = run_primal_dual(StrategyConfig("case1_penalty", lam=lam))
    np.testing.assert_allclose(params["w"], (a + lam * b) / (1 + lam), atol=1e-5)


def test_case1_constrained_matches_kkt_closed_form():
    """min ½‖θ−a‖² s.t. ½‖θ−b‖² ≤ c: θ* = (a + λ*b)/(1+λ*) with λ* = ‖a−b‖/√(2c) − 1 (active constraint)."""
    a, b, _, g = quadratic_problem()
    c = 0.5
    lam_star = float(jnp.linalg.norm(a - b) / np.sqrt(2 * c) - 1)
    assert lam_star > 0
    cfg = StrategyConfig("case1_constrained", lam=0.0, dual_lr=0.05)
    params, state, violations = run_primal_dual(cfg, steps=6000, bound=c)
    assert abs(float(state["lam"]) - lam_star) < 1e-3
    np.testing.assert_allclose(params["w"], (a + lam_star * b) / (1 + lam_star), atol=1e-4)
    assert abs(violations[-1]) < 1e-5 and violations.max() > 0.5  # was driven infeasible, then back to the boundary


def test_case1_constrained_inactive_constraint_leaves_lambda_at_zero():
    a, b, _, _ = quadratic_problem()
    cfg = StrategyConfig("case1_constrained", lam=0.0, dual_lr=0.05)
    params, state, _ = run_primal_dual(cfg, steps=2000, bound=100.0)
    assert float(state["lam"]) == 0.0
    np.testing.assert_allclose(params["w"], a, atol=1e-5)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_case2_projection_matches_closed_form(per_tensor):
    """min ½‖θ−a‖² s.t. ‖θ−b‖ ≤ r: θ* = b + r·(a−b)/‖a−b‖ (projection of a onto the ball)."""
    a, b, _, _ = quadratic_problem()
    r = 0.7
    cfg = StrategyConfig("case2_projection", radius=r, per_tensor=per_tensor)
    params, _, _ = run_primal_dual(cfg, anchor={"w": b})
    np.testing.assert_allclose(params["w"], b + r * (a - b) / jnp.linalg.norm(a - b), atol=1e-5)


def test_case2_penalty_matches_closed_form():
    a, b, _, _ = quadratic_problem()
    mu = 4.0
    params, _, _ = run_primal_dual(StrategyConfig("case2_penalty", mu=mu), anchor={"w": b})
    np.testing.assert_allclose(params["w"], (a + mu * b) / (1 + mu), atol=1e-5)


def test_projection_global_vs_per_tensor():
    anchor = {"x": jnp.zeros(2), "y": jnp.zeros(1)}
    params = {"x": jnp.asarray([3.0, 4.0]), "y": jnp.asarray([0.5])}
    glob = strategies.project_full(StrategyConfig("case2_projection", radius=1.0), params, anchor)
    assert abs(float(jnp.sqrt(strategies.sq_norm(glob))) - 1.0) < 1e-6
    per = strategies.project_full(StrategyConfig("case2_projection", radius=1.0, per_tensor=True), params, anchor)
    np.testing.assert_allclose(per["x"], [0.6, 0.8], atol=1e-6)
    np.testing.assert_allclose(per["y"], [0.5])  # already inside its own ball


def test_bad_strategy_config():
    with pytest.raises(SafetradeError, match="unknown strategy 'case3'"):
        StrategyConfig("case3")
    with pytest.raises(SafetradeError, match="radius must be >= 0"):
        StrategyConfig("case2_projection", radius=-1.0)
