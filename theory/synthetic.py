"""The synthetic exact setting: a categorical "language model" on finite contexts, where every gap has a closed form.

Model: θ ∈ R^{C×Y} and p_θ(y|x) = softmax(θ_x)_y, one free logit row per context x ∈ C and response y ∈ Y. This
model class holds every conditional with full support, so the distribution-space results of theory/bounds.py
(assumption A0) apply to it exactly, and gradient descent on θ can be checked against them.

Data (all conditionals defined on every context; masses may be 0):
- original safety data (p_s, π_s); the aligned model is θ_s = log π_s, an exact minimiser of L_s, so the
  parameter-space gap L_s(θ) − L_s(θ_s) and the distribution-space gap E_{p_s} KL(π_s‖p_θ) coincide;
- proxy safety data (p_s' = p_s, π_s' = (1 − ε)·π_s + ε·ν): `proxy_shift` ε ∈ [0, 1] is the similarity dial
  (0: the proxy is the original; 1: a different target ν on the same contexts);
- capability data p_f = (1 − ω)·u_F + ω·p_s, π_f: `overlap` ω ∈ [0, 1] is the context-overlap dial — u_F is spread
  over capability-only contexts, so Σ_x min(p_s, p_f) = ω exactly — and π_f is drawn independently of π_s, so the
  targets conflict on shared contexts.

Case I is solved in closed form (bounds.mixture_optimum) and by gradient descent; Case II by projected gradient
descent onto ‖θ − θ_s‖₂ ≤ r. The sweep functions return safety/capability gaps across λ, ε, ω and r.

Arrays: numpy float64 for the data and closed forms. The gradient-descent solvers run in JAX and follow JAX's dtype
setting: under `jax.enable_x64(True)` they match the closed form to ~1e-8; in float32 the gradient stalls at
rounding level and the match is ~3e-7 (measured on the default instance).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from theory import bounds

# ---------------------------------------------------------------------------------------------------------------
# Problem
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticProblem:
    p_safety: np.ndarray  # [C]
    pi_safety: np.ndarray  # [C, Y], also the aligned behaviour on every context
    p_proxy: np.ndarray  # [C]
    pi_proxy: np.ndarray  # [C, Y]
    p_capability: np.ndarray  # [C]
    pi_capability: np.ndarray  # [C, Y]

    @property
    def theta_aligned(self) -> np.ndarray:
        """θ_s = log π_s: softmax(θ_s) = π_s, the exact minimiser of L_s (unique up to a shift per row)."""
        return np.log(self.pi_safety)

    @property
    def shape(self) -> tuple[int, int]:
        return self.pi_safety.shape


def _conditionals(rng: np.random.Generator, rows: int, responses: int, floor: float) -> np.ndarray:
    # A floor mixed with uniform keeps every probability ≥ floor/Y: logits stay finite and the softmax Hessian on
    # each row stays well conditioned, so gradient descent converges in thousands, not millions, of steps.
    draws = rng.dirichlet(np.ones(responses), size=rows)
    return (1.0 - floor) * draws + floor / responses


def make_problem(num_safety_contexts: int = 4, num_capability_contexts: int = 4, num_responses: int = 5,
                 overlap: float = 0.0, proxy_shift: float = 0.0, seed: int = 0, floor: float = 0.2) -> SyntheticProblem:
    """A random instance; the same seed gives the same π_s, ν, π_f and masses for every dial value, so sweeps over
    `overlap` and `proxy_shift` change only the dial.

    Contexts 0..S−1 are safety contexts (p_s > 0 there), S..S+F−1 capability-only contexts.
    """
    if not 0.0 <= overlap <= 1.0 or not 0.0 <= proxy_shift <= 1.0:
        raise ValueError(f"overlap and proxy_shift must lie in [0, 1], got {overlap}, {proxy_shift}")
    rng = np.random.default_rng(seed)
    S, F, C = num_safety_contexts, num_capability_contexts, num_safety_contexts + num_capability_contexts
    p_s = np.zeros(C)
    p_s[:S] = rng.dirichlet(np.full(S, 5.0))
    u_f = np.zeros(C)
    u_f[S:] = rng.dirichlet(np.full(F, 5.0))
    pi_s = _conditionals(rng, C, num_responses, floor)
    away = _conditionals(rng, C, num_responses, floor)
    pi_f = _conditionals(rng, C, num_responses, floor)
    return SyntheticProblem(
        p_safety=p_s,
        pi_safety=pi_s,
        p_proxy=p_s.copy(),
        pi_proxy=(1.0 - proxy_shift) * pi_s + proxy_shift * away,
        p_capability=(1.0 - overlap) * u_f + overlap * p_s,
        pi_capability=pi_f,
    )


# ---------------------------------------------------------------------------------------------------------------
# Losses and gaps
# ---------------------------------------------------------------------------------------------------------------


def cross_entropy(p_ctx, targets, theta) -> jax.Array:
    """L(θ) = −Σ_x p(x) Σ_y π(y|x) log softmax(θ_x)_y."""
    logq = jax.nn.log_softmax(theta, axis=-1)
    return -jnp.sum(jnp.asarray(p_ctx, logq.dtype)[:, None] * jnp.asarray(targets, logq.dtype) * logq)


def probabilities(theta) -> np.ndarray:
    theta = np.asarray(theta, np.float64)
    z = np.exp(theta - theta.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def safety_gap(problem: SyntheticProblem, model: np.ndarray) -> float:
    """G_s = E_{p_s} KL(π_s ‖ model) = L_s(model) − L_s(θ_s); `model` is a [C, Y] conditional (use probabilities)."""
    return bounds.expected_kl(problem.p_safety, problem.pi_safety, model)


def capability_gap(problem: SyntheticProblem, model: np.ndarray) -> float:
    """G_f = E_{p_f} KL(π_f ‖ model) = L_f(model) − min L_f."""
    return bounds.expected_kl(problem.p_capability, problem.pi_capability, model)


# ---------------------------------------------------------------------------------------------------------------
# Case I: min L_f + λ L_s'
# ---------------------------------------------------------------------------------------------------------------


def case1_closed_form(problem: SyntheticProblem, lam: float) -> np.ndarray:
    """The exact Case I optimum as a conditional [C, Y] (bounds.mixture_optimum, R1): per context the mixture of
    π_f and π_s' weighted by the context masses p_f and λ·p_s'; untouched contexts keep π_s."""
    return bounds.mixture_optimum(problem.p_capability, problem.pi_capability, problem.p_proxy, problem.pi_proxy,
                                  lam, problem.pi_safety)


@dataclasses.dataclass(frozen=True)
class DescentResult:
    theta: np.ndarray
    steps: int
    residual: float  # ‖∇F‖ (Case I) or the projected-gradient mapping norm (Case II) at the end


def project_to_ball(theta, anchor, radius):
    """Euclidean projection onto {‖θ − anchor‖₂ ≤ r}: the rule of safetrade.tradeoff.case2_projection (one
    global ball), shrinking the displacement radially when it is outside."""
    d = theta - anchor
    norm = jnp.sqrt(jnp.sum(d * d))
    return anchor + d * jnp.where(norm > radius, radius / jnp.maximum(norm, jnp.finfo(d.dtype).tiny), 1.0)


@functools.partial(jax.jit, static_argnames=("max_steps",))
def _descend(weights, targets, theta0, anchor, radius, lr, tol, *, max_steps):
    """Projected gradient descent on Σ_k L_k(θ), L_k the cross-entropy on (weights[k], targets[k]), over
    {‖θ − anchor‖ ≤ radius} (radius = inf: plain gradient descent), stopping once the gradient-mapping norm falls
    below tol."""
    objective = lambda t: sum(cross_entropy(weights[k], targets[k], t) for k in range(weights.shape[0]))  # noqa: E731
    grad = jax.grad(objective)

    def project(theta):
        return project_to_ball(theta, anchor, radius)

    def mapping(theta):
        return (theta - project(theta - lr * grad(theta))) / lr

    def cond(carry):
        _, step, res = carry
        return (step < max_steps) & (res > tol)

    def body(carry):
        theta, step, _ = carry
        theta = project(theta - lr * grad(theta))
        return theta, step + 1, jnp.sqrt(jnp.sum(mapping(theta) ** 2))

    theta0 = project(theta0)
    init = (theta0, jnp.asarray(0), jnp.sqrt(jnp.sum(mapping(theta0) ** 2)))
    return jax.lax.while_loop(cond, body, init)


def _run_descent(weights, targets, anchor, radius, tol, max_steps) -> DescentResult:
    """weights [K, C] and targets [K, C, Y]: the objective Σ_k Σ_x weights[k, x]·CE(targets[k, x], softmax θ_x)."""
    dtype = jnp.zeros(()).dtype  # float64 under jax.enable_x64, else float32
    # The Hessian is block-diagonal over contexts, blocks m(x)·(diag q − q qᵀ) with m(x) = Σ_k weights[k, x], and
    # ‖diag q − q qᵀ‖₂ ≤ 1/2 (it is the variance of a unit vector's entries under q: ≤ (max − min)²/4 ≤ 1/2).
    # So β ≤ max m / 2 and lr = 1/β is a safe, monotone step.
    lr = 2.0 / float(np.max(np.sum(weights, axis=0)))
    theta, steps, res = _descend(jnp.asarray(weights, dtype), jnp.asarray(targets, dtype),
                                 jnp.asarray(anchor, dtype), jnp.asarray(anchor, dtype), jnp.asarray(radius, dtype),
                                 jnp.asarray(lr, dtype), jnp.asarray(tol, dtype), max_steps=max_steps)
    return DescentResult(np.asarray(theta, np.float64), int(steps), float(res))


def case1_gradient_descent(problem: SyntheticProblem, lam: float, tol: float = 1e-10,
                           max_steps: int = 200_000) -> DescentResult:
    """Gradient descent on L_f + λ·L_s' (the data, not the closed form) from θ_s, step 1/β with β the global
    smoothness bound; contexts neither loss sees get zero gradient and keep θ_s."""
    weights = np.stack([problem.p_capability, lam * problem.p_proxy])
    targets = np.stack([problem.pi_capability, problem.pi_proxy])
    return _run_descent(weights, targets, problem.theta_aligned, np.inf, tol, max_steps)


# ---------------------------------------------------------------------------------------------------------------
# Case II: min L_f s.t. ‖θ − θ_s‖ ≤ r
# ---------------------------------------------------------------------------------------------------------------


def case2_projected_descent(problem: SyntheticProblem, radius: float, tol: float = 1e-9,
                            max_steps: int = 50_000) -> DescentResult:
    """Projected gradient descent on L_f from θ_s onto the ball ‖θ − θ_s‖₂ ≤ r (Frobenius norm over all logits).

    L_f is convex in θ, so this converges to a minimiser over the ball. The gradient of each row sums to 0, so the
    iterates never move along the per-row shift that leaves softmax unchanged: all of the radius buys real change.
    """
    return _run_descent(problem.p_capability[None], problem.pi_capability[None], problem.theta_aligned, radius, tol,
                        max_steps)


# ---------------------------------------------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TradeoffCurve:
    dial: str
    values: np.ndarray
    safety_gap: np.ndarray
    capability_gap: np.ndarray


def lambda_sweep(problem: SyntheticProblem, lams) -> TradeoffCurve:
    """Case I optimum (closed form) across λ: the safety gap falls and the capability gap rises with λ (the latter
    always; the former always for a perfect proxy, see bounds.lambda_monotonicity_margin)."""
    lams = np.asarray(lams, np.float64)
    models = [case1_closed_form(problem, lam) for lam in lams]
    return TradeoffCurve("lambda", lams, np.array([safety_gap(problem, m) for m in models]),
                         np.array([capability_gap(problem, m) for m in models]))


def proxy_shift_sweep(shifts, lam: float, **problem_kwargs) -> TradeoffCurve:
    """Case I optimum across the similarity dial ε (same seed, only ε changes).

    h(ε) = KL(π_s ‖ w π_f + (1 − w)((1 − ε)π_s + εν)) is convex in ε; without overlap (w = 0 on safety contexts)
    h'(0) = 0, so the safety gap is non-decreasing in ε: a closer proxy gives a smaller gap. With overlap it is
    non-decreasing whenever h'(0) ≥ 0 on every safety context.
    """
    shifts = np.asarray(shifts, np.float64)
    problems = [make_problem(proxy_shift=float(e), **problem_kwargs) for e in shifts]
    models = [case1_closed_form(p, lam) for p in problems]
    return TradeoffCurve("proxy_shift", shifts, np.array([safety_gap(p, m) for p, m in zip(problems, models)]),
                         np.array([capability_gap(p, m) for p, m in zip(problems, models)]))


@dataclasses.dataclass(frozen=True)
class OverlapSweep:
    curve: TradeoffCurve  # Case I at the given λ
    best_total_gap: np.ndarray  # min over λ of G_s + G_f; for a perfect proxy = min over all models (at λ = 1)
    frontier_bound: np.ndarray  # R6 lower bound Σ min(p_s, p_f)·2JS (linear in ω by construction)


def overlap_sweep(overlaps, lam: float, lams=np.logspace(-3, 3, 61), **problem_kwargs) -> OverlapSweep:
    """Case I across the context-overlap dial ω (same seed, only ω changes).

    With a perfect proxy: on a shared context w = ω/(ω + λ) grows with ω, and KL(π_s ‖ w π_f + (1 − w) π_s) grows
    with w, so the safety gap at fixed λ is non-decreasing in ω. The best achievable G_s + G_f is the minimum over P
    of Σ_x [p_s KL(π_s‖P) + p_f KL(π_f‖P)], and p_f grows pointwise with ω on shared contexts while the
    capability-only contexts cost 0, so it is non-decreasing in ω too: more overlap, worse trade-off.
    """
    overlaps = np.asarray(overlaps, np.float64)
    problems = [make_problem(overlap=float(o), **problem_kwargs) for o in overlaps]
    models = [case1_closed_form(p, lam) for p in problems]
    curve = TradeoffCurve("overlap", overlaps, np.array([safety_gap(p, m) for p, m in zip(problems, models)]),
                          np.array([capability_gap(p, m) for p, m in zip(problems, models)]))
    best = []
    for p in problems:
        sweep = lambda_sweep(p, np.append(lams, 1.0))
        best.append(np.min(sweep.safety_gap + sweep.capability_gap))
    frontier = [bounds.tradeoff_frontier(p.p_safety, p.pi_safety, p.p_capability, p.pi_capability).bound
                for p in problems]
    return OverlapSweep(curve, np.array(best), np.array(frontier))


def radius_sweep(problem: SyntheticProblem, radii, **descent_kwargs) -> TradeoffCurve:
    """Case II (projected gradient descent) across the radius r."""
    radii = np.asarray(radii, np.float64)
    models = [probabilities(case2_projected_descent(problem, float(r), **descent_kwargs).theta) for r in radii]
    return TradeoffCurve("radius", radii, np.array([safety_gap(problem, m) for m in models]),
                         np.array([capability_gap(problem, m) for m in models]))


def case1_at_safety_gap(problem: SyntheticProblem, target: float, lam_range=(1e-6, 1e6),
                        iters: int = 200) -> tuple[float, float]:
    """(λ, capability gap) of the Case I optimum whose safety gap equals `target`, by bisection on log λ.

    Needs G_s(P_λ) decreasing in λ (true for a perfect proxy; bounds.lambda_monotonicity_margin ≥ 0 in general).
    Returns (nan, nan) when target lies outside the safety gaps reachable on lam_range.
    """
    lo, hi = np.log(lam_range[0]), np.log(lam_range[1])
    gap = lambda log_lam: safety_gap(problem, case1_closed_form(problem, float(np.exp(log_lam))))  # noqa: E731
    if not gap(hi) <= target <= gap(lo):
        return float("nan"), float("nan")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gap(mid) > target else (lo, mid)
    lam = float(np.exp(0.5 * (lo + hi)))
    return lam, capability_gap(problem, case1_closed_form(problem, lam))


@dataclasses.dataclass(frozen=True)
class StrategyComparison:
    case2: TradeoffCurve
    case1_lambda: np.ndarray  # λ at which Case I has Case II's safety gap (nan if unreachable)
    case1_capability_gap: np.ndarray  # Case I's capability gap at that matched safety gap
    excess: np.ndarray  # case2.capability_gap − case1_capability_gap: > 0 means Case II trades worse


def compare_strategies(problem: SyntheticProblem, radii, **descent_kwargs) -> StrategyComparison:
    """Case II against Case I at matched safety gap.

    With a perfect proxy, Case I with λ ranging over (0, ∞) traces the Pareto frontier of (G_s, G_f) exactly
    (weighted-sum scalarisation of two convex objectives, each optimum unique), and every Case II solution is a
    feasible model, so its capability gap can only be ≥ Case I's at the same safety gap: a steeper trade-off.
    Matching uses bisection rather than interpolating a sampled curve, because a chord of the convex frontier
    lies above it and could make Case II look better than it is.
    """
    case2 = radius_sweep(problem, radii, **descent_kwargs)
    matched = [case1_at_safety_gap(problem, g) for g in case2.safety_gap]
    lam = np.array([m[0] for m in matched])
    cap = np.array([m[1] for m in matched])
    return StrategyComparison(case2, lam, cap, case2.capability_gap - cap)


# ---------------------------------------------------------------------------------------------------------------
# Runs in the format of theory/check.py
# ---------------------------------------------------------------------------------------------------------------


def loss_of(p_ctx: np.ndarray, targets: np.ndarray, model: np.ndarray) -> float:
    """Cross-entropy −Σ_x p(x) Σ_y π(y|x) log model(y|x) of a [C, Y] conditional (numpy float64)."""
    with np.errstate(divide="ignore"):
        logm = np.log(model)
    return float(-np.sum(np.where(p_ctx[:, None] * targets > 0, p_ctx[:, None] * targets * logm, 0.0)))


def global_constants(problem: SyntheticProblem) -> dict[str, float]:
    """Exact global constants of the softmax losses (valid on every ball):
    ‖∇L‖ ≤ √2·‖p‖₂ (each row's gradient is p(x)·(q_x − π_x) and two probability vectors are ≤ √2 apart) and
    ‖∇²L‖₂ ≤ max_x p(x)/2 (block-diagonal, each block p(x)·(diag q − q qᵀ) of norm ≤ 1/2)."""
    return {"lipschitz_s": float(np.sqrt(2.0) * np.linalg.norm(problem.p_safety)),
            "smoothness_s": float(problem.p_safety.max() / 2),
            "grad_norm_s": 0.0,  # θ_s = log π_s minimises L_s exactly
            "lipschitz_f": float(np.sqrt(2.0) * np.linalg.norm(problem.p_capability))}


def case2_runs(problem: SyntheticProblem, radii, **descent_kwargs) -> list[dict]:
    """Case II runs (projected descent) with measured gaps and the exact constants, for check.check_runs."""
    consts = global_constants(problem)
    cap_anchor = loss_of(problem.p_capability, problem.pi_capability, problem.pi_safety)
    runs = []
    for r in radii:
        theta = case2_projected_descent(problem, float(r), **descent_kwargs).theta
        model = probabilities(theta)
        runs.append({"name": f"r={float(r):g}", "strategy": "case2",
                     "distance": float(np.linalg.norm(theta - problem.theta_aligned)),
                     "safety_gap": safety_gap(problem, model),
                     "capability_gain": cap_anchor - loss_of(problem.p_capability, problem.pi_capability, model),
                     **consts})
    return runs


def case1_runs(problem: SyntheticProblem, lams) -> list[dict]:
    """Case I runs (closed-form optimum) with measured gaps, the exact capability excess of θ_s and δ measured as
    max |L_s − L_s'| over {θ_s, θ_λ} (what the penalty bound needs), for check.check_runs."""
    aligned = problem.pi_safety
    excess = capability_gap(problem, aligned)  # L_f(θ_s) − min L_f
    runs = []
    for lam in lams:
        model = case1_closed_form(problem, float(lam))
        delta = bounds.similarity_term(
            [loss_of(problem.p_safety, problem.pi_safety, m) for m in (aligned, model)],
            [loss_of(problem.p_proxy, problem.pi_proxy, m) for m in (aligned, model)])
        runs.append({"name": f"λ={float(lam):g}", "strategy": "case1", "lam": float(lam),
                     "safety_gap": safety_gap(problem, model), "capability_excess_at_anchor": excess,
                     "similarity": delta})
    return runs
