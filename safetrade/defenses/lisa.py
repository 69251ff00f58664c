"""Lisa (Huang et al., NeurIPS 2024): bi-state optimisation with a proximal term, on any params pytree.

    cfg = LisaConfig()                                          # rho 1, 100 alignment / 900 fine-tune steps
    result = lisa_train(loss_fn, params, tx.init(params), tx, alignment_batches, user_batches, cfg, steps=20_000)
    result.params, result.anchors["alignment"], result.history

Rule (paper and official code, `LisaTrainer`): during the user's fine-tuning, alternate between an *alignment*
state (steps on alignment data D_a) and a *fine-tune* state (steps on the user's data D_u), with one shared
optimiser. Each cycle is `alignment_steps` alignment steps followed by `finetune_steps` fine-tune steps, starting
in the alignment state (`lisa_schedule`). At each switch the current params -- the last params of the state being
left -- become the anchor of the state being entered: entering fine-tune sets θ_al ← θ, entering alignment sets
θ_ft ← θ; both anchors start at the initial params. Each state descends its loss plus a proximal term towards the
other state's anchor:
    fine-tune state:  L_u(θ) + ρ/2 Σ_tensors ‖θ − θ_al‖²       alignment state:  L_a(θ) + ρ/2 Σ ‖θ − θ_ft‖²
The proximal gradient ρ (θ − anchor) is added to the loss gradient *before* the optimiser (`proximal_grad`): with
AdamW it goes through Adam's normaliser as in the official code (not a true proximal step; reproduced, not
"improved"). Note that the term is zero on the first step after each switch (the anchor is the current θ), so with
alignment_steps = finetune_steps = 1 Lisa is plain alternating descent whatever ρ.

Defaults are the official script's (`lisa_poison_ratio.sh`), which differ from its argparse defaults (ρ 0.1,
500/500): ρ = 1, 100 alignment / 900 fine-tune steps. Two further behaviours of the official code, kept as
options with its values as defaults (neither is in the paper's algorithm):
  - `proximal_off_fraction` 0.1: the proximal term is off while step <= 0.1 x total steps (the code comments that it
    hurts GSM8K convergence early on);
  - `skip_user_batches_on_alignment` True: the HF Trainer draws a user batch on every step and throws it away on
    alignment steps, so D_u sees only the fine-tune share of its batches, in the order the schedule reaches them.
Steps are optimiser steps here (the official counts micro-batches; with gradient accumulation 1 they agree).

In the paper D_a is the alignment data itself (BeaverTails safe pairs); safetrade's is the built "alignment" set
(`alignment_set`, a `sets.rows_for` name). `lisa_bistate` is the same rule as one optax piece that keeps the
anchor in its state (what `safetrade finetune strategy.name=lisa` chains); `lisa_proximal` takes the anchor as an
update argument instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from safetrade.defenses.common import DefenseError
from safetrade.tradeoff.registry import Lisa
from safetrade.models import lora as lora_lib
from safetrade.train.losses import lm_loss

__all__ = [
    "ALIGNMENT",
    "FINETUNE",
    "LisaConfig",
    "LisaResult",
    "LisaBistateState",
    "lisa_bistate",
    "lisa_proximal",
    "lisa_schedule",
    "schedule_counts",
    "lisa_train",
    "llama_loss_fn",
    "make_lisa_step",
    "proximal_active",
    "proximal_grad",
]

ALIGNMENT = "alignment"
FINETUNE = "finetune"


# One config for the library loop and the `safetrade finetune` strategy: its fields, defaults and checks are in
# safetrade/tradeoff/registry.py (the core), where the strategy registry needs it without this module.
LisaConfig = Lisa


def lisa_schedule(step: int, cfg: LisaConfig) -> str:
    """The state of (0-based) step `step`: ALIGNMENT for the first K1 steps of each K1 + K2 cycle, else FINETUNE.

    As the official `check_mode`: K2 = 0 stays in the alignment state, K1 = 0 in the fine-tune state.
    """
    if step < 0:
        raise DefenseError(f"lisa_schedule: step must be >= 0, got {step}")
    cycle = cfg.alignment_steps + cfg.finetune_steps
    return ALIGNMENT if step % cycle < cfg.alignment_steps else FINETUNE


def schedule_counts(step: int, cfg: LisaConfig) -> tuple[int, int]:
    """(alignment steps, fine-tune steps) that come before 0-based `step` in the schedule: the index of the next
    batch each state draws when its batches are consumed only in its own steps."""
    cycles, within = divmod(step, cfg.alignment_steps + cfg.finetune_steps)
    alignment = cycles * cfg.alignment_steps + min(within, cfg.alignment_steps)
    return alignment, step - alignment


def proximal_active(step: int, total_steps: int, cfg: LisaConfig) -> bool:
    """Whether the proximal term applies at 0-based `step` (official: step > proximal_off_fraction x total)."""
    return cfg.rho > 0 and step > cfg.proximal_off_fraction * total_steps


def proximal_grad(params, anchor, rho):
    """∇_θ of ρ/2 Σ_leaves ‖θ − anchor‖², i.e. ρ (θ − anchor), leaf by leaf in each leaf's dtype."""
    return jax.tree.map(lambda p, a: (rho * (p - a)).astype(p.dtype), params, anchor)


def lisa_proximal(rho: float) -> optax.GradientTransformationExtraArgs:
    """An optax piece adding ρ (params − anchor) to the gradient, the anchor passed as `update(..., anchor=)`.

    Chain it before the optimiser (optax.chain(lisa_proximal(ρ), adamw)) so the term goes through the optimiser as
    in the official code. `anchor=None` leaves the gradient unchanged (so does anchor = params: the term is zero).
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, anchor=None, **extra):
        del extra
        if anchor is None:
            return updates, state
        if params is None:
            raise DefenseError("lisa_proximal needs params: call update(grads, state, params, anchor=...)")
        prox = proximal_grad(params, anchor, rho)
        return jax.tree.map(lambda g, p: g + p.astype(g.dtype), updates, prox), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class LisaBistateState(NamedTuple):
    count: jax.Array  # int32: optimiser steps taken
    anchor: Any  # the other state's anchor: the params at the latest switch (at first the initial params)


def lisa_bistate(cfg: LisaConfig, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """Lisa's proximal term with its anchors kept in the optimiser state: one piece, jittable, for any train step.

    Chain it before the optimiser. Step `count` is in the state `lisa_schedule(count, cfg)` says; the caller feeds
    that state's batch (its loss is the gradient passed in). Whenever the state changes, the params reaching this
    update -- the last params of the state being left -- become the anchor, so the anchor is always the other
    state's checkpoint, as in `lisa_train`. The gradient gains ρ (params − anchor) when
    `proximal_active(count, total_steps, cfg)`. Holds one copy of the params, like an optimiser moment.
    """
    cycle = cfg.alignment_steps + cfg.finetune_steps
    off_until = cfg.proximal_off_fraction * total_steps

    def in_alignment(count):
        return (count % cycle) < cfg.alignment_steps

    def init_fn(params):
        return LisaBistateState(jnp.zeros((), jnp.int32), jax.tree.map(lambda p: jnp.array(p, copy=True), params))

    def update_fn(updates, state, params=None, **extra):
        del extra
        if params is None:
            raise DefenseError("lisa_bistate needs params: call update(grads, state, params)")
        count = state.count
        switched = (count > 0) & (in_alignment(count) != in_alignment(count - 1))
        anchor = jax.tree.map(lambda p, a: jnp.where(switched, p, a), params, state.anchor)
        on = (cfg.rho > 0) & (count > off_until)
        prox = proximal_grad(params, anchor, cfg.rho)
        updates = jax.tree.map(lambda g, p: g + jnp.where(on, p, 0).astype(g.dtype), updates, prox)
        return updates, LisaBistateState(count + 1, anchor)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_lisa_step(loss_fn: Callable[[Any, Any], jax.Array], tx: optax.GradientTransformation, rho: float):
    """The jitted step (params, opt_state, batch, anchor) -> (params, opt_state, loss) of either state.

    The state only decides which batch and which anchor are passed, so one compiled step serves both; passing the
    current params as the anchor switches the proximal term off (its gradient is exactly zero).
    """
    proximal = lisa_proximal(rho)

    def step(params, opt_state, batch, anchor):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        grads, _ = proximal.update(grads, optax.EmptyState(), params, anchor=anchor)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step)


def llama_loss_fn(cfg, base=None) -> Callable[[Any, Any], jax.Array]:
    """loss_fn(trainable, batch) for `lisa_train` on safetrade's Llama: the token-mean response loss of a batch
    {"input_ids", "attention_mask", "loss_mask"}; with `base` (LoRA: lora.split's frozen part) the trainable tree
    is the adapters, and the proximal term then acts on the adapters only, as in the official LoRA code."""

    def loss_fn(trainable, batch):
        return lm_loss(cfg, lora_lib.combine(base, trainable) if base is not None else trainable, batch)

    return loss_fn


class LisaResult(NamedTuple):
    params: Any
    opt_state: Any
    anchors: dict[str, Any]  # ALIGNMENT: θ_al (last params of the alignment state), FINETUNE: θ_ft
    history: list[dict]  # per step: {"step", "state", "loss", "proximal"}


def lisa_train(loss_fn: Callable[[Any, Any], jax.Array], params, opt_state, tx: optax.GradientTransformation,
               alignment_batches: Iterator, user_batches: Iterator, cfg: LisaConfig, steps: int,
               *, jit_step=None) -> LisaResult:
    """Run `steps` Lisa steps on any params pytree and loss_fn(params, batch) (a scalar); see the module doc.

    `opt_state` is `tx.init(params)`; both iterators must yield at least as many batches as the schedule draws
    (cycle them for several epochs). The schedule and the anchors live on the host; the anchors are the params
    arrays themselves (JAX arrays are immutable, so no copy is needed). `jit_step` replaces the default
    `make_lisa_step(loss_fn, tx, cfg.rho)` (e.g. one jitted with shardings). `history[k]["loss"]` is the state's
    own loss, without the proximal term.
    """
    if steps < 0:
        raise DefenseError(f"lisa_train: steps must be >= 0, got {steps}")
    step_fn = jit_step or make_lisa_step(loss_fn, tx, cfg.rho)
    anchors = {ALIGNMENT: params, FINETUNE: params}  # both start at the initial params, as in the official code
    history: list[dict] = []
    previous = None
    for k in range(steps):
        state = lisa_schedule(k, cfg)
        if previous is not None and state != previous:
            anchors[previous] = params  # the state being left: its last params anchor the state being entered
        other = FINETUNE if state == ALIGNMENT else ALIGNMENT
        if state == ALIGNMENT:
            batch = _next(alignment_batches, "alignment", k)
            if cfg.skip_user_batches_on_alignment:
                _next(user_batches, "user", k)
        else:
            batch = _next(user_batches, "user", k)
        on = proximal_active(k, steps, cfg)
        params, opt_state, loss = step_fn(params, opt_state, batch, anchors[other] if on else params)
        history.append({"step": k, "state": state, "loss": loss, "proximal": on})
        previous = state
    if previous is not None:
        anchors[previous] = params  # as the official end_training: the final params are their state's anchor
    history = [{**h, "loss": float(h["loss"])} for h in history]  # one host sync at the end
    return LisaResult(params, opt_state, anchors, history)


def _next(batches: Iterator, name: str, step: int):
    try:
        return next(batches)
    except StopIteration:
        raise DefenseError(f"lisa_train: the {name} batches ran out at step {step}; pass an iterator that yields "
                           "enough (e.g. itertools.cycle over an epoch, or map(batches, itertools.count()))") from None
