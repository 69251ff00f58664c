"""Safety-aware fine-tuning strategies as pure functions of pytrees.

The trade-off paper (Chen, Shen, Das, Chen 2025) studies two ways to fine-tune an aligned model θ_s on capability
data D_f while protecting alignment:

  Case I  (alignment-loss constraint, with a *proxy* safety set D_s'):
    case1_penalty      min_θ L_f(θ) + λ·L_s'(θ)
    case1_constrained  min_θ L_f(θ)  s.t.  L_s'(θ) ≤ L_s'(θ_s) + ε          (primal–dual: λ ← [λ + η(L_s' − c)]₊)
  Case II (alignment-parameter constraint):
    case2_projection   min_θ L_f(θ)  s.t.  ‖θ − θ_s‖₂ ≤ r                     (project after every update)
    case2_penalty      min_θ L_f(θ) + (μ/2)·‖θ − θ_s‖₂²
  sft                  min_θ L_f(θ)

The penalty form of Case I is verified from the paper's figure ("varying penalty strength λ"); the constrained
form, the projection and the proximal penalty are our reconstruction (see shared/research/tradeoff.md §2.2): the
paper's text was not available, and how it enforced Case II on a 7B model is unknown.

Every function here works on any pytree, so the same code trains an LLM and solves the small convex problems the
tests check against closed-form KKT solutions. `displacement` is θ − θ_s: for full fine-tuning the parameter
difference, for LoRA the merged update (the constraint is on the merged delta, per the issue).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from safetrade.errors import SafetradeError

STRATEGIES = ("sft", "case1_penalty", "case1_constrained", "case2_projection", "case2_penalty")


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    name: str = "sft"
    lam: float = 1.0  # case1_penalty: the fixed λ; case1_constrained: the initial multiplier
    epsilon: float = 0.0  # case1_constrained: allowed rise of the proxy loss over the aligned model's
    dual_lr: float = 0.1  # case1_constrained: step size η of the multiplier's projected ascent
    radius: float = 1.0  # case2_projection: r
    per_tensor: bool = False  # case2_projection: a ball of radius r per weight tensor instead of one global ball
    mu: float = 1.0  # case2_penalty: μ

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise SafetradeError(f"unknown strategy {self.name!r}; choose from {', '.join(STRATEGIES)}")
        for field in ("lam", "epsilon", "dual_lr", "radius", "mu"):
            if getattr(self, field) < 0:
                raise SafetradeError(f"strategy {self.name}: {field} must be >= 0, got {getattr(self, field)}")

    @property
    def uses_proxy(self) -> bool:
        return self.name.startswith("case1")

    @property
    def uses_anchor(self) -> bool:
        return self.name.startswith("case2")


def init_state(cfg: StrategyConfig) -> dict[str, jax.Array]:
    """Strategy state carried in the train state: the multiplier λ (fixed unless case1_constrained)."""
    return {"lam": jnp.asarray(cfg.lam if cfg.name.startswith("case1") else 0.0, jnp.float32)}


def sq_norm(tree) -> jax.Array:
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def objective(cfg: StrategyConfig, state, cap_loss, proxy_loss=None, displacement=None) -> jax.Array:
    """The scalar each strategy's optimiser minimises at the current multiplier."""
    total = cap_loss
    if cfg.name == "case1_penalty":
        total = total + state["lam"] * proxy_loss
    elif cfg.name == "case1_constrained":
        # The constant bound does not change the gradient; λ·L_s' is the Lagrangian's θ-dependent part.
        total = total + jax.lax.stop_gradient(state["lam"]) * proxy_loss
    elif cfg.name == "case2_penalty":
        total = total + 0.5 * cfg.mu * sq_norm(displacement)
    return total


def dual_update(cfg: StrategyConfig, state, proxy_loss, proxy_bound):
    """Projected dual ascent on λ for case1_constrained: λ ← max(0, λ + η·(L_s'(θ) − bound)); else unchanged."""
    if cfg.name != "case1_constrained":
        return state
    lam = jnp.maximum(0.0, state["lam"] + cfg.dual_lr * (jax.lax.stop_gradient(proxy_loss) - proxy_bound))
    return {**state, "lam": lam}


def ball_factors(cfg: StrategyConfig, displacement):
    """Per-leaf shrink factors in [0, 1] that bring ‖displacement‖ within the radius (1 when already inside)."""
    def factor(norm):
        return jnp.where(norm > cfg.radius, cfg.radius / jnp.maximum(norm, 1e-30), 1.0)

    if cfg.per_tensor:
        return jax.tree.map(lambda d: factor(jnp.sqrt(sq_norm(d))), displacement)
    shrink = factor(jnp.sqrt(sq_norm(displacement)))
    return jax.tree.map(lambda _: shrink, displacement)


def project_full(cfg: StrategyConfig, params, anchor):
    """Euclidean projection of params onto {θ : ‖θ − anchor‖ ≤ r} (global, or per tensor)."""
    if cfg.name != "case2_projection":
        return params
    displacement = jax.tree.map(lambda p, a: p.astype(jnp.float32) - a.astype(jnp.float32), params, anchor)
    factors = ball_factors(cfg, displacement)
    return jax.tree.map(lambda a, d, f: (a.astype(jnp.float32) + f * d).astype(a.dtype), anchor, displacement,
                        factors)
