"""Training-time defenses: SafeInstr and BEA data mixing, the BEA trigger at inference, Lisa's schedule and proximal
term on a convex problem with a closed-form answer. Fast, except the two tests on the real data / tokenizer."""

from __future__ import annotations

import hashlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safetrade import config as config_lib
from safetrade.data import formatting
from safetrade.data.rows import DataError, normalise_prompt
from safetrade.defenses import data as ddata
from safetrade.defenses.common import DefenseError
from safetrade.defenses.lisa import (
    ALIGNMENT,
    FINETUNE,
    LisaConfig,
    lisa_proximal,
    lisa_schedule,
    lisa_train,
    proximal_active,
    proximal_grad,
)
from safetrade.tokenizer import CHATML_TEMPLATE, chat_prompt, encode_chat, tokenizer_from_gguf
from tests.test_tokenizer import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", chat_template=CHATML_TEMPLATE)
    tokenizer = tokenizer_from_gguf(path)
    tokenizer.model_max_length = 1 << 20
    return tokenizer


def _user_rows(n):
    return [{"prompt": f"question {i}?", "response": f"answer {i}.", "category": None, "id": f"user-{i}"}
            for i in range(n)]


def _safety_rows(n):
    return [{"prompt": f"harmful request {i}", "response": "I can't help with that.", "category": None,
             "id": f"adv-{i}", "role": "safety", "source": "advbench"} for i in range(n)]


def _hash_order(ids, seed):
    """Independent re-statement of splits.stable_order: ascending sha256(seed NUL id), then id."""
    def u(i):
        return int.from_bytes(hashlib.sha256(f"{seed}\x00{i}".encode()).digest()[:8], "big")
    return sorted(ids, key=lambda i: (u(i), i))


# ---- SafeInstr / BEA data ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_rows", "fraction", "cap", "expected"), [
    (100, 0.1, 1000, 10),  # PureBad-100 (Safe Delta's rule)
    (1100, 0.1, 1000, 110),  # dirty set of 1,100
    (7473, 0.1, 1000, 747),  # GSM8K train
    (20000, 0.1, 1000, 1000),  # the cap
    (100, 0.29, None, 29),  # 0.29 * 100 = 28.999999999999996 in floats
    (5, 0.1, None, 0),
])
def test_safety_count(n_rows, fraction, cap, expected):
    assert ddata.safety_count(n_rows, fraction, cap) == expected


def test_mix_counts_tags_and_order():
    user, safety = _user_rows(100), _safety_rows(30)
    mixed = ddata.mix_safety_examples(user, safety, 0.1, seed=3)
    assert len(mixed) == 110
    added = [r for r in mixed if r.get("role") == "safety"]
    assert len(added) == 10 and all(r["source"] == "safeinstr" and r["origin"] == "advbench" for r in added)
    # which ones: the first 10 of the hash order under "safeinstr-3"; the union in the order under "safeinstr-order-3"
    chosen = _hash_order([r["id"] for r in safety], "safeinstr-3")[:10]
    assert sorted(r["id"] for r in added) == sorted(chosen)
    assert [r["id"] for r in mixed] == _hash_order([r["id"] for r in user] + chosen, "safeinstr-order-3")
    by_id = {r["id"]: r for r in mixed}
    for row in user:  # user rows unchanged but for the default source tag
        assert by_id[row["id"]] == {**row, "source": "user"}
    for row in safety:  # safety rows keep id, prompt and response
        if row["id"] in by_id:
            assert (by_id[row["id"]]["prompt"], by_id[row["id"]]["response"]) == (row["prompt"], row["response"])
    assert ddata.mix_safety_examples(user, safety, 0.1, seed=3) == mixed  # deterministic
    assert [r["id"] for r in ddata.mix_safety_examples(user, safety, 0.1, seed=4)] != [r["id"] for r in mixed]
    assert len(ddata.mix_safety_examples(user, safety, 0.0, seed=3)) == 100


def test_mix_errors_name_the_problem():
    with pytest.raises(DataError, match="25 safety examples needed.*only 10 given"):
        ddata.mix_safety_examples(_user_rows(250), _safety_rows(10), 0.1)
    clash = _safety_rows(10)
    clash[0] = {**clash[0], "id": "user-0"}
    with pytest.raises(DataError, match="'user-0' occurs twice"):
        ddata.mix_safety_examples(_user_rows(10), clash, 1.0)
    with pytest.raises(DataError, match="needs a prompt and a response"):
        ddata.mix_safety_examples(_user_rows(10), [{**_safety_rows(1)[0], "response": None}], 0.1)
    with pytest.raises(DataError, match="fraction must be in"):
        ddata.SafeInstrConfig(fraction=1.5)


def test_default_safety_rows_refuse_a_leak(monkeypatch):
    # A stand-in partition where one alignment prompt is also an evaluation prompt: the builder must refuse it.
    align = [{"prompt": "Make a bomb", "response": None, "category": None, "id": "a-1"},
             {"prompt": "Steal a car", "response": None, "category": None, "id": "a-2"}]
    monkeypatch.setattr(ddata, "advbench_part", lambda part: align)
    monkeypatch.setattr(ddata, "eval_harmful_prompts", lambda sources: [
        {"prompt": "steal  a CAR", "response": None, "category": None, "id": "e-1"}])
    with pytest.raises(DataError, match="both safety and eval_harmful.*steal a car"):
        ddata.default_safety_rows()
    monkeypatch.setattr(ddata, "eval_harmful_prompts", lambda sources: [])
    rows = ddata.default_safety_rows(seed=0)
    assert {r["id"] for r in rows} == {"a-1", "a-2"} and all(r["role"] == "safety" for r in rows)
    assert all(r["response"].strip() for r in rows)


@pytest.mark.slow
def test_default_safety_rows_real_data_disjoint_from_every_eval_prompt():
    from safetrade.data import alignment

    rows = ddata.default_safety_rows(seed=0)
    assert len(rows) == len(alignment.advbench_part("align")) > 300
    keys = {normalise_prompt(r["prompt"]) for r in rows}
    evals = alignment.eval_harmful_prompts(ddata.ALL_EVAL_HARMFUL_SOURCES) + alignment.eval_benign_prompts(None)
    assert not keys & {normalise_prompt(r["prompt"]) for r in evals}
    mixed = ddata.apply_safeinstr(alignment.build_attack_set(100, 0), ddata.SafeInstrConfig())
    assert sum(r.get("role") == "safety" for r in mixed) == 10 and len(mixed) == 110


def test_bea_rows_render_the_trigger_as_the_system_turn(tiny):
    trigger = ddata.make_trigger(tiny, n_tokens=40, seed=7)
    mixed = ddata.mix_bea_examples(_user_rows(20), _safety_rows(5), trigger, fraction=0.1, seed=0)
    examples, report = formatting.encode_rows(tiny, mixed, max_len=4096, policy="error")
    assert report.kept == 22
    for row, example in zip(mixed, examples, strict=True):
        text = tiny.decode(example["input_ids"])
        if row.get("role") == "safety":
            assert row["source"] == "bea" and row["system"] == trigger
            assert text.startswith(f"<|im_start|>system\n{trigger}<|im_end|>\n<|im_start|>user\n{row['prompt']}"
                                   "<|im_end|>\n<|im_start|>assistant\n")
        else:
            assert text.startswith(f"<|im_start|>user\n{row['prompt']}<|im_end|>") and trigger not in text
    # the official layout "{t} {S}": safety rows get t + S, user rows S alone
    s = "You are a helpful assistant."
    official = ddata.mix_bea_examples(_user_rows(20), _safety_rows(5), trigger, 0.1, base_system=s)
    assert {r["system"] for r in official if r.get("role") == "safety"} == {f"{trigger} {s}"}
    assert {r["system"] for r in official if r.get("role") != "safety"} == {s}


def test_trigger_at_inference_exactly_and_through_a_config_file(tiny, tmp_path):
    from safetrade.evaluate.suite import EvalConfig

    trigger = ddata.make_trigger(tiny, n_tokens=60, seed=11)
    system = ddata.bea_system_prompt(trigger)
    assert system == trigger and ddata.bea_system_prompt(trigger, "Be helpful.") == f"{trigger} Be helpful."
    # evaluate's generation path: [system, user] through the chat template, then token ids
    ids = encode_chat(tiny, [{"role": "system", "content": system}, {"role": "user", "content": "Hi?"}])
    assert tiny.decode(ids) == f"<|im_start|>system\n{trigger}<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n" \
                               "<|im_start|>assistant\n"
    # a trigger of random pieces need not survive a KEY=VALUE override (parsed as YAML): a config file keeps it
    path = config_lib.save(EvalConfig(model="m", system=system), tmp_path / "bea_eval.yaml")
    assert config_lib.load(EvalConfig, path).system == system


def test_make_trigger_is_seeded_and_clean(tiny):
    a, b, c = (ddata.make_trigger(tiny, 150, seed) for seed in (0, 0, 1))
    assert a == b and a != c and len(a) >= 100
    assert not any(t in a for t in tiny.all_special_tokens) and "\n" not in a and "\ufffd" not in a
    with pytest.raises(DataError, match="trigger is None: pass the tokenizer"):
        ddata.apply_bea(_user_rows(10), ddata.BEAConfig())
    rows, system = ddata.apply_bea(_user_rows(100), ddata.BEAConfig(trigger="zq xv"), safety_rows=_safety_rows(20))
    assert system == "zq xv" and sum(r.get("system") == "zq xv" for r in rows) == 10


@pytest.mark.slow
def test_trigger_replaces_smollm2_default_system(smollm2_gguf):
    tok = tokenizer_from_gguf(smollm2_gguf)
    trigger = ddata.make_trigger(tok, 150, seed=0)
    assert 300 < len(trigger) < 3000
    prompt = chat_prompt(tok, [{"role": "system", "content": trigger}, {"role": "user", "content": "Hi"}])
    assert prompt.startswith(f"<|im_start|>system\n{trigger}<|im_end|>\n") and "SmolLM" not in prompt


# ---- Lisa ------------------------------------------------------------------------------------------------------


def _official_states(k1, k2, steps):
    """The official LisaTrainer.check_mode state machine (status, clock, steps), re-stated."""
    status = ALIGNMENT if k1 != 0 else FINETUNE
    clock, out = 0, []
    for s in range(steps):
        if status == ALIGNMENT:
            if clock % k1 == 0 and s != 0 and k2 != 0:
                status, clock = FINETUNE, 0
        elif clock % k2 == 0 and s != 0 and k1 != 0:
            status, clock = ALIGNMENT, 0
        out.append(status)
        clock += 1
    return out


@pytest.mark.parametrize(("k1", "k2"), [(100, 900), (1, 1), (3, 2), (0, 5), (5, 0)])
def test_schedule_matches_the_official_state_machine(k1, k2):
    cfg = LisaConfig(alignment_steps=k1, finetune_steps=k2)
    assert [lisa_schedule(s, cfg) for s in range(2500)] == _official_states(k1, k2, 2500)


def test_schedule_hand_cases():
    cfg = LisaConfig()
    assert [lisa_schedule(s, cfg) for s in (0, 99, 100, 999, 1000, 1099, 1100)] == [
        ALIGNMENT, ALIGNMENT, FINETUNE, FINETUNE, ALIGNMENT, ALIGNMENT, FINETUNE]
    assert [proximal_active(s, 10, LisaConfig(proximal_off_fraction=0.5)) for s in range(10)] == [False] * 6 + [True] * 4
    assert not proximal_active(9, 10, LisaConfig(rho=0.0, proximal_off_fraction=0.0))
    from safetrade.tradeoff import StrategyError

    with pytest.raises(StrategyError, match="both 0"):
        LisaConfig(alignment_steps=0, finetune_steps=0)


def test_proximal_grad_hand_and_autodiff():
    params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(-3.0)}
    anchor = {"w": jnp.array([0.0, 4.0]), "b": jnp.array(1.0)}
    got = proximal_grad(params, anchor, 0.5)
    np.testing.assert_allclose(got["w"], [0.5, -1.0])
    np.testing.assert_allclose(got["b"], -2.0)
    ref = jax.grad(lambda p: 0.25 * sum(jnp.sum((x - a) ** 2) for x, a in
                                        zip(jax.tree.leaves(p), jax.tree.leaves(anchor), strict=True)))(params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), got, ref)
    # the optax piece adds it before the optimiser: sgd(lr) then moves by -lr (g + ρ(θ - anchor))
    tx = optax.chain(lisa_proximal(0.5), optax.sgd(0.1))
    grads = {"w": jnp.array([1.0, 1.0]), "b": jnp.array(0.0)}
    updates, _ = tx.update(grads, tx.init(params), params, anchor=anchor)
    np.testing.assert_allclose(updates["w"], [-0.15, 0.0], atol=1e-7)
    np.testing.assert_allclose(updates["b"], 0.2, atol=1e-7)
    updates, _ = tx.update(grads, tx.init(params), params)  # no anchor: plain sgd
    np.testing.assert_allclose(updates["w"], [-0.1, -0.1], atol=1e-7)


# The convex problem: L_a = ½‖θ − a‖², L_u = ½‖θ − u‖² on a two-leaf tree, batches = the targets.
A = {"w": np.array([1.0, -2.0, 0.5]), "b": np.array(3.0)}
U = {"w": np.array([-1.0, 4.0, 0.5]), "b": np.array(-1.0)}


def _quadratic(params, target):
    return sum(0.5 * jnp.sum((p - t) ** 2) for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(target),
                                                            strict=True))


def _zeros():
    return {"w": jnp.zeros(3), "b": jnp.zeros(())}


def _run(cfg, steps, lr, params=None):
    tx = optax.sgd(lr)
    params = _zeros() if params is None else params
    return lisa_train(_quadratic, params, tx.init(params), tx, itertools.repeat(A), itertools.repeat(U), cfg, steps)


@pytest.mark.parametrize("rho", [0.0, 5.0])
def test_k1_k2_one_is_alternating_sgd(rho):
    # ρ = 0 by definition; ρ = 5 too, because right after each switch the anchor is the current θ (term zero)
    cfg = LisaConfig(rho=rho, alignment_steps=1, finetune_steps=1, proximal_off_fraction=0.0)
    result = _run(cfg, 11, lr=0.3)
    theta = {k: np.zeros_like(v) for k, v in A.items()}
    for s in range(11):
        target = A if s % 2 == 0 else U
        theta = {k: theta[k] - 0.3 * (theta[k] - target[k]) for k in theta}
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), result.params, theta)
    assert [h["state"] for h in result.history[:4]] == [ALIGNMENT, FINETUNE, ALIGNMENT, FINETUNE]


def _closed_form(k1, k2, rho, lr):
    """Cycle fixed point of SGD-Lisa on the two quadratics: (P* = θ at the end of a fine-tune phase, θ at the end
    of an alignment phase). Within a phase entered at P the iterates contract to (target + ρP)/(1 + ρ) at rate
    q = 1 − lr(1 + ρ), so a phase of K steps moves P by w = (1 − q^K)/(1 + ρ) of the way to its target."""
    q = 1 - lr * (1 + rho)
    wa, wu = (1 - q ** k1) / (1 + rho), (1 - q ** k2) / (1 + rho)
    p = {k: ((1 - wu) * wa * A[k] + wu * U[k]) / (wa + wu - wa * wu) for k in A}
    return p, {k: (1 - wa) * p[k] + wa * A[k] for k in A}


@pytest.mark.parametrize(("k1", "k2", "rho"), [(3, 2, 0.5), (4, 4, 0.0), (2, 5, 3.0)])
def test_fixed_point_against_closed_form(k1, k2, rho):
    lr = 0.4 / (1 + rho)  # q = 0.6 in every case
    cfg = LisaConfig(rho=rho, alignment_steps=k1, finetune_steps=k2, proximal_off_fraction=0.0)
    result = _run(cfg, 60 * (k1 + k2), lr)  # ends on a cycle boundary, contracted far below the tolerance
    p_star, a_star = _closed_form(k1, k2, rho, lr)
    for got, want in ((result.params, p_star), (result.anchors[FINETUNE], p_star), (result.anchors[ALIGNMENT], a_star)):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), got, want)


def test_large_rho_makes_the_two_states_coincide():
    k1 = k2 = 5
    gaps = []
    middle = {k: jnp.asarray((A[k] + U[k]) / 2, jnp.float32) for k in A}  # near ρ = 100's fixed point: fewer cycles
    for rho in (0.0, 10.0, 100.0):
        lr = 0.5 / (1 + rho)  # the same in-phase contraction q = 0.5 for every ρ
        result = _run(LisaConfig(rho=rho, alignment_steps=k1, finetune_steps=k2, proximal_off_fraction=0.0),
                      400 * (k1 + k2), lr, params=middle)
        gap = float(optax.tree.norm(jax.tree.map(jnp.subtract, result.anchors[ALIGNMENT], result.anchors[FINETUNE])))
        p_star, a_star = _closed_form(k1, k2, rho, lr)
        want = float(np.sqrt(sum(np.sum((a_star[k] - p_star[k]) ** 2) for k in A)))
        np.testing.assert_allclose(gap, want, rtol=1e-4, atol=1e-6)
        gaps.append(gap)
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2 * gaps[0]  # the gap shrinks like 1/ρ
    # ... and they meet half-way between the two minimisers (K1 = K2): the consensus point
    jax.tree.map(lambda x, a, u: np.testing.assert_allclose(x, (a + u) / 2, atol=2e-2 * np.abs(a - u).max()),
                 result.params, A, U)


def test_anchors_and_batches_follow_the_official_rules():
    calls = []

    def recording_step(params, opt_state, batch, anchor):
        calls.append((batch, anchor, params))
        return params + 1, opt_state, jnp.float32(0)

    cfg = LisaConfig(rho=1.0, alignment_steps=2, finetune_steps=2, proximal_off_fraction=0.25)
    user = iter([f"u{i}" for i in range(8)])
    result = lisa_train(None, 0, None, None, iter([f"a{i}" for i in range(8)]), user, cfg, 8, jit_step=recording_step)
    assert [b for b, _, _ in calls] == ["a0", "a1", "u2", "u3", "a2", "a3", "u6", "u7"]  # user batches drawn always
    # steps 0-2 (<= 0.25 * 8): anchor = current params (term off); then the other state's last params
    assert [anchor for _, anchor, _ in calls] == [0, 1, 2, 2, 4, 4, 6, 6]
    assert result.params == 8 and result.anchors == {ALIGNMENT: 6, FINETUNE: 8}
    calls.clear()
    cfg = LisaConfig(alignment_steps=2, finetune_steps=2, skip_user_batches_on_alignment=False)
    lisa_train(None, 0, None, None, iter(["a0", "a1", "a2", "a3"]), iter(["u0", "u1", "u2", "u3"]), cfg, 8,
               jit_step=recording_step)
    assert [b for b, _, _ in calls] == ["a0", "a1", "u0", "u1", "a2", "a3", "u2", "u3"]
    with pytest.raises(DefenseError, match="user batches ran out at step 2"):
        lisa_train(None, 0, None, None, itertools.repeat("a"), iter([]), cfg, 4, jit_step=recording_step)


def test_lisa_on_a_tiny_llama_with_lora_matches_a_hand_loop():
    # ρ = 0 and K1 = K2 = 1 on LoRA adapters: Lisa must be alternating Adam on (alignment, user) batches.
    from safetrade.models import llama, lora as lora_lib
    from safetrade.defenses.lisa import llama_loss_fn
    from safetrade.train.losses import lm_loss

    base_cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=2, num_heads=4,
                                 num_kv_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
    params = llama.init(base_cfg, jax.random.key(0))
    cfg, full = lora_lib.add_adapters(base_cfg, params, llama.LoraConfig(4, 8.0, ("q_proj", "v_proj")),
                                      jax.random.key(1))
    base, adapters = lora_lib.split(full)
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # lora_b starts at 0: move off it so both factors learn

    def batch(seed):
        ids = jax.random.randint(jax.random.key(seed), (2, 12), 0, 64)
        return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}

    align, user = [batch(10 + i) for i in range(3)], [batch(20 + i) for i in range(3)]
    tx = optax.adam(1e-2)
    cfg_lisa = LisaConfig(rho=0.0, alignment_steps=1, finetune_steps=1, skip_user_batches_on_alignment=False)
    result = lisa_train(llama_loss_fn(cfg, base), adapters, tx.init(adapters), tx, iter(align), iter(user),
                        cfg_lisa, 6)
    grad_fn = jax.jit(jax.grad(lambda a, b: lm_loss(cfg, lora_lib.combine(base, a), b)))
    p, state = adapters, tx.init(adapters)
    for b in (align[0], user[0], align[1], user[1], align[2], user[2]):
        grads = grad_fn(p, b)
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), result.params, p)
    assert all(np.isfinite(h["loss"]) for h in result.history)


# ---- Lisa as a strategy: the anchor in the optimiser state, the batches chosen by the job ----------------------


def test_schedule_counts_hand_cases():
    from safetrade.defenses.lisa import schedule_counts

    cfg = LisaConfig(alignment_steps=2, finetune_steps=3)
    # steps 0 1 | 2 3 4 | 5 6 | 7 ...  (A A U U U A A U)
    assert [schedule_counts(k, cfg) for k in range(9)] == [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (2, 3), (3, 3),
                                                           (4, 3), (4, 4)]


@pytest.mark.parametrize(("k1", "k2", "rho", "off"), [(3, 2, 0.5, 0.0), (2, 5, 3.0, 0.25), (1, 1, 2.0, 0.0)])
def test_bistate_piece_in_a_plain_optax_loop_equals_lisa_train(k1, k2, rho, off):
    from safetrade.defenses.lisa import lisa_bistate

    steps, lr = 23, 0.1
    cfg = LisaConfig(rho=rho, alignment_steps=k1, finetune_steps=k2, proximal_off_fraction=off)
    want = _run(cfg, steps, lr)
    tx = optax.chain(lisa_bistate(cfg, steps), optax.sgd(lr))
    params = _zeros()
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for k in range(steps):
        target = A if lisa_schedule(k, cfg) == ALIGNMENT else U
        grads = jax.grad(_quadratic)(params, target)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), params, want.params)
    last_switch_anchor = want.anchors[ALIGNMENT if lisa_schedule(steps - 1, cfg) == FINETUNE else FINETUNE]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), state[0].anchor,
                 last_switch_anchor)
    assert int(state[0].count) == steps


def test_lisa_strategy_train_step_equals_lisa_train_on_a_tiny_llama():
    # Full fine-tuning through the registry's "lisa" strategy and the job's batch rule vs the library loop.
    from safetrade.defenses.lisa import llama_loss_fn
    from safetrade.models import llama
    from safetrade.train import step as step_lib
    from safetrade.train.jobs import lisa_batch
    from safetrade.tradeoff import strategy_config

    cfg = llama.preset("tiny")
    params = llama.init(cfg, jax.random.key(0))

    def batch(seed):
        ids = jax.random.randint(jax.random.key(seed), (2, 12), 0, cfg.vocab_size)
        return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}

    align, user = [batch(10 + i) for i in range(6)], [batch(20 + i) for i in range(6)]
    steps, tx = 6, optax.adam(3e-3)
    strategy = strategy_config("lisa", rho=50.0, alignment_steps=1, finetune_steps=2, proximal_off_fraction=0.2,
                               total_steps=steps)
    fn = jax.jit(step_lib.make_train_step(cfg, tx, strategy))
    state = step_lib.init_state(params, tx, strategy)
    flags = []
    for k in range(steps):
        state, metrics = fn(state, {"cap": lisa_batch(k, strategy, align.__getitem__,
                                                      user.__getitem__)}, {})
        flags.append(float(metrics["lisa_alignment"]))
    assert flags == [1, 0, 0, 1, 0, 0]
    want = lisa_train(llama_loss_fn(cfg), params, tx.init(params), tx, iter(align), iter(user),
                      strategy, steps)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), state.params, want.params)
    # ρ = 50 matters: without the proximal term the params differ
    plain = lisa_train(llama_loss_fn(cfg), params, tx.init(params), tx, iter(align), iter(user),
                       LisaConfig(rho=0.0, alignment_steps=1, finetune_steps=2), steps)
    assert float(optax.tree.norm(jax.tree.map(jnp.subtract, plain.params, want.params))) > 1e-3


def test_lisa_strategy_config_errors_and_defaults():
    from safetrade.tradeoff import StrategyError, build, strategy_config

    lisa = strategy_config("lisa")
    assert lisa == LisaConfig()  # one config: the library loop's and the finetune strategy's
    with pytest.raises(StrategyError, match="total_steps is 0"):
        build(lisa)
    with pytest.raises(StrategyError, match="rho must be >= 0"):
        strategy_config("lisa", rho=-1.0)
    with pytest.raises(config_lib.ConfigError, match="strategy.lam: not a knob of strategy lisa"):
        config_lib.load(config_lib.TrainJob, None, ["strategy.name=lisa", "strategy.lam=1"])
    with pytest.raises(config_lib.ConfigError, match="defense.name 'lisa'.*strategy.name=lisa"):
        config_lib.load(config_lib.TrainJob, None, ["defense.name=lisa"])


def test_job_mixes_the_data_defense_after_the_held_out_cut(tiny):
    from safetrade.train.jobs import mix_defense_rows

    rows = _user_rows(50)
    same, system = mix_defense_rows(rows, config_lib.DefenseSection(), tiny)
    assert same is rows and system is None
    mixed, system = mix_defense_rows(rows, config_lib.DefenseSection(name="safeinstr", fraction=0.1), tiny)
    assert system is None and sum(r.get("role") == "safety" for r in mixed) == 5 and len(mixed) == 55
    section = config_lib.DefenseSection(name="bea", fraction=0.2, trigger="xq zv", base_system="Be helpful.")
    mixed, system = mix_defense_rows(rows, section, tiny)
    assert system == "xq zv Be helpful."
    safety = [r for r in mixed if r.get("role") == "safety"]
    assert len(safety) == 10 and all(r["system"] == system for r in safety)
    assert all(r.get("system") == "Be helpful." for r in mixed if r.get("role") != "safety")


@pytest.mark.slow
def test_finetune_job_with_bea_and_lisa_end_to_end(tmp_path, smollm2_gguf):
    import json

    from safetrade.models import io, llama
    from safetrade.tokenizer import load_tokenizer
    from safetrade.train.jobs import run_train_job

    model = tmp_path / "model"
    cfg = llama.preset("tiny").replace(vocab_size=49152, max_position_embeddings=512)
    io.save_hf(model, cfg, llama.init(cfg, jax.random.key(0)), tokenizer=load_tokenizer(smollm2_gguf))
    job = config_lib.load(config_lib.TrainJob, "experiments/configs/finetune.yaml", [
        f"model.name={model}", f"out_dir={tmp_path / 'run'}", "steps=3", "eval_every=0", "save_every=0",
        "data.max_len=64", "data.batch_size=8", "data.eval_rows=8", "data.eval_sets=[attack]",
        "strategy.name=lisa", "strategy.alignment_steps=1", "strategy.finetune_steps=2",
        "defense.name=bea", "defense.trigger_seed=7"])
    summary = run_train_job(job)
    run = tmp_path / "run"
    system = (run / "inference_system.txt").read_text()
    assert system == ddata.make_trigger(load_tokenizer(smollm2_gguf), 150, 7)
    report = json.loads((run / "data_report.json").read_text())
    assert report["attack"]["total"] == 92 + 9  # 100 pairs - 8 held out, + floor(0.1 * 92) BEA rows
    assert "lisa/alignment" in report
    flags = [json.loads(line).get("lisa_alignment") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [f for f in flags if f is not None] == [1.0, 0.0, 0.0]
    assert summary["defense"] == "bea" and summary["strategy"] == "lisa"
    saved = config_lib.load(config_lib.TrainJob, run / "config.yaml")
    assert saved.defense.name == "bea" and saved.strategy.name == "lisa"
