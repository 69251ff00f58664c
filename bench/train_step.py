"""Train-step throughput of SmolLM2-135M (full fine-tuning and LoRA) against transformers + torch, in one run.

    python bench/train_step.py --torch-python .venv-torch/bin/python        # make bench-train does this

Both sides read the same fp32 weights (safetrade writes an HF dir first), take AdamW steps on the same random
[batch, seq] token batch with every position a target, and report tokens/s as the median over --steps timed steps
after --warmup untimed ones. Model FLOPs use MaxText's convention: 6·N per token for the weights plus causal
attention, 6·L·B·S²·H·Dh per step (forward QKᵀ and PV, halved for the causal mask, ×3 for the backward pass); for
LoRA, frozen weights get no weight gradient: 4·N + 6·N_adapters. MFU divides by --peak-tflops (e.g. 989 for an
H100's dense bf16 peak) or, when it is not given, by the measured throughput of a 2048³ fp32 matmul on the same
device (a VM's CPU does not report the clocks and vector units a nominal peak needs). `--loop-log-every 1 10` adds
rows for the project's whole training loop (train/loop.py) around the full fine-tuning step, which reads metrics
from the device only every log_every steps; tokens/s there is over the timed steps as a whole, not a median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def model_flops_per_step(cfg, batch: int, seq: int, trainable_params: int | None = None) -> float:
    """MaxText's convention: 6·N per token for the weights (2 forward, 2 activation-gradient, 2 weight-gradient)
    plus causal attention. With LoRA only `trainable_params` get weight gradients: 4·N + 2·N_trainable, plus the
    adapters' own 4·N_trainable of forward/activation-gradient work (so 4·N + 6·N_trainable)."""
    tokens = batch * seq
    if trainable_params is None:
        weights = 6 * cfg.num_params * tokens
    else:
        weights = (4 * cfg.num_params + 6 * trainable_params) * tokens
    attention = 6 * cfg.num_layers * batch * seq * seq * cfg.num_heads * cfg.head_dim
    return weights + attention


def measured_matmul_tflops(n: int = 2048, reps: int = 10) -> float:
    """Attainable fp32 matmul throughput of the default JAX device ([n, n] @ [n, n], jit, median of reps): the
    peak used for MFU when --peak-tflops is not given (a CPU's nominal peak depends on clocks and vector units
    that a VM does not report reliably)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def random_token_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict:
    """A {"cap": batch} of seeded random ids [batch, seq] with every position a target (throughput only)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"cap": {"input_ids": rng.integers(0, vocab_size, (batch, seq)).astype(np.int32),
                    "attention_mask": np.ones((batch, seq), np.int32),
                    "loss_mask": np.ones((batch, seq), np.float32)}}


def train_setup(cfg, params, tx, lora_config=None):
    """The project's own step for full fine-tuning (lora_config None) or LoRA with the base frozen:
    (jitted step with the state donated, state, frozen, the config without adapters, trainable parameter count).

    With full fine-tuning the params become the state and are donated by the first step: pass a copy to keep them.
    """
    import jax

    sys.path.insert(0, str(ROOT))
    from safetrade.models import lora as lora_lib
    from safetrade.train import step as step_lib
    from safetrade.tradeoff import strategy_config

    strategy = strategy_config("sft")
    frozen = {}
    base_cfg = cfg
    if lora_config is not None:
        cfg, params = lora_lib.add_adapters(cfg, params, lora_config, jax.random.key(0))
        base, params = lora_lib.split(params)
        frozen = step_lib.make_frozen(base=base)
    fn = jax.jit(step_lib.make_train_step(cfg, tx, strategy, lora=lora_config is not None), donate_argnums=0)
    state = step_lib.init_state(params, tx, strategy)
    trainable = sum(x.size for x in jax.tree.leaves(params))  # adapters only, with LoRA
    return fn, state, frozen, base_cfg, trainable


def bench_safetrade(model: str, batch: int, seq: int, steps: int, warmup: int, lora: bool, dtype: str):
    import jax
    import optax

    sys.path.insert(0, str(ROOT))
    from safetrade.models import io, llama

    cfg, params = io.load_model(model, dtype=dtype)
    lora_config = llama.LoraConfig(8, 16.0, ("q_proj", "v_proj")) if lora else None
    fn, state, frozen, base_cfg, trainable = train_setup(cfg, params, optax.adamw(1e-5), lora_config)
    batch_arrays = random_token_batch(cfg.vocab_size, batch, seq)
    times = []
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = fn(state, batch_arrays, frozen)
        jax.block_until_ready(metrics["loss_cap"])
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return base_cfg, batch * seq / statistics.median(times), float(metrics["loss_cap"]), trainable


def bench_loop(model: str, batch: int, seq: int, steps: int, warmup: int, dtype: str, log_every: int):
    """tokens/s of the project's training loop (train/loop.py: host syncs, divergence checks, batch transfer)
    around the same full fine-tuning step: `warmup` steps through the loop first (compiles), then `steps` timed."""
    import jax
    import optax

    sys.path.insert(0, str(ROOT))
    from safetrade.models import io
    from safetrade.train import loop

    cfg, params = io.load_model(model, dtype=dtype)
    fn, state, frozen, _, _ = train_setup(cfg, params, optax.adamw(1e-5))
    batch_arrays = random_token_batch(cfg.vocab_size, batch, seq)  # numpy: transferred every step, as in a job
    quiet = dict(log_every=log_every, progress=False)
    state = loop.run(fn, state, frozen, lambda k: batch_arrays, loop.LoopConfig(steps=warmup, **quiet))
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    state = loop.run(fn, state, frozen, lambda k: batch_arrays, loop.LoopConfig(steps=warmup + steps, **quiet))
    jax.block_until_ready(state)
    return batch * seq * steps / (time.perf_counter() - t0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (compilation)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (master weights float32)")
    parser.add_argument("--torch-python", default=None, help="python of a venv with torch + transformers (+ peft)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, for MFU (0: not printed)")
    parser.add_argument("--loop-log-every", type=int, nargs="*", default=[],
                        help="also time train/loop.py's loop around the full fine-tuning step at these log_every "
                             "values (e.g. 1 10)")
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args(argv)

    rows = []
    torch_results = {}
    if args.torch_python:
        sys.path.insert(0, str(ROOT))
        from safetrade.models import io

        with tempfile.TemporaryDirectory() as tmp:
            cfg, params = io.load_model(args.model)
            io.save_hf(tmp, cfg, params)
            del params
            cmd = [args.torch_python, str(ROOT / "bench" / "torch_train_step.py"), tmp, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                torch_results = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                print(f"torch baseline failed, safetrade numbers only:\n{proc.stderr[-2000:]}", file=sys.stderr)
    peak = args.peak_tflops or measured_matmul_tflops()
    peak_source = "given" if args.peak_tflops else "measured fp32 matmul 2048^3"
    for lora in (False, True):
        cfg, tps, loss, trainable = bench_safetrade(args.model, args.batch, args.seq, args.steps, args.warmup, lora,
                                                    args.dtype)
        name = "lora" if lora else "full"
        flops = model_flops_per_step(cfg, args.batch, args.seq, trainable if lora else None) * tps / (
            args.batch * args.seq)
        ref = torch_results.get(name)
        rows.append({"step": name, "safetrade_tokens_per_s": tps, "torch_tokens_per_s": ref,
                     "ratio": tps / ref if ref else None, "model_tflops_per_s": flops / 1e12,
                     "mfu": flops / 1e12 / peak, "loss": loss})

    full = rows[0]
    for log_every in args.loop_log_every:
        tps = bench_loop(args.model, args.batch, args.seq, args.steps, args.warmup, args.dtype, log_every)
        ref = full["torch_tokens_per_s"]
        rows.append({"step": f"loop{log_every}", "safetrade_tokens_per_s": tps, "torch_tokens_per_s": ref,
                     "ratio": tps / ref if ref else None,
                     "model_tflops_per_s": full["model_tflops_per_s"] * tps / full["safetrade_tokens_per_s"],
                     "mfu": full["mfu"] * tps / full["safetrade_tokens_per_s"], "loss": None})

    import jax

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, cpus {os.cpu_count()}, "
          f"batch {args.batch} x {args.seq}, {args.dtype}, AdamW, {time.strftime('%Y-%m-%d')}")
    print(f"peak for MFU: {peak:.4f} TFLOP/s ({peak_source})")
    print(f"{'step':<6}{'safetrade tok/s':>17}{'torch tok/s':>13}{'ratio':>8}{'model TFLOP/s':>15}{'MFU':>8}")
    for r in rows:
        torch_tps = f"{r['torch_tokens_per_s']:.1f}" if r["torch_tokens_per_s"] else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        print(f"{r['step']:<6}{r['safetrade_tokens_per_s']:>17.1f}{torch_tps:>13}{ratio:>8}"
              f"{r['model_tflops_per_s']:>15.4f}{mfu:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "peak_tflops": peak, "peak_source": peak_source,
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
