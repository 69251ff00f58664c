"""Reference half of bench/forward.py: HF transformers' torch LlamaForCausalLM on the same weights and prompts.

Run by bench/forward.py as a subprocess with the torch venv's python (torch never enters the project venv):

    .venv-torch/bin/python bench/torch_forward.py --model-dir DIR --prompts prompts.json [--new-tokens 64]

`--prompts` is a JSON file {"batches": {"1": [[ids...]], "16": [[...], ...]}} written by forward.py, so both sides
see identical token ids (no padding: every row of a batch has the same length). Prints exactly one JSON line on
stdout, the last line of output:

    {"ok": true, "torch": "2.13.0+cpu", "transformers": "5.23.0", "threads": 2, "dtype": "float32",
     "results": {"1": {"prefill_s": ..., "generate_s": ..., "decode_s": ..., "prefill_tok_s": ...,
                        "decode_tok_s": ..., "new_tokens": 64}, "16": {...}}}

On a machine with CUDA and a CUDA build of torch, the model runs on the GPU (`--device` to choose). With
`--random-weights` (bench/device_check.py) the directory holds only config.json and the model gets transformers'
own random init, directly on the device and in --dtype: a throughput figure, its tokens compare with nothing.

Timing: prefill = one forward over [B, P] (median of --repeats after a warm-up call); decode = greedy
`model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)` with the KV cache, minus the prefill
median, so only the N-1 cached decode steps + sampling count (the first new token comes from the prefill logits).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="HF directory (config.json + model.safetensors)")
    ap.add_argument("--prompts", required=True, help="JSON file written by bench/forward.py")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = os.cpu_count()")
    ap.add_argument("--device", default="auto", help="torch device; auto = cuda when available, else cpu")
    ap.add_argument("--random-weights", action="store_true", help="--model-dir holds only config.json")
    args = ap.parse_args(argv)

    try:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except Exception as exc:  # noqa: BLE001 - the caller reports why torch numbers are missing
        print(json.dumps({"ok": False, "error": f"cannot import torch/transformers: {exc!r}"}))
        return 1

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.random_weights:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_dir), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(device)
    model.eval()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    with open(args.prompts) as f:
        batches = json.load(f)["batches"]

    n = args.new_tokens
    results = {}
    with torch.inference_mode():
        for key, rows in batches.items():
            ids = torch.tensor(rows, dtype=torch.long, device=device)
            b, p = ids.shape
            mask = torch.ones_like(ids)

            def prefill():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=True).logits
                sync()
                return logits

            def gen():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, pad_token_id=0, eos_token_id=None, temperature=None,
                                     top_p=None, top_k=None)
                sync()
                return out

            prefill()  # warm-up (allocator, oneDNN primitive cache)
            pre = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                prefill()
                pre.append(time.perf_counter() - t)
            out = gen()  # warm-up
            if out.shape[1] - p != n:
                raise RuntimeError(f"generate returned {out.shape[1] - p} new tokens, expected {n}")
            gens = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                gen()
                gens.append(time.perf_counter() - t)
            prefill_s, gen_s = statistics.median(pre), statistics.median(gens)
            # On a busy machine a slow prefill run can exceed a generate run; then there is no decode figure.
            decode_s = gen_s - prefill_s if gen_s > prefill_s else None
            results[key] = {
                "batch": b, "prompt_len": p, "new_tokens": n,
                "prefill_s": prefill_s, "prefill_runs_s": pre, "generate_s": gen_s, "generate_runs_s": gens,
                "decode_s": decode_s,
                "prefill_tok_s": b * p / prefill_s,
                # N new tokens per row: the first comes out of the prefill, N-1 from cached decode steps. Counting
                # N over decode_s is what "new tokens per second" means to a user, and forward.py counts the same.
                "decode_tok_s": b * n / decode_s if decode_s else None,
                "tokens": out[:, p:].tolist(),  # greedy ids, compared with safetrade's by forward.py
            }
            print(f"[torch] batch {b}: prefill {prefill_s:.3f}s, generate {gen_s:.3f}s", file=sys.stderr)

    print(json.dumps({
        "ok": True, "torch": torch.__version__, "transformers": transformers.__version__, "threads": threads,
        "device": str(device), "dtype": args.dtype, "load_s": load_s, "results": results,
    }))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # noqa: BLE001 - always leave one JSON line for the caller
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
