"""The torch side of bench/train_step.py and bench/device_check.py: transformers LlamaForCausalLM + AdamW on the
same batch shape.

Run with a python that has torch, transformers (and peft for the LoRA row); prints one JSON line:
{"full": tokens/s, "lora": tokens/s or null, "torch": version, ...}.

Defaults are bench/train_step.py's CPU comparison (fp32, AdamW lr 1e-5, LoRA r 8 on q/v). bench/device_check.py
adds --device cuda --autocast bfloat16 (fp32 master weights, bf16 matmuls: what safetrade's bf16-compute /
fp32-param step does), --random-weights (the directory holds only config.json: no weights are written or read),
the optimizer of safetrade's make_optimizer (--b2 0.95 --weight-decay 0 --clip-norm 1) and its LoRA settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def bench(model, batch, seq, steps, warmup, *, device="cpu", autocast=None, lr=1e-5, betas=(0.9, 0.999),
          weight_decay=0.01, clip_norm=0.0):
    """Tokens/s of AdamW steps on one seeded random [batch, seq] batch: the median step after `warmup`; on CUDA
    every step ends with a synchronize, so a step's time is its whole device time."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, betas=betas, weight_decay=weight_decay)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    cast = (torch.autocast(device_type=dev.type, dtype=getattr(torch, autocast)) if autocast
            else contextlib.nullcontext())
    times, loss = [], None
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        with cast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return batch * seq / statistics.median(times), float(loss)


def load(hf_dir, random_weights: bool, device: str):
    """The model in fp32 (the master weights): read from hf_dir, or built from its config.json with transformers'
    own random init directly on `device` (throughput only)."""
    if random_weights:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device)
    model.train()
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("hf_dir")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lora-batch", type=int, default=0, help="batch of the LoRA row (0: --batch)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--autocast", default=None, choices=(None, "bfloat16"), help="autocast dtype (fp32 masters)")
    p.add_argument("--random-weights", action="store_true", help="hf_dir holds only config.json")
    p.add_argument("--rows", default="full,lora", help="which rows to run: full, lora or both")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--b2", type=float, default=0.999)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-norm", type=float, default=0.0, help="global-norm clipping (0: none)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rows = set(a.rows.split(","))
    opt = {"device": device, "autocast": a.autocast, "lr": a.lr, "betas": (0.9, a.b2),
           "weight_decay": a.weight_decay, "clip_norm": a.clip_norm}
    out = {"full": None, "lora": None, "torch": torch.__version__, "device": device, "autocast": a.autocast,
           "attn_implementation": None, "loss": {}}
    if "full" in rows:
        model = load(a.hf_dir, a.random_weights, device)
        out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        out["full"], out["loss"]["full"] = bench(model, a.batch, a.seq, a.steps, a.warmup, **opt)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        out["lora_skipped"] = "peft not installed"
    else:
        if "lora" in rows:
            model = load(a.hf_dir, a.random_weights, device)
            out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
            model = get_peft_model(model, LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha,
                                                     target_modules=a.lora_targets.split(","),
                                                     lora_dropout=0.0, task_type="CAUSAL_LM"))
            out["lora"], out["loss"]["lora"] = bench(model, a.lora_batch or a.batch, a.seq, a.steps, a.warmup,
                                                     **opt)
    if device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(out))


if __name__ == "__main__":
    main()
