"""Loss-landscape estimators over parameter pytrees: gradient norms, Hessian-vector products, top Hessian
eigenvalues, Lanczos / stochastic Lanczos quadrature, local Lipschitz and smoothness estimates.

Every function takes `loss_fn`, a pure scalar function of a params pytree (for the LLM:
`lambda p: losses.lm_loss(cfg, p, batch)`), and never flattens the parameters into one vector: vectors are pytrees
shaped like the params, and inner products are summed leaf by leaf, so the same code runs on a 3-parameter
quadratic in a test and on a sharded LLM (each leaf keeps its sharding).

Conventions
- Distances and norms are the global Euclidean norm over all leaves, ‖θ‖² = Σ_leaves Σ θ², computed in (at least)
  float32, exactly as safetrade/tradeoff/case2.py measures ‖θ − θ_aligned‖ for the Case II ball.
- Direction vectors are kept in the accumulation dtype (float32 for bf16/float32 params, float64 under x64) and are
  cast to each leaf's dtype only where jax.jvp requires it, so for bf16 params the HVP itself is a bf16 computation.
- `loss_fn` is a static argument of the jitted internals: pass the *same* function object on repeated calls, or each
  call retraces.
- Power iteration returns the eigenvalues of largest *magnitude* (signed Rayleigh quotients). That is the quantity a
  smoothness constant needs (β-smoothness ⇔ ‖∇²L‖₂ ≤ β), not the largest algebraic eigenvalue.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

LossFn = Callable[[Any], jax.Array]
PyTree = Any


# ---------------------------------------------------------------------------------------------------------------
# Pytree vector algebra (leafwise, no ravel)
# ---------------------------------------------------------------------------------------------------------------

def accumulation_dtype(dtype) -> jnp.dtype:
    """At least float32: bf16 params get float32 direction vectors and dot products; float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Σ over leaves of ⟨a_leaf, b_leaf⟩, accumulated in at least float32."""
    parts = [jnp.vdot(x.astype(accumulation_dtype(x.dtype)).ravel(), y.astype(accumulation_dtype(y.dtype)).ravel())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    return functools.reduce(jnp.add, parts)


def tree_norm(a: PyTree) -> jax.Array:
    return jnp.sqrt(tree_vdot(a, a))


def tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """alpha·x + y, leafwise."""
    return jax.tree.map(lambda xi, yi: alpha * xi + yi, x, y)


def tree_scale(alpha, x: PyTree) -> PyTree:
    return jax.tree.map(lambda xi: alpha * xi, x)


def tree_sub(x: PyTree, y: PyTree) -> PyTree:
    """x − y, leafwise, in the accumulation dtype (a bf16 difference of nearby weights would lose its digits)."""
    def sub(a, b):
        return a.astype(accumulation_dtype(a.dtype)) - b.astype(accumulation_dtype(b.dtype))

    return jax.tree.map(sub, x, y)


def tree_size(tree: PyTree) -> int:
    """Total number of scalars (static)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def random_direction(key: jax.Array, like: PyTree, kind: str = "normal") -> PyTree:
    """A random pytree shaped like `like` in the accumulation dtype: i.i.d. N(0,1) or Rademacher (±1) entries."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, x in zip(keys, leaves, strict=True):
        dtype = accumulation_dtype(x.dtype)
        if kind == "normal":
            out.append(jax.random.normal(k, x.shape, dtype))
        elif kind == "rademacher":
            out.append(jax.random.rademacher(k, x.shape, dtype))
        else:
            raise ValueError(f"unknown direction kind {kind!r}; use 'normal' or 'rademacher'")
    return treedef.unflatten(out)


def stacked_random_directions(key: jax.Array, like: PyTree, count: int, kind: str = "normal") -> PyTree:
    """`count` random directions as one pytree whose leaves carry a leading axis of size count."""
    return jax.vmap(lambda k: random_direction(k, like, kind))(jax.random.split(key, count))


def normalized(v: PyTree) -> PyTree:
    # The floor only matters for an exactly zero vector, where it keeps the result finite (zero) instead of NaN.
    return tree_scale(1.0 / jnp.maximum(tree_norm(v), 1e-30), v)


# ---------------------------------------------------------------------------------------------------------------
# Gradient norm and Hessian-vector product
# ---------------------------------------------------------------------------------------------------------------

def grad_norm(loss_fn: LossFn, params: PyTree) -> jax.Array:
    """‖∇L(θ)‖₂ over all leaves."""
    return tree_norm(jax.grad(loss_fn)(params))


def hvp(loss_fn: LossFn, params: PyTree, v: PyTree) -> PyTree:
    """∇²L(θ)·v as forward-over-reverse (jvp of grad): one forward and one reverse pass with tangents, no Hessian.

    Forward-over-reverse is the cheapest exact HVP in JAX (cf. the JAX autodiff cookbook): memory of one gradient
    evaluation, no materialised Hessian. The result is returned in the accumulation dtype. Jit-able as
    `jax.jit(hvp, static_argnums=0)`.
    """
    tangent = jax.tree.map(lambda p, t: t.astype(p.dtype), params, v)  # jvp needs tangent dtype == primal dtype
    _, out = jax.jvp(jax.grad(loss_fn), (params,), (tangent,))
    return jax.tree.map(lambda o: o.astype(accumulation_dtype(o.dtype)), out)


# ---------------------------------------------------------------------------------------------------------------
# Power iteration with deflation
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Eigenpairs:
    """Dominant eigenpairs of ∇²L(θ), in order of decreasing |λ|.

    eigenvectors is one pytree whose leaves carry a leading axis of size k (`vector(i)` slices one out).
    residuals[i] = ‖H u_i − λ_i u_i‖ with H restricted to the complement of the earlier eigenvectors: small relative
    to |λ_i| means the pair has converged; a large one flags a small spectral gap or ±λ of equal size.
    """

    eigenvalues: jax.Array  # [k]
    eigenvectors: PyTree  # leaves [k, ...], unit norm each
    residuals: jax.Array  # [k]

    def vector(self, i: int) -> PyTree:
        return jax.tree.map(lambda x: x[i], self.eigenvectors)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("iters",))
def _power_iteration(loss_fn, params, starts, *, iters):
    k = jax.tree.leaves(starts)[0].shape[0]
    found = jax.tree.map(jnp.zeros_like, starts)
    slots = jnp.arange(k)

    def one_pair(i, carry):
        found, values, residuals = carry
        earlier = slots < i
        # Deflation by projection: iterate with P H P, P the projector onto the complement of the pairs already
        # found. Re-projecting every step (not only the start vector) keeps rounding errors from regrowing the
        # earlier, larger eigendirections.
        def deflated_hvp(v):
            return _orthogonalize(hvp(loss_fn, params, v), found, earlier)

        v0 = normalized(_orthogonalize(jax.tree.map(lambda s: s[i], starts), found, earlier))
        v = jax.lax.fori_loop(0, iters, lambda _, v: normalized(deflated_hvp(v)), v0)
        v = normalized(_orthogonalize(v, found, earlier))
        hv = deflated_hvp(v)
        lam = tree_vdot(v, hv)
        residual = tree_norm(tree_axpy(-lam, v, hv))
        found = jax.tree.map(lambda b, x: b.at[i].set(x), found, v)
        return found, values.at[i].set(lam), residuals.at[i].set(residual)

    dtype = jax.tree.leaves(starts)[0].dtype
    # One compiled body for all k pairs (a Python loop would unroll k copies of the HVP graph into the program).
    found, values, residuals = jax.lax.fori_loop(0, k, one_pair, (found, jnp.zeros(k, dtype), jnp.zeros(k, dtype)))
    return values, found, residuals


def top_eigenvalues(loss_fn: LossFn, params: PyTree, k: int = 1, iters: int = 100,
                    key: jax.Array | None = None) -> Eigenpairs:
    """The k Hessian eigenvalues of largest magnitude at θ, by power iteration with deflation.

    Each pair costs `iters` HVPs. The error of the i-th Rayleigh quotient decays like (|λ_{i+1}|/|λ_i|)^(2·iters),
    so a small gap needs many iterations; check `residuals`. Memory: k parameter-sized vectors.
    """
    key = jax.random.key(0) if key is None else key
    # Start vectors are drawn outside the jitted solver: the PRNG's compile is then shared by every loss_fn with the
    # same parameter shapes instead of being repeated inside each loss-specific program.
    starts = stacked_random_directions(key, params, k)
    values, vectors, residuals = _power_iteration(loss_fn, params, starts, iters=iters)
    return Eigenpairs(values, vectors, residuals)


# ---------------------------------------------------------------------------------------------------------------
# Lanczos and stochastic Lanczos quadrature
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LanczosResult:
    """m-step Lanczos on ∇²L(θ) from a unit start vector v.

    T = tridiag(betas, alphas, betas) = Vᵀ H V. Its eigenvalues (Ritz values) approximate the extreme eigenvalues
    of H; with weights τ_j = (first component of T's j-th eigenvector)², the pairs (ritz_values, ritz_weights) are
    the m-node Gauss quadrature rule of the spectral measure Σ_i (vᵀq_i)² δ_{λ_i}: Σ_j τ_j f(θ_j) = vᵀ f(H) v
    exactly for every polynomial f of degree ≤ 2m − 1.
    """

    alphas: jax.Array  # [m] diagonal of T
    betas: jax.Array  # [m - 1] off-diagonal of T (0 where the Krylov space was exhausted and restarted)
    ritz_values: jax.Array  # [m] ascending
    ritz_weights: jax.Array  # [m], sum to 1

    @property
    def tridiagonal(self) -> jax.Array:
        return jnp.diag(self.alphas) + jnp.diag(self.betas, 1) + jnp.diag(self.betas, -1)


def _stacked_dot(basis: PyTree, w: PyTree) -> jax.Array:
    """[m] inner products of each stacked basis vector (leading axis of every leaf) with w."""
    parts = [jnp.tensordot(b.reshape(b.shape[0], -1), x.astype(b.dtype).ravel(), axes=1)
             for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(w), strict=True)]
    return functools.reduce(jnp.add, parts)


def _stacked_combine(basis: PyTree, coeffs: jax.Array) -> PyTree:
    """Σ_j coeffs[j]·basis[j]."""
    return jax.tree.map(lambda b: jnp.tensordot(coeffs.astype(b.dtype), b, axes=1), basis)


def _orthogonalize(w: PyTree, basis: PyTree, used: jax.Array) -> PyTree:
    """w minus its projection on the basis vectors flagged in `used`; done twice ("twice is enough",
    Kahan–Parlett), since one classical Gram–Schmidt pass loses orthogonality once w is nearly in the span."""
    for _ in range(2):
        coeffs = jnp.where(used, _stacked_dot(basis, w), 0.0)
        w = jax.tree.map(jnp.subtract, w, _stacked_combine(basis, coeffs))
    return w


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("num_steps",))
def _lanczos(loss_fn, params, v0, spare, *, num_steps):
    m = num_steps
    v0 = normalized(v0)
    basis = jax.tree.map(lambda x: jnp.zeros((m,) + x.shape, x.dtype), v0)
    steps = jnp.arange(m)

    def body(i, carry):
        basis, v, v_prev, beta_prev, alphas, betas = carry
        basis = jax.tree.map(lambda b, x: b.at[i].set(x), basis, v)
        w = hvp(loss_fn, params, v)
        hv_norm = tree_norm(w)
        alpha = tree_vdot(v, w)
        w = tree_axpy(-alpha, v, tree_axpy(-beta_prev, v_prev, w))
        # Full reorthogonalisation against every stored vector: without it Lanczos loses orthogonality as Ritz
        # values converge and produces spurious copies ("ghosts") of the extreme eigenvalues.
        used = steps <= i
        w = _orthogonalize(w, basis, used)
        beta = tree_norm(w)
        # Breakdown: the Krylov space of v0 is H-invariant (e.g. H has fewer distinct eigenvalues than m). The
        # Gauss rule is then already exact; continue from a fresh random vector orthogonal to the basis with
        # β = 0, which makes T block-diagonal and gives the new block zero quadrature weight.
        # The test is relative to ‖Hv‖; sqrt(eps) (3e-4 in float32) separates rounding noise from a genuine new
        # direction, and dropping a coupling that small moves the Ritz values by at most sqrt(eps)·‖Hv‖.
        broke = beta <= _breakdown_tol(v) * jnp.maximum(hv_norm, 1e-30)

        def restart(_):
            # A fresh direction without a PRNG in the loop: the spare random vector, cyclically shifted by i so
            # that repeated restarts do not retry the same vector (a shifted Gaussian vector is, with probability
            # 1, not in the span of the basis).
            fresh = jax.tree.map(lambda x: jnp.roll(x, i), spare)
            return normalized(_orthogonalize(fresh, basis, used)), jnp.zeros_like(beta)

        def keep(_):
            return tree_scale(1.0 / jnp.maximum(beta, 1e-30), w), beta

        v_next, beta = jax.lax.cond(broke, restart, keep, None)
        return basis, v_next, v, beta, alphas.at[i].set(alpha), betas.at[i].set(beta)

    dtype = jax.tree.leaves(v0)[0].dtype
    zeros = jax.tree.map(jnp.zeros_like, v0)
    carry = (basis, v0, zeros, jnp.zeros((), dtype), jnp.zeros(m, dtype), jnp.zeros(m, dtype))
    _, _, _, _, alphas, betas = jax.lax.fori_loop(0, m, body, carry)
    betas = betas[: m - 1]
    tri = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    ritz, vecs = jnp.linalg.eigh(tri)
    return alphas, betas, ritz, vecs[0] ** 2


def _breakdown_tol(v: PyTree) -> float:
    return math.sqrt(float(jnp.finfo(jax.tree.leaves(v)[0].dtype).eps))


def lanczos(loss_fn: LossFn, params: PyTree, num_steps: int, key: jax.Array | None = None,
            v0: PyTree | None = None) -> LanczosResult:
    """`num_steps` steps of Lanczos with full reorthogonalisation on ∇²L(θ), from v0 (default: a random Gaussian
    direction from `key`).

    Memory: the basis keeps num_steps vectors the size of the params (in float32 for bf16/float32 params), so for a
    135M-parameter model 30 steps hold ~16 GB. num_steps is clipped to the number of parameters.
    """
    key = jax.random.key(0) if key is None else key
    steps = min(num_steps, tree_size(params))
    if v0 is None:
        v0 = random_direction(jax.random.fold_in(key, 1), params)
    v0 = jax.tree.map(lambda x, p: x.astype(accumulation_dtype(p.dtype)), v0, params)
    spare = random_direction(jax.random.fold_in(key, 2), params)  # only used if the Krylov space is exhausted
    return LanczosResult(*_lanczos(loss_fn, params, v0, spare, num_steps=steps))


@dataclasses.dataclass(frozen=True)
class SpectralDensity:
    """SLQ estimate of the Hessian's eigenvalue density φ(t) ≈ (1/n) Σ_i δ(t − λ_i), Gaussian-broadened.

    nodes/weights: each probe's Gauss rule ([probes, m]); the un-broadened estimate of ∫ f dφ is
    mean over probes of Σ_j weights·f(nodes). `density` is that mixture of N(node, sigma²) evaluated on `grid`.
    """

    grid: jax.Array
    density: jax.Array
    nodes: jax.Array
    weights: jax.Array
    sigma: float

    def moment(self, power: int) -> jax.Array:
        """Quadrature estimate of (1/n)·tr(Hᵖ) (exact in expectation over probes for power ≤ 2m − 1)."""
        return jnp.mean(jnp.sum(self.weights * self.nodes ** power, axis=-1))


def broadened_density(nodes: jax.Array, weights: jax.Array, grid: jax.Array, sigma: float) -> jax.Array:
    """Σ weights·N(grid; node, σ²), averaged over the leading (probe) axis of nodes/weights."""
    nodes = jnp.reshape(nodes, (-1, nodes.shape[-1]))
    weights = jnp.reshape(weights, nodes.shape)
    z = (grid[:, None, None] - nodes[None]) / sigma
    kernel = jnp.exp(-0.5 * z * z) / (sigma * jnp.sqrt(2.0 * jnp.pi))
    return jnp.mean(jnp.sum(weights[None] * kernel, axis=-1), axis=-1)


def spectral_density(loss_fn: LossFn, params: PyTree, num_steps: int = 30, num_probes: int = 4,
                     key: jax.Array | None = None, *, grid: jax.Array | None = None, num_points: int = 1024,
                     sigma: float | None = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Golub–Meurant; Ghorbani et al. 2019) for the Hessian spectrum at θ.

    For a unit probe v uniform on the sphere (a normalised Rademacher or Gaussian vector), E[vᵀ f(H) v] = tr f(H)/n;
    the m-step Lanczos Gauss rule computes vᵀ f(H) v exactly for polynomials of degree ≤ 2m − 1, and each probe's
    nodes/weights are averaged. Rademacher probes are used: for f(H) = H their trace estimate has variance
    (2/n²)·Σ_{i≠j} H_ij² (zero for a diagonal Hessian), below the Gaussian's.

    sigma: Gaussian broadening; default 1% of the spread of all nodes (or of their magnitude when the spread is 0).
    grid: default `num_points` points covering every node ± 6σ, so at most ~2e-9 of the mass falls outside and the
    density integrates to 1 up to quadrature error on the grid.
    """
    key = jax.random.key(0) if key is None else key
    nodes, weights = [], []
    for p in range(num_probes):
        probe = random_direction(jax.random.fold_in(key, p), params, kind="rademacher")
        result = lanczos(loss_fn, params, num_steps, key=jax.random.fold_in(key, p + num_probes), v0=probe)
        nodes.append(result.ritz_values)
        weights.append(result.ritz_weights)
    nodes, weights = jnp.stack(nodes), jnp.stack(weights)
    if sigma is None:
        lo, hi = float(nodes.min()), float(nodes.max())
        spread = hi - lo if hi > lo else max(abs(hi), abs(lo), 1.0)
        sigma = 0.01 * spread
    if grid is None:
        grid = jnp.linspace(float(nodes.min()) - 6 * sigma, float(nodes.max()) + 6 * sigma, num_points,
                            dtype=nodes.dtype)
    return SpectralDensity(grid, broadened_density(nodes, weights, grid, sigma), nodes, weights, float(sigma))


# ---------------------------------------------------------------------------------------------------------------
# Local Lipschitz and smoothness estimates
# ---------------------------------------------------------------------------------------------------------------

def sample_in_ball(key: jax.Array, center: PyTree, radius, where: str = "ball") -> PyTree:
    """One point of B(center, r) (where='ball') or of its boundary sphere (where='sphere'), uniformly.

    Rule: the direction u = g/‖g‖ with g ~ N(0, I) over all leaves is uniform on the unit sphere (the Gaussian is
    rotation invariant). For the ball the distance is r·U^(1/n), U ~ Uniform(0,1), n = number of parameters, because
    the volume within distance ρ grows like ρⁿ. For large n, U^(1/n) ≈ 1: uniform ball samples lie essentially on
    the sphere (for n = 10⁸ the median distance is r·(1 − 7e-9)).
    """
    if where not in ("ball", "sphere"):
        raise ValueError(f"where must be 'ball' or 'sphere', got {where!r}")
    k_dir, k_rad = jax.random.split(key)
    u = normalized(random_direction(k_dir, center))
    dist = jnp.asarray(radius, jax.tree.leaves(u)[0].dtype)
    if where == "ball":
        dist = dist * jax.random.uniform(k_rad, (), dist.dtype) ** (1.0 / tree_size(center))
    return jax.tree.map(lambda c, d: (c.astype(d.dtype) + dist * d).astype(c.dtype), center, u)


@dataclasses.dataclass(frozen=True)
class LipschitzEstimate:
    """Sampled estimate of sup_{θ ∈ B(center, r)} ‖∇L(θ)‖.

    It is a *lower* estimate of the true local Lipschitz constant (a max over finitely many points), so a bound
    built on it is itself an estimate, not a certificate.
    """

    max: jax.Array
    center: jax.Array  # ‖∇L(center)‖
    sampled: jax.Array  # [n_samples] at the points sample_in_ball(fold_in(key, i), center, r, where)
    trajectory: jax.Array  # [len(trajectory)] at the given points


_jit_grad_norm = jax.jit(grad_norm, static_argnums=0)
# Sampling is compiled apart from the loss: its program depends only on the parameter shapes, so one compile serves
# every loss_fn, and points are drawn one at a time (memory of one extra parameter vector, not n_samples of them).
_jit_sample_in_ball = jax.jit(sample_in_ball, static_argnames=("where",))


def local_lipschitz(loss_fn: LossFn, center: PyTree, radius, n_samples: int = 16, key: jax.Array | None = None,
                    trajectory: Sequence[PyTree] | None = None, where: str = "ball") -> LipschitzEstimate:
    """max ‖∇L‖ over the center, n_samples points drawn by `sample_in_ball` (see its sampling rule), and the
    points of `trajectory` (e.g. the checkpoints of a fine-tuning run; they are used as given, inside the ball
    or not).

    Why both: random points probe the ball isotropically but in high dimension almost never hit the directions
    where the gradient grows fastest; the fine-tuning trajectory is where the bound is actually used.
    """
    key = jax.random.key(0) if key is None else key
    center_norm = _jit_grad_norm(loss_fn, center)
    sampled = jnp.asarray([
        _jit_grad_norm(loss_fn, _jit_sample_in_ball(jax.random.fold_in(key, i), center, radius, where=where))
        for i in range(n_samples)
    ], center_norm.dtype)
    along = jnp.asarray([_jit_grad_norm(loss_fn, p) for p in (trajectory or [])], center_norm.dtype)
    overall = jnp.max(jnp.concatenate([center_norm[None], sampled, along]))
    return LipschitzEstimate(overall, center_norm, sampled, along)


@dataclasses.dataclass(frozen=True)
class SmoothnessEstimate:
    """Dominant Hessian eigenvalue (signed, largest |λ|) at each point; `max` = max |λ|, an estimate of the
    smoothness constant β over the points (a lower estimate of sup ‖∇²L‖₂ over any region containing them).

    residuals: power iteration's ‖Hu − λu‖ per point; for method='lanczos', the Lanczos residual bound
    β_m·|last component of the Ritz vector| is not tracked and residuals are NaN.
    """

    values: jax.Array  # [P]
    residuals: jax.Array  # [P]
    max: jax.Array


def smoothness_along(loss_fn: LossFn, points: Sequence[PyTree], iters: int = 100, key: jax.Array | None = None,
                     method: str = "power", num_steps: int = 20) -> SmoothnessEstimate:
    """Top Hessian eigenvalue (in magnitude) at each point, e.g. along a fine-tuning trajectory or at points from
    sample_in_ball. All points must share one tree structure, so the solver compiles once.

    method='power': `iters` power iterations (memory: one extra vector). It converges slowly when the two
    extreme eigenvalues have similar magnitude and opposite signs, which is common for an LLM away from a minimum
    (check `residuals`). method='lanczos': the extreme Ritz value of `num_steps` Lanczos steps; Ritz values lie
    inside [λ_min, λ_max] and converge to the extremes much faster, at the cost of num_steps stored vectors.
    Both return lower estimates of ‖∇²L‖₂.
    """
    if method not in ("power", "lanczos"):
        raise ValueError(f"method must be 'power' or 'lanczos', got {method!r}")
    key = jax.random.key(0) if key is None else key
    values, residuals = [], []
    for i, p in enumerate(points):
        if method == "power":
            pairs = top_eigenvalues(loss_fn, p, k=1, iters=iters, key=jax.random.fold_in(key, i))
            values.append(pairs.eigenvalues[0])
            residuals.append(pairs.residuals[0])
        else:
            ritz = lanczos(loss_fn, p, num_steps, key=jax.random.fold_in(key, i)).ritz_values
            values.append(jnp.where(jnp.abs(ritz[-1]) >= jnp.abs(ritz[0]), ritz[-1], ritz[0]))
            residuals.append(jnp.asarray(jnp.nan, ritz.dtype))
    values, residuals = jnp.stack(values), jnp.stack(residuals)
    return SmoothnessEstimate(values, residuals, jnp.max(jnp.abs(values)))


# ---------------------------------------------------------------------------------------------------------------
# Along the segment of a finished run: the ingredients of the a-posteriori certificate
# ---------------------------------------------------------------------------------------------------------------

SEGMENT_METHODS = ("forward", "jvp_of_grad")


@dataclasses.dataclass(frozen=True)
class SegmentProfile:
    """φ(t) = L(θ_0 + tΔ) and its first two derivatives at sampled t ∈ [0, 1], Δ = θ_1 − θ_0.

    curvatures[k] = uᵀ∇²L(θ_0 + t_k Δ)u with u = Δ/‖Δ‖, the directional curvature (φ''(t) = ‖Δ‖²·curvature).
    `gap` = φ(1) − φ(0) is the measured change of the loss when t = 1 is sampled.
    """

    ts: tuple[float, ...]
    values: tuple[float, ...]  # φ(t_k)
    slopes: tuple[float, ...]  # φ'(t_k) = ⟨∇L(θ_t), Δ⟩
    curvatures: tuple[float, ...]  # uᵀ∇²L(θ_t)u
    step_norm: float  # ‖Δ‖
    method: str

    @property
    def gap(self) -> float:
        if self.ts[0] != 0.0 or self.ts[-1] != 1.0:
            raise ValueError("gap needs t = 0 and t = 1 among the sampled points")
        return self.values[-1] - self.values[0]


def segment_points(num_points: int) -> tuple[float, ...]:
    """The sampling rule: num_points equally spaced t ∈ [0, 1], both ends included (t = 0 gives the gradient at θ_0
    that the certificate's linear term needs; t = 1 gives the measured gap)."""
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2 (t = 0 and t = 1), got {num_points}")
    return tuple(k / (num_points - 1) for k in range(num_points))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("method",))
def _segment_point(loss_fn, start, delta, t, *, method):
    norm = tree_norm(delta)
    unit = tree_scale(1.0 / jnp.maximum(norm, 1e-30), delta)
    # θ_t in the accumulation dtype, then cast: for bf16 params t·Δ would otherwise lose Δ's low digits.
    point = jax.tree.map(lambda s, d: (s.astype(d.dtype) + t * d).astype(s.dtype), start, delta)
    tangent = jax.tree.map(lambda p, u: u.astype(p.dtype), point, unit)
    if method == "jvp_of_grad":
        # Forward-over-reverse, as landscape.hvp: value, gradient and H·u in one pass.
        (value, grad), (_, hu) = jax.jvp(jax.value_and_grad(loss_fn), (point,), (tangent,))
        slope, curvature = tree_vdot(grad, unit), tree_vdot(unit, hu)
    else:
        # Forward-over-forward on the scalar restriction: the second directional derivative without a backward
        # pass (no activations stored), since only uᵀHu is needed, never H·u itself.
        def along(p):
            return jax.jvp(loss_fn, (p,), (tangent,))

        (value, slope), (_, curvature) = jax.jvp(along, (point,), (tangent,))
    dtype = accumulation_dtype(jnp.result_type(value))
    return value.astype(dtype), (slope * norm).astype(dtype), curvature.astype(dtype), norm


def segment_profile(loss_fn: LossFn, start: PyTree, end: PyTree, num_points: int = 5,
                    method: str = "forward") -> SegmentProfile:
    """φ, φ' and the directional curvature uᵀ∇²L u at `num_points` equally spaced points of the segment start → end.

    Cost per point (bench/theory.py, SmolLM2-135M, 4 × 128 tokens, 2-core CPU): method='forward' (the default),
    forward-over-forward on L(θ + s·u), never runs a backward pass and costs 1.5 gradients; method='jvp_of_grad',
    one forward-over-reverse pass (jvp of value_and_grad, as an HVP), costs 3.2 gradients. Both give the same numbers
    up to rounding (tested); jvp_of_grad is kept as the cross-check that reuses the HVP path.
    One-sidedness: the curvature is *sampled*, so max(curvatures) is a lower estimate of sup_t uᵀ∇²L u on the
    segment, and a certificate built from it (bounds.segment_certificate) is an estimate that can fall below the
    true gap when the curvature peaks between samples.
    """
    if method not in SEGMENT_METHODS:
        raise ValueError(f"method must be one of {SEGMENT_METHODS}, got {method!r}")
    delta = tree_sub(end, start)
    t_dtype = jax.tree.leaves(delta)[0].dtype  # float64 under x64: a float32 t = 1/3 would cost θ_t 8 digits
    out = [_segment_point(loss_fn, start, delta, jnp.asarray(t, t_dtype), method=method)
           for t in segment_points(num_points)]
    values, slopes, curvatures, norms = (tuple(float(x[i]) for x in out) for i in range(4))
    return SegmentProfile(segment_points(num_points), values, slopes, curvatures, norms[0], method)
