"""The same forward pass and generation on 8 simulated CPU devices, params sharded over (fsdp, tensor)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from safetrade import parallel
from safetrade.errors import SafetradeError
from safetrade.generate import SamplingConfig, generate
from safetrade.models import io, llama
from tests.conftest import GOLDEN, TINY_VARIANTS

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices; see tests/conftest.py")


@pytest.mark.parametrize("variant", TINY_VARIANTS)
@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2), (8, 1, 1)])
def test_sharded_forward_matches_one_device(variant, shape):
    data, fsdp, tensor = shape
    mesh = parallel.make_mesh(data, fsdp, tensor)
    cfg, params = io.load_hf(GOLDEN / f"tiny_{variant}")
    _, sharded = io.load_hf(GOLDEN / f"tiny_{variant}", mesh=mesh)
    ids = jnp.asarray(np.load(GOLDEN / f"tiny_{variant}" / "expected.npz")["input_ids"])
    ids = jnp.tile(ids, (4, 1))  # batch 8 so the data axes have rows to split

    expected, _ = jax.jit(lambda p, t: llama.forward(cfg, p, t))(params, ids)
    shardings = parallel.param_shardings(llama.logical_axes(cfg), sharded, mesh)
    step = jax.jit(lambda p, t: llama.forward(cfg, p, t)[0], in_shardings=(shardings, parallel.batch_sharding(mesh)))
    got = step(sharded, jax.device_put(ids, parallel.batch_sharding(mesh)))
    # Sharded contractions sum partial products per shard and then all-reduce, a different fp32 summation order
    # than one device: differences of ~n*eps*|x| (measured <= 1.8e-5 on logits up to 6.7). So the 1e-5 bound is
    # relative to the logit scale; a wrong spec or a missing all-reduce gives O(1) errors.
    scale = float(np.abs(np.asarray(expected)).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5 * scale, rtol=0)


def test_params_land_on_their_declared_shardings():
    mesh = parallel.make_mesh(2, 2, 2)
    cfg, params = io.load_hf(GOLDEN / "tiny_qwen2_bias", mesh=mesh)
    attn = params["blocks"]["attn"]
    assert attn["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert attn["o_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert attn["q_proj"]["bias"].sharding.spec == P(None, "tensor")
    assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert params["blocks"]["attn_norm"]["scale"].sharding.spec == P(None, None)
    # Each device holds a quarter of q_proj: fsdp x tensor = 4 shards, replicated over data.
    shard = attn["q_proj"]["kernel"].addressable_shards[0].data
    assert shard.shape == (cfg.num_layers, cfg.hidden_size // 2, cfg.num_heads * cfg.head_dim // 2)


def test_indivisible_dimension_is_replicated_not_an_error():
    mesh = parallel.make_mesh(1, 1, 8)
    spec = parallel.logical_to_spec(("embed", "heads"), (576, 9 * 64 // 3), mesh)  # 192 % 8 == 0
    assert spec == P("fsdp", "tensor")
    assert parallel.logical_to_spec(("layers", "kv_heads"), (30, 3 * 64 + 4), mesh) == P(None, None)


def test_sharded_generation_matches_one_device():
    mesh = parallel.make_mesh(1, 4, 2)
    cfg, params = io.load_hf(GOLDEN / "tiny_gqa_tied")
    _, sharded = io.load_hf(GOLDEN / "tiny_gqa_tied", mesh=mesh)
    prompts = [[5, 9, 13], [7, 1, 2, 3, 4, 5], [42], [8, 8]]
    sampling = SamplingConfig(max_new_tokens=12, pad_to_multiple=8)
    assert generate(cfg, sharded, prompts, sampling).tokens == generate(cfg, params, prompts, sampling).tokens


def test_bad_mesh_shapes():
    with pytest.raises(SafetradeError, match="needs 6 devices, found 8"):
        parallel.make_mesh(1, 3, 2)
    with pytest.raises(SafetradeError, match="at most one mesh axis may be -1"):
        parallel.make_mesh(-1, -1, 2)
    assert dict(parallel.make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
