"""Case II (an alignment-*parameter* constraint) as optax transformations on any pytree.

    tx = optax.chain(optax.adamw(1e-3), case2_projection(aligned, radius=0.5))       # ‖θ − θ_s‖₂ ≤ r, always
    tx = optax.chain(case2_penalty(aligned, mu=1.0), optax.adamw(1e-3))              # + (μ/2)‖θ − θ_s‖₂²

`case2_projection` goes last in the chain: its update maps the optimiser's step u to u' such that
`optax.apply_updates(params, u')` is the Euclidean projection of params + u onto the ball around the anchor (one
global ball, or one per leaf with `per_tensor=True`). `case2_penalty` goes first: it adds the gradient of
(μ/2)‖θ − θ_s‖² (μ(θ − θ_s) for full fine-tuning) to the loss gradient before the optimiser sees it.

Both take the anchor θ_s at construction, or with each update (`anchor=None`, then
`tx.update(g, state, params, anchor=aligned)`: a jitted step can take the anchor as an argument instead of baking it
into the compiled program), or a `displacement` hook instead (safetrade/tradeoff/displacement.py: LoRA, where the
ball is on the merged update and the anchor is implicit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from safetrade.errors import SafetradeError
from safetrade.tradeoff.displacement import Displacement, resolve


def _check_knob(name: str, value: float, what: str) -> None:
    if not value >= 0:
        raise SafetradeError(f"{what}: {name} must be >= 0, got {value}")


def ball_factors(displacement, radius: float, per_tensor: bool = False):
    """A factor per displacement leaf that brings it into the ball: r / √max(‖d‖², r²) (1 inside the ball).

    It is the factor `optax.projections.projection_l2_ball` scales a tree by; here it is kept as a factor because a
    LoRA hook applies it to B rather than to the displacement itself.
    """
    r = jnp.asarray(radius, jnp.float32)  # r² in float32: √(r²) is exactly r, so the factor is exactly 1 inside

    def factor(tree):
        return r / jnp.sqrt(jnp.maximum(optax.tree.norm(tree, squared=True), r * r))

    if per_tensor:
        return jax.tree.map(factor, displacement)
    shrink = factor(displacement)
    return jax.tree.map(lambda _: shrink, displacement)


def _with_displacement(what: str, anchor, displacement: Displacement | None, apply
                       ) -> optax.GradientTransformationExtraArgs:
    """A stateless transform whose update is apply(updates, params, hook), the hook resolved for each update."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise SafetradeError(f"{what} needs the params: tx.update(updates, state, params)")
        hook = resolve(displacement, anchor if anchor is not None else extra_args.get("anchor"), what)
        return apply(updates, params, hook), state

    return optax.GradientTransformationExtraArgs(init, update)


def case2_projection(anchor, radius: float, *, per_tensor: bool = False,
                     displacement: Displacement | None = None) -> optax.GradientTransformationExtraArgs:
    """Keep ‖θ − anchor‖₂ ≤ radius after every update (last in `optax.chain`; `update` needs `params`)."""
    _check_knob("radius", radius, "case2_projection")

    def project(updates, params, hook):
        stepped = optax.apply_updates(params, updates)
        projected = hook.scale(stepped, ball_factors(hook.of(stepped), radius, per_tensor))
        # apply_updates(params, projected − params) is `projected` wherever the subtraction is exact (Sterbenz:
        # projected within a factor 2 of params, as for most entries after one step); elsewhere within an ulp.
        return jax.tree.map(lambda q, p: q - p, projected, params)

    return _with_displacement("case2_projection", anchor, displacement, project)


def case2_penalty(anchor, mu: float, *, displacement: Displacement | None = None
                  ) -> optax.GradientTransformationExtraArgs:
    """Add ∇(μ/2)‖θ − anchor‖₂² to the gradient (first in `optax.chain`, before the optimiser; needs `params`)."""
    _check_knob("mu", mu, "case2_penalty")

    def pull(updates, params, hook):
        return jax.tree.map(jnp.add, updates, jax.grad(lambda p: penalty_value(hook, p, mu))(params))

    return _with_displacement("case2_penalty", anchor, displacement, pull)


def penalty_value(hook: Displacement, params, mu: float) -> jax.Array:
    """(μ/2)‖displacement‖₂², the term case2_penalty adds to the loss (its gradient is what it adds to g)."""
    return 0.5 * mu * optax.tree.norm(hook.of(params), squared=True)
