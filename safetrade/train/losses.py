"""Token-level language-model losses with response-only masks.

Batch convention (safetrade/data): `input_ids`, `attention_mask` and `loss_mask`, all [B, T]; `loss_mask[t] = 1`
means token t is a target, predicted from the logits at t-1. Losses are returned as (sum, count) so that
gradient accumulation and data-parallel reductions can form the exact token-weighted mean of the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from safetrade.models import llama
from safetrade.models.llama import LlamaConfig, Params


def token_nll(cfg: LlamaConfig, params: Params, batch) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood [B, T-1] of tokens 1..T-1, and their weights (loss_mask[:, 1:])."""
    logits, _ = llama.forward(cfg, params, batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return (logz - target_logit) * weights, weights


def lm_loss_sum(cfg: LlamaConfig, params: Params, batch) -> tuple[jax.Array, jax.Array]:
    """(sum of target-token NLL, number of target tokens) over the batch."""
    nll, weights = token_nll(cfg, params, batch)
    return nll.sum(), weights.sum()


def lm_loss(cfg: LlamaConfig, params: Params, batch) -> jax.Array:
    """Mean NLL per target token (0 when the batch has no target tokens)."""
    total, count = lm_loss_sum(cfg, params, batch)
    return total / jnp.maximum(count, 1.0)


def per_example_loss(cfg: LlamaConfig, params: Params, batch) -> jax.Array:
    """Mean NLL per target token of each row [B] (used by SQSD and evaluation)."""
    nll, weights = token_nll(cfg, params, batch)
    return nll.sum(-1) / jnp.maximum(weights.sum(-1), 1.0)
