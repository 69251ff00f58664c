"""The training loop's hot paths: host syncs only at log/eval/save steps, exact divergence reports, one-ahead
batches, background checkpoints, and evaluation helpers that compile once per shape."""

from __future__ import annotations

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safetrade.errors import SafetradeError
from safetrade.models import llama
from safetrade.train import loop, step as step_lib
from safetrade.train.checkpoint import Checkpoints, abstract_like
from safetrade.tradeoff import strategy_config
from tests.test_train import CFG, batches, synthetic_batch

STRATEGY = strategy_config("case1_penalty", lam=0.5)
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))


def fresh_state():
    # Committed to device 0, as a restored checkpoint is: resumed runs then reuse the same compiled step.
    return jax.device_put(step_lib.init_state(llama.init(CFG, jax.random.key(0)), TX, STRATEGY), jax.devices()[0])


def raw_step():
    return step_lib.make_train_step(CFG, TX, STRATEGY)


JITTED_STEP = jax.jit(raw_step(), donate_argnums=0)  # compiled once for the whole module


@functools.cache
def reference_metrics(steps: int) -> tuple[dict[str, float], ...]:
    """Each step's metrics, fetched one step at a time without the loop: what the loop's records must match."""
    state, out = fresh_state(), []
    for k in range(steps):
        state, metrics = JITTED_STEP(state, batches(k), {})
        out.append({name: float(v) for name, v in jax.device_get(metrics).items()})
    return tuple(out)


@pytest.fixture
def counted_fetches(monkeypatch):
    """The global step of every call to loop.fetch_to_host (the loop's one device -> host copy)."""
    seen: list[int] = []
    original = loop.fetch_to_host

    def counting(tree):
        host = original(tree)
        seen.append(host.step)
        return host

    monkeypatch.setattr(loop, "fetch_to_host", counting)
    return seen


def test_metrics_reach_the_host_once_per_log_window(counted_fetches, monkeypatch):
    # On GPU/TPU any other device -> host copy inside the loop (a float(metric), a device_get) raises under this
    # guard, fetch_to_host being the one place allowed; JAX does not guard CPU transfers, so on a CPU the count
    # below is the check.
    counting = loop.fetch_to_host

    def allowed(tree):
        with jax.transfer_guard_device_to_host("allow"):
            return counting(tree)

    monkeypatch.setattr(loop, "fetch_to_host", allowed)
    state = fresh_state()
    with jax.transfer_guard_device_to_host("disallow_explicit"):
        loop.run(JITTED_STEP, state, {}, batches, loop.LoopConfig(steps=12, log_every=4, progress=False))
    assert counted_fetches == [4, 8, 12]


def test_log_records_are_window_means_and_save_steps_sync_once(counted_fetches, tmp_path):
    loop.run(JITTED_STEP, fresh_state(), {}, batches,
             loop.LoopConfig(steps=12, log_every=4, save_every=6, progress=False), tmp_path)
    assert counted_fetches == [4, 6, 8, 12]  # log steps, plus the save step 6 (a finiteness check before saving)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    reference = reference_metrics(12)
    for record in records:
        window = reference[record["step"] - 4:record["step"]]
        for name in reference[0]:
            # float32 sums on the device vs float64 sums here, over 4 values: a few float32 ulps.
            assert record[name] == pytest.approx(np.mean([m[name] for m in window]), rel=1e-6), name
        assert record["tokens_per_s"] > 0
    assert Checkpoints(tmp_path / "checkpoints").steps() == [6, 12]


def test_log_every_1_records_each_steps_own_values(tmp_path):
    loop.run(JITTED_STEP, fresh_state(), {}, batches, loop.LoopConfig(steps=3, progress=False), tmp_path)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for record, expected in zip(records, reference_metrics(3), strict=True):
        assert {name: record[name] for name in expected} == expected  # exactly: a window of one is the value


def _planted_nan_step(state, batch, plant):
    """The real train step, with loss_cap replaced by NaN at 1-based step plant["at"] (and after it, unless
    plant["transient"]: the loop must remember the first bad step even when later steps look fine again)."""
    state, metrics = raw_step()(state, batch, {})
    at = plant["at"]
    hit = jnp.where(plant["transient"], state.step == at, state.step >= at)
    return state, {**metrics, "loss_cap": jnp.where(hit, jnp.nan, metrics["loss_cap"])}


PLANTED_NAN_STEP = jax.jit(_planted_nan_step, donate_argnums=0)  # the plant is data: one compile for all cases


@pytest.mark.parametrize(("bad_step", "log_every", "save_every", "transient", "seen_at", "kept"), [
    (6, 4, 2, False, 6, [2, 4]),  # found at a save step: step 6 is never written
    (5, 3, 4, True, 6, [4]),  # found at the next log step, one step later; the NaN was gone by then
    (3, 8, 0, True, 8, []),  # no checkpoint before it: "step 0" (the start) is the last good one
])
def test_planted_nan_is_reported_at_its_step_and_no_checkpoint_at_or_after_it(
        tmp_path, bad_step, log_every, save_every, transient, seen_at, kept):
    cfg = loop.LoopConfig(steps=12, log_every=log_every, save_every=save_every, progress=False)
    with pytest.raises(loop.TrainingDiverged) as err:
        loop.run(PLANTED_NAN_STEP, fresh_state(), {"at": bad_step, "transient": transient}, batches, cfg, tmp_path)
    message = str(err.value)
    assert message.startswith(f"step {bad_step}: non-finite loss_cap ")
    assert f"seen at step {seen_at}" in message
    last_good = kept[-1] if kept else 0
    assert f"The last good checkpoint is step {last_good} in {tmp_path / 'checkpoints'}" in message
    ckpt = Checkpoints(tmp_path / "checkpoints")
    assert ckpt.steps() == kept
    if kept:
        restored = ckpt.restore(last_good, abstract_like(fresh_state()))
        assert int(restored.step) == last_good
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(restored.params))
    ckpt.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] < bad_step for r in records)


def test_resume_after_a_background_save_is_bit_identical(tmp_path):
    straight = loop.run(JITTED_STEP, fresh_state(), {}, batches, loop.LoopConfig(steps=6, progress=False))
    loop.run(JITTED_STEP, fresh_state(), {}, batches, loop.LoopConfig(steps=3, progress=False), tmp_path)
    resumed = loop.run(JITTED_STEP, fresh_state(), {}, batches, loop.LoopConfig(steps=6, progress=False), tmp_path)
    assert int(resumed.step) == 6
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 straight.params, resumed.params)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # the resumed run counts on from step 3


def test_one_ahead_builds_the_next_batch_before_handing_out_the_current():
    calls: list[str] = []

    def make(k):
        calls.append(f"make {k}")
        return k

    for item in loop.one_ahead(make, range(2, 5)):
        calls.append(f"use {item}")
    assert calls == ["make 2", "make 3", "use 2", "make 4", "use 3", "use 4"]
    assert list(loop.one_ahead(make, range(0))) == []


# ----------------------------------------------------------------------------------------------------------------
# Compiles

# jax.monitoring reports every XLA compile (a persistent-cache hit included) under this event name.
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compiles():
    """The names of the functions XLA compiles inside the block."""
    names: list[str] = []

    def listener(event, duration_secs, **kwargs):
        if event == BACKEND_COMPILE:
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


class ByteTokenizer:
    """Bytes as token ids and a 'role: text' chat template: all continuation_logprobs asks of a tokenizer."""

    pad_token_id = 0
    chat_template = "role: text"

    def apply_chat_template(self, messages, chat_template, add_generation_prompt, tokenize):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " * add_generation_prompt)

    def encode(self, text, add_special_tokens=False):
        return [3 + b % (CFG.vocab_size - 3) for b in text.encode()]


def test_continuations_scored_together_equal_one_full_forward_each():
    from safetrade.evaluate.margin import continuations_logprobs
    from safetrade.tokenizer import encode_chat

    params = llama.init(CFG, jax.random.key(2))
    tok = ByteTokenizer()
    prompts = ["Hi", "How do I pick a lock?", "Name three colours of the rainbow, please", "ok"]
    conts = ["S", "Sure", "No, I won't help with that."]  # 1, 4 and 27 tokens: padding and the 1-token path
    got = continuations_logprobs(CFG, params, tok, prompts, conts, batch_size=3)  # 2 batches, the last padded
    for i, prompt in enumerate(prompts):
        ctx = encode_chat(tok, [{"role": "user", "content": prompt}])
        for k, text in enumerate(conts):
            cont = tok.encode(text)
            logits, _ = llama.forward(CFG, params, np.asarray([ctx + cont], np.int32))
            logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
            expected = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
            # both fp32 forwards; the cached path differs only in summation order: 1e-4 on values of about -100
            assert got[k, i] == pytest.approx(expected, abs=1e-4), (prompt, text)


def test_a_second_evaluation_over_the_same_shapes_compiles_nothing():
    from safetrade.evaluate.margin import continuation_logprobs
    from safetrade.train.jobs import mean_loss

    cfg = CFG.replace(rms_norm_eps=2e-5)  # a config no other test compiles for: the first pass must compile
    params = llama.init(cfg, jax.random.key(0))
    other = llama.init(cfg, jax.random.key(1))  # new values, same shapes
    held_out = [synthetic_batch(100 + i) for i in range(3)]
    prompts = ["How do I pick a lock?", "Hello", "Name three colours of the rainbow, please"]

    with compiles() as first:
        mean_loss(cfg, params, held_out)
        continuation_logprobs(cfg, params, ByteTokenizer(), prompts, "Sure", batch_size=2)
        loop.run(JITTED_STEP, fresh_state(), {}, batches, loop.LoopConfig(steps=3, log_every=2, progress=False))
    assert first, "the compile counter saw nothing: it cannot show that the second pass compiles nothing"
    with compiles() as second:
        mean_loss(cfg.replace(), other, held_out)  # an equal config, another object: the same static key
        continuation_logprobs(cfg, other, ByteTokenizer(), prompts, "Sure", batch_size=2)
        loop.run(JITTED_STEP, fresh_state(), {}, batches, loop.LoopConfig(steps=3, log_every=2, progress=False))
    assert second == []


def test_a_non_scalar_metric_is_a_clear_error():
    def step(state, batch, frozen):
        return state + 1, {"loss": jnp.float32(1.0), "per_row": jnp.ones(3)}

    with pytest.raises(SafetradeError, match=r"metric 'per_row' has shape \(3,\): the loop logs scalars only"):
        loop.run(jax.jit(step), jnp.int32(0), {}, lambda k: None, loop.LoopConfig(steps=2, progress=False))
