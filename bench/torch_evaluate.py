"""Reference half of bench/evaluate.py: transformers' `generate` in torch on the same chat prompts.

Run by bench/evaluate.py with the torch venv's python (torch never enters the project venv):

    .venv-torch/bin/python bench/torch_evaluate.py --model-dir DIR --prompts prompts.json --new-tokens 64

`prompts.json` holds {"prompts": [[ids...], ...]} (chat-templated token ids, identical to what safetrade
generates from) and {"stop": [ids]}. Two ways a user would run an ASR evaluation in torch:
  - "loop": one prompt at a time (what the Safe Delta / He et al. evaluation scripts do);
  - "batched": left-padded batches of --batch-size, sorted by length (the fair batched baseline).
Greedy, at most --new-tokens new tokens, stopping at the end-of-turn token. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--modes", default="loop,batched")
    args = ap.parse_args(argv)
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except Exception as exc:  # noqa: BLE001
        print(json.dumps({"ok": False, "error": f"cannot import torch/transformers: {exc!r}"}))
        return 1
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    spec = json.loads(open(args.prompts).read())
    prompts, stop, pad = spec["prompts"], spec["stop"], spec["pad"]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    common = dict(do_sample=False, max_new_tokens=args.new_tokens, eos_token_id=stop, pad_token_id=pad)
    results = {}
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), attention_mask=torch.ones(1, len(prompts[0]), dtype=torch.long),
                       **common)  # warm-up
        if "loop" in args.modes:
            start, new = time.perf_counter(), 0
            for ids in prompts:
                out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     **common)
                new += out.shape[1] - len(ids)
            seconds = time.perf_counter() - start
            results["loop"] = {"seconds": seconds, "prompts_per_s": len(prompts) / seconds, "new_tokens": new}
            print(f"[torch] loop: {seconds:.1f}s", file=sys.stderr, flush=True)
        if "batched" in args.modes:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            start, new = time.perf_counter(), 0
            for k in range(0, len(order), args.batch_size):
                chunk = [prompts[i] for i in order[k:k + args.batch_size]]
                width = max(len(x) for x in chunk)
                ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk])
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
                out = model.generate(ids, attention_mask=mask, **common)[:, width:]
                for row in out.tolist():
                    new += next((j for j, t in enumerate(row) if t in stop or t == pad), len(row))
            seconds = time.perf_counter() - start
            results["batched"] = {"seconds": seconds, "prompts_per_s": len(prompts) / seconds, "new_tokens": new}
            print(f"[torch] batched: {seconds:.1f}s", file=sys.stderr, flush=True)
    print(json.dumps({"ok": True, "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
