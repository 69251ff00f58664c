"""Batched chat generation for evaluation: one jit-compiled prefill + decode per batch, never a per-prompt loop.

Prompts are sorted by token length (less padding, fewer compiled shapes) and generated `batch_size` at a time;
replies come back in the input order. A prompt that cannot fit the model's context together with
`max_new_tokens` is not generated: it gets an error record instead, so the caller counts it rather than losing it.
Sampled decoding (temperature > 0) is seeded per batch from `sampling.seed` and the batch index, so a run with the
same seed reproduces exactly.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from safetrade.generate import SamplingConfig, generate


@dataclasses.dataclass
class Replies:
    texts: list[str | None]  # None where `errors` has an entry
    errors: dict[int, str]  # prompt index -> why it was not generated
    new_tokens: int  # generated tokens over all prompts (stop tokens excluded)
    seconds: float

    @property
    def prompts_per_second(self) -> float:
        done = len(self.texts) - len(self.errors)
        return done / self.seconds if self.seconds > 0 else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def chat_replies(cfg, params, tokenizer, prompts: Sequence[str], sampling=None, *, batch_size: int = 16,
                 system: str | None = None, progress: bool = True, desc: str = "generate") -> Replies:
    """Chat replies for `prompts` (greedy unless `sampling` says otherwise; see module doc)."""
    from safetrade.tokenizer import encode_user_prompts, stop_token_ids  # transformers: 1.6 s at import

    base = sampling or SamplingConfig(max_new_tokens=48)
    if not base.stop_token_ids:
        base = dataclasses.replace(base, stop_token_ids=stop_token_ids(tokenizer))
    ids = encode_user_prompts(tokenizer, prompts, system)
    room = cfg.max_position_embeddings - base.max_new_tokens - base.pad_to_multiple
    errors = {i: f"prompt_too_long: {len(x)} tokens + {base.max_new_tokens} new > context "
                 f"{cfg.max_position_embeddings}" for i, x in enumerate(ids) if len(x) > room}
    todo = [i for i in np.argsort([len(x) for x in ids], kind="stable") if i not in errors]
    texts: list[str | None] = [None] * len(prompts)
    new_tokens, start = 0, time.perf_counter()
    bar = tqdm(total=len(todo), disable=not progress, desc=desc, unit="prompt")
    for b, first in enumerate(range(0, len(todo), batch_size)):
        chunk = todo[first:first + batch_size]
        out = generate(cfg, params, [ids[i] for i in chunk], dataclasses.replace(base, seed=base.seed + b),
                       pad_id=tokenizer.pad_token_id or 0)
        for i, tokens in zip(chunk, out.tokens):
            texts[i] = tokenizer.decode(tokens, skip_special_tokens=True)
            new_tokens += len(tokens)
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}")
    bar.close()
    return Replies(texts, errors, new_tokens, time.perf_counter() - start)
