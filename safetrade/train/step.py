"""The train state and the pure, jitted train step.

    state = init_state(cfg, trainable, tx, strategy)
    step = make_train_step(cfg, tx, strategy, accum_steps=2, lora=False)   # (state, batch, frozen) -> (state, m)
    jstep = jit_train_step(step, mesh, state, frozen)                      # explicit shardings, donated state

`trainable` is the full params tree (full fine-tuning) or the LoRA adapter tree (only adapters get gradients
and optimizer state). `frozen` holds what the step reads but never updates: the LoRA base weights, the aligned
anchor θ_s (Case II) and the proxy-loss bound L_s'(θ_s) + ε (case1_constrained).

A batch is {"cap": cap_batch, "proxy": proxy_batch}; each is {"input_ids", "attention_mask", "loss_mask"} of
[accum_steps · micro, T]. Micro-batches are scanned and every loss is normalised by the token count of the whole
global batch, so accumulation gives exactly the gradient of the full-batch token-mean loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from safetrade import parallel
from safetrade.models import llama
from safetrade.models.llama import LlamaConfig, Params
from safetrade.train import strategies
from safetrade.train.losses import lm_loss_sum
from safetrade.train.strategies import StrategyConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Params  # the trainable tree: all params, or only the LoRA adapters
    opt_state: Any
    strategy: dict  # {"lam": multiplier}
    step: jax.Array  # int32 scalar
    rng: jax.Array  # uint32[2] raw key, for stochastic extensions (dropout, sampling during training)


def init_state(trainable: Params, tx: optax.GradientTransformation, strategy: StrategyConfig, seed: int = 0):
    return TrainState(
        params=trainable,
        opt_state=tx.init(trainable),
        strategy=strategies.init_state(strategy),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def _micro_batches(batch, accum_steps: int):
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {accum_steps} micro-batches")
        return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])

    return jax.tree.map(split, batch)


def _target_count(batch) -> jax.Array:
    return jnp.maximum(batch["loss_mask"][:, 1:].astype(jnp.float32).sum(), 1.0)


def make_train_step(cfg: LlamaConfig, tx: optax.GradientTransformation, strategy: StrategyConfig, *,
                    accum_steps: int = 1, lora: bool = False):
    """Build the pure step function (state, batch, frozen) -> (state, metrics)."""
    from safetrade.models import lora as lora_lib

    def full_params(trainable, frozen):
        return lora_lib.combine(frozen["base"], trainable) if lora else trainable

    def displacement(trainable, frozen):
        if lora:
            return lora_lib.delta(cfg, full_params(trainable, frozen))
        return jax.tree.map(lambda p, a: p.astype(jnp.float32) - a.astype(jnp.float32), trainable, frozen["anchor"])

    def step(state: TrainState, batch, frozen):
        n_cap = _target_count(batch["cap"])
        n_proxy = _target_count(batch["proxy"]) if strategy.uses_proxy else 1.0
        micro = _micro_batches(batch, accum_steps)

        def micro_loss(trainable, mb):
            params = full_params(trainable, frozen)
            cap = lm_loss_sum(cfg, params, mb["cap"])[0] / n_cap
            proxy = lm_loss_sum(cfg, params, mb["proxy"])[0] / n_proxy if strategy.uses_proxy else 0.0
            return strategies.objective(strategy, state.strategy, cap, proxy), (cap, proxy)

        def accumulate(carry, mb):
            grads, cap, proxy = carry
            (_, (c, p)), g = jax.value_and_grad(micro_loss, has_aux=True)(state.params, mb)
            return (jax.tree.map(jnp.add, grads, g), cap + c, proxy + p), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (grads, cap_loss, proxy_loss), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micro
        )
        metrics = {"loss_cap": cap_loss, "lam": state.strategy["lam"],
                   "tokens": sum(b["attention_mask"].sum() for b in batch.values()).astype(jnp.float32)}
        if strategy.uses_proxy:
            metrics["loss_proxy"] = proxy_loss
        if strategy.name == "case2_penalty":
            def penalty(trainable):
                return strategies.objective(strategy, state.strategy, 0.0,
                                            displacement=displacement(trainable, frozen))
            value, g = jax.value_and_grad(penalty)(state.params)
            grads = jax.tree.map(jnp.add, grads, g)
            metrics["penalty"] = value

        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = _constrain(params, frozen)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if strategy.uses_anchor or lora:
            metrics["distance"] = jnp.sqrt(strategies.sq_norm(displacement(params, frozen)))
        new_strategy = strategies.dual_update(strategy, state.strategy, proxy_loss, frozen.get("proxy_bound", 0.0))
        new_state = TrainState(params, opt_state, new_strategy, state.step + 1, state.rng)
        return new_state, metrics

    def _constrain(params, frozen):
        if strategy.name != "case2_projection":
            return params
        if not lora:
            return strategies.project_full(strategy, params, frozen["anchor"])
        # The constraint is on the merged update ΔW = scale·A·B, linear in B: shrink B.
        factors = strategies.ball_factors(strategy, displacement(params, frozen))
        return lora_lib.scale_b(params, factors)

    return step


def make_frozen(base: Params | None = None, anchor: Params | None = None, proxy_bound: float | None = None):
    frozen: dict[str, Any] = {}
    if base is not None:
        frozen["base"] = base
    if anchor is not None:
        frozen["anchor"] = anchor
    if proxy_bound is not None:
        frozen["proxy_bound"] = jnp.asarray(proxy_bound, jnp.float32)
    return frozen


def state_shardings(state: TrainState, param_shardings, mesh: Mesh, tx: optax.GradientTransformation):
    """Shardings for every leaf of the state: optimizer moments follow their params; scalars are replicated."""
    rep = parallel.replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, s: s, state.opt_state, param_shardings,
                                transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(param_shardings, opt, jax.tree.map(lambda _: rep, state.strategy), rep, rep)


def jit_train_step(step, mesh: Mesh | None, shardings: TrainState | None = None, frozen_shardings=None,
                   batch_ndim: int = 2):
    """jit the step with explicit in/out shardings over `mesh` and the state donated (updated in place)."""
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    batch_sharding = parallel.batch_sharding(mesh, batch_ndim)
    return jax.jit(
        step,
        in_shardings=(shardings, batch_sharding, frozen_shardings),
        out_shardings=(shardings, parallel.replicated(mesh)),
        donate_argnums=0,
    )


def frozen_shardings_for(frozen, cfg: LlamaConfig, mesh: Mesh):
    """Shardings of the frozen inputs (weight trees of the base config `cfg` sharded like params; scalars
    replicated)."""
    out = {}
    for key, value in frozen.items():
        if key in ("base", "anchor"):
            out[key] = parallel.param_shardings(llama.logical_axes(cfg), value, mesh)
        else:
            out[key] = parallel.replicated(mesh)
    return out
