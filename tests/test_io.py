"""Checkpoint loading and export: HF safetensors, GGUF (incl. the Q/K permutation), round trips, bad input."""

from __future__ import annotations

import json
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from safetrade.errors import SafetradeError
from safetrade.models import io, llama
from tests.conftest import GOLDEN, TINY_VARIANTS


def assert_trees_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


# --- HF directories -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_hf_dir_loads_every_tensor_bit_for_bit(variant):
    cfg, params = io.load_hf(GOLDEN / f"tiny_{variant}")
    tensors = load_file(str(GOLDEN / f"tiny_{variant}" / "model.safetensors"))
    q = params["blocks"]["attn"]["q_proj"]["kernel"]
    for i in range(cfg.num_layers):
        assert np.array_equal(np.asarray(q[i]).T, tensors[f"model.layers.{i}.self_attn.q_proj.weight"])
    assert np.array_equal(np.asarray(params["embed"]["embedding"]), tensors["model.embed_tokens.weight"])


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_export_is_what_transformers_loaded(variant, tmp_path):
    """params -> HF dir -> transformers gives the same logits (recorded by `make golden` in the torch venv).

    The recorded run read roundtrip/<variant>/model.safetensors; today's exporter must write the same tensors.
    """
    cfg, params = io.load_hf(GOLDEN / f"tiny_{variant}")
    io.save_hf(tmp_path, cfg, params)
    ours = load_file(str(tmp_path / "model.safetensors"))
    recorded = load_file(str(GOLDEN / "roundtrip" / variant / "model.safetensors"))
    assert ours.keys() == recorded.keys()
    assert all(np.array_equal(ours[k], recorded[k]) for k in ours)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(
        (GOLDEN / "roundtrip" / variant / "config.json").read_text()
    )
    report = json.loads((GOLDEN / "roundtrip" / variant / "report.json").read_text())
    assert report["ok"] and not report["loading_info"]["missing_keys"] and not report["loading_info"]["unexpected_keys"]
    expected = np.load(GOLDEN / f"tiny_{variant}" / "expected.npz")["logits"]
    torch_logits = np.load(GOLDEN / "roundtrip" / variant / "transformers_logits.npz")["logits"]
    np.testing.assert_allclose(torch_logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_save_then_load_is_bit_for_bit(variant, tmp_path):
    cfg, params = io.load_hf(GOLDEN / f"tiny_{variant}")
    io.save_hf(tmp_path / "single", cfg, params)
    io.save_hf(tmp_path / "sharded", cfg, params, max_shard_bytes=60_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    for sub in ("single", "sharded"):
        cfg2, params2 = io.load_hf(tmp_path / sub)
        assert cfg2 == cfg
        assert_trees_identical(params, params2)


def test_tokenizer_is_written_with_the_model(tmp_path, smollm2_gguf):
    from safetrade.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    cfg, params = io.load_hf(GOLDEN / "tiny_gqa_tied")
    io.save_hf(tmp_path, cfg, params, tokenizer=tok)
    again = load_tokenizer(tmp_path)
    assert again.encode("Hello world, how are you?") == tok.encode("Hello world, how are you?")


# --- GGUF -----------------------------------------------------------------------------------------------------


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time permutation, written from its description: rows (head, 2, half) -> (head, half, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, cfg, params, qtype_for=None):
    """Write params as a llama-arch GGUF the way llama.cpp's converter does (q/k rows permuted)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    for spec in io.weight_specs(cfg):
        host = np.asarray(io.tree_get(params, spec.path))
        for i in range(cfg.num_layers) if spec.stacked else [None]:
            array = host[i] if spec.stacked else host
            array = np.ascontiguousarray(array.T if spec.transpose else array).astype(np.float32)
            if spec.rope_permuted:
                array = permute_like_llama_cpp(array, cfg.num_heads if spec.rope_permuted == "q" else cfg.num_kv_heads)
            name = spec.gguf.format(i=i)
            if qtype_for and name in qtype_for:
                qtype = qtype_for[name]
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                raw = np.zeros((array.shape[0], array.shape[1] // block * size), np.uint8)  # byte shape per row
                writer.add_tensor(name, raw, raw_dtype=qtype)
            else:
                writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_loader_inverts_llama_cpp_conversion(tmp_path):
    cfg, params = io.load_hf(GOLDEN / "tiny_gqa_tied")
    path = write_gguf(tmp_path / "tiny.gguf", cfg, params)
    cfg2, params2 = io.load_gguf(path)
    assert cfg2.tie_word_embeddings and cfg2.num_kv_heads == cfg.num_kv_heads
    assert_trees_identical(params, params2)
    _, raw = io.load_gguf(path, undo_rope_permutation=False)
    assert not np.array_equal(raw["blocks"]["attn"]["q_proj"]["kernel"], params["blocks"]["attn"]["q_proj"]["kernel"])


@pytest.mark.slow
def test_smollm2_gguf_next_token_logits_match_transformers(smollm2):
    """Golden values: transformers (torch, fp32) loading the same GGUF. 1e-3 abs: 30 layers, logits ~30."""
    cfg, params = smollm2
    golden = np.load(GOLDEN / "smollm2_gguf.npz")
    n = golden["next_token_logits"].shape[0]
    assert n >= 3
    step = jax.jit(lambda p, t: llama.forward(cfg, p, t)[0][:, -1])
    for k in range(n):
        logits = np.asarray(step(params, jnp.asarray(golden[f"ids_{k}"])[None]))[0]
        assert np.abs(logits - golden["next_token_logits"][k]).max() <= 1e-3
        assert logits.argmax() == golden["next_token_logits"][k].argmax()


@pytest.mark.slow
def test_skipping_qk_unpermutation_breaks_smollm2(smollm2_gguf):
    cfg, params = io.load_gguf(smollm2_gguf, undo_rope_permutation=False)
    golden = np.load(GOLDEN / "smollm2_gguf.npz")
    logits = np.asarray(llama.forward(cfg, params, jnp.asarray(golden["ids_0"])[None])[0][0, -1])
    assert np.abs(logits - golden["next_token_logits"][0]).max() > 1.0


@pytest.mark.slow
def test_smollm2_golden_prompts_tokenize_identically(smollm2_gguf):
    from safetrade.tokenizer import encode_chat, load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    record = json.loads((GOLDEN / "smollm2_gguf.json").read_text())
    golden = np.load(GOLDEN / "smollm2_gguf.npz")
    for k, prompt in enumerate(record["prompts"]):
        assert encode_chat(tok, prompt["messages"]) == golden[f"ids_{k}"].tolist()


# --- bad input ------------------------------------------------------------------------------------------------


def _copy_tiny(tmp_path, variant="gqa_tied"):
    dst = tmp_path / variant
    shutil.copytree(GOLDEN / f"tiny_{variant}", dst)
    return dst


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        io.load_hf(tmp_path / "nowhere")
    d = _copy_tiny(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*never pickles"):
        io.load_hf(d)


def test_unsupported_architecture_names_the_file(tmp_path):
    d = _copy_tiny(tmp_path)
    hf = json.loads((d / "config.json").read_text())
    hf["architectures"], hf["model_type"] = ["GPTNeoXForCausalLM"], "gpt_neox"
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(llama.UnsupportedArchitectureError, match=rf"{d / 'config.json'}.*GPTNeoXForCausalLM.*supported"):
        io.load_hf(d)


def test_shape_mismatch_names_tensor_and_file(tmp_path):
    d = _copy_tiny(tmp_path)
    hf = json.loads((d / "config.json").read_text())
    hf["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(io.CheckpointError, match=r"gqa_tied: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
                                                 r"\(128, 64\), but the config implies \(96, 64\)"):
        io.load_hf(d)


def test_missing_and_unexpected_tensors(tmp_path):
    d = _copy_tiny(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(io.CheckpointError, match="'model.norm.weight' is missing"):
        io.load_hf(d)
    tensors["model.norm.weight"] = np.ones(64, np.float32)
    tensors["lm_head.weight"] = np.ones((256, 64), np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(io.CheckpointError, match="lm_head.weight.*tie_word_embeddings"):
        io.load_hf(d)


def test_unsupported_gguf_quant_type_names_tensor_and_type(tmp_path):
    cfg, params = io.load_hf(GOLDEN / "tiny_gqa_tied")
    path = write_gguf(tmp_path / "q81.gguf", cfg, params, {"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q8_1})
    with pytest.raises(io.CheckpointError, match=r"q81\.gguf: tensor 'blk\.0\.ffn_up\.weight' uses GGML type Q8_1.*"
                                                 r"supported: .*Q4_1"):
        io.load_gguf(path)


def test_not_a_gguf_and_unknown_source(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(SafetradeError, match="not a GGUF"):
        io.load_gguf(bogus)
    with pytest.raises(SafetradeError, match="smollm2-135m-instruct"):
        io.load_model("no-such-model")
