"""Loglikelihood throughput of the lm-eval adapter (safetrade/evaluate/lm_eval_model.py): batched vs a loop.

    python bench/lm_eval.py [--scales tiny,135m --n 128 --batch-size 16]

The same requests, in the same process, two ways: `SafetradeLM.loglikelihood` on all of them at once with
--batch-size rows per forward (sorted by length, bucketed, one jitted forward per batch), and a loop that calls it
with one request at a time on a batch-size-1 model (what a per-request adapter does). Two request sets, built
offline from the held-out GSM8K questions: "distinct" -- every request its own context ("Question: ...\\nAnswer:")
and a multi-token continuation (the answer's first 6 words), so only batching helps; "mmlu-shaped" -- each context
with four choices " A" .. " D", where the batched path also scores the four choices of a question in one row.
Both sides are warmed up first (every bucket length compiled), then timed once. Scales: "tiny" (the tiny preset
with SmolLM2's 49152-token vocabulary, random weights) and "135m" (SmolLM2-135M-Instruct, the embedded GGUF).
Prints a block ready for bench/RESULTS.md. Goal (issue 16): batched >= 5x the loop.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
# `python bench/lm_eval.py` puts bench/ first on sys.path, where this file would shadow the lm_eval package itself:
# the repository root takes its place.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(REPO)
else:
    sys.path.insert(0, str(REPO))

from bench.forward import cpu_model  # noqa: E402

GOAL = 5.0
CHOICES = (" A", " B", " C", " D")


def requests_for(n: int, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """{"distinct": n (context, continuation) pairs, "mmlu-shaped": n contexts x 4 one-letter choices}."""
    from safetrade.data import load_dataset, take

    rows = take(load_dataset("gsm8k", split="eval"), n, seed)
    contexts = [f"Question: {r['prompt']}\nAnswer:" for r in rows]
    # the answer's first 6 words, calculator annotations ("<<48/2=24>>") removed: a short multi-token continuation
    answers = [re.sub(r"<<[^>]*>>", "", r["response"]).split()[:6] for r in rows]
    distinct = [(c, " " + " ".join(words)) for c, words in zip(contexts, answers)]
    return {"distinct": distinct, "mmlu-shaped": [(c, choice) for c in contexts for choice in CHOICES]}


def instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=0, metadata=("bench", i, 1))
            for i, pair in enumerate(pairs)]


def model(scale: str):
    """(cfg, params, tokenizer) for a scale name."""
    from safetrade import hub
    from safetrade.models import io, llama
    from safetrade.tokenizer import load_tokenizer

    path = hub.resolve_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    if scale == "tiny":
        cfg = llama.preset("tiny").replace(vocab_size=len(tokenizer), max_position_embeddings=2048)
        return cfg, llama.init(cfg, jax.random.key(0)), tokenizer
    if scale == "135m":
        cfg, params = io.load_model(path)
        return cfg, params, tokenizer
    raise SystemExit(f"unknown scale {scale!r}; choose tiny or 135m")


def one_per_bucket(lm, reqs):
    """One request for each (row length, scored-slot) bucket pair the requests reach, as SafetradeLM._score
    buckets them at batch size 1 (so a warm-up compiles every shape the loop meets)."""
    from safetrade.data.batching import bucket_for, bucket_lengths

    buckets, seen = bucket_lengths(lm.max_length + 1), {}
    for r in reqs:
        context, continuation = lm._encode_pair(*r.args)
        length = bucket_for(min(len(context) + len(continuation), lm.max_length + 1), buckets)
        seen.setdefault((length, bucket_for(len(continuation), bucket_lengths(length, min_len=1))), r)
    return list(seen.values())


def bench_scale(scale: str, sets: dict, batch_size: int, max_length: int) -> list[dict]:
    from safetrade.evaluate.lm_eval_model import SafetradeLM

    cfg, params, tokenizer = model(scale)
    batched = SafetradeLM.from_params(cfg, params, tokenizer, batch_size=batch_size, max_length=max_length)
    single = SafetradeLM.from_params(cfg, params, tokenizer, batch_size=1, max_length=max_length)
    out = []
    for kind, pairs in sets.items():
        reqs = instances(pairs)
        batched.loglikelihood(reqs, disable_tqdm=True)  # warm-up: compiles every bucket this set reaches
        start = time.perf_counter()
        result_batched = batched.loglikelihood(reqs, disable_tqdm=True)
        t_batched = time.perf_counter() - start
        for r in one_per_bucket(single, reqs):  # warm-up: the loop's shapes (batch 1, each bucket length)
            single.loglikelihood([r], disable_tqdm=True)
        start = time.perf_counter()
        result_loop = [single.loglikelihood([r], disable_tqdm=True)[0] for r in reqs]
        t_loop = time.perf_counter() - start
        worst = max(abs(a[0] - b[0]) for a, b in zip(result_batched, result_loop))
        row = {"scale": scale, "set": kind, "requests": len(reqs), "batch_size": batch_size,
               "batched_s": t_batched, "loop_s": t_loop, "batched_req_s": len(reqs) / t_batched,
               "loop_req_s": len(reqs) / t_loop, "ratio": t_loop / t_batched, "max_logprob_diff": worst}
        print(f"[{scale} {kind}] {len(reqs)} requests: batched {row['batched_req_s']:.1f} req/s, loop "
              f"{row['loop_req_s']:.1f} req/s, {row['ratio']:.1f}x; max |Δ log p| {worst:.2e}",
              file=sys.stderr, flush=True)
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default="tiny,135m")
    ap.add_argument("--n", type=int, default=128, help="contexts per set (the mmlu-shaped set has 4x requests)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"date {date}  jax {jax.__version__} on {jax.default_backend()}  cpus {os.cpu_count()} ({cpu_model()})",
          file=sys.stderr, flush=True)
    sets = requests_for(args.n)
    rows = [row for scale in args.scales.split(",") for row in
            bench_scale(scale, sets, args.batch_size, args.max_length)]

    command = "python bench/lm_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n### lm-eval adapter: loglikelihood batched vs a one-request loop ({date[:10]})\n")
    print(f"`{command.strip()}` — {cpu_model()}, {os.cpu_count()} cpus, jax {jax.__version__} "
          f"({jax.default_backend()}), float32. Same requests, same process, compiled before timing.\n")
    print("| scale | set | requests | batched req/s | loop req/s | batched / loop | goal ≥ 5× | max \\|Δ log p\\| |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['scale']} | {r['set']} | {r['requests']} | {r['batched_req_s']:.1f} | {r['loop_req_s']:.1f} | "
              f"{r['ratio']:.1f}× | {'met' if r['ratio'] >= GOAL else 'not met'} | {r['max_logprob_diff']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": date, "cpu": cpu_model(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
