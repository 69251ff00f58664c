"""theory/: landscape estimators against dense linear algebra, the project's bounds on problems where every quantity
is exact, and the synthetic categorical setting (closed form vs gradient descent, dial trends).

Tolerances: float32 JAX results are compared at ~1e-5 relative (float32 eps is 1.2e-7; a dozen-term dot product
and a few HVPs stay well inside 1e-5); float64 results (numpy, or JAX under jax.enable_x64) at 1e-9 or tighter
unless an iteration count sets the limit, in which case the comment says why.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from theory import bounds, landscape, synthetic

# ---------------------------------------------------------------------------------------------------------------
# Toy problems
# ---------------------------------------------------------------------------------------------------------------

SPECTRUM = np.array([10.0, -8.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.25, -0.5, -1.0, -2.0, 0.1])


def rotated(spectrum, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(spectrum), len(spectrum))))
    return (q * spectrum) @ q.T, q


def quadratic(A, b):
    """½xᵀAx + bᵀx on a two-leaf pytree {'m': [2, 3], 'v': [n − 6]} (so tree code, not a flat vector, is tested)."""
    A32, b32 = jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32)

    def loss(p):
        x = jnp.concatenate([p["m"].ravel(), p["v"]])
        return 0.5 * x @ A32 @ x + b32 @ x

    return loss


def as_tree(x):
    x = jnp.asarray(x, jnp.float32)
    return {"m": x[:6].reshape(2, 3), "v": x[6:]}


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def logistic_data(seed=0, n=40, d=6):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    X[:, 0] *= 3.0  # one dominant direction: a clear spectral gap for power iteration
    y = (rng.uniform(size=n) < 0.5).astype(np.float64)
    return jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)


def logistic_loss(X, y):
    def loss(p):
        z = X @ p["w"] + p["b"]
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    return loss


LOGISTIC_PARAMS = {"w": jnp.asarray([0.3, -0.2, 0.1, 0.0, 0.5, -0.4], jnp.float32), "b": jnp.asarray(0.1, jnp.float32)}

# One loss object per toy problem, shared by the tests: the estimators jit with loss_fn as a static argument, so a
# shared object compiles once (the suite must stay fast on a loaded 2-core machine).
QUAD_A, QUAD_Q = rotated(SPECTRUM)
QUAD = quadratic(QUAD_A, np.zeros(len(SPECTRUM)))
LOGISTIC = logistic_loss(*logistic_data(seed=0))
_UNRAVEL = ravel_pytree(LOGISTIC_PARAMS)[1]
# jitted once: eager jax.hessian would dispatch (and compile) hundreds of small ops
_LOGISTIC_HESSIAN = jax.jit(jax.hessian(lambda x: LOGISTIC(_UNRAVEL(x))))


def logistic_hessian(params):
    """The full Hessian of LOGISTIC by autodiff (jacfwd of jacrev), as a float64 numpy matrix."""
    return np.asarray(_LOGISTIC_HESSIAN(ravel_pytree(params)[0]), np.float64)


# ---------------------------------------------------------------------------------------------------------------
# landscape
# ---------------------------------------------------------------------------------------------------------------


def test_grad_norm_and_hvp_match_dense_on_logistic_regression():
    loss = LOGISTIC
    H = logistic_hessian(LOGISTIC_PARAMS)
    v = landscape.random_direction(jax.random.key(3), LOGISTIC_PARAMS)
    expected = H @ flat(v)
    got = flat(jax.jit(landscape.hvp, static_argnums=0)(loss, LOGISTIC_PARAMS, v))
    assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected)
    g = flat(jax.grad(loss)(LOGISTIC_PARAMS))
    assert abs(float(landscape.grad_norm(loss, LOGISTIC_PARAMS)) - np.linalg.norm(g)) <= 1e-6 * np.linalg.norm(g)


def test_power_iteration_with_deflation_finds_largest_magnitude_eigenpairs():
    q, loss = QUAD_Q, QUAD
    # Ratios |λ2/λ1| = 0.8, |λ3/λ2| = 0.625, |λ4/λ3| = 0.6: after 150 iterations the Rayleigh-quotient error factor
    # is ≤ 0.8^300 ≈ 1e-29, so only float32 rounding (≤ 1e-5·‖A‖) remains.
    pairs = landscape.top_eigenvalues(loss, as_tree(np.ones(12)), k=3, iters=150, key=jax.random.key(1))
    np.testing.assert_allclose(np.asarray(pairs.eigenvalues), [10.0, -8.0, 5.0], atol=1e-4)
    for i in range(3):
        cosine = abs(flat(pairs.vector(i)) @ q[:, i])
        assert cosine >= 1 - 1e-5
    assert np.all(np.asarray(pairs.residuals) <= 1e-4)


def test_top_eigenvalue_of_logistic_hessian_matches_eigvalsh():
    loss = LOGISTIC
    exact = np.linalg.eigvalsh(logistic_hessian(LOGISTIC_PARAMS))
    ratio = abs(exact[-2]) / abs(exact[-1])
    assert ratio < 0.5  # the scaled feature makes the gap wide; 100 iterations leave a factor ≤ ratio^200
    pairs = landscape.top_eigenvalues(loss, LOGISTIC_PARAMS, k=1, iters=100)
    assert abs(float(pairs.eigenvalues[0]) - exact[-1]) <= 1e-5 * exact[-1]


def test_lanczos_ritz_values_and_gauss_quadrature_are_exact_on_a_quadratic():
    A, loss = QUAD_A, QUAD
    params = as_tree(np.zeros(12))
    full = landscape.lanczos(loss, params, num_steps=12, key=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(full.ritz_values), np.sort(SPECTRUM), atol=1e-4)
    np.testing.assert_allclose(np.linalg.eigvalsh(np.asarray(full.tridiagonal)), np.asarray(full.ritz_values),
                               atol=1e-5)
    # m = 4 steps from a known start v: the Gauss rule reproduces vᵀAᵖv for p ≤ 2m − 1 = 7. Relative to ‖A‖ᵖ
    # (10⁷ for p = 7) the float32 error stays below 1e-4.
    v = np.random.default_rng(5).normal(size=12)
    v /= np.linalg.norm(v)
    short = landscape.lanczos(loss, params, num_steps=4, v0=as_tree(v))
    nodes, weights = np.asarray(short.ritz_values, np.float64), np.asarray(short.ritz_weights, np.float64)
    for p in range(8):
        exact = v @ np.linalg.matrix_power(A, p) @ v
        assert abs(np.sum(weights * nodes ** p) - exact) <= 1e-4 * 10.0 ** p, p
    # A degree-8 moment is not reproduced: the check above can fail.
    exact8 = v @ np.linalg.matrix_power(A, 8) @ v
    assert abs(np.sum(weights * nodes ** 8) - exact8) > 1e-2 * exact8


def test_lanczos_survives_breakdown_when_krylov_space_is_small():
    # Three distinct eigenvalues: the Krylov space of any start vector has dimension ≤ 3, so step 3 breaks down.
    A, _ = rotated(np.repeat([4.0, 1.0, -2.0], 4), seed=3)
    loss = quadratic(A, np.zeros(12))
    res = landscape.lanczos(loss, as_tree(np.zeros(12)), num_steps=4, key=jax.random.key(4))
    assert np.all(np.isfinite(np.asarray(res.ritz_values)))
    assert abs(float(res.betas[2])) == 0.0  # restarted with β = 0
    assert abs(float(res.ritz_weights.sum()) - 1.0) <= 1e-5
    nodes, weights = np.asarray(res.ritz_values), np.asarray(res.ritz_weights)
    support = nodes[weights > 1e-6]
    assert np.allclose(np.sort(support), [-2.0, 1.0, 4.0], atol=1e-4)
    # T stays Vᵀ A V for an orthonormal V, so every Ritz value (the restart block's too) lies in [λ_min, λ_max]
    assert np.all((nodes >= -2.0 - 1e-4) & (nodes <= 4.0 + 1e-4))


def test_slq_density_integrates_to_one_and_its_mean_is_the_trace_estimate():
    A, loss = QUAD_A, QUAD
    probes = 8
    key = jax.random.key(7)
    sd = landscape.spectral_density(loss, as_tree(np.zeros(12)), num_steps=12, num_probes=probes, key=key)
    grid, dens = np.asarray(sd.grid, np.float64), np.asarray(sd.density, np.float64)
    # The grid covers every node ± 6σ (≤ 2e-9 of the mass outside) with σ/spacing ≈ 30: the trapezoid rule is
    # accurate far below 1e-4.
    assert abs(np.trapezoid(dens, grid) - 1.0) <= 1e-4
    assert abs(np.trapezoid(grid * dens, grid) - float(sd.moment(1))) <= 1e-4 * np.abs(SPECTRUM).max()
    # Deterministic: each probe's Gauss rule gives zᵀAz/n for its normalised Rademacher probe z (Hutchinson).
    hutchinson = []
    for p in range(probes):
        z = flat(landscape.random_direction(jax.random.fold_in(key, p), as_tree(np.zeros(12)), kind="rademacher"))
        hutchinson.append(z @ A @ z / 12)
    assert abs(float(sd.moment(1)) - np.mean(hutchinson)) <= 1e-5 * np.abs(SPECTRUM).max()
    # Statistical: Var(zᵀAz)/n² = 2Σ_{i≠j}A_ij²/n² per probe; 4 standard errors (deterministic key, so no flake).
    off = A - np.diag(np.diag(A))
    stderr = np.sqrt(2.0 * np.sum(off ** 2)) / 12 / np.sqrt(probes)
    assert abs(float(sd.moment(1)) - np.trace(A) / 12) <= 4 * stderr


def test_sampling_rule_and_local_lipschitz_on_quadratic():
    A, _ = rotated(SPECTRUM, seed=5)
    b = np.random.default_rng(6).normal(size=12)
    loss = quadratic(A, b)
    center_flat = np.random.default_rng(7).normal(size=12)
    center, r = as_tree(center_flat), 0.3
    key = jax.random.key(11)
    traj = [as_tree(center_flat + 0.1 * k) for k in range(3)]
    est = landscape.local_lipschitz(loss, center, r, n_samples=32, key=key, trajectory=traj)
    sampled = np.asarray(est.sampled)
    for i in range(32):
        x = flat(landscape.sample_in_ball(jax.random.fold_in(key, i), center, r))
        assert np.linalg.norm(x - center_flat) <= r * (1 + 1e-5)
        assert abs(sampled[i] - np.linalg.norm(A @ x + b)) <= 1e-5 * np.linalg.norm(A @ x + b)
    for i, p in enumerate(traj):
        assert abs(float(est.trajectory[i]) - np.linalg.norm(A @ flat(p) + b)) <= 1e-4
    g = A @ center_flat + b
    assert abs(float(est.center) - np.linalg.norm(g)) <= 1e-5 * np.linalg.norm(g)
    # Triangle inequality: sup over the ball of ‖∇L‖ ≤ ‖∇L(c)‖ + ‖A‖·r; every sampled value must respect it.
    assert sampled.max() <= np.linalg.norm(g) + np.abs(SPECTRUM).max() * r + 1e-4
    assert float(est.max) == max(sampled.max(), float(est.center), float(np.max(est.trajectory)))


def test_sphere_samples_reach_the_exact_supremum_in_two_dimensions():
    A = np.array([[3.0, 1.0], [1.0, -2.0]])
    b = np.array([0.5, -1.0])
    A32, b32 = jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32)
    loss = lambda p: 0.5 * p @ A32 @ p + b32 @ p  # noqa: E731
    c, r = np.array([0.2, 0.1]), 0.5
    angles = np.linspace(0.0, 2 * np.pi, 200_001)
    d = r * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    exact_sup = np.max(np.linalg.norm((c + d) @ A + b, axis=1))  # ‖∇L‖ is convex: its max lies on the sphere
    est = landscape.local_lipschitz(loss, jnp.asarray(c, jnp.float32), r, n_samples=2000, where="sphere")
    # 2000 uniform angles leave gaps ≲ 0.03 rad; near the smooth maximum the loss of the max is ≤ ½·f''·gap²,
    # well below 1e-3 relative.
    assert exact_sup * (1 - 1e-3) <= float(est.max) <= exact_sup * (1 + 1e-5)


def test_uniform_ball_sampling_has_the_volume_law():
    # Uniform in the n-ball: P(dist ≤ ρ) = (ρ/r)ⁿ, so (dist/r)ⁿ ~ Uniform(0, 1): mean ½, standard error
    # 0.29/√N; 4 standard errors (deterministic key). Uses the 12-parameter tree of the other quadratic tests.
    center_flat = np.linspace(-1.0, 1.0, 12)
    key, r, N = jax.random.key(2), 0.7, 300
    dist = np.array([np.linalg.norm(flat(landscape.sample_in_ball(jax.random.fold_in(key, i), as_tree(center_flat), r))
                                    - center_flat) for i in range(N)])
    assert np.all(dist <= r * (1 + 1e-5))
    assert abs(np.mean((dist / r) ** 12) - 0.5) <= 4 * 0.29 / np.sqrt(N)
    sphere = landscape.sample_in_ball(key, as_tree(center_flat), r, where="sphere")
    assert np.linalg.norm(flat(sphere) - center_flat) == pytest.approx(r, rel=1e-5)
    with pytest.raises(ValueError):
        landscape.sample_in_ball(key, as_tree(center_flat), r, where="cube")


def test_smoothness_along_points_matches_dense_spectral_norm():
    loss = LOGISTIC
    points = [jax.tree.map(lambda x, s=s: x * s, LOGISTIC_PARAMS) for s in (0.0, 1.0, 3.0)]
    est = landscape.smoothness_along(loss, points, iters=100)
    for i, p in enumerate(points):
        top = np.abs(np.linalg.eigvalsh(logistic_hessian(p))).max()
        assert abs(float(est.values[i]) - top) <= 1e-5 * top
    assert float(est.max) == pytest.approx(float(np.abs(np.asarray(est.values)).max()))
    # Lanczos variant on the quadratic (|λ| largest = 10, from the positive end); 12 steps = n, so exact.
    quad = landscape.smoothness_along(QUAD, [as_tree(np.zeros(12))], method="lanczos", num_steps=12)
    assert float(quad.values[0]) == pytest.approx(10.0, rel=1e-5)
    with pytest.raises(ValueError):
        landscape.smoothness_along(QUAD, [as_tree(np.zeros(12))], method="arnoldi")


# ---------------------------------------------------------------------------------------------------------------
# bounds: Case II and the Case I penalty bound
# ---------------------------------------------------------------------------------------------------------------


def test_case2_smoothness_bound_is_attained_on_a_quadratic_and_holds_inside_the_ball():
    A, q = rotated(np.array([4.0, 2.0, 1.0, 0.5, 0.1]), seed=8)
    theta_star = np.zeros(5)
    theta_s = theta_star + 0.7 * q[:, 0]  # ∇L_s(θ_s) = 2.8·(top eigenvector): the worst case of the bound
    L_s = lambda t: 0.5 * (t - theta_star) @ A @ (t - theta_star)  # noqa: E731
    g = A @ (theta_s - theta_star)
    r = 0.4
    smooth = bounds.case2_smoothness_bound(np.linalg.norm(g), 4.0, r)
    worst = theta_s + r * g / np.linalg.norm(g)
    gap = L_s(worst) - L_s(theta_s)
    assert gap == pytest.approx(smooth.bound, rel=1e-12)
    assert gap > smooth.linear_term + 0.5 * smooth.quadratic_term  # the r² term is needed
    lipschitz = np.linalg.norm(g) + 4.0 * r  # exact sup of ‖∇L_s‖ on the ball (g is along the top eigenvector)
    lip = bounds.case2_lipschitz_bound(lipschitz, r)
    rng = np.random.default_rng(0)
    for _ in range(200):
        d = rng.normal(size=5)
        d *= r * rng.uniform() ** (1 / 5) / np.linalg.norm(d)
        gap = L_s(theta_s + d) - L_s(theta_s)
        assert gap <= smooth.bound + 1e-12 and gap <= lip.bound + 1e-12


def projected_gd(loss, anchor, radius, steps, lr):
    """Projected gradient descent on a pytree loss over the global ball around anchor (float32)."""
    grad = jax.grad(loss)

    def step(_, theta):
        moved = jax.tree.map(lambda t, g: t - lr * g, theta, grad(theta))
        disp = landscape.tree_sub(moved, anchor)
        norm = landscape.tree_norm(disp)
        shrink = jnp.where(norm > radius, radius / norm, 1.0)
        return jax.tree.map(lambda a, d: a + shrink * d, anchor, disp)

    return jax.jit(lambda a: jax.lax.fori_loop(0, steps, step, a))(anchor)


def test_case2_bounds_hold_on_logistic_regression_with_exact_and_estimated_constants():
    Xs, _ = logistic_data(seed=0)
    Xf, yf = logistic_data(seed=3)
    L_s, L_f = LOGISTIC, logistic_loss(Xf, yf)
    theta_s = LOGISTIC_PARAMS
    Xs64 = np.concatenate([np.asarray(Xs, np.float64), np.ones((40, 1))], axis=1)  # the bias is a feature of 1
    Xf64 = np.concatenate([np.asarray(Xf, np.float64), np.ones((40, 1))], axis=1)
    # Global constants of the mean logistic loss: ‖∇‖ ≤ mean‖x̃_i‖ since |σ(z) − y| ≤ 1, and
    # ∇² = X̃ᵀ diag(σ(1−σ)) X̃ / n ⪯ X̃ᵀX̃/(4n).
    lip_s, beta_s = np.mean(np.linalg.norm(Xs64, axis=1)), np.linalg.eigvalsh(Xs64.T @ Xs64 / 160).max()
    lip_f, beta_f = np.mean(np.linalg.norm(Xf64, axis=1)), np.linalg.eigvalsh(Xf64.T @ Xf64 / 160).max()
    g_s = float(landscape.grad_norm(L_s, theta_s))
    g_f = float(landscape.grad_norm(L_f, theta_s))
    for r in (0.05, 0.3, 1.0):
        theta_r = projected_gd(L_f, theta_s, r, steps=3000, lr=1.0 / beta_f)
        assert float(landscape.tree_norm(landscape.tree_sub(theta_r, theta_s))) <= r * (1 + 1e-5)
        gap = float(L_s(theta_r) - L_s(theta_s))
        gain = float(L_f(theta_s) - L_f(theta_r))
        assert gap <= bounds.case2_lipschitz_bound(lip_s, r).bound + 1e-6
        assert gap <= bounds.case2_smoothness_bound(g_s, beta_s, r).bound + 1e-6
        cap = bounds.case2_capability_gain_bounds(lip_f, r, g_f, beta_f)
        # 3000 steps of 1/β on a convex problem: the gain is within float32 noise (1e-6) of the ball optimum.
        assert cap.lower - 1e-6 <= gain <= cap.upper + 1e-6
        # The estimators are lower estimates of the global sup, so they must not exceed the analytic constants.
        est = landscape.local_lipschitz(L_s, theta_s, r, n_samples=8, trajectory=[theta_r])
        assert float(est.max) <= lip_s * (1 + 1e-5)
        smooth = landscape.smoothness_along(L_s, [theta_s, theta_r], iters=100)
        assert float(smooth.max) <= beta_s * (1 + 1e-5)


def test_case1_penalty_bound_holds_and_its_similarity_term_is_needed():
    """L_f = ½‖θ − a‖², L_s' = ½(θ − b)ᵀB(θ − b), L_s = L_s' + δ·sin(uᵀθ + φ): |L_s − L_s'| ≤ δ everywhere, and
    u, φ are chosen so that the difference is −δ at θ_s and +δ at θ_λ, which makes the 2δ term exactly active."""
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=4), rng.normal(size=4)
    B = np.diag([3.0, 1.0, 0.5, 0.2])
    theta_s = b.copy()
    L_f = lambda t: 0.5 * np.sum((t - a) ** 2)  # noqa: E731
    L_p = lambda t: 0.5 * (t - b) @ B @ (t - b)  # noqa: E731
    needed = 0
    for lam in (0.1, 1.0, 10.0):
        theta_lam = np.linalg.solve(np.eye(4) + lam * B, a + lam * B @ b)  # ∇(L_f + λL_s') = 0
        step = theta_lam - theta_s
        u = np.pi * step / (step @ step)  # uᵀ(θ_λ − θ_s) = π
        phi = -np.pi / 2 - u @ theta_s  # sin = −1 at θ_s, +1 at θ_λ
        for delta in (0.0, 0.05, 0.5):
            L_s = lambda t, u=u, phi=phi, delta=delta: L_p(t) + delta * np.sin(u @ t + phi)  # noqa: E731
            gap = L_s(theta_lam) - L_s(theta_s)
            d_hat = bounds.similarity_term([L_s(theta_s), L_s(theta_lam)], [L_p(theta_s), L_p(theta_lam)])
            assert d_hat == pytest.approx(delta, abs=1e-12)
            res = bounds.case1_penalty_bound(lam, L_f(theta_s), 0.0, d_hat)
            assert gap <= res.bound + 1e-12
            assert res.bound - gap == pytest.approx(res.penalty_term - (L_p(theta_lam) - L_p(theta_s)), abs=1e-12)
            if 2 * delta > res.penalty_term:
                assert gap > res.penalty_term  # without 2δ the statement would be false here
                needed += 1
            cap = bounds.case1_capability_bound(lam, L_p(a), 0.0)
            assert L_f(theta_lam) <= cap.bound + 1e-12
    assert needed >= 1
    with pytest.raises(ValueError):
        bounds.case1_penalty_bound(0.0, 1.0, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# bounds: distribution space (R1–R3, R6)
# ---------------------------------------------------------------------------------------------------------------


def random_instance(rng, C=6, Y=4):
    def masses():
        p = rng.dirichlet(np.ones(C))
        p[rng.uniform(size=C) < 0.3] = 0.0  # zero masses exercise the w = 0, w = 1 and untouched branches
        return p / p.sum() if p.sum() > 0 else np.full(C, 1.0 / C)

    conds = lambda: rng.dirichlet(np.full(Y, 0.7), size=C)  # noqa: E731
    return masses(), conds(), masses(), conds(), masses(), conds(), conds()


def test_mixture_optimum_minimises_the_penalised_objective():
    rng = np.random.default_rng(10)
    for _ in range(20):
        _, _, p_f, pi_f, p_p, pi_p, aligned = random_instance(rng)
        lam = float(np.exp(rng.uniform(-3, 3)))
        P = bounds.mixture_optimum(p_f, pi_f, p_p, pi_p, lam, aligned)
        np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-12)

        def objective(Q):
            return -np.sum((p_f[:, None] * pi_f + lam * p_p[:, None] * pi_p) * np.log(Q))

        best = objective(P)
        for _ in range(20):
            Q = 0.9 * P + 0.1 * rng.dirichlet(np.ones(4), size=6)
            assert objective(Q) >= best - 1e-12
        untouched = (p_f + lam * p_p) == 0
        np.testing.assert_array_equal(P[untouched], aligned[untouched])


def test_distribution_space_bounds_hold_on_random_instances():
    rng = np.random.default_rng(11)
    worst = {"conv": -np.inf, "floor": -np.inf, "cap_overlap": -np.inf, "cap_conv": -np.inf, "frontier": -np.inf}
    for _ in range(300):
        p_s, pi_s, p_f, pi_f, p_p, pi_p, aligned = random_instance(rng)
        lam = float(np.exp(rng.uniform(-4, 4)))
        s = bounds.case1_mixture_safety_bounds(p_s, pi_s, p_f, pi_f, p_p, pi_p, lam, aligned)
        c = bounds.case1_mixture_capability_bounds(p_f, pi_f, p_p, pi_p, lam, aligned)
        P = bounds.mixture_optimum(p_f, pi_f, p_p, pi_p, lam, aligned)
        assert s.exact == pytest.approx(bounds.expected_kl(p_s, pi_s, P))
        assert s.floor_bound == pytest.approx(s.similarity_term + s.overlap_term + s.untouched_term)
        worst["conv"] = max(worst["conv"], s.exact - s.convexity_bound)
        worst["floor"] = max(worst["floor"], s.exact - s.floor_bound)
        worst["cap_overlap"] = max(worst["cap_overlap"], c.exact - c.overlap_bound)
        worst["cap_conv"] = max(worst["cap_conv"], c.exact - c.convexity_bound)
        frontier = bounds.tradeoff_frontier(p_s, pi_s, p_f, pi_f).bound
        for model in (P, rng.dirichlet(np.ones(4), size=6)):
            total = bounds.expected_kl(p_s, pi_s, model) + bounds.expected_kl(p_f, pi_f, model)
            worst["frontier"] = max(worst["frontier"], frontier - total)
    assert all(v <= 1e-12 for v in worst.values()), worst


def test_distribution_space_bounds_are_tight_where_the_proofs_say():
    rng = np.random.default_rng(12)
    p_s, pi_s, _, pi_f, _, pi_p, _ = random_instance(rng)
    p_s = np.full(6, 1 / 6)
    # (1) capability data on other contexts (w = 0 on safety contexts): the floor bound is an equality.
    p_f_disjoint = np.zeros(6)
    s = bounds.case1_mixture_safety_bounds(p_s, pi_s, p_f_disjoint, pi_f, p_s, pi_p, 1.0, pi_s)
    assert s.exact == pytest.approx(s.floor_bound, rel=1e-12) and s.overlap_term == 0.0
    assert s.similarity_term == pytest.approx(bounds.proxy_dissimilarity(p_s, pi_s, pi_p), rel=1e-12)
    # (2) π_f = π_s': the mixture is π_s' itself, so the convexity bound is an equality.
    s = bounds.case1_mixture_safety_bounds(p_s, pi_s, p_s, pi_p, p_s, pi_p, 0.7, pi_s)
    assert s.exact == pytest.approx(s.convexity_bound, rel=1e-12)
    # (3) p_s = p_f and P = (π_s + π_f)/2: the frontier bound is an equality; overlap is 1.
    front = bounds.tradeoff_frontier(p_s, pi_s, p_s, pi_f)
    M = 0.5 * (pi_s + pi_f)
    total = bounds.expected_kl(p_s, pi_s, M) + bounds.expected_kl(p_s, pi_f, M)
    assert total == pytest.approx(front.bound, rel=1e-12) and front.overlap == pytest.approx(1.0)
    # (4) On a shared context the two overlap terms cost ≥ log 4 for every λ, with equality at w = ½ (λ = p_f/p_s').
    for lam in (0.01, 0.5, 1.0, 2.0, 100.0):
        w = bounds.mixture_weights(np.array([0.5]), np.array([0.5]), lam)[0]
        assert -np.log(w) - np.log1p(-w) >= np.log(4.0) - 1e-12
    w = bounds.mixture_weights(np.array([0.5]), np.array([0.5]), 1.0)[0]
    assert -np.log(w) - np.log1p(-w) == pytest.approx(np.log(4.0), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------------------------


def test_synthetic_dials_are_exact():
    for omega in (0.0, 0.3, 1.0):
        pr = synthetic.make_problem(overlap=omega, proxy_shift=0.4)
        assert bounds.context_overlap(pr.p_safety, pr.p_capability) == pytest.approx(omega, abs=1e-12)
        for arr in (pr.p_safety, pr.p_capability, pr.p_proxy):
            assert arr.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(synthetic.probabilities(pr.theta_aligned), pr.pi_safety, atol=1e-12)
    base, same = synthetic.make_problem(proxy_shift=0.0), synthetic.make_problem(proxy_shift=0.0, overlap=0.5)
    np.testing.assert_array_equal(base.pi_proxy, base.pi_safety)
    np.testing.assert_array_equal(base.pi_capability, same.pi_capability)  # the seed fixes everything but the dial


def test_case1_closed_form_matches_gradient_descent():
    with jax.enable_x64(True):
        worst = 0.0
        for overlap, shift, lam in [(0.0, 0.3, 0.1), (0.5, 0.3, 1.0), (0.5, 0.0, 10.0), (1.0, 0.8, 0.3)]:
            pr = synthetic.make_problem(overlap=overlap, proxy_shift=shift, seed=1)
            run = synthetic.case1_gradient_descent(pr, lam)
            assert run.residual <= 1e-10  # converged, not stopped by max_steps
            closed = synthetic.case1_closed_form(pr, lam)
            worst = max(worst, np.abs(synthetic.probabilities(run.theta) - closed).max())
            # the closed form is also the optimum in logits: θ_x = log t_x up to a per-context shift
            centred = run.theta - run.theta.mean(axis=1, keepdims=True)
            np.testing.assert_allclose(centred, np.log(closed) - np.log(closed).mean(axis=1, keepdims=True),
                                       atol=1e-6)
        # measured ≈ 4e-9; gradient norm 1e-10 and the smallest curvature ~0.005 bound the error by ~2e-8
        assert worst <= 1e-5


def test_case1_trends_over_lambda_proxy_similarity_and_overlap():
    pr = synthetic.make_problem(overlap=0.5, proxy_shift=0.0)
    lams = np.logspace(-2, 2, 9)
    curve = synthetic.lambda_sweep(pr, lams)
    assert np.all(np.diff(curve.safety_gap) < 0) and np.all(np.diff(curve.capability_gap) > 0)
    # closer proxy → smaller safety gap (guaranteed without overlap; checked here with and without)
    shifts = np.linspace(0.0, 1.0, 6)
    for omega in (0.0, 0.5):
        sweep = synthetic.proxy_shift_sweep(shifts, lam=1.0, overlap=omega)
        assert np.all(np.diff(sweep.safety_gap) > 0), omega
    no_overlap = synthetic.proxy_shift_sweep([0.0], lam=1.0, overlap=0.0)
    # identical proxy and disjoint contexts: both gaps vanish at once (no trade-off at all)
    assert no_overlap.safety_gap[0] == pytest.approx(0.0, abs=1e-15)
    assert no_overlap.capability_gap[0] == pytest.approx(0.0, abs=1e-15)
    # more overlap → larger safety gap at fixed λ and a larger best achievable G_s + G_f
    omegas = np.linspace(0.0, 1.0, 6)
    ov = synthetic.overlap_sweep(omegas, lam=1.0)
    assert np.all(np.diff(ov.curve.safety_gap) > 0)
    assert np.all(np.diff(ov.best_total_gap) > 0)
    assert np.all(ov.frontier_bound <= ov.best_total_gap + 1e-12)
    assert ov.best_total_gap[0] == pytest.approx(0.0, abs=1e-15)


def test_case2_projected_descent_stays_in_ball_obeys_bounds_and_trades_worse_than_case1():
    from safetrade import tradeoff

    pr = synthetic.make_problem(overlap=0.5, proxy_shift=0.0, seed=2)
    radii = np.array([0.1, 0.3, 1.0, 3.0])
    with jax.enable_x64(True):
        comparison = synthetic.compare_strategies(pr, radii)
        for r in radii:
            run = synthetic.case2_projected_descent(pr, float(r))
            assert run.residual <= 1e-9
            assert np.linalg.norm(run.theta - pr.theta_aligned) <= r * (1 + 1e-12)
    # the projection rule is the training code's (tradeoff.case2_projection, one global ball)
    anchor = jnp.asarray(pr.theta_aligned, jnp.float32)
    outside = anchor + jnp.asarray(np.random.default_rng(0).normal(size=anchor.shape), jnp.float32)
    for r in (0.5, 100.0):
        tx = tradeoff.case2_projection({"t": anchor}, r)
        updates, _ = tx.update({"t": jnp.zeros_like(outside)}, tx.init({"t": outside}), {"t": outside})
        expected = optax.apply_updates({"t": outside}, updates)["t"]
        np.testing.assert_allclose(np.asarray(synthetic.project_to_ball(outside, anchor, r)), np.asarray(expected),
                                   atol=1e-6)
    curve = comparison.case2
    assert np.all(np.diff(curve.capability_gap) < 0)  # nested balls: the ball optimum can only improve
    # Exact global constants of L_s for the softmax model: ‖∇L_s‖ ≤ √2‖p_s‖₂, ‖∇²L_s‖ ≤ max p_s / 2, ∇L_s(θ_s) = 0.
    lip = np.sqrt(2.0) * np.linalg.norm(pr.p_safety)
    beta = pr.p_safety.max() / 2
    for r, gap in zip(radii, curve.safety_gap):
        assert gap <= bounds.case2_lipschitz_bound(lip, r).bound
        assert gap <= bounds.case2_smoothness_bound(0.0, beta, r).bound
    # Perfect proxy: Case I traces the Pareto frontier, so at matched safety gap Case II's capability gap is larger.
    assert np.all(np.isfinite(comparison.excess))
    assert np.all(comparison.excess > 1e-3)


# ---------------------------------------------------------------------------------------------------------------
# check: bound vs measured
# ---------------------------------------------------------------------------------------------------------------


def test_check_flags_violations_and_writes_table_and_png(tmp_path):
    from theory import check

    pr = synthetic.make_problem(overlap=0.5, proxy_shift=0.3, seed=3)
    with jax.enable_x64(True):
        runs = synthetic.case2_runs(pr, [0.2, 1.0]) + synthetic.case1_runs(pr, [0.1, 1.0, 10.0])
    checks = check.check_runs(runs)
    assert len(checks) == 2 * 3 + 3  # lipschitz, smoothness, capability gain per Case II run; penalty per Case I
    assert not any(c.violated for c in checks), check.format_table(checks)
    # A run claiming a safety gap above L·r must be flagged on exactly that bound; a tolerance can absorb noise.
    fake = {"name": "bad", "strategy": "case2", "distance": 0.5, "safety_gap": 1.2, "lipschitz_s": 2.0}
    flagged = check.check_runs([fake])
    assert [(c.bound_name, c.violated) for c in flagged] == [("lipschitz", True)]
    assert flagged[0].slack == pytest.approx(-0.2)
    assert not check.check_runs([fake], tolerance=0.25)[0].violated
    table = check.format_table(checks + flagged)
    assert "**VIOLATED**" in table and "10 checks, 1 violated." in table
    assert check.summary(checks + flagged)["lipschitz"]["violated"] == 1
    out = tmp_path / "bounds.png"
    check.plot(checks + flagged, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        check.check_runs([{"strategy": "sft"}])
