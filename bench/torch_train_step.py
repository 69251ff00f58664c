"""The torch side of bench/train_step.py: transformers LlamaForCausalLM + AdamW on the same batch shape.

Run with a python that has torch, transformers (and peft for the LoRA row); prints one JSON line:
{"full": tokens/s, "lora": tokens/s or null}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def bench(model, batch, seq, steps, warmup):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    times = []
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return batch * seq / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("hf_dir")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32)
    model.train()
    out = {"full": bench(model, a.batch, a.seq, a.steps, a.warmup), "lora": None,
           "torch": torch.__version__}
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        pass
    else:
        model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
        out["lora"] = bench(model, a.batch, a.seq, a.steps, a.warmup)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
