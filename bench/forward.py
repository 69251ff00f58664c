#!/usr/bin/env python
"""Forward/generation throughput of safetrade's Llama (JAX) against HF transformers' torch Llama, same run.

A benchmark, never a test: it prints numbers and ratios and exits 0 whatever they are.

    python bench/forward.py --torch-python .venv-torch/bin/python          # what `make bench` runs
    python bench/forward.py --dtype bfloat16 --batch-sizes 1,16 --prompt-len 128 --new-tokens 64 --json out.json

Per batch size B (default 1 and 16), with one set of seeded random prompt ids [B, P] (no padding) shared by both:
  prefill tokens/s  B*P / median time of one forward over [B, P] (safetrade: the jitted `generate._prefill`, which
                    also fills the KV cache; torch: `model(ids, use_cache=True)`), after a warm-up call.
  decode tokens/s   B*N / (median end-to-end greedy generation of N new tokens - median prefill), no stop tokens,
                    so every row decodes all N (safetrade: `generate.generate`; torch: `model.generate(...,
                    do_sample=False, min_new_tokens=N)`), after a warm-up call with the same shapes (no compile
                    time is counted). For safetrade the jitted `_decode` loop is also timed on its own as a check.
The torch side runs in its own venv (`--torch-python`, bench/torch_forward.py) and reads an HF directory that this
script writes with `io.save_hf` from the same fp32 params, so both models hold identical weights.

Goals (from the issue): safetrade decode >= 1.0x torch at batch 1; safetrade batch-16 decode throughput >= 5x
torch's batch-1 decode throughput.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/forward.py` from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from safetrade import generate as gen  # noqa: E402
from safetrade import hub  # noqa: E402
from safetrade.models import io  # noqa: E402

GOAL_DECODE_B1 = 1.0  # safetrade decode tok/s at batch 1 / torch decode tok/s at batch 1
GOAL_BATCHED = 5.0  # safetrade decode tok/s at batch 16 / torch decode tok/s at batch 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, repeats: int) -> list[float]:
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return runs


def pad_multiple(p: int) -> int:
    """The largest bucket from generate's usual sizes that divides P, so generate() adds no padding."""
    return next(m for m in (32, 16, 8, 4, 2, 1) if p % m == 0)


def bench_safetrade(cfg, params, prompts: dict[int, np.ndarray], new_tokens: int, repeats: int) -> dict:
    results = {}
    for b, ids in prompts.items():
        p = ids.shape[1]
        multiple = pad_multiple(p)
        sampling = gen.SamplingConfig(max_new_tokens=new_tokens, stop_token_ids=(), pad_to_multiple=multiple)
        cache_len = p + -(-new_tokens // multiple) * multiple  # what generate() allocates
        tokens, mask = jnp.asarray(ids, jnp.int32), jnp.ones(ids.shape, jnp.int32)
        rows = ids.tolist()

        t = time.perf_counter()
        first_logits, cache, kv_valid = jax.block_until_ready(gen._prefill(cfg, params, tokens, mask, cache_len))
        prefill_compile_s = time.perf_counter() - t
        pre = timed(lambda: jax.block_until_ready(gen._prefill(cfg, params, tokens, mask, cache_len)), repeats)

        # Decode alone: the jitted while_loop over all new tokens, from one prefill's outputs.
        lengths = jnp.full((b,), p, jnp.int32)

        def decode():
            return jax.block_until_ready(
                gen._decode(cfg, sampling, params, first_logits, cache, kv_valid, lengths, p))

        t = time.perf_counter()
        out, steps = decode()
        decode_compile_s = time.perf_counter() - t
        direct = timed(decode, repeats)

        # End to end, as a user calls it (host-side padding and token lists included).
        out_tokens = gen.generate(cfg, params, rows, sampling).tokens  # warm-up; both jits are cached by now
        if any(len(r) != new_tokens for r in out_tokens):
            raise RuntimeError("safetrade generate stopped early although no stop tokens were given")
        full = timed(lambda: gen.generate(cfg, params, rows, sampling), repeats)

        prefill_s, full_s, direct_s = map(statistics.median, (pre, full, direct))
        decode_s = full_s - prefill_s if full_s > prefill_s else None  # None: timings too noisy to subtract
        results[str(b)] = {
            "batch": b, "prompt_len": p, "new_tokens": new_tokens, "cache_len": cache_len,
            "prefill_s": prefill_s, "prefill_runs_s": pre, "generate_s": full_s, "generate_runs_s": full,
            "decode_s": decode_s, "decode_direct_s": direct_s, "decode_direct_runs_s": direct,
            "prefill_tok_s": b * p / prefill_s,
            "decode_tok_s": b * new_tokens / decode_s if decode_s else None,
            "decode_direct_tok_s": b * new_tokens / direct_s,
            "compile_s": {"prefill": prefill_compile_s, "decode": decode_compile_s},
            "tokens": out_tokens,
        }
        print(f"[safetrade] batch {b}: prefill {prefill_s:.3f}s, generate {full_s:.3f}s, "
              f"_decode alone {direct_s:.3f}s (compile {prefill_compile_s:.1f}s + {decode_compile_s:.1f}s)",
              file=sys.stderr, flush=True)
    return results


def run_torch_script(cmd: list[str], timeout: float | None = None) -> dict:
    """Run a torch half of a benchmark (cmd[0] = the torch venv's python) offline; its last JSON line, or
    {"ok": False, "error": ...} when it cannot run, times out or prints no JSON."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, timeout=timeout)
    except FileNotFoundError:
        return {"ok": False, "error": f"--torch-python {cmd[0]!r} does not exist"}
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"torch run exceeded {timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"ok": False, "error": f"torch run exited {proc.returncode} without a JSON result"}
    return json.loads(lines[-1])


def run_torch(torch_python: str, model_dir: Path, prompts: dict[int, np.ndarray], args) -> dict:
    """Run bench/torch_forward.py in the torch venv; returns its JSON (with ok=False and an error on failure)."""
    prompt_file = model_dir / "prompts.json"
    prompt_file.write_text(json.dumps({"batches": {str(b): ids.tolist() for b, ids in prompts.items()}}))
    return run_torch_script([torch_python, str(REPO / "bench" / "torch_forward.py"), "--model-dir", str(model_dir),
                             "--prompts", str(prompt_file), "--new-tokens", str(args.new_tokens), "--repeats",
                             str(args.repeats), "--dtype", args.dtype, "--threads", str(args.torch_threads)],
                            timeout=args.torch_timeout)


def run_info(args, argv) -> dict:
    """Date, software, devices, CPU and load average of this run (printed as one header line)."""
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else None,
        "args": vars(args),
    }
    print(f"date {info['date']}  jax {jax.__version__}  devices {info['jax_devices']}  "
          f"cpus {info['cpu_count']} ({info['cpu_model']})  loadavg {info['loadavg_start']}", flush=True)
    return info


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each row's new tokens that agree before the first divergence (greedy, fp32 = near 1)."""
    fracs = []
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        k = next((i for i in range(n) if x[i] != y[i]), n)
        fracs.append(k / max(n, 1))
    return sum(fracs) / max(len(fracs), 1)


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model name, GGUF file or HF dir (hub.resolve_model)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute and param dtype for both sides (the HF dir always holds the fp32 weights)")
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated, e.g. 1,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is reported")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids")
    ap.add_argument("--torch-python", default=None,
                    help="python of a venv with torch + transformers (e.g. .venv-torch/bin/python); omit to skip torch")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads; 0 = os.cpu_count()")
    ap.add_argument("--torch-timeout", type=int, default=1800, help="seconds before the torch run is abandoned")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    batch_sizes = sorted({int(x) for x in args.batch_sizes.split(",") if x.strip()})

    info = run_info(args, argv)

    path = hub.resolve_model(args.model)
    t = time.perf_counter()
    cfg, params = io.load_model(path, dtype="float32")  # fp32 on every backend: both sides read the same weights
    print(f"model {path} ({cfg.num_params / 1e6:.0f}M params) loaded in {time.perf_counter() - t:.1f}s", flush=True)

    rng = np.random.default_rng(args.seed)
    prompts = {b: rng.integers(0, cfg.vocab_size, (b, args.prompt_len), dtype=np.int64) for b in batch_sizes}

    torch_res, why_no_torch = None, None
    with tempfile.TemporaryDirectory(prefix="safetrade-bench-") as tmp:
        if args.torch_python:
            io.save_hf(tmp, cfg, params)  # fp32 weights, before any cast, so both sides read the same numbers
        if args.dtype != "float32":
            cfg = cfg.replace(dtype=args.dtype, param_dtype=args.dtype)
            params = jax.tree.map(lambda x: x.astype(args.dtype), params)

        st = bench_safetrade(cfg, params, prompts, args.new_tokens, args.repeats)

        if not args.torch_python:
            why_no_torch = "no --torch-python given"
        else:
            print(f"running torch reference with {args.torch_python} ...", file=sys.stderr, flush=True)
            torch_res = run_torch(args.torch_python, Path(tmp), prompts, args)
            if not torch_res.get("ok"):
                why_no_torch = f"torch run failed: {torch_res.get('error')}"
                torch_res = None
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    tr = torch_res["results"] if torch_res else {}

    def ratio(a, b):
        return None if a is None or not b else a / b

    rows = []
    for b in batch_sizes:
        for metric, key in (("prefill", "prefill_tok_s"), ("decode", "decode_tok_s")):
            s, t_ = st[str(b)][key], tr.get(str(b), {}).get(key)
            rows.append({"metric": f"{metric} tok/s, batch {b}", "safetrade": s, "torch": t_, "ratio": ratio(s, t_)})

    goals = {}
    if tr and "1" in tr and "1" in st:
        torch_b1 = tr["1"]["decode_tok_s"]
        r1 = ratio(st["1"]["decode_tok_s"], torch_b1)
        goals["decode_b1"] = {"goal": f"safetrade decode >= {GOAL_DECODE_B1}x torch at batch 1",
                              "ratio": r1, "met": None if r1 is None else r1 >= GOAL_DECODE_B1}
        big = 16 if 16 in batch_sizes else max(batch_sizes)
        if big > 1:
            r16 = ratio(st[str(big)]["decode_tok_s"], torch_b1)
            goals["decode_batched"] = {
                "goal": f"safetrade batch-{big} decode >= {GOAL_BATCHED}x torch batch-1 decode",
                "ratio": r16, "met": None if r16 is None else r16 >= GOAL_BATCHED}
    agreement = {b: token_agreement(st[b]["tokens"], tr[b]["tokens"]) for b in st if b in tr and "tokens" in tr[b]}

    # Spread of the timed runs (max/min): far above 1 means other processes were competing for the CPU.
    spreads = {}
    for side, res in (("safetrade", st), ("torch", tr)):
        for b, r in res.items():
            for k in ("prefill_runs_s", "generate_runs_s"):
                runs = r.get(k) or []
                if runs and min(runs) > 0:
                    spreads[f"{side} batch {b} {k[:-7]}"] = max(runs) / min(runs)
    noisy = {k: v for k, v in spreads.items() if v > 1.3}

    # ---- report
    print()
    print(f"{Path(path).name} ({cfg.num_params / 1e6:.0f}M params, {cfg.dtype}), prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
          f"median of {args.repeats}; jax {jax.__version__} on {jax.default_backend()} {info['jax_devices']}, "
          f"{os.cpu_count()} CPUs ({info['cpu_model']}), {info['date']}")
    if torch_res:
        print(f"torch {torch_res['torch']}, transformers {torch_res['transformers']}, "
              f"{torch_res['threads']} threads, device {torch_res.get('device', 'cpu')}")
    w = max(len(r["metric"]) for r in rows)
    print(f"{'metric':<{w}}  {'safetrade':>10}  {'torch':>10}  {'ratio':>6}")
    for r in rows:
        print(f"{r['metric']:<{w}}  {fmt(r['safetrade']):>10}  {fmt(r['torch']):>10}  {fmt(r['ratio'], '.2f'):>6}")
    for b in batch_sizes:
        s = st[str(b)]
        print(f"  safetrade batch {b}: jitted _decode loop alone {s['decode_direct_tok_s']:.1f} tok/s "
              f"(generate - prefill: {fmt(s['decode_tok_s'])})")
    for g in goals.values():
        verdict = "undetermined (a decode figure is missing)" if g["met"] is None else (
            "MET" if g["met"] else "NOT MET")
        print(f"goal: {g['goal']}: {fmt(g['ratio'], '.2f')}x -> {verdict}")
    if agreement:
        print("greedy tokens agreeing with torch before the first divergence: "
              + ", ".join(f"batch {b} {a:.0%}" for b, a in agreement.items()))
    if why_no_torch:
        print(f"torch numbers missing: {why_no_torch}; safetrade numbers only")
    print(f"loadavg start {info['loadavg_start']} end {info['loadavg_end']}")
    if noisy:
        print("NOISY (max/min of timed runs > 1.3; another process was probably using the CPU): "
              + ", ".join(f"{k} {v:.2f}" for k, v in noisy.items()))

    if args.json:
        for s in st.values():
            s.pop("tokens", None)
        for s in tr.values():
            s.pop("tokens", None)
        out = {"info": info, "config": {"dtype": cfg.dtype, "num_params": cfg.num_params},
               "safetrade": st, "torch": torch_res, "why_no_torch": why_no_torch, "table": rows, "goals": goals,
               "token_agreement": agreement, "run_spread": spreads}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
