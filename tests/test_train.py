"""The LLM train step: exact accumulation, constraints every step, sharded == single device, resume, divergence."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safetrade import parallel
from safetrade.models import llama
from safetrade.train import loop, step as step_lib
from safetrade.tradeoff import StrategyConfig, strategy_config

CFG = llama.preset("tiny")


def synthetic_batch(seed: int, rows: int = 8, length: int = 16):
    """Token rows with a 'prompt' half (loss 0) and a 'response' half (loss 1), right-padded by a few tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, CFG.vocab_size, (rows, length)).astype(np.int32)
    attention = np.ones((rows, length), np.int32)
    attention[:, -2:] = 0
    loss = np.zeros((rows, length), np.float32)
    loss[:, length // 2 : -2] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}


def batches(k):
    return {"cap": synthetic_batch(k), "proxy": synthetic_batch(10_000 + k)}


def setup(strategy: StrategyConfig, lr=1e-2, accum=1, mesh=None, tx=None):
    params = llama.init(CFG, jax.random.key(0))
    aligned = jax.tree.map(jnp.copy, params)
    tx = tx or optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr))
    frozen = step_lib.make_frozen(anchor=aligned if strategy.uses_anchor else None,
                                  proxy_reference=2.0 if strategy.uses_proxy_reference else None)
    fn = step_lib.make_train_step(CFG, tx, strategy, accum_steps=accum)
    if mesh is None:
        return jax.jit(fn, donate_argnums=0), step_lib.init_state(params, tx, strategy), frozen
    shard = parallel.param_shardings(llama.logical_axes(CFG), params, mesh)
    params = jax.device_put(params, shard)
    state = step_lib.init_state(params, tx, strategy)
    shardings = step_lib.state_shardings(state, shard, mesh, tx, strategy)
    state = jax.device_put(state, shardings)
    fz = step_lib.frozen_shardings_for(frozen, CFG, mesh)
    frozen = jax.device_put(frozen, fz)
    return step_lib.jit_train_step(fn, mesh, shardings, fz), state, frozen


def losses(strategy, steps=5, **kw):
    fn, state, frozen = setup(strategy, **kw)
    out = []
    for k in range(steps):
        state, metrics = fn(state, batches(k), frozen)
        out.append({n: float(v) for n, v in metrics.items()})
    return out, state


def test_sft_learns_the_batch():
    fn, state, frozen = setup(strategy_config("sft"))
    first = None
    for _ in range(30):
        state, metrics = fn(state, batches(0), frozen)
        first = first or float(metrics["loss_cap"])
    assert float(metrics["loss_cap"]) < 0.5 * first


def test_accumulation_equals_one_big_batch():
    # SGD, because Adam's m/√v turns fp32 summation-order noise in near-zero gradients into lr-sized steps.
    one, s1 = losses(strategy_config("case1_penalty", lam=0.5), steps=3, accum=1, tx=optax.sgd(0.5))
    two, s2 = losses(strategy_config("case1_penalty", lam=0.5), steps=3, accum=4, tx=optax.sgd(0.5))
    for a, b in zip(one, two):
        assert abs(a["loss_cap"] - b["loss_cap"]) < 1e-5 * abs(a["loss_cap"])
        assert abs(a["loss_proxy"] - b["loss_proxy"]) < 1e-5 * abs(a["loss_proxy"])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0), s1.params, s2.params)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_case2_projection_holds_after_every_step(per_tensor):
    r = 0.05
    fn, state, frozen = setup(strategy_config("case2_projection", radius=r, per_tensor=per_tensor), lr=1e-2)
    for k in range(6):
        state, metrics = fn(state, batches(k), frozen)
        for leaf_p, leaf_a in zip(jax.tree.leaves(state.params), jax.tree.leaves(frozen["anchor"])):
            if per_tensor:
                assert float(jnp.linalg.norm((leaf_p - leaf_a).ravel())) <= r * (1 + 1e-5)
        assert float(metrics["distance"]) <= (r if not per_tensor else r * len(jax.tree.leaves(state.params))) * (1 + 1e-5)
    assert float(metrics["distance"]) > 0.5 * r  # the constraint is active, not trivially satisfied


def test_case1_constrained_multiplier_moves_with_the_violation():
    out, _ = losses(strategy_config("case1_constrained", lam=0.0, dual_lr=1.0), steps=3)
    # proxy loss on random tokens is ~log(256) = 5.5 > bound 2.0, so λ rises by η·(L − 2) each step.
    assert out[0]["lam"] == 0.0 and out[1]["lam"] > 3.0 and out[2]["lam"] > out[1]["lam"]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 simulated devices")
@pytest.mark.parametrize("strategy", [strategy_config("sft"), strategy_config("case2_projection", radius=0.05)])
def test_sharded_loss_curve_equals_single_device(strategy):
    single, _ = losses(strategy, steps=5)
    sharded, _ = losses(strategy, steps=5, mesh=parallel.make_mesh(data=2, fsdp=4, tensor=1))
    for a, b in zip(single, sharded):
        assert abs(a["loss_cap"] - b["loss_cap"]) <= 1e-5 * abs(a["loss_cap"])


def test_divergence_stops_with_a_clear_error(tmp_path):
    params = llama.init(CFG, jax.random.key(0))
    tx = optax.sgd(1e30)
    strategy = strategy_config("sft")
    fn = jax.jit(step_lib.make_train_step(CFG, tx, strategy), donate_argnums=0)
    state = step_lib.init_state(params, tx, strategy)
    with pytest.raises(loop.TrainingDiverged, match=r"step \d+: non-finite .*loss_cap.*last good checkpoint is step 1"):
        loop.run(fn, state, {}, batches, loop.LoopConfig(steps=5, save_every=1, progress=False), tmp_path)


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    from tensorboardX.event_file_writer import event_pb2  # tensorboardX is in the dev extra
    from tensorboardX.record_writer import RecordWriter  # noqa: F401 -- import proves the package is complete

    params = llama.init(CFG, jax.random.key(0))
    tx = optax.adam(1e-3)
    strategy = strategy_config("sft")
    fn = jax.jit(step_lib.make_train_step(CFG, tx, strategy))
    state = step_lib.init_state(params, tx, strategy)
    loop.run(fn, state, {}, batches, loop.LoopConfig(steps=3, progress=False), tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    logged = {}
    data = events[0].read_bytes()
    pos = 0
    while pos < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
        n = int.from_bytes(data[pos:pos + 8], "little")
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        for v in event.summary.value:
            logged[(v.tag, event.step)] = v.simple_value
    assert logged[("loss_cap", 3)] == pytest.approx(lines[2]["loss_cap"], rel=1e-6)


def test_lora_case2_projection_bounds_the_merged_update():
    from safetrade.models import lora

    r = 0.02
    base = llama.init(CFG, jax.random.key(0))
    cfg, full = lora.add_adapters(CFG, base, llama.LoraConfig(rank=4, alpha=8, targets=("q_proj", "down_proj")),
                                  jax.random.key(1))
    base, adapters = lora.split(full)
    strategy = strategy_config("case2_projection", radius=r)
    tx = optax.adam(5e-2)
    fn = jax.jit(step_lib.make_train_step(cfg, tx, strategy, lora=True))
    state = step_lib.init_state(adapters, tx, strategy)
    frozen = step_lib.make_frozen(base=base)
    for k in range(4):
        state, metrics = fn(state, batches(k), frozen)
        assert float(jnp.sqrt(lora.delta_sqnorm(cfg, state.params))) <= r * (1 + 1e-5)
    assert float(metrics["distance"]) > 0.5 * r
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)  # only adapters were trained


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    from safetrade.train.checkpoint import CheckpointRestoreError, Checkpoints, abstract_like

    params = llama.init(CFG, jax.random.key(0))
    tx = optax.adam(1e-3)
    strategy = strategy_config("sft")
    fn = jax.jit(step_lib.make_train_step(CFG, tx, strategy))
    state = step_lib.init_state(params, tx, strategy)
    loop.run(fn, state, {}, batches, loop.LoopConfig(steps=4, save_every=2, progress=False), tmp_path)
    newest = tmp_path / "checkpoints" / "4"
    for f in newest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate every file of step 4
    ckpt = Checkpoints(tmp_path / "checkpoints")
    with pytest.raises(CheckpointRestoreError, match=r"checkpoints/4: cannot restore checkpoint"):
        ckpt.restore(4, abstract_like(state))
    step, restored = ckpt.restore_latest(abstract_like(state))
    assert step == 2 and int(restored.step) == 2
    assert "trying an older checkpoint" in caplog.text


def test_tokenizer_and_model_vocab_mismatch_is_refused(tmp_path, smollm2_gguf):
    import shutil

    from safetrade import config
    from safetrade.errors import SafetradeError
    from safetrade.tokenizer import load_tokenizer
    from safetrade.train.jobs import run_train_job
    from tests.conftest import GOLDEN

    model_dir = tmp_path / "tiny"
    shutil.copytree(GOLDEN / "tiny_gqa_tied", model_dir)
    load_tokenizer(smollm2_gguf).save_pretrained(str(model_dir))  # 49152 tokens for a 256-token model
    job = config.load(config.TrainJob, None, [f"model.name={model_dir}", f"out_dir={tmp_path / 'run'}", "steps=1"])
    with pytest.raises(SafetradeError, match="49152 tokens but the model's vocab is 256"):
        run_train_job(job)


def test_bf16_compute_with_fp32_master_weights_trains():
    cfg = CFG.replace(dtype="bfloat16", remat=True)
    params = llama.init(cfg, jax.random.key(0))
    tx = optax.adam(1e-2)
    strategy = strategy_config("sft")
    fn = jax.jit(step_lib.make_train_step(cfg, tx, strategy))
    state = step_lib.init_state(params, tx, strategy)
    first = None
    for _ in range(15):
        state, metrics = fn(state, batches(0), {})
        first = first or float(metrics["loss_cap"])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))  # masters stay fp32
    assert float(metrics["loss_cap"]) < 0.7 * first
