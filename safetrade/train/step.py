"""The train state and the pure, jitted train step, composed from safetrade/tradeoff pieces.

    state = init_state(trainable, tx, strategy)
    step = make_train_step(cfg, tx, strategy, accum_steps=2, lora=False)   # (state, batch, frozen) -> (state, m)
    jstep = jit_train_step(step, mesh, state_shardings(state, shardings, mesh, tx, strategy), frozen_shardings)

`strategy` is a safetrade.tradeoff config; its pieces wrap the optimiser `tx` as
optax.chain(pieces.gradient, tx, pieces.constraint) and say what loss to descend: the step runs them and knows no
strategy by name. `trainable` is the full params tree (full fine-tuning) or the LoRA adapter tree (only adapters get
gradients and optimizer state; the Case II distance is then that of the merged update). `frozen` holds what the step
reads but never updates: the LoRA base weights, the aligned anchor θ_s (Case II, full fine-tuning) and the
reference loss L_s'(θ_s) (case1_constrained's bound is that + ε).

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

from safetrade import parallel, tradeoff
from safetrade.models import llama, lora as lora_lib
from safetrade.models.llama import LlamaConfig, Params
from safetrade.tradeoff import StrategyConfig
from safetrade.tradeoff.adapters import llama_lora
from safetrade.train.losses import lm_loss_sum


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Params  # the trainable tree: all params, or only the LoRA adapters
    opt_state: Any  # the state of optax.chain(strategy gradient piece, tx, strategy constraint piece); holds λ
    step: jax.Array  # int32 scalar
    rng: jax.Array  # uint32[2] raw key, for stochastic extensions (dropout, sampling during training)


def strategy_tx(tx: optax.GradientTransformation, strategy: StrategyConfig, displacement=None):
    """(the optimiser with the strategy's pieces around it, the pieces)."""
    pieces = tradeoff.build(strategy, displacement)
    return pieces.chain(tx), pieces


def init_state(trainable: Params, tx: optax.GradientTransformation, strategy: StrategyConfig, seed: int = 0):
    chain, _ = strategy_tx(tx, strategy)  # the pieces' states do not depend on the displacement hook
    return TrainState(
        params=trainable,
        opt_state=chain.init(trainable),
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
    lora_hook = llama_lora(cfg) if lora else None
    chain, pieces = strategy_tx(tx, strategy, lora_hook)
    uses_proxy = strategy.uses_proxy

    def full_params(trainable, frozen):
        return lora_lib.combine(frozen["base"], trainable) if lora else trainable

    def displacement(frozen):
        """θ − θ_s for the distance metric: the merged LoRA update, or params − anchor when an anchor is given."""
        if lora_hook is not None or "anchor" not in frozen:
            return lora_hook
        return tradeoff.anchored(frozen["anchor"])

    def step(state: TrainState, batch, frozen):
        n_cap = _target_count(batch["cap"])
        n_proxy = _target_count(batch["proxy"]) if uses_proxy else 1.0
        micro = _micro_batches(batch, accum_steps)

        def micro_loss(trainable, mb):
            params = full_params(trainable, frozen)
            cap = lm_loss_sum(cfg, params, mb["cap"])[0] / n_cap
            proxy = lm_loss_sum(cfg, params, mb["proxy"])[0] / n_proxy if uses_proxy else 0.0
            return pieces.objective(cap, proxy, state.opt_state), (cap, proxy)

        def accumulate(carry, mb):
            grads, cap, proxy = carry
            (_, (c, p)), g = jax.value_and_grad(micro_loss, has_aux=True)(state.params, mb)
            return (jax.tree.map(jnp.add, grads, g), cap + c, proxy + p), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (grads, cap_loss, proxy_loss), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micro
        )
        hook = displacement(frozen)
        metrics = {"loss_cap": cap_loss, **pieces.metrics(state.params, state.opt_state, hook),
                   "tokens": sum(b["attention_mask"].sum() for b in batch.values()).astype(jnp.float32)}
        if uses_proxy:
            metrics["loss_proxy"] = proxy_loss

        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = chain.update(grads, state.opt_state, state.params, anchor=frozen.get("anchor"),
                                          proxy_loss=proxy_loss, proxy_reference=frozen.get("proxy_reference"))
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if hook is not None:
            metrics["distance"] = optax.tree.norm(hook.of(params))
        return TrainState(params, opt_state, state.step + 1, state.rng), metrics

    return step


def make_frozen(base: Params | None = None, anchor: Params | None = None, proxy_reference: float | None = None):
    frozen: dict[str, Any] = {}
    if base is not None:
        frozen["base"] = base
    if anchor is not None:
        frozen["anchor"] = anchor
    if proxy_reference is not None:
        frozen["proxy_reference"] = jnp.asarray(proxy_reference, jnp.float32)
    return frozen


def state_shardings(state: TrainState, param_shardings, mesh: Mesh, tx: optax.GradientTransformation,
                    strategy: StrategyConfig):
    """Shardings for every leaf of the state: optimizer moments follow their params; scalars (λ) are replicated."""
    rep = parallel.replicated(mesh)
    chain, _ = strategy_tx(tx, strategy)
    opt = optax.tree_map_params(chain, lambda _, s: s, state.opt_state, param_shardings,
                                transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(param_shardings, opt, rep, rep)


def jit_train_step(step, mesh: Mesh | None, shardings: TrainState | None = None, frozen_shardings=None,
                   batch_ndim: int = 2):
    """jit the step with explicit in/out shardings over `mesh` and the state donated (updated in place).

    The step is traced with `mesh` in context, so the model's activation sharding constraints apply
    (parallel.constrain); without a mesh there are none.
    """
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    batch_sharding = parallel.batch_sharding(mesh, batch_ndim)
    return jax.jit(
        parallel.within_mesh(step, mesh),
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
