"""Safe Delta and its Hessians streamed from host memory layer by layer give today's numbers bit for bit.

`SafeDeltaConfig(stream_layers=n)` keeps the stacked kernels and Hessians in host memory and sends n layers of one
kernel at a time to the device; `collect_llama_hessians(..., stream=True)` runs the model one decoder layer at a
time. Both exist so that a 7-8B request fits one accelerator (bench/memory_plan.py); neither may change a value.
Bit-identical is the claim (same float32 programs per layer, same order of the sums), so the comparisons below are
exact; a backend that fuses a one-layer program differently from the layer scan would show up here first.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safetrade.models import io, llama
from safetrade.safedelta import SafeDeltaConfig, SafeDeltaError
from safetrade.safedelta.llama_adapter import KERNELS, collect_llama_hessians, safe_delta_llama
from safetrade.safedelta.tree import safe_delta

# Three layers, so chunks of 2 leave a remainder. Every projection is 32x32: one compiled per-layer program serves
# all seven kernels (each program costs ~10 s to compile here; the kernel shapes do not matter to the streaming).
CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=3, num_heads=4,
                        num_kv_heads=4, max_position_embeddings=64, tie_word_embeddings=True)


def leaf(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


@pytest.fixture(scope="module")
def model():
    params = llama.init(CFG, jax.random.key(0))
    finetuned = jax.tree.map(lambda a, n: a + 0.05 * n, params, llama.init(CFG, jax.random.key(1)))
    ids = jax.random.randint(jax.random.key(2), (6, 12), 0, CFG.vocab_size)
    mask = jnp.ones((6, 12), jnp.int32).at[1, 7:].set(0).at[3, 2:].set(0).at[4, :].set(0)  # row 4: padding only
    batches = [{"input_ids": np.asarray(ids[i:i + 2]), "attention_mask": np.asarray(mask[i:i + 2])}
               for i in range(0, 6, 2)]
    return params, finetuned, batches


def test_streamed_hessians_equal_the_one_pass_collection_and_share_its_cache(model, tmp_path):
    params, _, batches = model
    one_pass = collect_llama_hessians(CFG, params, batches)
    host_params = jax.device_get(params)
    streamed = collect_llama_hessians(CFG, host_params, batches, stream=True)
    assert streamed.names == one_pass.names and set(streamed.arrays) == {"attn_input", "o_proj_input", "mlp_input",
                                                                         "down_proj_input"}
    for name, h in one_pass.arrays.items():
        assert isinstance(streamed.arrays[name], np.ndarray) and streamed.arrays[name].dtype == np.float32
        assert np.array_equal(streamed.arrays[name], np.asarray(h)), name
    assert streamed.arrays["down_proj_input"].shape == (3, 32, 32)

    # The streamed collection writes the file the one-pass collection reads (same fingerprint), and back.
    collect_llama_hessians(CFG, host_params, batches, cache_dir=tmp_path, stream=True)
    cached = collect_llama_hessians(CFG, params, batches, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("hessians-*.safetensors"))) == 1
    again = collect_llama_hessians(CFG, params, batches, cache_dir=tmp_path, stream=True)
    for name, h in one_pass.arrays.items():
        assert np.array_equal(np.asarray(cached.arrays[name]), np.asarray(h))
        assert isinstance(again.arrays[name], np.ndarray) and np.array_equal(again.arrays[name], np.asarray(h))


@pytest.mark.slow  # three compiled per-layer programs per case (~30 s)
@pytest.mark.parametrize("layer_batch,stream_layers", [(1, 2), (2, 2)])
def test_streamed_transform_equals_the_resident_one(model, layer_batch, stream_layers):
    """Chunks of 2 layers and a remainder of 1, with lax.map's batches of 1 or 2 layers; official mode with the
    random ablation, so the per-layer keys must be the whole stack's too."""
    params, finetuned, batches = model
    hessians = collect_llama_hessians(CFG, params, batches)
    cfg = SafeDeltaConfig(s=1.0, layer_batch=layer_batch, ablation="random", seed=3)
    resident, report = safe_delta_llama(params, finetuned, hessians, cfg)
    host = jax.device_get
    streamed, streamed_report = safe_delta_llama(host(params), host(finetuned), hessians,
                                                 SafeDeltaConfig(s=1.0, layer_batch=layer_batch, ablation="random",
                                                                 seed=3, stream_layers=stream_layers))
    for path in KERNELS:
        assert isinstance(leaf(streamed, path), np.ndarray)
        assert np.array_equal(leaf(streamed, path), np.asarray(leaf(resident, path))), path
    assert np.array_equal(streamed["embed"]["embedding"], np.asarray(resident["embed"]["embedding"]))
    strip = lambda r: {k: v for k, v in r.items() if k != "config"}  # noqa: E731  (stream_layers differs)
    assert json.dumps(strip(streamed_report), sort_keys=True) == json.dumps(strip(report), sort_keys=True)
    assert 0 < report["kept_fraction"] < 1


@pytest.mark.slow  # the programs of the (1, 2) case above, compiled again when run alone
def test_streamed_out_in_layout(model):
    """A torch-layout tree ([out, in] kernels, host arrays) streams as it runs resident: bit for bit."""
    params, finetuned, batches = model
    hessians = collect_llama_hessians(CFG, params, batches)
    torch_layout = lambda tree: {p: np.swapaxes(np.asarray(leaf(tree, p)), -1, -2) for p in KERNELS}  # noqa: E731
    resident, _ = safe_delta(torch_layout(params), torch_layout(finetuned), hessians, SafeDeltaConfig(s=1.0),
                             layout="out_in")
    streamed, _ = safe_delta(torch_layout(params), torch_layout(finetuned), hessians,
                             SafeDeltaConfig(s=1.0, stream_layers=2), layout="out_in")
    for path in KERNELS:
        assert np.array_equal(streamed[path], np.asarray(resident[path])), path


def test_streamed_checks_name_the_layer(model):
    """The host-side checks (q_proj is the first kernel: they fail before any layer is computed)."""
    params, finetuned, batches = model
    hessians = dict(collect_llama_hessians(CFG, params, batches).arrays)
    broken = jax.tree.map(np.array, finetuned)  # writable host copies
    broken["blocks"]["attn"]["q_proj"]["kernel"][2, 3, 4] = np.nan
    with pytest.raises(SafeDeltaError, match=r"blocks/attn/q_proj/kernel: .*non-finite.*\[2\]"):
        safe_delta_llama(jax.device_get(params), broken, hessians, SafeDeltaConfig(stream_layers=1))
    nan_h = np.array(hessians["attn_input"])
    nan_h[1, 0, 0] = np.inf
    with pytest.raises(SafeDeltaError, match=r"Hessian 'attn_input'.*non-finite.*\[1\]"):
        safe_delta_llama(params, finetuned, {**hessians, "attn_input": nan_h}, SafeDeltaConfig(stream_layers=1))
    with pytest.raises(SafeDeltaError, match="stream_layers=3 must be 0 .* multiple of layer_batch=2"):
        SafeDeltaConfig(layer_batch=2, stream_layers=3)


@pytest.mark.slow
def test_safedelta_command_streamed_writes_the_same_model(tmp_path, smollm2_gguf):
    """`safetrade safedelta safedelta.stream_layers=1`: models loaded into host memory, Hessians and transform
    streamed; the exported model and the report's numbers equal the resident run's, each with its own cache."""
    from safetrade import cli
    from safetrade.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    # every projection 64x64: one compiled rule per path (resident stack, streamed chunk) instead of four
    cfg = llama.preset("tiny").replace(vocab_size=49152, max_position_embeddings=512, intermediate_size=64,
                                       num_kv_heads=4)
    aligned = llama.init(cfg, jax.random.key(0))
    finetuned = jax.tree.map(lambda a, n: a + 0.05 * n, aligned, llama.init(cfg, jax.random.key(1)))
    io.save_hf(tmp_path / "aligned", cfg, aligned, tokenizer=tok)
    io.save_hf(tmp_path / "finetuned", cfg, finetuned, tokenizer=tok)
    common = [f"aligned={tmp_path / 'aligned'}", f"finetuned={tmp_path / 'finetuned'}", "n_calibration=8",
              "max_len=64"]
    for run, extra in (("resident", []), ("streamed", ["safedelta.stream_layers=1"])):
        assert cli.main(["safedelta", *common, *extra, f"out_dir={tmp_path / run}",
                         f"cache_dir={tmp_path / run / 'cache'}"]) == 0
    reports = [json.loads((tmp_path / run / "report.json").read_text()) for run in ("resident", "streamed")]
    assert reports[0]["kernels"] == reports[1]["kernels"] and reports[1]["job"]["safedelta"]["stream_layers"] == 1
    _, resident = io.load_hf(tmp_path / "resident" / "hf")
    _, streamed = io.load_hf(tmp_path / "streamed" / "hf")
    for a, b in zip(jax.tree.leaves(resident), jax.tree.leaves(streamed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
