"""The Llama family (Llama-2/3, SmolLM2, Mistral-style, Qwen2 q/k/v biases) in Flax NNX.

The network is defined with NNX modules; everything else in safetrade treats it as data:

    graphdef, params = init(cfg, jax.random.key(0))      # params: a plain nested dict of arrays
    logits, _ = forward(cfg, params, tokens)              # pure function, jit-able, grad-able

Layers are stacked along a leading axis (one `blocks` subtree with shape [L, ...] per weight) and run with
`jax.lax.scan`, so a 30-layer model compiles one layer body, not thirty. Linear kernels are stored as
[in, out] (the HF checkpoint layout [out, in] is transposed once in models/io.py).

Every weight carries logical axis names as NNX metadata (`axes=`); `parallel.param_shardings` maps them onto
the (data, fsdp, tensor) mesh. We use our own metadata key rather than Flax's `sharding_names`, because the
latter shards eagerly at creation and so needs a mesh even for a CPU unit test. The residual stream, q/k/v, the
attention output, the MLP hidden activation and the logits are constrained by logical names under the same
rules (`parallel.constrain`), when traced with a mesh in context (`jax.set_mesh`, `train.step.jit_train_step`);
without one the constraints are no-ops and the traced program is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safetrade import parallel
from safetrade.models.llama_config import (  # noqa: F401  (re-exported: the model module exposes its config)
    LOGICAL_AXES,
    LORA_TARGETS,
    PRESETS,
    LlamaConfig,
    LoraConfig,
    RopeScaling,
    UnsupportedArchitectureError,
    config_from_gguf,
    config_from_hf,
    config_to_hf,
    preset,
)

Params = dict[str, Any]

# Logical axes of the activations the model constrains (parallel.constrain; mapped to mesh axes by parallel.RULES
# like the weights' axes). Constraints apply only while a mesh is in context; without one they are no-ops.
RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")  # [B, T, D]
QUERY_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")  # [B, T, H, Dh]
KEY_VALUE_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
MLP_HIDDEN_AXES = ("activation_batch", "activation_length", "activation_mlp")  # [B, T, F]
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")  # [B, T, V]


# ----------------------------------------------------------------------------------------------------------------
# Modules


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ scale · (x @ lora_a) @ lora_b); kernel is [in, out].

    `name` (e.g. "q_proj") decides whether cfg.lora puts an adapter here. lora_b starts at zero, as in PEFT, so
    a fresh adapter leaves the model unchanged.
    """

    def __init__(self, din: int, dout: int, axes: tuple[str, str], cfg: LlamaConfig, rngs: nnx.Rngs,
                 use_bias: bool = False, name: str = ""):
        self.kernel = nnx.Param(_normal(rngs, (din, dout), cfg.param_dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((dout,), cfg.param_dtype), axes=(axes[1],)) if use_bias else None
        self.dtype = cfg.dtype
        lora = cfg.lora if cfg.lora is not None and name in cfg.lora.targets else None
        self.lora_scale = lora.scale if lora else 0.0
        if lora:
            a = _normal(rngs, (din, lora.rank), jnp.float32, std=1.0 / math.sqrt(din))
            self.lora_a = nnx.LoRAParam(a.astype(cfg.param_dtype), axes=(axes[0], "lora_rank"))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, dout), cfg.param_dtype), axes=("lora_rank", axes[1]))
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, x):
        y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            y = y + self.lora_scale * ((x @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype))
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: LlamaConfig):
        self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype), axes=("norm",))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x):
        # As in HF: normalise in float32, cast back to the input dtype, then scale.
        x32 = x.astype(jnp.float32)
        normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed


def rope_inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """Per-pair rotation frequencies, float32, following transformers' rope init functions."""
    d = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))).astype(
        np.float32
    )
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return (inv / np.float32(s.factor)).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, and the band between is interpolated.
    old = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """Rotate [B, T, H, Dh] by `positions` [B, T] in HF's rotate-half layout (first half pairs with second half)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, hq, hkv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = Linear(d, hq, ("embed", "heads"), cfg, rngs, cfg.attention_bias, "q_proj")
        self.k_proj = Linear(d, hkv, ("embed", "kv_heads"), cfg, rngs, cfg.attention_bias, "k_proj")
        self.v_proj = Linear(d, hkv, ("embed", "kv_heads"), cfg, rngs, cfg.attention_bias, "v_proj")
        self.o_proj = Linear(hq, d, ("heads", "embed"), cfg, rngs, name="o_proj")
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def __call__(self, x, positions, inv_freq, kv_valid, cache_k=None, cache_v=None, cache_index=0, layer=0):
        """x [B, T, D]. Without a cache, attends over x itself (kv_valid [B, T]); with one (the whole stacked
        cache_k/v [L, B, S, Hkv, Dh] and this block's `layer` index; kv_valid [B, S]), writes this call's keys and
        values into the layer's slots cache_index.. in place and attends over the layer's cache.

        A query at slot s may attend to valid slots <= s. Padding is contiguous (left for generation, right for
        training), so slot order is token order and kv_valid alone removes the padding.
        """
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), positions, inv_freq)
        k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), positions, inv_freq)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q = parallel.constrain(q, QUERY_AXES)
        k = parallel.constrain(k, KEY_VALUE_AXES)
        v = parallel.constrain(v, KEY_VALUE_AXES)
        if cache_k is not None:
            # Only the new rows are written into the stacked cache; copying a layer's slice out and back in per
            # step cost ~20 % of a batch-16 decode step (bench/RESULTS.md).
            at = (layer, 0, cache_index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), at)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), at)
            k = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False).astype(q.dtype)
            v = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False).astype(q.dtype)

        s = k.shape[1]
        q_slots = cache_index + jnp.arange(t)
        allowed = (jnp.arange(s)[None, :] <= q_slots[:, None])[None] & kv_valid[:, None, :]  # [B, T, S]

        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores / np.sqrt(self.head_dim).astype(np.float32)
        # A finite floor instead of -inf keeps fully masked rows (left-padding queries) NaN-free.
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        out = parallel.constrain(out.reshape(b, t, self.num_heads, self.head_dim), QUERY_AXES)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), cache_k, cache_v


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, ("embed", "mlp"), cfg, rngs, name="gate_proj")
        self.up_proj = Linear(d, f, ("embed", "mlp"), cfg, rngs, name="up_proj")
        self.down_proj = Linear(f, d, ("mlp", "embed"), cfg, rngs, name="down_proj")

    def __call__(self, x):
        hidden = parallel.constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), MLP_HIDDEN_AXES)
        return self.down_proj(hidden)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, h, positions, inv_freq, kv_valid, cache_k=None, cache_v=None, cache_index=0, layer=0):
        a, cache_k, cache_v = self.attn(self.attn_norm(h), positions, inv_freq, kv_valid, cache_k, cache_v,
                                        cache_index, layer)
        h = parallel.constrain(h + a, RESIDUAL_AXES)
        h = parallel.constrain(h + self.mlp(self.mlp_norm(h)), RESIDUAL_AXES)
        return h, cache_k, cache_v


class Embed(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype),
                                   axes=("vocab", "embed"))
        self.dtype = cfg.dtype

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, h):
        return h @ self.embedding[...].astype(h.dtype).T


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rngs)
        )

    def __call__(self, tokens, positions, kv_valid, cache: KVCache | None = None, cache_index=0,
                 return_hidden: bool = False):
        cfg = self.cfg
        inv_freq = jnp.asarray(rope_inverse_frequencies(cfg))
        embedded = parallel.constrain(self.embed(tokens), RESIDUAL_AXES)
        block_graph, block_state = nnx.split(self.blocks)

        if cache is None:
            # Training/scoring: only the residual stream is carried, so the backward pass stores one activation
            # per layer (none with remat), never a per-layer copy of a cache.
            def layer(h, state):
                h, _, _ = nnx.merge(block_graph, state)(h, positions, inv_freq, kv_valid)
                return h, (h if return_hidden else None)

            if cfg.remat:
                layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
            h, per_layer = jax.lax.scan(layer, embedded, block_state)
        else:
            # Generation: the whole cache rides in the loop carry, so each layer's update is an in-place slice
            # write rather than a fresh [L, B, S, ...] buffer per step.
            def layer(carry, xs):
                h, ks, vs = carry
                state, i = xs
                h, ks, vs = nnx.merge(block_graph, state)(h, positions, inv_freq, kv_valid, ks, vs, cache_index, i)
                return (h, ks, vs), (h if return_hidden else None)

            (h, ks, vs), per_layer = jax.lax.scan(
                layer, (embedded, cache.k, cache.v), (block_state, jnp.arange(cfg.num_layers))
            )
            cache = KVCache(ks, vs)

        normed = self.final_norm(h)
        logits = self.embed.attend(normed) if self.lm_head is None else self.lm_head(normed)
        hidden = None
        if return_hidden:
            hidden = {"layer_outputs": jnp.concatenate([embedded[None], per_layer]), "final": normed}
        return parallel.constrain(logits.astype(jnp.float32), LOGITS_AXES), cache, hidden


# ----------------------------------------------------------------------------------------------------------------
# Pure-function interface


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys and values, [L, B, S, Hkv, Dh]."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: LlamaConfig, batch: int, length: int) -> KVCache:
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype))


@functools.lru_cache(maxsize=16)
def graphdef(cfg: LlamaConfig) -> nnx.GraphDef:
    """The static structure of the model for `cfg`, built without allocating weights."""
    graph, _ = nnx.split(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))))
    return graph


def init(cfg: LlamaConfig, key: jax.Array) -> Params:
    """Random params (normal, std 0.02; norms 1) as a plain nested dict."""
    _, state = nnx.split(Llama(cfg, nnx.Rngs(params=key)))
    return nnx.to_pure_dict(state)


def abstract_params(cfg: LlamaConfig) -> Params:
    """ShapeDtypeStructs of every weight, without allocating anything."""
    _, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))))
    return nnx.to_pure_dict(state)


def logical_axes(cfg: LlamaConfig) -> Params:
    """For every weight, its logical axis names (a tuple per leaf), with `layers` first on stacked block weights."""
    _, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))))
    axes = jax.tree.map(
        lambda v: v.get_metadata()["axes"], state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    axes = nnx.to_pure_dict(axes)
    axes["blocks"] = jax.tree.map(lambda a: ("layers", *a), axes["blocks"], is_leaf=lambda x: isinstance(x, tuple))
    return axes


def forward(
    cfg: LlamaConfig,
    params: Params,
    tokens: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    return_hidden: bool = False,
):
    """Logits [B, T, V] (float32) for `tokens` [B, T]; `attention_mask` [B, T] is 1 for real tokens.

    Padding may be on the left (generation) or the right (training); positions count real tokens only.
    Returns (logits, hidden) where hidden is None unless return_hidden: then a dict with `layer_outputs`
    [L+1, B, T, D] (embeddings, then each block's output) and `final` (after the final norm).
    """
    b, t = tokens.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    model = nnx.merge(graphdef(cfg), params)
    logits, _, hidden = model(tokens, positions, attention_mask.astype(bool), return_hidden=return_hidden)
    return logits, hidden


def forward_with_cache(cfg: LlamaConfig, params: Params, tokens, positions, kv_valid, cache: KVCache, cache_index):
    """One prefill or decode step: write `tokens`' keys/values at cache_index, return (logits, cache)."""
    model = nnx.merge(graphdef(cfg), params)
    logits, cache, _ = model(tokens, positions, kv_valid, cache, cache_index)
    return logits, cache


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position ids counting only real tokens (0 for padding), so left padding does not shift RoPE."""
    mask = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
