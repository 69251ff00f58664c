"""The project's bounds on the safety and capability gaps, in the framework of Chen, Shen, Das & Chen (2025),
"Fundamental Safety-Capability Trade-offs in Fine-tuning LLMs".

The paper's full text was not available (only its abstract and secondary summaries; theory/README.md). Every statement here is **the project's
statement in the paper's framework**, derived by us with its proof in the docstring, and none of them should be
cited as the paper's theorem. Each function returns a frozen dataclass holding the bound and every ingredient, so
a report can show what a bound is made of.

Two kinds of gap are used, and they are not the same thing:
- Parameter space (Case II, and the Case I penalty bound): G_s(θ) := L_s(θ) − L_s(θ_s), the rise of the original
  alignment loss over the aligned model's; this is what the experiments measure. It equals the framework's
  L_s(θ) − min L_s when θ_s minimises L_s, and is smaller than it by the constant L_s(θ_s) − min L_s otherwise.
- Distribution space (our reconstruction, assumption A0: the model class holds every conditional):
  G_s(P) = E_{x∼p_s} KL(π_s(·|x) ‖ P(·|x)) = L_s(P) − min L_s, and G_f(P) likewise with (p_f, π_f).

Arrays in the distribution-space functions: context masses p[x] of shape [C] (a probability vector, zeros allowed)
and conditionals π[x, y] of shape [C, Y] (rows sum to 1). Everything is numpy float64: these are small exact
computations, and the tests compare them to 1e-12.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Case II: alignment-parameter constraint ‖θ − θ_s‖ ≤ r
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaseIILipschitzBound:
    bound: float
    lipschitz: float
    radius: float


def case2_lipschitz_bound(lipschitz: float, radius: float) -> CaseIILipschitzBound:
    """Safety gap of any point of the ball, from a local Lipschitz constant of the alignment loss.

    Statement (project's, in the paper's framework). Let B = {θ : ‖θ − θ_s‖₂ ≤ r} and suppose
    ‖∇L_s(θ)‖₂ ≤ L for all θ ∈ B. Then every θ_r ∈ B (in particular the Case II solution) satisfies
        G_s(θ_r) = L_s(θ_r) − L_s(θ_s) ≤ L·r.
    Assumptions: L_s differentiable on B; L bounds the gradient norm on all of B (not only at sampled points).
    Proof. B is convex, so the segment θ_s + t·d, d = θ_r − θ_s, t ∈ [0, 1], lies in B. By the mean-value
    (fundamental) theorem, L_s(θ_r) − L_s(θ_s) = ∫₀¹ ∇L_s(θ_s + t d)·d dt ≤ ∫₀¹ L‖d‖ dt ≤ L·r (Cauchy–Schwarz). ∎
    With L from `landscape.local_lipschitz` (a max over sampled points) the result is an estimate, not a
    certificate.
    """
    return CaseIILipschitzBound(bound=float(lipschitz) * float(radius), lipschitz=float(lipschitz),
                                radius=float(radius))


@dataclasses.dataclass(frozen=True)
class CaseIISmoothnessBound:
    bound: float
    linear_term: float  # ‖∇L_s(θ_s)‖·r
    quadratic_term: float  # (β/2)·r²
    grad_norm_at_anchor: float
    smoothness: float
    radius: float


def case2_smoothness_bound(grad_norm_at_anchor: float, smoothness: float, radius: float) -> CaseIISmoothnessBound:
    """Safety gap of any point of the ball, from the gradient at θ_s and a local smoothness constant.

    Statement (project's, in the paper's framework). If ∇L_s is β-Lipschitz on B = {‖θ − θ_s‖ ≤ r} (for C² losses:
    ‖∇²L_s(θ)‖₂ ≤ β on B), then every θ_r ∈ B satisfies
        G_s(θ_r) ≤ ‖∇L_s(θ_s)‖·r + (β/2)·r².
    At an exact aligned minimum (∇L_s(θ_s) = 0) the gap grows at most quadratically in r: the "flat basin" reading
    of Case II.
    Proof. With d = θ_r − θ_s and the segment inside B (convexity),
        L_s(θ_r) − L_s(θ_s) − ∇L_s(θ_s)·d = ∫₀¹ (∇L_s(θ_s + t d) − ∇L_s(θ_s))·d dt ≤ ∫₀¹ β t ‖d‖² dt = (β/2)‖d‖²,
    and ∇L_s(θ_s)·d ≤ ‖∇L_s(θ_s)‖·‖d‖; finally ‖d‖ ≤ r. ∎
    The bound is attained by a quadratic whose gradient at θ_s is a top Hessian eigenvector and d = r·∇L/‖∇L‖.
    """
    g, b, r = float(grad_norm_at_anchor), float(smoothness), float(radius)
    return CaseIISmoothnessBound(bound=g * r + 0.5 * b * r * r, linear_term=g * r, quadratic_term=0.5 * b * r * r,
                                 grad_norm_at_anchor=g, smoothness=b, radius=r)


@dataclasses.dataclass(frozen=True)
class CapabilityGainBounds:
    upper: float  # L_f·r: no point of the ball gains more
    lower: float | None  # guaranteed gain of the exact ball minimiser (None without ‖∇L_f(θ_s)‖ and β_f)
    lipschitz: float
    radius: float
    grad_norm_at_anchor: float | None
    smoothness: float | None


def case2_capability_gain_bounds(lipschitz: float, radius: float, grad_norm_at_anchor: float | None = None,
                                 smoothness: float | None = None) -> CapabilityGainBounds:
    """How much capability loss Case II can recover inside the ball: gain := L_f(θ_s) − L_f(θ_r).

    Statement (project's, in the paper's framework).
    (upper) If ‖∇L_f‖ ≤ L_f on B = {‖θ − θ_s‖ ≤ r}, every θ_r ∈ B has gain ≤ L_f·r.
    (lower) If moreover ∇L_f is β_f-Lipschitz on B and θ_r minimises L_f over B exactly, then with
        g = ‖∇L_f(θ_s)‖ and ρ = min(r, g/β_f):   gain ≥ ρ·g − (β_f/2)·ρ²  (= g·r − β_f r²/2 for r ≤ g/β_f,
        = g²/(2β_f) beyond).
    So the achievable gain is capped linearly in r, while the safety cost can grow like r (Lipschitz) or r²
    (smooth, flat minimum): the steep Case II trade-off.
    Proof. (upper) mean-value theorem on the segment, as in case2_lipschitz_bound, applied to −L_f.
    (lower) the point θ_s − ρ·∇L_f(θ_s)/g lies in B; the descent lemma gives L_f there ≤ L_f(θ_s) − ρ g + β_f ρ²/2,
    and the ball minimiser is at least as good; ρ maximises ρg − β_f ρ²/2 over [0, r]. ∎
    The lower bound is for the exact minimiser; a finite-step projected-gradient run can fall short of it.
    """
    lower = None
    if grad_norm_at_anchor is not None and smoothness is not None:
        g, b = float(grad_norm_at_anchor), float(smoothness)
        rho = min(float(radius), g / b) if b > 0 else float(radius)
        lower = rho * g - 0.5 * b * rho * rho
    return CapabilityGainBounds(upper=float(lipschitz) * float(radius), lower=lower, lipschitz=float(lipschitz),
                                radius=float(radius), grad_norm_at_anchor=grad_norm_at_anchor,
                                smoothness=smoothness)


# ---------------------------------------------------------------------------------------------------------------
# Case I in parameter space: penalty method min L_f + λ·L_s'
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaseIPenaltyBound:
    bound: float
    penalty_term: float  # [L_f(θ_s) − min L_f] / λ
    similarity_term: float  # 2δ
    lam: float
    capability_excess_at_anchor: float  # L_f(θ_s) − min L_f
    similarity: float  # δ


def similarity_term(safety_losses: Sequence[float], proxy_losses: Sequence[float]) -> float:
    """δ estimate: max |L_s − L_s'| over evaluated points (e.g. θ_s and θ_λ, or a trajectory).

    The penalty bound only needs |L_s − L_s'| at θ_s and θ_λ, so evaluating at those two points gives a δ the
    bound is exactly valid with; a sup over a region is the version one can state before training. For losses in
    [0, B], sup_θ |L_s − L_s'| ≤ B·TV(D_s, D_s') bounds it from the data alone.
    """
    diff = np.abs(np.asarray(safety_losses, np.float64) - np.asarray(proxy_losses, np.float64))
    return float(diff.max())


def case1_penalty_bound(lam: float, capability_loss_at_anchor: float, capability_loss_min: float,
                        similarity: float) -> CaseIPenaltyBound:
    """Safety gap of the Case I penalty solution with a proxy safety set.

    Statement (project's, in the paper's framework). Let F(θ) = L_f(θ) + λ·L_s'(θ), λ > 0, and let θ_λ be any point
    with F(θ_λ) ≤ F(θ_s) (a global minimiser of F, or the end of any descent run started at θ_s). If
    |L_s(θ) − L_s'(θ)| ≤ δ at θ = θ_s and θ = θ_λ (e.g. δ = sup over a region containing both), then
        G_s(θ_λ) = L_s(θ_λ) − L_s(θ_s) ≤ [L_f(θ_s) − min L_f] / λ + 2δ.
    Assumptions: min L_f = inf_θ L_f finite (≥ 0 for cross-entropy). No convexity, smoothness or expressivity.
    Proof. F(θ_λ) ≤ F(θ_s) rearranges to λ[L_s'(θ_λ) − L_s'(θ_s)] ≤ L_f(θ_s) − L_f(θ_λ) ≤ L_f(θ_s) − min L_f.
    Then L_s(θ_λ) − L_s(θ_s) = [L_s'(θ_λ) − L_s'(θ_s)] + [(L_s − L_s')(θ_λ) − (L_s − L_s')(θ_s)] and the second
    bracket is at most 2δ. ∎
    Reading: the penalty term decays like 1/λ; the data-similarity term 2δ does not decay, so a dissimilar proxy
    leaves a safety gap no λ removes (the verified "closer proxy → smaller safety gap" trend).
    """
    lam = float(lam)
    if lam <= 0:
        raise ValueError(f"the penalty bound needs λ > 0, got {lam}")
    excess = float(capability_loss_at_anchor) - float(capability_loss_min)
    return CaseIPenaltyBound(bound=excess / lam + 2.0 * float(similarity), penalty_term=excess / lam,
                             similarity_term=2.0 * float(similarity), lam=lam, capability_excess_at_anchor=excess,
                             similarity=float(similarity))


@dataclasses.dataclass(frozen=True)
class CaseICapabilityBound:
    bound: float
    lam: float
    proxy_excess_at_capability_optimum: float  # L_s'(θ_f*) − min L_s'


def case1_capability_bound(lam: float, proxy_loss_at_capability_optimum: float,
                           proxy_loss_min: float) -> CaseICapabilityBound:
    """Capability gap of the Case I penalty solution: the price of the penalty grows at most linearly in λ.

    Statement (project's, in the paper's framework). If θ_λ minimises F = L_f + λ·L_s' globally and θ_f* minimises
    L_f, then
        G_f(θ_λ) = L_f(θ_λ) − L_f(θ_f*) ≤ λ·[L_s'(θ_f*) − min L_s'].
    Proof. F(θ_λ) ≤ F(θ_f*) gives L_f(θ_λ) − L_f(θ_f*) ≤ λ[L_s'(θ_f*) − L_s'(θ_λ)] ≤ λ[L_s'(θ_f*) − min L_s']. ∎
    With case1_penalty_bound: safety gap O(1/λ) + 2δ against capability gap O(λ), the inverse relationship.
    """
    excess = float(proxy_loss_at_capability_optimum) - float(proxy_loss_min)
    return CaseICapabilityBound(bound=float(lam) * excess, lam=float(lam), proxy_excess_at_capability_optimum=excess)


# ---------------------------------------------------------------------------------------------------------------
# A posteriori: one finished run θ_r, measured along its own segment θ_s → θ_r
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SegmentCertificate:
    """Two-sided bounds on the change L(θ_r) − L(θ_s) of one loss, from its slope at θ_s and the directional
    curvature along the segment; `upper` is the certificate of a safety gap, −`lower` of a capability gain."""

    upper: float  # ⟨∇L(θ_s), Δ⟩ + ½ β_Δ ‖Δ‖²
    lower: float  # ⟨∇L(θ_s), Δ⟩ + ½ α_Δ ‖Δ‖²
    linear_term: float  # ⟨∇L(θ_s), Δ⟩
    curvature_max: float  # β_Δ = max sampled uᵀ∇²L u
    curvature_min: float  # α_Δ = min sampled uᵀ∇²L u
    step_norm: float  # ‖Δ‖
    quadrature: float  # ⟨∇L(θ_s), Δ⟩ + ‖Δ‖² ∫₀¹ (1 − t) c(t) dt, c piecewise linear through the samples: an estimate


def segment_certificate(slope_at_start: float, curvatures: Sequence[float], step_norm: float,
                        ts: Sequence[float] | None = None) -> SegmentCertificate:
    """A-posteriori bounds on L(θ_r) − L(θ_s) for a finished run, Δ = θ_r − θ_s, u = Δ/‖Δ‖.

    Statement (project's). Let L be C² on the segment S = {θ_s + tΔ : t ∈ [0, 1]} and let
    α_Δ ≤ uᵀ∇²L(θ)u ≤ β_Δ for every θ ∈ S. Then
        ⟨∇L(θ_s), Δ⟩ + ½ α_Δ ‖Δ‖²  ≤  L(θ_r) − L(θ_s)  ≤  ⟨∇L(θ_s), Δ⟩ + ½ β_Δ ‖Δ‖².
    Proof. φ(t) = L(θ_s + tΔ) is C² on [0, 1] with φ'(0) = ⟨∇L(θ_s), Δ⟩ and φ''(t) = Δᵀ∇²L(θ_s + tΔ)Δ =
    ‖Δ‖² uᵀ∇²L u. Taylor's formula with integral remainder gives φ(1) − φ(0) = φ'(0) + ∫₀¹ (1 − t) φ''(t) dt, and
    ‖Δ‖²α_Δ ≤ φ''(t) ≤ ‖Δ‖²β_Δ with ∫₀¹ (1 − t) dt = ½ bounds the integral on both sides. ∎
    Compared with the worst-case bounds (case2_smoothness_bound): the linear term is the actual inner product, not
    ‖∇L(θ_s)‖·r (Cauchy–Schwarz is attained only when the run moves along the gradient), and the curvature is the
    one direction the run took, not the top Hessian eigenvalue over a ball. Both are exact for the run, so the
    certificate is tight when the curvature is nearly constant along the segment (exact for a quadratic).
    For a safety gap G_s use `upper`; for a capability gain L_f(θ_s) − L_f(θ_r) = −(change of L_f) use
    −lower ≥ gain ≥ −upper.
    With α_Δ, β_Δ the min / max over *sampled* points (landscape.segment_profile) the statement's hypothesis is
    not verified between samples: the sampled β_Δ is a lower estimate of the supremum, so `upper` can under-state
    the true bound; a measured gap above it is reported as a finding (curvature peaked between samples, or
    rounding), never dropped. `quadrature` integrates the piecewise-linear interpolant of the samples and is an
    estimate of the change itself, not a bound. ts default: equally spaced on [0, 1] (landscape.segment_points).
    """
    c = np.asarray(curvatures, np.float64)
    if c.size < 1:
        raise ValueError("segment_certificate needs at least one sampled curvature")
    t = np.linspace(0.0, 1.0, c.size) if ts is None else np.asarray(ts, np.float64)
    if t.shape != c.shape:
        raise ValueError(f"ts has {t.size} points but curvatures has {c.size}")
    if c.size > 1 and (t[0] != 0.0 or t[-1] != 1.0 or np.any(np.diff(t) <= 0)):
        raise ValueError(f"ts must increase from 0 to 1, got {t.tolist()}")
    g, n2 = float(slope_at_start), float(step_norm) ** 2
    beta, alpha = float(c.max()), float(c.min())
    if c.size == 1:
        integral = 0.5 * float(c[0])
    else:
        # ∫ (1 − t) c(t) dt for c linear on each [t_k, t_k+1]: exact per piece (Simpson is exact on cubics).
        t0, t1, c0, c1 = t[:-1], t[1:], c[:-1], c[1:]
        mid = 0.5 * (t0 + t1)
        integral = float(np.sum((t1 - t0) / 6.0 * ((1 - t0) * c0 + 4 * (1 - mid) * 0.5 * (c0 + c1) + (1 - t1) * c1)))
    return SegmentCertificate(upper=g + 0.5 * beta * n2, lower=g + 0.5 * alpha * n2, linear_term=g,
                              curvature_max=beta, curvature_min=alpha, step_norm=float(step_norm),
                              quadrature=g + n2 * integral)


# ---------------------------------------------------------------------------------------------------------------
# Distribution space (our reconstruction, assumption A0)
# ---------------------------------------------------------------------------------------------------------------


def kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p[x] ‖ q[x]) for every row x, in nats, with 0·log(0/q) = 0 and +inf where p > 0 = q."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(axis=-1)


def js_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence ½KL(p‖m) + ½KL(q‖m), m = (p+q)/2, per row, in nats (≤ log 2)."""
    m = 0.5 * (np.asarray(p, np.float64) + np.asarray(q, np.float64))
    return 0.5 * kl_rows(p, m) + 0.5 * kl_rows(q, m)


def expected_kl(p_ctx: np.ndarray, target: np.ndarray, model: np.ndarray) -> float:
    """E_{x∼p_ctx} KL(target(·|x) ‖ model(·|x)) = L(model) − min L for cross-entropy on (p_ctx, target) under A0.

    Contexts with zero mass are skipped even where the KL is infinite (0·∞ = 0 here).
    """
    p_ctx = np.asarray(p_ctx, np.float64)
    per = kl_rows(target, model)
    return float(np.sum(np.where(p_ctx > 0, p_ctx * np.where(p_ctx > 0, per, 0.0), 0.0)))


def context_overlap(p_safety: np.ndarray, p_capability: np.ndarray) -> float:
    """Overlap mass Σ_x min(p_s(x), p_f(x)) ∈ [0, 1] (1 − TV between the two context distributions)."""
    return float(np.minimum(np.asarray(p_safety, np.float64), np.asarray(p_capability, np.float64)).sum())


def proxy_dissimilarity(p_safety: np.ndarray, pi_safety: np.ndarray, pi_proxy: np.ndarray) -> float:
    """Data-similarity term E_{x∼p_s} KL(π_s ‖ π_s') (0 for a perfect proxy): the safety-gap floor of R2."""
    return expected_kl(p_safety, pi_safety, pi_proxy)


def mixture_weights(p_capability: np.ndarray, p_proxy: np.ndarray, lam: float) -> np.ndarray:
    """w_λ(x) = p_f(x) / (p_f(x) + λ·p_s'(x)); 0 where both masses are 0 (such contexts keep the aligned model)."""
    p_f, p_p = np.asarray(p_capability, np.float64), np.asarray(p_proxy, np.float64)
    total = p_f + float(lam) * p_p
    return np.where(total > 0, p_f / np.where(total > 0, total, 1.0), 0.0)


def mixture_optimum(p_capability, pi_capability, p_proxy, pi_proxy, lam: float, aligned) -> np.ndarray:
    """R1: the minimiser of L_f(P) + λ·L_s'(P) over all conditionals P (assumption A0).

    Statement (project's, in the paper's framework). With w = w_λ(x) from `mixture_weights`,
        P_λ(·|x) = w·π_f(·|x) + (1 − w)·π_s'(·|x)   where p_f(x) + λ p_s'(x) > 0,
        P_λ(·|x) = aligned(·|x)                     elsewhere (the objective does not see x; the aligned model —
                                                    and gradient descent started there — keeps it).
    Proof. The objective separates over contexts: Σ_x Σ_y [p_f π_f + λ p_s' π_s'](x, y)·(−log P(y|x)).
    With m(x) = p_f(x) + λ p_s'(x) > 0 the x-term is m(x)·CE(t_x, P(·|x)) where t_x = (p_f π_f + λ p_s' π_s')/m is
    the mixture above, and CE(t, P) = H(t) + KL(t ‖ P) is minimised uniquely at P = t (Gibbs' inequality). ∎
    For a softmax model p_θ(y|x) = softmax(θ_x)_y the minimising logits are θ_x = log t_x + const(x).
    """
    w = mixture_weights(p_capability, p_proxy, lam)[:, None]
    touched = (np.asarray(p_capability) + float(lam) * np.asarray(p_proxy) > 0)[:, None]
    mix = w * np.asarray(pi_capability, np.float64) + (1.0 - w) * np.asarray(pi_proxy, np.float64)
    return np.where(touched, mix, np.asarray(aligned, np.float64))


@dataclasses.dataclass(frozen=True)
class MixtureSafetyBounds:
    exact: float  # G_s(P_λ), computed exactly
    convexity_bound: float  # E_ps[w·KL(π_s‖π_f) + (1−w)·KL(π_s‖π_s')] + untouched
    floor_bound: float  # E_ps[KL(π_s‖π_s') + log(1 + p_f/(λ p_s'))] + untouched
    similarity_term: float  # E_ps KL(π_s‖π_s'): the floor no λ removes
    overlap_term: float  # E_ps log(1 + p_f/(λ p_s')) = E_ps[−log(1 − w)]: → 0 as λ → ∞ or without overlap
    conflict_term: float  # E_ps w·KL(π_s‖π_f): fitting conflicting capability targets on shared contexts
    untouched_term: float  # E_ps KL(π_s‖aligned) on contexts neither objective sees (0 if aligned = π_s)


def case1_mixture_safety_bounds(p_safety, pi_safety, p_capability, pi_capability, p_proxy, pi_proxy, lam: float,
                                aligned) -> MixtureSafetyBounds:
    """R2: safety gap of the Case I optimum P_λ in distribution space.

    Statement (project's, in the paper's framework; A0). With w = w_λ(x) and U = {x : p_f(x) + λ p_s'(x) = 0},
        G_s(P_λ) ≤ E_{p_s}[ w·KL(π_s‖π_f) + (1 − w)·KL(π_s‖π_s') ]          (convexity bound)
        G_s(P_λ) ≤ E_{p_s}[ KL(π_s‖π_s') + log(1 + p_f/(λ p_s')) ]           (floor bound)
    (sums over x ∉ U), each plus the untouched term E_{p_s}[1_U·KL(π_s‖aligned)] (0 when the aligned model is π_s).
    The floor bound is infinite on a context with p_s > 0, p_f > 0 and p_s' = 0: a proxy that misses a context
    protects nothing there.
    Proof. Per x ∉ U, P_λ = w π_f + (1 − w) π_s'. KL is convex in its second argument, which gives the first line.
    Since P_λ ≥ (1 − w)·π_s' pointwise and −log is decreasing,
        KL(π_s‖P_λ) ≤ Σ_y π_s log(π_s / ((1 − w) π_s')) = KL(π_s‖π_s') − log(1 − w),
    and −log(1 − w) = log(1 + p_f/(λ p_s')). Contexts in U keep P = aligned. ∎
    Reading: KL(π_s‖π_s') is the data-similarity floor; the overlap term vanishes on contexts the capability data
    do not visit and decays like p_f/(λ p_s').
    """
    p_s = np.asarray(p_safety, np.float64)
    w = mixture_weights(p_capability, p_proxy, lam)
    untouched = (np.asarray(p_capability) + float(lam) * np.asarray(p_proxy)) <= 0
    seen = (p_s > 0) & ~untouched
    P = mixture_optimum(p_capability, pi_capability, p_proxy, pi_proxy, lam, aligned)

    def e_ps(values, where):
        return float(np.sum(np.where(where, p_s * np.where(where, values, 0.0), 0.0)))

    kl_proxy = kl_rows(pi_safety, pi_proxy)
    kl_cap = kl_rows(pi_safety, pi_capability)
    with np.errstate(divide="ignore"):
        neg_log_1mw = -np.log1p(-w)  # = log(1 + p_f/(λ p_s')), +inf where p_s' = 0 < p_f
    similarity = e_ps(kl_proxy, seen)
    overlap = e_ps(neg_log_1mw, seen)
    conflict = e_ps(w * kl_cap, seen)
    # (1 − w)·KL(π_s‖π_s') is 0 where w = 1, even if that KL is infinite (the proxy's rows there do not matter).
    proxy_part = e_ps(np.where(w < 1, (1.0 - w) * kl_proxy, 0.0), seen)
    untouched_term = e_ps(kl_rows(pi_safety, aligned), (p_s > 0) & untouched)
    return MixtureSafetyBounds(
        exact=expected_kl(p_s, pi_safety, P),
        convexity_bound=conflict + proxy_part + untouched_term,
        floor_bound=similarity + overlap + untouched_term,
        similarity_term=similarity,
        overlap_term=overlap,
        conflict_term=conflict,
        untouched_term=untouched_term,
    )


@dataclasses.dataclass(frozen=True)
class MixtureCapabilityBounds:
    exact: float  # G_f(P_λ)
    overlap_bound: float  # E_pf log(1 + λ p_s'/p_f)
    convexity_bound: float  # E_pf (1−w)·KL(π_f‖π_s')


def case1_mixture_capability_bounds(p_capability, pi_capability, p_proxy, pi_proxy, lam: float,
                                    aligned) -> MixtureCapabilityBounds:
    """R3: capability gap of the Case I optimum P_λ in distribution space.

    Statement (project's, in the paper's framework; A0).
        G_f(P_λ) ≤ E_{p_f} log(1 + λ p_s'/p_f)            (overlap bound: grows with λ and with proxy mass on
                                                            capability contexts; 0 where p_s' = 0)
        G_f(P_λ) ≤ E_{p_f}[(1 − w)·KL(π_f‖π_s')]          (convexity bound)
    Proof. On contexts with p_f > 0, w > 0 and P_λ ≥ w·π_f pointwise, so KL(π_f‖P_λ) ≤ −log w = log(1 + λp_s'/p_f);
    and convexity of KL in its second argument with KL(π_f‖π_f) = 0 gives the second line. ∎
    With R2: on a context shared with ratio a = p_f/p_s', the two overlap terms satisfy
    log(1 + a/λ) + log(1 + λ/a) = −log(w(1 − w)) ≥ log 4 for every λ: overlap forces a price on one side.
    """
    p_f = np.asarray(p_capability, np.float64)
    w = mixture_weights(p_f, p_proxy, lam)
    P = mixture_optimum(p_f, pi_capability, p_proxy, pi_proxy, lam, aligned)
    seen = p_f > 0
    with np.errstate(divide="ignore"):
        neg_log_w = np.where(seen, -np.log(np.where(seen, w, 1.0)), 0.0)
    kl = kl_rows(pi_capability, pi_proxy)
    proxy_part = np.where(w < 1, (1.0 - w) * kl, 0.0)
    return MixtureCapabilityBounds(
        exact=expected_kl(p_f, pi_capability, P),
        overlap_bound=float(np.sum(np.where(seen, p_f * neg_log_w, 0.0))),
        convexity_bound=float(np.sum(np.where(seen, p_f * np.where(seen, proxy_part, 0.0), 0.0))),
    )


@dataclasses.dataclass(frozen=True)
class FrontierBound:
    bound: float  # Σ_x min(p_s, p_f)·2·JS(π_s, π_f)
    overlap: float  # Σ_x min(p_s, p_f)
    conflict: np.ndarray  # [C] per-context 2·JS(π_s(·|x), π_f(·|x))


def tradeoff_frontier(p_safety, pi_safety, p_capability, pi_capability) -> FrontierBound:
    """R6: no fine-tuned model escapes a trade-off on shared, conflicting contexts.

    Statement (project's, in the paper's framework; A0). For every conditional model P,
        G_s(P) + G_f(P) ≥ Σ_x min(p_s(x), p_f(x)) · 2·JS(π_s(·|x), π_f(·|x)).
    So an unavoidable trade-off exists exactly where contexts overlap (min(p_s, p_f) > 0) and targets conflict
    (JS > 0); without overlap both gaps can be 0 at once.
    Proof. Per x, with m = min(p_s, p_f): p_s KL(π_s‖P) + p_f KL(π_f‖P) ≥ m·[KL(π_s‖P) + KL(π_f‖P)], and
    KL(π_s‖P) + KL(π_f‖P) = 2·KL(M‖P) + KL(π_s‖M) + KL(π_f‖M) with M = (π_s + π_f)/2 (expand the logs), which is
    ≥ KL(π_s‖M) + KL(π_f‖M) = 2·JS(π_s, π_f), with equality at P = M. ∎
    Equality holds for P = M when p_s = p_f on every context.
    """
    overlap_mass = np.minimum(np.asarray(p_safety, np.float64), np.asarray(p_capability, np.float64))
    conflict = 2.0 * js_rows(pi_safety, pi_capability)
    return FrontierBound(bound=float(np.sum(overlap_mass * conflict)), overlap=float(overlap_mass.sum()),
                         conflict=conflict)


def lambda_monotonicity_margin(pi_safety, pi_capability, pi_proxy) -> np.ndarray:
    """Per context, 1 − Σ_y π_s π_f / π_s'. Where it is ≥ 0, that context's safety gap KL(π_s‖P_λ) cannot rise
    as λ grows.

    Why: h(w) = KL(π_s ‖ w π_f + (1 − w) π_s') is convex in w with h'(0) = 1 − Σ π_s π_f/π_s', so h is
    non-decreasing on [0, 1] when h'(0) ≥ 0, and w_λ decreases in λ. For a perfect proxy (π_s' = π_s) the margin
    is exactly 0, so "larger λ → smaller safety gap" always holds; for an imperfect proxy it can fail on contexts
    where the capability targets are closer to π_s than the proxy is. Such contexts are where this framework and
    the paper's "monotone in λ" statement could part ways.
    """
    pi_s, pi_f, pi_p = (np.asarray(a, np.float64) for a in (pi_safety, pi_capability, pi_proxy))
    return 1.0 - np.sum(pi_s * pi_f / pi_p, axis=-1)
