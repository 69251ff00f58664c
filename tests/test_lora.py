"""LoRA as pytree transforms: adding, splitting, merging, gradients, PEFT export/import, and parity with peft.

The peft numbers come from tests/golden/make_peft_golden.py (peft in the torch venv); no torch here.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from safetrade import parallel
from safetrade.errors import MissingPathError, SafetradeError
from safetrade.models import io, llama, lora
from safetrade.models.llama import LoraConfig
from tests.conftest import GOLDEN

PEFT = GOLDEN / "peft"


def assert_trees_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


def with_random_b(adapters, seed: int, std: float):
    """Replace every lora_b (zero when fresh, which would hide any B-side bug) by seeded N(0, std²) draws."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(0, std, x.shape), x.dtype) if path[-1].key == "lora_b" else x,
        adapters,
    )


@pytest.fixture(scope="module")
def golden_base():
    return io.load_hf(GOLDEN / "tiny_gqa_tied")


@pytest.fixture(scope="module")
def tiny():
    """The `tiny` preset at llama.init's scale (std 0.02), adapters on all seven projections with random B.

    Its logits are O(1), so fp32 rounding sits near 1e-7 and a 1e-5 tolerance still has ~40x margin.
    """
    cfg = llama.preset("tiny")
    params = llama.init(cfg, jax.random.key(1))
    lora_cfg, with_adapters = lora.add_adapters(cfg, params, LoraConfig(4, 8.0, llama.LORA_TARGETS),
                                                jax.random.key(2))
    base, adapters = lora.split(with_adapters)
    adapters = with_random_b(adapters, seed=3, std=0.05)
    tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, cfg.vocab_size)
    return cfg, params, lora_cfg, base, adapters, tokens


# --- adding adapters ------------------------------------------------------------------------------------------


def test_fresh_adapters_leave_logits_unchanged_exactly(golden_base):
    cfg, params = golden_base
    lora_cfg, with_adapters = lora.add_adapters(cfg, params, LoraConfig(4, 6.0, ("q_proj", "v_proj", "down_proj")),
                                                jax.random.key(0))
    ids = np.load(GOLDEN / "tiny_gqa_tied" / "expected.npz")["input_ids"]
    before, _ = llama.forward(cfg, params, ids)
    after, _ = llama.forward(lora_cfg, with_adapters, ids)
    assert np.array_equal(np.asarray(before), np.asarray(after))  # B = 0: the adapter term adds exact zeros
    base, adapters = lora.split(with_adapters)
    assert_trees_identical(base, params)  # base weights untouched (same leaves)
    q = adapters["blocks"]["attn"]["q_proj"]
    assert q["lora_a"].shape == (2, 64, 4) and q["lora_b"].shape == (2, 4, 64)
    assert adapters["blocks"]["attn"]["v_proj"]["lora_b"].shape == (2, 4, 32)  # GQA: v_proj out = 2 kv heads × 16
    assert adapters["blocks"]["mlp"]["down_proj"]["lora_a"].shape == (2, 128, 4)
    assert set(adapters["blocks"]["attn"]) == {"q_proj", "v_proj"} and set(adapters["blocks"]["mlp"]) == {"down_proj"}
    with pytest.raises(SafetradeError, match="already carry adapters"):
        lora.add_adapters(lora_cfg, with_adapters, LoraConfig(), jax.random.key(0))


def test_add_adapters_draws_what_llama_init_draws(tiny):
    cfg, params, lora_cfg, *_ = tiny
    _, with_adapters = lora.add_adapters(cfg, params, lora_cfg.lora, jax.random.key(2))  # the fixture's draw
    _, ours = lora.split(with_adapters)
    _, reference = lora.split(llama.init(lora_cfg, jax.random.key(2)))
    assert jax.tree.structure(ours) == jax.tree.structure(reference)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        # jit may round the std multiply differently from eager execution: 1 ulp, nothing more.
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2**-22, atol=0)
    down_a = np.asarray(ours["blocks"]["mlp"]["down_proj"]["lora_a"])
    assert abs(down_a.std() * np.sqrt(128) - 1) < 0.1  # N(0, 1/in)
    assert not np.any(np.asarray(ours["blocks"]["mlp"]["down_proj"]["lora_b"]))


def test_adapters_follow_the_base_sharding():
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    cfg, params = io.load_hf(GOLDEN / "tiny_gqa_tied", mesh=mesh)
    lora_cfg, with_adapters = lora.add_adapters(cfg, params, LoraConfig(4, 6.0, ("q_proj", "down_proj")),
                                                jax.random.key(0))
    expected = parallel.param_shardings(llama.logical_axes(lora_cfg), llama.abstract_params(lora_cfg), mesh)
    q, down = with_adapters["blocks"]["attn"]["q_proj"], with_adapters["blocks"]["mlp"]["down_proj"]
    assert q["lora_a"].sharding.spec == expected["blocks"]["attn"]["q_proj"]["lora_a"].spec == P(None, "fsdp", None)
    assert q["lora_b"].sharding.spec == P(None, None, "tensor")
    assert down["lora_a"].sharding.spec == P(None, "tensor", None)
    assert down["lora_b"].sharding.spec == P(None, None, "fsdp")
    # Loading a PEFT adapter onto sharded params places it the same way, with the same values as unsharded.
    lora_cfg2, loaded = lora.load_peft(PEFT / "adapter", cfg, params)
    _, unsharded = lora.load_peft(PEFT / "adapter", *io.load_hf(GOLDEN / "tiny_gqa_tied"))
    assert loaded["blocks"]["mlp"]["down_proj"]["lora_b"].sharding.spec == P(None, None, "fsdp")
    assert_trees_identical(jax.device_get(lora.split(loaded)[1]), jax.device_get(lora.split(unsharded)[1]))


# --- split / combine / gradients ------------------------------------------------------------------------------


def test_split_combine_round_trip(tiny):
    _, params, _, base, adapters, _ = tiny
    full = lora.combine(base, adapters)
    base2, adapters2 = lora.split(full)
    assert_trees_identical(base2, base)
    assert_trees_identical(adapters2, adapters)
    assert_trees_identical(base, params)
    assert {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(adapters)} == {"lora_a", "lora_b"}
    assert "lora_a" not in base["blocks"]["attn"]["q_proj"]
    assert lora.split(params) == (params, {})  # no adapters: everything is base
    with pytest.raises(SafetradeError, match="already hold"):
        lora.combine(full, adapters)
    with pytest.raises(SafetradeError, match="lack"):
        lora.combine({"embed": base["embed"]}, adapters)


def test_gradients_flow_to_adapters_only(tiny):
    _, _, lora_cfg, base, adapters, tokens = tiny

    def loss(adapters, base):
        logits, _ = llama.forward(lora_cfg, lora.combine(base, adapters), tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    grads = jax.jit(jax.grad(loss))(adapters, base)  # argnums=0: no cotangent is formed for the base weights
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    # The same numbers as differentiating the full params and keeping the adapter part.
    full_grads = jax.jit(jax.grad(lambda p: loss(*reversed(lora.split(p)))))(lora.combine(base, adapters))
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(lora.split(full_grads)[1])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-7)


# --- merge and delta --------------------------------------------------------------------------------------------


def test_merged_forward_equals_adapter_forward(tiny):
    """≤ 1e-5 absolute: x@(W + s·AB) and x@W + s·(x@A)@B differ only in fp32 summation order.

    On this O(1)-logit model the measured difference is ~3e-7. (On the golden tiny models, whose std-0.2 weights
    give logits up to ±7, plain fp32 is already ~1.3e-5 away from a float64 forward, so the merged vs adapter
    difference there is ~1e-5 and is checked at the parity tolerance 1e-4 against peft instead.)
    """
    cfg, params, lora_cfg, base, adapters, tokens = tiny
    full = lora.combine(base, adapters)
    with_adapters, _ = llama.forward(lora_cfg, full, tokens)
    merged_cfg, merged = lora.merge(lora_cfg, full)
    assert merged_cfg == cfg and merged_cfg.lora is None
    assert lora.split(merged)[1] == {} and jax.tree.structure(merged) == jax.tree.structure(params)
    merged_logits, _ = llama.forward(merged_cfg, merged, tokens)
    base_logits, _ = llama.forward(cfg, params, tokens)
    assert float(jnp.abs(with_adapters - base_logits).max()) > 0.3  # the adapters matter
    np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(with_adapters), atol=1e-5, rtol=0)


def test_merge_is_exact_in_fp32(tiny):
    _, _, lora_cfg, base, adapters, _ = tiny
    _, merged = lora.merge(lora_cfg, lora.combine(base, adapters))
    scale = lora_cfg.lora.scale
    for group, name in [("attn", "q_proj"), ("attn", "v_proj"), ("mlp", "down_proj")]:
        w = np.asarray(base["blocks"][group][name]["kernel"], np.float64)
        a = np.asarray(adapters["blocks"][group][name]["lora_a"], np.float64)
        b = np.asarray(adapters["blocks"][group][name]["lora_b"], np.float64)
        exact = w + scale * np.einsum("lir,lro->lio", a, b)
        got = np.asarray(merged["blocks"][group][name]["kernel"])
        assert got.dtype == np.float32
        # fp32 products and one fp32 addition: a few units of 2^-24 relative to the terms' size.
        bound = 4 * 2.0**-24 * (np.abs(w) + scale * np.einsum("lir,lro->lio", np.abs(a), np.abs(b)))
        assert np.all(np.abs(got - exact) <= bound)


def test_delta_is_the_merged_update(tiny):
    _, _, lora_cfg, base, adapters, _ = tiny
    deltas = lora.delta(lora_cfg, adapters)  # adapters alone are enough
    _, merged = lora.merge(lora_cfg, lora.combine(base, adapters))
    assert set(deltas["blocks"]["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    for group in ("attn", "mlp"):
        for name, leaves in deltas["blocks"][group].items():
            assert set(leaves) == {"kernel"} and leaves["kernel"].dtype == jnp.float32
            diff = merged["blocks"][group][name]["kernel"] - base["blocks"][group][name]["kernel"]
            np.testing.assert_allclose(np.asarray(diff), np.asarray(leaves["kernel"]), atol=1e-7)
    global_norm = jnp.sqrt(sum(jnp.sum(d**2) for d in jax.tree.leaves(deltas)))
    np.testing.assert_allclose(float(jnp.sqrt(lora.delta_sqnorm(lora_cfg, adapters))), float(global_norm), rtol=1e-5)
    assert jax.tree.structure(lora.delta(lora_cfg, lora.combine(base, adapters))) == jax.tree.structure(deltas)
    with pytest.raises(SafetradeError, match="cfg.lora is None"):
        lora.delta(llama.preset("tiny"), adapters)


def test_save_merged_hf_is_a_plain_checkpoint(tiny, tmp_path):
    _, _, lora_cfg, base, adapters, _ = tiny
    full = lora.combine(base, adapters)
    lora.save_merged_hf(tmp_path, lora_cfg, full)
    cfg2, reloaded = io.load_hf(tmp_path)
    assert cfg2.lora is None
    assert_trees_identical(reloaded, lora.merge(lora_cfg, full)[1])


# --- PEFT format ------------------------------------------------------------------------------------------------


def test_save_load_peft_round_trip_bit_for_bit(golden_base, tmp_path):
    cfg, params = golden_base
    lora_cfg, full = lora.add_adapters(cfg, params, LoraConfig(2, 5.0, ("k_proj", "o_proj", "gate_proj", "up_proj")),
                                       jax.random.key(5))
    base, adapters = lora.split(full)
    adapters = with_random_b(adapters, seed=6, std=0.1)
    lora.save_peft(tmp_path, lora_cfg, adapters, base_model_name_or_path="some/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 2
    assert config["lora_alpha"] == 5 and config["target_modules"] == ["k_proj", "o_proj", "gate_proj", "up_proj"]
    assert config["base_model_name_or_path"] == "some/base" and config["bias"] == "none"
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 4 * cfg.num_layers
    a = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert a.shape == (2, 64) and b.shape == (32, 2)  # torch layout: A [r, in], B [out, r]
    assert np.array_equal(a, np.asarray(adapters["blocks"]["attn"]["k_proj"]["lora_a"][1]).T)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (128, 2)

    loaded_cfg, loaded = lora.load_peft(tmp_path, cfg, params)
    assert loaded_cfg == lora_cfg
    assert_trees_identical(loaded, lora.combine(base, adapters))


def test_peft_round_trip_in_bfloat16(tmp_path):
    cfg, params = io.load_hf(GOLDEN / "tiny_gqa_tied", param_dtype="bfloat16")
    lora_cfg, loaded = lora.load_peft(PEFT / "adapter", cfg, params)
    assert loaded["blocks"]["attn"]["q_proj"]["lora_a"].dtype == jnp.bfloat16  # cast to the param dtype
    lora.save_peft(tmp_path, lora_cfg, loaded)
    assert load_file(str(tmp_path / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dtype.name == "bfloat16"
    _, again = lora.load_peft(tmp_path, cfg, params)
    assert_trees_identical(again, loaded)


def _adapter_copy(tmp_path, edit_config=None, edit_tensors=None):
    out = tmp_path / "adapter"
    shutil.copytree(PEFT / "adapter", out)
    if edit_config:
        config = json.loads((out / "adapter_config.json").read_text())
        edit_config(config)
        (out / "adapter_config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(str(out / "adapter_model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


Q0A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    "case, edit_config, edit_tensors, error, match",
    [
        ("rank mismatch", lambda c: c.update(r=8), None, lora.AdapterError,
         r"q_proj\.lora_A\.weight.*shape \(4, 64\).*r=8"),
        ("wrong shape", None, lambda t: t.update({Q0A: t[Q0A][:, :32]}), lora.AdapterError,
         r"layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \(4, 32\).*imply \(4, 64\)"),
        ("missing tensor", None,
         lambda t: t.pop("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"), lora.AdapterError,
         r"layers\.1\.mlp\.down_proj\.lora_B\.weight' is missing"),
        ("unsupported target", lambda c: c.update(target_modules=["q_proj", "lm_head"]), None, lora.AdapterError,
         r"target module 'lm_head' is not supported"),
        ("unsupported tensor", None,
         lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)}),
         lora.AdapterError, r"lm_head\.lora_A\.weight' is not supported"),
        ("layer out of range", None,
         lambda t: t.update({"base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight": t[Q0A]}),
         lora.AdapterError, r"names layer 2, but the model has 2 layers"),
        ("declared but absent", lambda c: c.update(target_modules=["q_proj", "v_proj", "down_proj", "o_proj"]),
         None, lora.AdapterError, r"declared but absent: \['o_proj'\]"),
        ("dora", lambda c: c.update(use_dora=True), None, lora.AdapterError, r"use_dora=True is not supported"),
        ("not lora", lambda c: c.update(peft_type="IA3"), None, lora.AdapterError, r"peft_type 'IA3'"),
    ],
)
def test_load_peft_errors(golden_base, tmp_path, case, edit_config, edit_tensors, error, match):
    cfg, params = golden_base
    directory = _adapter_copy(tmp_path, edit_config, edit_tensors)
    with pytest.raises(error, match=match):
        lora.load_peft(directory, cfg, params)


def test_load_peft_missing_files(golden_base, tmp_path):
    cfg, params = golden_base
    with pytest.raises(MissingPathError, match="adapter directory not found"):
        lora.load_peft(tmp_path / "nope", cfg, params)
    directory = _adapter_copy(tmp_path)
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    with pytest.raises(MissingPathError, match=r"adapter_model\.safetensors not found.*adapter_model\.bin"):
        lora.load_peft(directory, cfg, params)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(MissingPathError, match=r"adapter_config\.json not found"):
        lora.load_peft(directory, cfg, params)
    lora_cfg, full = lora.load_peft(PEFT / "adapter", cfg, params)
    with pytest.raises(SafetradeError, match="already carry adapters"):
        lora.load_peft(PEFT / "adapter", lora_cfg, full)


# --- parity with peft (files made by tests/golden/make_peft_golden.py) ---------------------------------------------


def test_peft_loads_our_adapter_and_gives_the_same_logits(golden_base):
    """peft 0.x (torch) ran the committed adapter on tiny_gqa_tied; our adapter forward must match within 1e-4.

    1e-4 is the tiny-model parity tolerance (tests/golden/README.md): fp32 everywhere, different summation orders.
    """
    cfg, params = golden_base
    report = json.loads((PEFT / "report.json").read_text())
    assert report["ok"], report["problems"]
    assert not report["missing_keys"] and not report["unexpected_keys"] and not report["not_bit_equal"]
    assert report["scalings"] == [1.5] and report["versions"]["peft"]
    exported = np.load(PEFT / "export.npz")
    peft_logits = np.load(PEFT / "peft_logits.npz")["logits"]

    lora_cfg, full = lora.load_peft(PEFT / "adapter", cfg, params)
    assert lora_cfg.lora == LoraConfig(4, 6.0, ("q_proj", "v_proj", "down_proj"))
    ours, _ = llama.forward(lora_cfg, full, exported["input_ids"])
    np.testing.assert_allclose(np.asarray(ours), peft_logits, atol=1e-4, rtol=0)
    merged_logits, _ = llama.forward(*lora.merge(lora_cfg, full), exported["input_ids"])
    np.testing.assert_allclose(np.asarray(merged_logits), peft_logits, atol=1e-4, rtol=0)
    base_logits = np.load(GOLDEN / "tiny_gqa_tied" / "expected.npz")["logits"]
    assert np.abs(peft_logits - base_logits).max() > 0.5  # the adapter was active in peft


def test_save_peft_writes_the_committed_adapter(golden_base, tmp_path):
    """What peft loaded was written by save_peft; today's save_peft must write the same tensors and config."""
    cfg, params = golden_base
    lora_cfg, full = lora.load_peft(PEFT / "adapter", cfg, params)
    lora.save_peft(tmp_path, lora_cfg, lora.split(full)[1], base_model_name_or_path="tests/golden/data/tiny_gqa_tied")
    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    committed = load_file(str(PEFT / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == committed.keys()
    assert all(ours[k].dtype == committed[k].dtype and np.array_equal(ours[k], committed[k]) for k in ours)
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == json.loads(
        (PEFT / "adapter" / "adapter_config.json").read_text()
    )
