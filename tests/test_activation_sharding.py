"""Activation sharding constraints: present in the lowered program under a mesh, absent (the very same traced
program) without one, and numerically neutral: 8 simulated devices give the single-device losses.

The train-step tests use a (data=2, fsdp=2, tensor=2) mesh, so every activation rule is active (the tensor axis
splits heads, the MLP hidden, the vocab and the residual stream's model dimension), unlike the (2, 4, 1) mesh of
tests/test_train.py.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from safetrade import parallel
from safetrade.models import llama
from safetrade.train import step as step_lib
from safetrade.tradeoff import strategy_config
from tests.test_train import batches

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")

CFG = llama.preset("tiny")  # 4 heads, 2 kv heads, hidden 64, MLP 128, vocab 256: all divide by 2
# SmolLM2's head layout in miniature: 3 query heads and 1 kv head, which tensor=2 does not divide.
ODD_HEADS = llama.LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=3,
                              num_kv_heads=1, max_position_embeddings=128, tie_word_embeddings=True)
# Constraint sites in one forward: the embedding, the logits, and per block (the scan body, traced once) q, k, v,
# the attention output, the MLP hidden activation and the residual stream twice.
FORWARD_SITES = 2 + 7


def constraint_count(lowered_text: str) -> int:
    """Sharding constraints in lowered StableHLO: Shardy's op, or the GSPMD custom call when Shardy is off."""
    return len(re.findall(r"sdy\.sharding_constraint|custom_call @Sharding\b", lowered_text))


def sharded_step(cfg, mesh, strategy, tx):
    params = llama.init(cfg, jax.random.key(0))
    shard = parallel.param_shardings(llama.logical_axes(cfg), params, mesh)
    state = step_lib.init_state(jax.device_put(params, shard), tx, strategy)
    shardings = step_lib.state_shardings(state, shard, mesh, tx, strategy)
    fn = step_lib.jit_train_step(step_lib.make_train_step(cfg, tx, strategy), mesh, shardings, {})
    return fn, jax.device_put(state, shardings)


def train_losses(cfg, mesh=None, steps=4):
    tx, strategy = optax.adamw(1e-2), strategy_config("sft")
    if mesh is None:
        fn = jax.jit(step_lib.make_train_step(cfg, tx, strategy), donate_argnums=0)
        state = step_lib.init_state(llama.init(cfg, jax.random.key(0)), tx, strategy)
    else:
        fn, state = sharded_step(cfg, mesh, strategy, tx)
    out = []
    for k in range(steps):
        batch = {"cap": batches(k)["cap"]}
        if mesh is not None:
            batch = {"cap": parallel.host_local_batch_to_global(batch["cap"], mesh)}
        state, metrics = fn(state, batch, {})
        out.append(float(metrics["loss_cap"]))
    return out


def test_lowered_train_step_carries_the_constraints():
    mesh = parallel.make_mesh(2, 2, 2)
    tx, strategy = optax.adamw(1e-2), strategy_config("sft")
    fn, state = sharded_step(CFG, mesh, strategy, tx)
    batch = {"cap": parallel.host_local_batch_to_global(batches(0)["cap"], mesh)}
    with_mesh = fn.lower(state, batch, {}).as_text()
    # The same step jitted with the same shardings but traced without the mesh in context: no constraint at all.
    without = jax.jit(step_lib.make_train_step(CFG, tx, strategy)).lower(state, batch, {}).as_text()
    assert constraint_count(without) == 0
    # Forward sites, and their transposes in the backward pass (a constraint's cotangent is constrained alike).
    assert constraint_count(with_mesh) >= 2 * FORWARD_SITES


def test_forward_constraints_under_a_user_mesh_name_the_rules_axes():
    mesh = parallel.make_mesh(2, 2, 2)
    params = jax.device_put(llama.init(CFG, jax.random.key(0)),
                            parallel.param_shardings(llama.logical_axes(CFG), llama.abstract_params(CFG), mesh))
    ids = jax.device_put(jnp.zeros((8, 16), jnp.int32), parallel.batch_sharding(mesh))
    forward = jax.jit(lambda p, t: llama.forward(CFG, p, t)[0])
    with jax.set_mesh(mesh):
        text = forward.lower(params, ids).as_text()
    assert constraint_count(text) == FORWARD_SITES
    # The logits [8, 16, 256]: batch over data x fsdp, vocab over tensor.
    assert parallel.logical_to_spec(llama.LOGITS_AXES, (8, 16, 256), mesh) == P(("data", "fsdp"), None, "tensor")
    assert re.search(r'sharding_constraint[^\n]*\[\{"data", "fsdp"\}, \{\}, \{"tensor"\}\]', text) or \
        re.search(r'@Sharding[^\n]*devices=\[4,1,2\]', text)


def test_without_a_mesh_the_traced_forward_is_the_unconstrained_one(monkeypatch):
    params = llama.init(CFG, jax.random.key(0))
    ids = jnp.zeros((2, 8), jnp.int32)
    program = lambda: str(jax.make_jaxpr(lambda p, t: llama.forward(CFG, p, t, return_hidden=True))(params, ids))  # noqa: E731
    constrained = program()
    monkeypatch.setattr(parallel, "constrain", lambda x, axes, rules=parallel.RULES: x)
    assert program() == constrained
    assert "sharding_constraint" not in constrained
    x = jnp.ones((2, 8, 64))
    assert parallel.constrain(x, llama.RESIDUAL_AXES) is x


def test_mesh_of_other_axis_names_is_left_alone():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    seen = []

    def f(x):
        y = parallel.constrain(x, llama.RESIDUAL_AXES)
        seen.append(y is x)
        return y

    with jax.set_mesh(mesh):
        jax.jit(f).lower(jnp.ones((8, 4, 64)))
    assert seen == [True]


@pytest.mark.parametrize("cfg", [
    pytest.param(CFG, id="tiny"),
    pytest.param(ODD_HEADS.replace(remat=True, tie_word_embeddings=False), id="odd_heads_untied_remat",
                 marks=pytest.mark.slow),
])
def test_constrained_sharded_training_equals_one_device(cfg):
    # Tied and untied, with and without remat, on (2, 2, 2): the mesh where MaxText's residual layout miscompiles.
    single = train_losses(cfg, steps=2)
    sharded = train_losses(cfg, parallel.make_mesh(2, 2, 2), steps=2)
    for a, b in zip(single, sharded):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_indivisible_heads_fall_back_to_replicated_and_batches_to_a_leading_group():
    # 3 heads do not divide over tensor=2: that dimension stays whole.
    assert parallel.logical_to_spec(llama.QUERY_AXES, (8, 16, 3, 16), parallel.make_mesh(2, 2, 2)) == \
        P(("data", "fsdp"), None, None, None)
    # A micro-batch of 4 rows on data=2 x fsdp=4 keeps the split over data.
    mesh = parallel.make_mesh(2, 4, 1)
    assert parallel.logical_to_spec(llama.RESIDUAL_AXES, (4, 16, 64), mesh) == P("data", None, None)
    assert parallel.logical_to_spec(llama.MLP_HIDDEN_AXES, (8, 16, 128), mesh) == P(("data", "fsdp"), None, "tensor")


def test_generation_under_a_mesh_matches_one_device():
    from safetrade.generate import SamplingConfig, generate

    mesh = parallel.make_mesh(2, 2, 2)
    params = llama.init(CFG, jax.random.key(0))
    sharded = jax.device_put(params, parallel.param_shardings(llama.logical_axes(CFG), params, mesh))
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    sampling = SamplingConfig(max_new_tokens=6)
    expected = generate(CFG, params, prompts, sampling).tokens
    with jax.set_mesh(mesh):
        got = generate(CFG, sharded, prompts, sampling).tokens
    assert [list(t) for t in got] == [list(t) for t in expected]
