"""Throughput of an AdvBench ASR evaluation: safetrade's batched jit generation vs transformers' generate in torch.

    python bench/evaluate.py --torch-python .venv-torch/bin/python [--n 100 --new-tokens 64 --batch-size 16]

Both sides generate greedy replies (at most --new-tokens, stopping at end-of-turn) for the same --n AdvBench
prompts, chat-templated to identical token ids, with the same fp32 weights (safetrade writes the HF dir torch
loads), on the same CPU, one after the other in this run. safetrade's time includes judging with the keyword
judge and is reported twice: the first run (jit compilation included) and a second run (compiled). torch is
measured as a one-prompt-at-a-time loop (how the papers' evaluation scripts run) and as left-padded batches.
Ratios are prompts/s over prompts/s. Goal: >= 2x the torch loop.

    python bench/evaluate.py --n 96 --new-tokens 32 --batch-size 16 --compare-batch-size 32

`--compare-batch-size B` also times safetrade's generation at batch B (first and compiled runs) in the same
process and prints prompts/s at B over prompts/s at --batch-size, both compiled: whether a larger generation
batch speeds up an evaluation (the demo's evaluations are ~half its time on a 2-core CPU).

    python bench/evaluate.py --judge llama_guard --n 500 [--judge-batch-size 16]

`--judge` adds a guard judge (`llama_guard` or `harmbench`, safetrade/evaluate/guards.py) run on the model's own
weights and tokenizer (same model size: the verdict words are looked up in its tokenizer, so the verdicts are
meaningless but the work is the real one): its seconds to judge the --n generated replies against the seconds to
generate them, both compiled (second runs), in the same process. Goal: judging costs no more than generating.
The stand-in never ends its verdict, so its decoding is capped at --judge-new-tokens (default 6: a real Llama
Guard stops after 2 tokens for "safe", 5 for "unsafe\nS1").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.forward import cpu_model, run_torch_script  # noqa: E402
from safetrade import hub  # noqa: E402
from safetrade.models import io  # noqa: E402

GOAL = 2.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--compare-batch-size", type=int, default=None,
                    help="also time safetrade at this generation batch size; print the compiled speed ratio")
    ap.add_argument("--torch-python", default=None, help="python of the torch venv; omit to skip torch")
    ap.add_argument("--torch-modes", default="loop,batched")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--judge", default=None, choices=("llama_guard", "harmbench"),
                    help="also time a guard judge of the same model on the generated replies")
    ap.add_argument("--judge-batch-size", type=int, default=16)
    ap.add_argument("--judge-new-tokens", type=int, default=6,
                    help="a real guard stops after its verdict (Llama Guard: 'safe' + end of turn = 2 tokens, "
                         "'unsafe\\nS1' + end of turn = 5); the stand-in model never does, so its decoding is "
                         "capped at the length of a one-category verdict plus one")
    args = ap.parse_args(argv)

    from safetrade.data import load_dataset, take
    from safetrade.evaluate.generation import chat_replies
    from safetrade.evaluate.judges import KeywordJudge
    from safetrade.generate import SamplingConfig
    from safetrade.tokenizer import encode_chat, load_tokenizer, stop_token_ids

    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"date {date}  jax {jax.__version__} on {jax.default_backend()}  cpus {os.cpu_count()} ({cpu_model()})",
          flush=True)
    path = hub.resolve_model(args.model)
    cfg, params = io.load_model(path)
    tok = load_tokenizer(path)
    prompts = [r["prompt"] for r in take(load_dataset("advbench"), args.n, 0)]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    judge = KeywordJudge()

    def time_generation(batch_size: int) -> tuple[list[dict], list[str]]:
        """Records of a first (compiling) and a second (compiled) run, and the second run's replies."""
        timed = []
        for label in ("first (with compile)", "second (compiled)"):
            start = time.perf_counter()
            replies = chat_replies(cfg, params, tok, prompts, sampling, batch_size=batch_size, progress=False)
            asr = 1 - sum(v.refused for v in judge.judge(prompts, replies.texts)) / len(prompts)
            seconds = time.perf_counter() - start
            timed.append({"run": label, "seconds": seconds, "prompts_per_s": len(prompts) / seconds,
                          "new_tokens": replies.new_tokens, "asr": asr, "batch_size": batch_size})
            print(f"[safetrade batch {batch_size}] {label}: {seconds:.1f}s, {len(prompts) / seconds:.2f} prompts/s, "
                  f"ASR {asr:.0%}", file=sys.stderr, flush=True)
        return timed, replies.texts

    runs, out_texts = time_generation(args.batch_size)
    batch_runs = []
    if args.compare_batch_size:
        batch_runs, batch_texts = time_generation(args.compare_batch_size)
        same = sum(a == b for a, b in zip(out_texts, batch_texts))

    judge_runs = []
    if args.judge:
        from safetrade.evaluate.guards import HarmBenchJudge, LlamaGuardJudge

        model = (cfg, params, tok)
        knobs = {"batch_size": args.judge_batch_size, "max_new_tokens": args.judge_new_tokens}
        guard = (LlamaGuardJudge(model, variant="8b", **knobs) if args.judge == "llama_guard"
                 else HarmBenchJudge(model, **{**knobs, "max_new_tokens": 1}))
        lengths = [len(guard.prompt_ids(p, r)) for p, r in zip(prompts, out_texts)]
        for label in ("first (with compile)", "second (compiled)"):
            start = time.perf_counter()
            verdicts = guard.judge(prompts, out_texts)
            seconds = time.perf_counter() - start
            judge_runs.append({"run": label, "seconds": seconds, "replies_per_s": len(prompts) / seconds,
                               "judge_errors": sum(v.error is not None for v in verdicts),
                               "mean_prompt_tokens": sum(lengths) / len(lengths)})
            print(f"[judge {args.judge}] {label}: {seconds:.1f}s, {len(prompts) / seconds:.2f} replies/s",
                  file=sys.stderr, flush=True)

    torch_res = None
    if args.torch_python:
        with tempfile.TemporaryDirectory(prefix="safetrade-bench-eval-") as tmp:
            io.save_hf(tmp, cfg, params)
            spec = {"prompts": [list(map(int, encode_chat(tok, [{"role": "user", "content": p}]))) for p in prompts],
                    "stop": list(stop_token_ids(tok)), "pad": int(tok.pad_token_id or 0)}
            (Path(tmp) / "prompts.json").write_text(json.dumps(spec))
            cmd = [args.torch_python, str(REPO / "bench" / "torch_evaluate.py"), "--model-dir", tmp, "--prompts",
                   str(Path(tmp) / "prompts.json"), "--new-tokens", str(args.new_tokens), "--batch-size",
                   str(args.batch_size), "--modes", args.torch_modes]
            torch_res = run_torch_script(cmd)

    print(f"\n{args.n} AdvBench prompts, <= {args.new_tokens} new tokens, greedy, fp32, batch {args.batch_size}")
    print(f"{'side':34s} {'seconds':>9s} {'prompts/s':>10s} {'new tok':>8s}")
    for r in runs:
        print(f"{'safetrade ' + r['run']:34s} {r['seconds']:9.1f} {r['prompts_per_s']:10.2f} {r['new_tokens']:8d}")
    for r in judge_runs:
        print(f"{'judge ' + args.judge + ' ' + r['run']:34s} {r['seconds']:9.1f} {r['replies_per_s']:10.2f} "
              f"{'':8s} (judge prompts: {r['mean_prompt_tokens']:.0f} tokens on average)")
    if judge_runs:
        cost = judge_runs[1]["seconds"] / runs[1]["seconds"]
        print(f"judge / generation seconds (compiled): {cost:.2f}; goal <= 1: {'met' if cost <= 1 else 'NOT met'}")
    for r in batch_runs:
        print(f"{'safetrade batch ' + str(r['batch_size']) + ' ' + r['run']:34s} {r['seconds']:9.1f} "
              f"{r['prompts_per_s']:10.2f} {r['new_tokens']:8d}")
    batch_ratio = None
    if batch_runs:
        batch_ratio = batch_runs[1]["prompts_per_s"] / runs[1]["prompts_per_s"]
        print(f"ratio batch {args.compare_batch_size} / batch {args.batch_size} (compiled prompts/s): "
              f"{batch_ratio:.2f}x; identical replies: {same} of {len(prompts)}")
    ratios = {}
    if torch_res and torch_res.get("ok"):
        for mode, r in torch_res["results"].items():
            print(f"{'torch ' + mode:34s} {r['seconds']:9.1f} {r['prompts_per_s']:10.2f} {r['new_tokens']:8d}")
            ratios[mode] = runs[1]["prompts_per_s"] / r["prompts_per_s"]
            ratios[mode + " (first run)"] = runs[0]["prompts_per_s"] / r["prompts_per_s"]
        for k, v in ratios.items():
            print(f"ratio safetrade/torch {k}: {v:.2f}x")
        if "loop" in ratios:
            print(f"goal >= {GOAL}x the torch loop: {'met' if ratios['loop'] >= GOAL else 'NOT met'}")
    elif torch_res:
        print(f"torch: {torch_res.get('error')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": date, "cpu": cpu_model(), "safetrade": runs, "judge": judge_runs,
                                               "torch": torch_res,
                                               "batch_comparison": batch_runs, "batch_ratio": batch_ratio,
                                               "ratios": ratios, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
