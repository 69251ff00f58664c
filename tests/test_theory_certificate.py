"""The a-posteriori certificate of a finished run: landscape.segment_profile against closed forms and against the
existing gradient / HVP code, and bounds.segment_certificate on functions whose segment integrals are known.

Tolerances: float32 JAX values at 1e-5 relative (a dozen-term dot product plus one jvp; float32 eps 1.2e-7);
float64 (numpy, or JAX under jax.enable_x64) at 1e-10. The tiny Llama's two methods agree at 2e-4 relative: the
same second derivative computed in two different orders of float32 operations over ~10⁵ parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory import bounds, landscape


def quadratic_problem(seed=0, n=9):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, n))
    A, b = m @ m.T - 2.0 * np.eye(n), rng.normal(size=n)  # indefinite: the certificate needs no convexity

    def loss(p):
        x = jnp.concatenate([p["m"].ravel(), p["v"]])
        return 0.5 * x @ jnp.asarray(A) @ x + jnp.asarray(b) @ x

    def tree(x):
        x = jnp.asarray(x)
        return {"m": x[:6].reshape(2, 3), "v": x[6:]}

    return A, b, loss, tree, rng


@pytest.mark.parametrize("method", landscape.SEGMENT_METHODS)
def test_certificate_is_exact_on_a_quadratic(method):
    with jax.enable_x64(True):
        A, b, loss, tree, rng = quadratic_problem()
        x0, x1 = rng.normal(size=9), rng.normal(size=9)
        prof = landscape.segment_profile(loss, tree(x0), tree(x1), num_points=4, method=method)
        d = x1 - x0
        u = d / np.linalg.norm(d)
        assert prof.ts == (0.0, 1 / 3, 2 / 3, 1.0)
        assert prof.step_norm == pytest.approx(np.linalg.norm(d), rel=1e-12)
        np.testing.assert_allclose(prof.curvatures, [u @ A @ u] * 4, rtol=1e-10)
        np.testing.assert_allclose(prof.slopes[0], (A @ x0 + b) @ d, rtol=1e-10)
        for t, value in zip(prof.ts, prof.values):
            x = x0 + t * d
            assert value == pytest.approx(0.5 * x @ A @ x + b @ x, rel=1e-10)
        cert = bounds.segment_certificate(prof.slopes[0], prof.curvatures, prof.step_norm, prof.ts)
        # constant curvature: lower = upper = quadrature = the measured gap
        for value in (cert.upper, cert.lower, cert.quadrature):
            assert value == pytest.approx(prof.gap, rel=1e-10, abs=1e-10)


def test_certificate_brackets_the_gap_of_exp_by_hand():
    # φ(t) = e^t on [0, 1]: φ'(0) = 1, curvature φ'' = e^t ∈ [1, e] (sampled at both ends), gap e − 1.
    def loss(p):
        return jnp.exp(p["x"]).sum()

    with jax.enable_x64(True):
        prof = landscape.segment_profile(loss, {"x": jnp.zeros(1)}, {"x": jnp.ones(1)}, num_points=5)
        assert prof.gap == pytest.approx(math.e - 1, rel=1e-12)
        np.testing.assert_allclose(prof.curvatures, np.exp(np.linspace(0, 1, 5)), rtol=1e-12)
        cert = bounds.segment_certificate(prof.slopes[0], prof.curvatures, prof.step_norm, prof.ts)
    assert cert.upper == pytest.approx(1 + math.e / 2, rel=1e-12)
    assert cert.lower == pytest.approx(1.5, rel=1e-12)
    assert cert.lower < math.e - 1 < cert.upper
    # quadrature = φ'(0) + ∫(1 − t)·(piecewise-linear interpolant of the samples): checked against a fine
    # trapezoid sum of that interpolant (error O(1e-12) at 10⁶ cells); the interpolant over-reads the convex e^t, so
    # the estimate sits slightly above the true gap (∫(1 − t)e^t dt = e − 2).
    grid = np.linspace(0.0, 1.0, 1_000_001)
    integrand = (1 - grid) * np.interp(grid, prof.ts, prof.curvatures)
    fine = float(np.sum(0.5 * (integrand[1:] + integrand[:-1])) * (grid[1] - grid[0]))
    assert cert.quadrature == pytest.approx(1.0 + fine, rel=1e-9)
    assert math.e - 1 < cert.quadrature < (math.e - 1) * 1.003


def test_sampled_curvature_is_one_sided_and_a_missed_peak_shows_as_a_violation():
    # φ(t) = −t²(1 − t)²: φ'(0) = 0, φ'' = −2 + 12t − 12t² is −2 at both ends and +1 at t = ½, gap 0.
    def loss(p):
        t = p["t"][0]
        return -(t ** 2) * (1 - t) ** 2

    with jax.enable_x64(True):
        start, end = {"t": jnp.zeros(1)}, {"t": jnp.ones(1)}
        ends_only = landscape.segment_profile(loss, start, end, num_points=2)
        with_middle = landscape.segment_profile(loss, start, end, num_points=3)
    missed = bounds.segment_certificate(ends_only.slopes[0], ends_only.curvatures, ends_only.step_norm)
    assert missed.upper == pytest.approx(-1.0) and ends_only.gap > missed.upper  # the estimate under-states
    seen = bounds.segment_certificate(with_middle.slopes[0], with_middle.curvatures, with_middle.step_norm)
    assert seen.curvature_max == pytest.approx(1.0) and seen.upper == pytest.approx(0.5)
    assert seen.upper >= with_middle.gap


def test_tiny_llama_profile_matches_grad_hvp_and_both_methods_agree():
    from safetrade.models import llama
    from safetrade.train.losses import lm_loss

    cfg = llama.preset("tiny")
    start = llama.init(cfg, jax.random.key(0))
    noise = llama.init(cfg, jax.random.key(1))
    end = jax.tree.map(lambda a, n: a + 0.02 * n, start, noise)
    ids = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
    batch = {"input_ids": ids, "loss_mask": jnp.ones_like(ids, jnp.float32).at[:, :4].set(0.0),
             "attention_mask": jnp.ones_like(ids)}

    def loss(p):
        return lm_loss(cfg, p, batch)

    a = landscape.segment_profile(loss, start, end, num_points=3, method="jvp_of_grad")
    b = landscape.segment_profile(loss, start, end, num_points=3, method="forward")
    np.testing.assert_allclose(a.values, b.values, rtol=1e-5)
    np.testing.assert_allclose(a.slopes, b.slopes, rtol=2e-4)
    np.testing.assert_allclose(a.curvatures, b.curvatures, rtol=2e-4)
    delta = landscape.tree_sub(end, start)
    u = landscape.normalized(delta)
    assert a.values[0] == pytest.approx(float(loss(start)), rel=1e-5)
    assert a.values[-1] == pytest.approx(float(loss(end)), rel=1e-5)
    assert a.slopes[0] == pytest.approx(float(landscape.tree_vdot(jax.grad(loss)(start), delta)), rel=1e-4)
    assert a.curvatures[0] == pytest.approx(float(landscape.tree_vdot(u, landscape.hvp(loss, start, u))), rel=1e-4)
    assert a.step_norm == pytest.approx(float(landscape.tree_norm(delta)), rel=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="num_points"):
        landscape.segment_points(1)
    with pytest.raises(ValueError, match="method"):
        landscape.segment_profile(lambda p: p["x"].sum(), {"x": jnp.zeros(1)}, {"x": jnp.ones(1)}, method="adjoint")
    with pytest.raises(ValueError, match="ts must increase"):
        bounds.segment_certificate(0.0, [1.0, 2.0], 1.0, ts=[0.0, 0.5])
    with pytest.raises(ValueError, match="3 points"):
        bounds.segment_certificate(0.0, [1.0, 2.0], 1.0, ts=[0.0, 0.5, 1.0])
