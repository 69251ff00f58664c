"""KV-cache generation against step-by-step full recomputation, sampling determinism, stops, bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from safetrade.errors import SafetradeError
from safetrade.generate import SamplingConfig, generate, left_pad, sample_token
from safetrade.models import io, llama
from tests.conftest import GOLDEN

PROMPTS = [[5, 9, 13], [7, 1, 2, 3, 4, 5, 6, 8, 100, 200, 17, 3, 9], [42]]


@pytest.fixture(scope="module")
def tiny():
    return io.load_hf(GOLDEN / "tiny_gqa_tied")


def recompute_greedy(cfg, params, prompt, n):
    """Reference decoder: re-run the full forward pass, no cache, over the whole sequence for every new token.

    The sequence sits in a fixed-width right-padded buffer so the forward pass compiles once.
    """
    import jax

    width = len(prompt) + n
    forward = jax.jit(lambda p, t, m: llama.forward(cfg, p, t, attention_mask=m)[0])
    seq = list(prompt)
    for _ in range(n):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(seq)] = seq
        mask = (np.arange(width) < len(seq)).astype(np.int32)[None]
        logits = forward(params, tokens, mask)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_cached_greedy_equals_full_recompute_for_a_ragged_batch(tiny):
    cfg, params = tiny
    out = generate(cfg, params, PROMPTS, SamplingConfig(max_new_tokens=20, pad_to_multiple=8))
    assert out.finished == [False] * 3
    for prompt, tokens in zip(PROMPTS, out.tokens):
        assert tokens == recompute_greedy(cfg, params, prompt, 20)


@pytest.mark.slow
def test_cached_greedy_equals_full_recompute_on_smollm2(smollm2):
    cfg, params = smollm2
    prompts = [[1, 9690, 198, 19556, 905, 28], [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]]
    out = generate(cfg, params, prompts, SamplingConfig(max_new_tokens=12))
    for prompt, tokens in zip(prompts, out.tokens):
        assert tokens == recompute_greedy(cfg, params, prompt, 12)


def test_batch_composition_does_not_change_a_row(tiny):
    cfg, params = tiny
    sampling = SamplingConfig(max_new_tokens=10)
    alone = generate(cfg, params, [PROMPTS[0]], sampling).tokens[0]
    assert generate(cfg, params, PROMPTS, sampling).tokens[0] == alone


def test_stop_tokens_end_rows_and_are_excluded(tiny):
    cfg, params = tiny
    free = generate(cfg, params, PROMPTS, SamplingConfig(max_new_tokens=12)).tokens
    stop = free[1][4]
    out = generate(cfg, params, PROMPTS, SamplingConfig(max_new_tokens=12, stop_token_ids=(stop,)))
    first = free[1].index(stop)
    assert out.tokens[1] == free[1][:first] and out.finished[1]
    for row, full in zip(out.tokens, free):
        assert stop not in row and row == full[: len(row)]


def test_sampling_is_deterministic_given_a_seed(tiny):
    cfg, params = tiny
    s = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    a = generate(cfg, params, PROMPTS, s).tokens
    assert a == generate(cfg, params, PROMPTS, s).tokens
    other = generate(cfg, params, PROMPTS, SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=8))
    assert a != other.tokens


def test_top_p_keeps_the_smallest_covering_prefix():
    import jax

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_token(logits, jax.random.key(k), 1.0, 0.75)[0]) for k in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.75 needs the second token; the third is never needed
    draws = {int(sample_token(logits, jax.random.key(k), 1.0, 0.5)[0]) for k in range(50)}
    assert draws == {0}
    assert int(sample_token(logits, jax.random.key(0), 0.0, 1.0)[0]) == 0


def test_left_pad_and_bad_input(tiny):
    cfg, params = tiny
    tokens, mask = left_pad([[1, 2, 3], [4]], pad_id=0, multiple=4)
    assert tokens.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]] and mask.sum(1).tolist() == [3, 1]
    with pytest.raises(SafetradeError, match="at least one token"):
        generate(cfg, params, [[1], []], SamplingConfig(max_new_tokens=2))
    with pytest.raises(SafetradeError, match="exceeds the model's context of 128"):
        generate(cfg, params, [[1] * 100], SamplingConfig(max_new_tokens=64))
    with pytest.raises(SafetradeError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_a_shared_prefix_prefilled_once_gives_the_same_generation(tiny):
    """generate(prefix=P, prompts) == generate(P + prompt): tokens equal, first logits equal to fp32 rounding."""
    from safetrade.generate import shared_prefix

    cfg, params = tiny
    rng = np.random.default_rng(0)
    head = rng.integers(1, cfg.vocab_size, 37).tolist()
    prompts = [head + rng.integers(1, cfg.vocab_size, n).tolist() for n in (3, 9, 1, 14)]
    common = shared_prefix(prompts, multiple=8)
    assert common == 32  # 37 shared tokens, rounded down to the multiple
    sampling = SamplingConfig(max_new_tokens=6)
    full = generate(cfg, params, prompts, sampling, return_first_logits=True)
    split = generate(cfg, params, [p[common:] for p in prompts], sampling, return_first_logits=True,
                     prefix=prompts[0][:common])
    assert split.tokens == full.tokens
    np.testing.assert_allclose(split.first_logits, full.first_logits, atol=2e-5)
    from safetrade.generate import prefix_cache

    kv = prefix_cache(cfg, params, np.asarray(prompts[0][:common], np.int32))
    reused = generate(cfg, params, [p[common:] for p in prompts], sampling, return_first_logits=True,
                      prefix=prompts[0][:common], prefix_kv=kv)
    assert reused.tokens == full.tokens
    np.testing.assert_array_equal(reused.first_logits, split.first_logits)
    assert shared_prefix([[1, 2, 3], [1, 2, 3]], multiple=1) == 2  # one token always stays in the prompt
