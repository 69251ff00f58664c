"""Batched generation: one jitted prefill, then one jitted `while_loop` that decodes every new token.

Prompts are left-padded to a common, bucketed length so that the newest token of every row sits at the same
cache slot; positions count real tokens only, so padding never shifts RoPE. The KV cache is preallocated for
prompt + max_new_tokens and updated in place inside the decode loop. Sampling is greedy (temperature 0) or
temperature / top-p, with the key for step t derived as fold_in(key(seed), t): the same seed gives the same text.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safetrade.errors import SafetradeError
from safetrade.models import llama
from safetrade.models.llama import KVCache, LlamaConfig, Params


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    pad_to_multiple: int = 32  # prompt lengths are bucketed so a new batch rarely recompiles

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise SafetradeError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise SafetradeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SafetradeError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, stop token excluded
    finished: list[bool]  # True when a stop token ended the row, False when max_new_tokens did
    first_logits: np.ndarray | None = None  # [B, V] float32 logits of the first new token, when asked for


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """One token per row of `logits` [B, V]: argmax when temperature == 0, else temperature + nucleus sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, P], mask [B, P]) with every prompt right-aligned; P is the longest prompt rounded up."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SafetradeError("every prompt must have at least one token")
    longest = max(len(p) for p in prompts)
    width = -(-longest // multiple) * multiple
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return tokens, mask


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _prefill(cfg: LlamaConfig, params: Params, tokens, mask, cache_len: int):
    b, p = tokens.shape
    kv_valid = jnp.zeros((b, cache_len), bool).at[:, :p].set(mask.astype(bool))
    cache = KVCache.zeros(cfg, b, cache_len)
    logits, cache = llama.forward_with_cache(cfg, params, tokens, llama.positions_from_mask(mask), kv_valid,
                                             cache, 0)
    return logits[:, -1], cache, kv_valid


@functools.partial(jax.jit, static_argnames=("cfg",))
def prefix_cache(cfg: LlamaConfig, params: Params, prefix) -> KVCache:
    """Keys and values [L, 1, P, Hkv, Dh] of a token prefix [P]: compute once, pass to every `generate` call that
    continues the same prefix (`generate(prefix=..., prefix_kv=...)`)."""
    p = prefix.shape[0]
    cache = KVCache.zeros(cfg, 1, p)
    _, cache = llama.forward_with_cache(cfg, params, prefix[None], jnp.arange(p)[None], jnp.ones((1, p), bool),
                                        cache, 0)
    return cache


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _prefill_after_prefix(cfg: LlamaConfig, params: Params, shared: KVCache, tokens, mask, cache_len: int):
    """Each row's own left-padded tokens after a prefix whose keys/values (`shared`, batch 1) are already known.
    The padding sits between the prefix and the row's tokens, where kv_valid masks it and positions skip it, so
    each row sees exactly prefix + its tokens."""
    b, width = tokens.shape
    p = shared.k.shape[2]
    empty = KVCache.zeros(cfg, b, cache_len)
    cache = KVCache(empty.k.at[:, :, :p].set(shared.k), empty.v.at[:, :, :p].set(shared.v))  # batch 1 broadcasts
    kv_valid = jnp.zeros((b, cache_len), bool).at[:, :p].set(True).at[:, p:p + width].set(mask.astype(bool))
    positions = p + llama.positions_from_mask(mask)
    logits, cache = llama.forward_with_cache(cfg, params, tokens, positions, kv_valid, cache, p)
    return logits[:, -1], cache, kv_valid


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"))
def _decode(cfg: LlamaConfig, sampling: SamplingConfig, params: Params, first_logits, cache: KVCache, kv_valid,
            prompt_lengths, prompt_width):
    b = first_logits.shape[0]
    base_key = jax.random.key(sampling.seed)
    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)

    def pick(logits, step):
        return sample_token(logits, jax.random.fold_in(base_key, step), sampling.temperature, sampling.top_p)

    first = pick(first_logits, 0)
    out = jnp.zeros((b, sampling.max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)

    def cond(state):
        step, _, _, _, _, done = state
        return (step < sampling.max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, cache, kv_valid, out, done = state
        slot = prompt_width + step - 1  # the slot of `token`, produced at step-1
        kv_valid = kv_valid.at[:, slot].set(True)
        positions = (prompt_lengths + step - 1)[:, None]
        logits, cache = llama.forward_with_cache(cfg, params, token[:, None], positions, kv_valid, cache, slot)
        new = pick(logits[:, -1], step)
        new = jnp.where(done, 0, new)
        out = out.at[:, step].set(new)
        done = done | jnp.isin(new, stop_ids)
        return step + 1, new, cache, kv_valid, out, done

    step, _, _, _, out, done = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, kv_valid, out, done))
    return out, step


def generate(cfg: LlamaConfig, params: Params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
             pad_id: int = 0, *, return_first_logits: bool = False, prefix: Sequence[int] = (),
             prefix_kv: KVCache | None = None) -> Generation:
    """Continue each prompt (a list of token ids); rows stop at a stop token or after max_new_tokens.

    `prefix`: token ids that come before every prompt (a judge's fixed instructions, a few-shot block). It is
    prefilled once for the whole batch instead of once per row; the result equals generating from
    prefix + prompt. `prefix_kv` (from `prefix_cache`) saves recomputing it across calls.
    `return_first_logits` also returns the logits the first new token was chosen from (what classifier-style
    judges read their verdict probability from), at no extra forward pass."""
    tokens, mask = left_pad(prompts, pad_id, sampling.pad_to_multiple)
    width = len(prefix) + tokens.shape[1]
    cache_len = width + -(-sampling.max_new_tokens // sampling.pad_to_multiple) * sampling.pad_to_multiple
    if cache_len > cfg.max_position_embeddings:
        raise SafetradeError(
            f"prompt ({width} padded tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds the model's "
            f"context of {cfg.max_position_embeddings}"
        )
    if len(prefix):
        if prefix_kv is None:
            prefix_kv = prefix_cache(cfg, params, jnp.asarray(prefix, jnp.int32))
        if prefix_kv.k.shape[2] != len(prefix):
            raise SafetradeError(f"prefix_kv holds {prefix_kv.k.shape[2]} tokens, the prefix has {len(prefix)}")
        first_logits, cache, kv_valid = _prefill_after_prefix(cfg, params, prefix_kv, jnp.asarray(tokens),
                                                              jnp.asarray(mask), cache_len)
    else:
        first_logits, cache, kv_valid = _prefill(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), cache_len)
    lengths = jnp.asarray(len(prefix) + mask.sum(axis=1), jnp.int32)
    out, steps = _decode(cfg, sampling, params, first_logits, cache, kv_valid, lengths, width)
    out = np.asarray(out)[:, : int(steps)]
    stops = set(sampling.stop_token_ids)
    rows, finished = [], []
    for row in out.tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), None)
        rows.append(row if cut is None else row[:cut])
        finished.append(cut is not None)
    first = np.asarray(first_logits, np.float32) if return_first_logits else None
    return Generation(rows, finished, first)


def shared_prefix(sequences: Sequence[Sequence[int]], multiple: int = 32, keep: int = 1) -> int:
    """Length of the longest common prefix of `sequences`, rounded down to `multiple` (few compiled shapes),
    leaving at least `keep` tokens of every sequence after it."""
    if not sequences:
        return 0
    first, n = sequences[0], min(len(s) for s in sequences) - keep
    common = 0
    while common < n and all(s[common] == first[common] for s in sequences):
        common += 1
    return common // multiple * multiple
