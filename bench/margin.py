"""Refusal margin: one prefill per prompt + cached continuations vs one full forward per (prompt, continuation).

    python bench/margin.py [--n 100 --batch-size 16]

Both sides score the refusal and the compliance continuation (safetrade.evaluate.margin's defaults) after the same
--n held-out harmful prompts (the evaluation suite's "heldout" set), on SmolLM2-135M-Instruct in fp32, in this
process, one after the other, each run twice (the first compiles). The reference is the margin's previous
implementation, kept here: prompt + continuation right-padded to a bucket and run through `token_nll` once per
continuation. Prints seconds, the compiled speed-up (reference seconds / safetrade seconds) and the largest difference
between the two margins.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.forward import cpu_model  # noqa: E402
from safetrade import hub  # noqa: E402
from safetrade.models import io  # noqa: E402


@functools.partial(jax.jit, static_argnums=0)
def _sequence_logprobs(cfg, params, batch):
    from safetrade.train.losses import token_nll

    return -token_nll(cfg, params, batch)[0].sum(-1)


def reference_margin(cfg, params, tok, prompts, batch_size):
    """The margin as it was computed before: a full forward of prompt + continuation, per continuation."""
    from safetrade.data.batching import bucket_for, bucket_lengths, make_batch
    from safetrade.evaluate.margin import COMPLIANCE_CONTINUATION, REFUSAL_CONTINUATION
    from safetrade.tokenizer import encode_chat

    scores = []
    for text in (REFUSAL_CONTINUATION, COMPLIANCE_CONTINUATION):
        cont = tok.encode(text, add_special_tokens=False)
        examples = []
        for p in prompts:
            ids = list(encode_chat(tok, [{"role": "user", "content": p}]))
            examples.append({"input_ids": np.asarray(ids + cont, np.int32),
                             "loss_mask": np.asarray([0] * len(ids) + [1] * len(cont), np.int32)})
        buckets = bucket_lengths(max(64, max(len(e["input_ids"]) for e in examples)))
        order = np.argsort([len(e["input_ids"]) for e in examples], kind="stable")
        out = np.zeros(len(examples))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            length = bucket_for(max(len(examples[i]["input_ids"]) for i in chunk), buckets)
            batch = make_batch([examples[i] for i in chunk], length, batch_size, pad_id=tok.pad_token_id or 0)
            out[chunk] = np.asarray(_sequence_logprobs(cfg, params, batch))[: len(chunk)]
        scores.append(out)
    return scores[0] - scores[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)

    from safetrade.evaluate.margin import refusal_margin
    from safetrade.evaluate.suite import harmful_rows
    from safetrade.tokenizer import load_tokenizer

    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"date {date}  jax {jax.__version__} on {jax.default_backend()}  cpus {os.cpu_count()} ({cpu_model()})")
    path = hub.resolve_model(args.model)
    cfg, params = io.load_model(path)
    tok = load_tokenizer(path)
    prompts = [r["prompt"] for r in harmful_rows("heldout", args.n, 0)]

    def timed(fn):
        """(second run's values, first run's seconds (compiling), second run's seconds (compiled))"""
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            value = np.asarray(fn())
            seconds.append(time.perf_counter() - start)
        return value, *seconds

    ref, ref_first, ref_s = timed(lambda: reference_margin(cfg, params, tok, prompts, args.batch_size))
    new, new_first, new_s = timed(
        lambda: refusal_margin(cfg, params, tok, prompts, batch_size=args.batch_size)["per_prompt"])
    print(f"{len(prompts)} prompts, batch {args.batch_size}; seconds of the first (compiling) / second run")
    print(f"  reference (full forward per continuation): {ref_first:.2f} / {ref_s:.2f} s")
    print(f"  safetrade (prefill once, cached continuations): {new_first:.2f} / {new_s:.2f} s")
    print(f"  speed-up {ref_s / new_s:.2f}x; largest |margin difference| {np.abs(ref - new).max():.2e} "
          f"(margins span {new.min():.1f} .. {new.max():.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
