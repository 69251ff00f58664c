#!/usr/bin/env python
"""SQSD scoring throughput: safetrade's vmapped per-example path vs its own batch-1 loop vs the official torch loop.

A benchmark, never a test: it prints numbers and ratios and exits 0 whatever they are.

    python bench/sqsd.py --torch-python .venv-torch/bin/python             # what `make bench-sqsd` runs
    python bench/sqsd.py --torch-python .venv-torch/bin/python --n 8 --max-len 64     # smoke-test size

Setting (all three sides identical): the model (default the registered smollm2-135m-instruct, fp32), three rank-8
LoRA adapters on all seven projections ("initial", "danger", "safety"; alpha 16) written as PEFT dirs, and --n rows
of the benign pool `safetrade sqsd` scores by default (`sqsd.job.pool_rows("capability", n, seed)`), encoded with
the chat template and truncated at --max-len exactly as `sqsd.job.run_sqsd_job` does. The adapters are seeded
random stand-ins for trained ones: lora_a ~ N(0, 1/in) as a fresh adapter, lora_b ~ N(0, --b-std²) (a trained B is
non-zero; B = 0 would make the danger side degenerate), so no training run is needed; --initial/--danger/--safety
take real PEFT dirs instead. Each SQSD score is P_danger (updates at "initial" vs the danger adapter's B·A) −
P_safe (updates at "safety", LoRA scaling overridden to --safety-scale, vs its own B·A): two forward+backward
passes per sample.

Timed paths (scores of all three are compared):
  vmapped  `sqsd.score_probes(examples, danger, safety, SQSDConfig(batch_size=--batch-size))`: what `safetrade sqsd`
           runs
           (per-example gradients by vmap over the batch, rank-space cosines).
  batch-1  the same call with batch_size=1: the same code, one sample per jitted step.
  torch    bench/torch_sqsd.py in the torch venv: HF transformers + peft, the official per-sample structure
           (forward, backward into the active adapter, materialised δW_m = −(∇_B·A + B·∇_A) [out, in], cosine
           with the materialised B_d·A_d, summed over modules).
samples/s = N / wall time of the whole scoring call (both projections, host-side batching and the numpy
reduction included; model and adapter loading excluded). safetrade's paths are timed after a warm-up that
compiles every (batch, bucket length) shape the timed call uses, so no compile time is counted (the warm-up time
is reported as the compile cost a one-off job pays). Goal (issue 6): vmapped >= 10x the batch-1 loop at equal
scores.

Why the goal is out of reach on a CPU (measured on the 2-core dev machine, SmolLM2-135M, 128 tokens, rank 8):
the per-example gradient step costs ~1.1 s per sample per projection at batch 1 and ~1.05 s per sample at batch
8, and even the ordinary summed gradient (no per-example anything) is no faster per sample at batch 8 than at
batch 1. Each sample needs a full forward and backward through the model (~2·2·N·T FLOPs, the 49k-vocab head
included), identical on both paths; one jitted call costs ~ms of dispatch against ~1 s of arithmetic, so batching
has nothing to amortise when the CPU is already compute-bound at batch 1. Per-sample recompilation is ruled out
(one compile per (batch, bucket) shape, done in the warm-up) and no d×k matrix is formed (rank-space cosines).
The ratio is meaningful on an accelerator, where batch 1 leaves most of the device idle.

Memory: XLA's compiled memory analysis of the per-example gradient step at each batch size and the longest
bucket (arguments + temporaries + outputs; the step dominates scoring), and the process's peak RSS during each
path (VmHWM, reset before each path via /proc/self/clear_refs; it includes the loaded model and adapters).
torch: its subprocess's peak RSS (VmHWM of the fresh process: getrusage's ru_maxrss would include the parent's
RSS, which survives fork + exec) after loading and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/sqsd.py` from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from bench.forward import run_info, run_torch_script  # noqa: E402
from bench.torch_sqsd import peak_rss_mib  # noqa: E402  (stdlib-only at import: no torch needed)
from safetrade import hub, sqsd  # noqa: E402
from safetrade.data import encode_rows  # noqa: E402
from safetrade.data.batching import make_batch  # noqa: E402
from safetrade.models import io, lora  # noqa: E402
from safetrade.models.llama import LORA_TARGETS, LoraConfig  # noqa: E402

# safetrade.sqsd.job and safetrade.tokenizer are imported in main(): the tokenizer module needs the gguf package,
# which a GPU image may lack, and bench/device_check.py imports random_adapters from here without them.

GOAL = 10.0  # vmapped samples/s / batch-1 loop samples/s
EQUAL_TOL = 1e-4  # |score difference| between the two safetrade paths (sums of ~200 fp32 cosines)
ADAPTERS = ("initial", "danger", "safety")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each path's peak is its own; False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def random_adapters(cfg, base, rank: int, alpha: float, b_std: float, seed: int) -> dict[str, tuple]:
    """Three seeded rank-`rank` adapters on all seven projections, in memory: {name: (lora_cfg, params with the
    adapters)}, as lora.load_peft returns them. lora_a is drawn as for a fresh adapter, lora_b ~ N(0, b_std²)."""
    spec = LoraConfig(rank, alpha, LORA_TARGETS)
    states = {}
    for index, name in enumerate(ADAPTERS):
        key = jax.random.fold_in(jax.random.key(seed), index)
        lora_cfg, params = lora.add_adapters(cfg, base, spec, key)  # lora_a as a fresh adapter draws it
        rng = np.random.default_rng([seed, index])
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.asarray(rng.normal(0.0, b_std, x.shape), x.dtype) if path[-1].key == "lora_b" else x,
            params)
        states[name] = (lora_cfg, params)
    return states


def random_adapter_dirs(cfg, base, out: Path, rank: int, alpha: float, b_std: float, seed: int) -> dict[str, Path]:
    """`random_adapters`, written as PEFT dirs under `out`."""
    return {name: lora.save_peft(out / name, lora_cfg, lora.split(params)[1])
            for name, (lora_cfg, params) in random_adapters(cfg, base, rank, alpha, b_std, seed).items()}


def warm_up(examples, danger, safety, batch_size: int, max_len: int) -> float:
    """Compile every (batch_size, bucket) shape that scoring `examples` in batches of `batch_size` will use.

    token_samples sorts by length and pads each batch to the bucket of its longest row, so one call per distinct
    bucket, on that batch's longest row alone (padded to batch_size rows), compiles exactly those shapes.
    """
    samples = sqsd.token_samples(examples, max_len)
    seen, reps = set(), []
    for chosen, batch in samples.batches(batch_size):
        length = batch["input_ids"].shape[1]
        if length not in seen:
            seen.add(length)
            reps.append(examples[int(max(chosen, key=lambda i: len(samples.rows[i]["input_ids"])))])
    t = time.perf_counter()
    for example in reps:
        sqsd.score_probes([example], danger, safety, sqsd.SQSDConfig(batch_size=batch_size, max_len=max_len))
    return time.perf_counter() - t


def step_memory(danger, examples, batch_size: int, max_len: int) -> dict | None:
    """XLA's memory analysis of the jitted per-example gradient step at the longest bucket these samples use."""
    samples = sqsd.token_samples(examples, max_len)
    length = max(batch["input_ids"].shape[1] for _, batch in samples.batches(batch_size))
    batch = make_batch(samples.rows[:1], length, batch_size)
    try:
        compiled = sqsd.per_example_grads.lower(danger.loss_fn, danger.params, batch,
                                                wrt=danger.gradient_paths()).compile()
        m = compiled.memory_analysis()
    except Exception as exc:  # noqa: BLE001 - a backend without the analysis: reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    if m is None:
        return None
    mib = 1 / 2**20
    return {"bucket": length, "argument_mib": m.argument_size_in_bytes * mib,
            "temp_mib": m.temp_size_in_bytes * mib, "output_mib": m.output_size_in_bytes * mib,
            "total_mib": (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes) * mib}


def device_peak_mib() -> float | None:
    stats = jax.devices()[0].memory_stats()  # None on CPU
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def time_path(label, examples, danger, safety, batch_size, max_len, eos_id):
    resettable = reset_peak_rss()
    compile_s = warm_up(examples, danger, safety, batch_size, max_len)
    t = time.perf_counter()
    scores = sqsd.score_probes(sqsd.token_samples(examples, max_len, eos_id), danger, safety,
                               sqsd.SQSDConfig(batch_size=batch_size, max_len=max_len))
    wall = time.perf_counter() - t
    print(f"[safetrade] {label} (batch {batch_size}): {len(examples)} samples in {wall:.2f}s "
          f"(warm-up/compile {compile_s:.1f}s)", file=sys.stderr, flush=True)
    return {"batch_size": batch_size, "wall_s": wall, "samples_per_s": len(examples) / wall,
            "compile_s": compile_s, "peak_rss_mib": peak_rss_mib(), "peak_rss_is_per_path": resettable,
            "device_peak_mib": device_peak_mib()}, scores


def spearman(a, b) -> float | None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return None
    return float(spearmanr(a[ok], b[ok]).statistic)


def agreement(ours: sqsd.SampleScores, p_danger, p_safe) -> dict:
    """Max |difference| of score and both components (NaN in the same places), and Spearman of the scores."""
    p_danger, p_safe = np.asarray(p_danger, np.float64), np.asarray(p_safe, np.float64)
    theirs = {"score": p_danger - p_safe, "p_danger": p_danger, "p_safe": p_safe}
    out = {}
    for name, value in theirs.items():
        mine = ours.score if name == "score" else ours.components[name]
        same_nan = bool(np.array_equal(np.isnan(mine), np.isnan(value)))
        ok = np.isfinite(mine) & np.isfinite(value)
        out[f"max_abs_diff_{name}"] = float(np.abs(mine[ok] - value[ok]).max()) if ok.any() else None
        out[f"nan_match_{name}"] = same_nan
    out["spearman_score"] = spearman(ours.score, theirs["score"])
    out["score_range"] = float(np.nanmax(ours.score) - np.nanmin(ours.score)) if ours.valid.any() else None
    return out


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model name, GGUF file or HF dir")
    ap.add_argument("--pool", default="capability", help="benign pool (built set, dataset or file), as sqsd.job")
    ap.add_argument("--n", type=int, default=64, help="pool samples scored by every path")
    ap.add_argument("--max-len", type=int, default=256, help="tokens per sample (longer ones are truncated)")
    ap.add_argument("--batch-size", type=int, default=8, help="the vmapped path's batch (the CLI's default)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of the stand-in adapters")
    ap.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha of the stand-in adapters")
    ap.add_argument("--b-std", type=float, default=0.01, help="std of the stand-in adapters' lora_b")
    ap.add_argument("--initial", type=Path, default=None, help="PEFT dir of a real initial adapter (with the others)")
    ap.add_argument("--danger", type=Path, default=None, help="PEFT dir of a real danger adapter")
    ap.add_argument("--safety", type=Path, default=None, help="PEFT dir of a real safety adapter")
    ap.add_argument("--safety-scale", type=float, default=1.0, help="safety-side LoRA scaling override")
    ap.add_argument("--seed", type=int, default=0, help="pool subset and stand-in adapter seed")
    ap.add_argument("--skip-batch1", action="store_true", help="skip the safetrade batch-1 loop")
    ap.add_argument("--torch-python", default=None,
                    help="python of a venv with torch + transformers + peft (e.g. .venv-torch/bin/python); "
                         "omit to skip torch")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads; 0 = os.cpu_count()")
    ap.add_argument("--torch-timeout", type=int, default=7200, help="seconds before the torch run is abandoned")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write every number to this JSON file")
    args = ap.parse_args(argv)
    given = [n for n in ADAPTERS if getattr(args, n) is not None]
    if given and len(given) != 3:
        raise SystemExit("--initial, --danger and --safety go together (or none: seeded stand-in adapters)")

    from safetrade.sqsd.job import pool_rows
    from safetrade.tokenizer import load_tokenizer

    info = run_info(args, argv)
    t = time.perf_counter()
    path = hub.resolve_model(args.model)
    cfg, base = io.load_model(path, dtype="float32")  # fp32 on every backend, as the torch side
    tokenizer = load_tokenizer(path)
    rows = pool_rows(args.pool, args.n, args.seed)
    examples, report = encode_rows(tokenizer, rows, max_len=args.max_len, policy="truncate", dataset=args.pool)
    if not examples:
        raise SystemExit(f"no row of pool {args.pool!r} fits --max-len {args.max_len} (the templated prompt alone is "
                         f"longer: {report.summary()}); raise it")
    lengths = [len(e["input_ids"]) for e in examples]
    torch_res, why_no_torch = None, None
    with tempfile.TemporaryDirectory(prefix="safetrade-bench-sqsd-") as tmp:
        tmp = Path(tmp)
        dirs = ({n: getattr(args, n) for n in ADAPTERS} if given else
                random_adapter_dirs(cfg, base, tmp, args.rank, args.alpha, args.b_std, args.seed))
        states = [lora.load_peft(dirs[n], cfg, base) for n in ADAPTERS]  # as run_sqsd_job loads them
        danger, safety = sqsd.llama_probes(*states, safety_scale=args.safety_scale)
        n_terms = sum(d.shape[0] for d in danger.directions.modules.values())
        print(f"model {path} ({cfg.num_layers} layers, {cfg.num_params / 1e6:.0f}M params); adapters "
              f"{'from ' + ', '.join(str(dirs[n]) for n in ADAPTERS) if given else f'seeded rank {args.rank}, alpha {args.alpha:g}, B std {args.b_std:g}'}"
              f" ({n_terms} module terms); {len(examples)} samples of pool {args.pool!r} (tokens: mean "
              f"{np.mean(lengths):.0f}, max {max(lengths)}, {report.truncated} truncated at {args.max_len}); "
              f"set up in {time.perf_counter() - t:.1f}s", flush=True)

        paths, scores = {}, {}
        if not args.skip_batch1:
            paths["batch1"], scores["batch1"] = time_path("batch-1 loop", examples, danger, safety, 1, args.max_len,
                                                          tokenizer.eos_token_id)
        paths["vmapped"], scores["vmapped"] = time_path("vmapped", examples, danger, safety, args.batch_size,
                                                        args.max_len, tokenizer.eos_token_id)
        memory = {f"batch{b}": step_memory(danger, examples, b, args.max_len)
                  for b in sorted({1, args.batch_size})}

        if not args.torch_python:
            why_no_torch = "no --torch-python given"
        else:
            io.save_hf(tmp / "base", cfg, base)  # fp32, so torch holds the same weights
            spec = {"base_dir": str(tmp / "base"), **{f"{n}_dir": str(dirs[n]) for n in ADAPTERS},
                    "safety_scale": args.safety_scale,
                    "samples": [{"input_ids": list(map(int, e["input_ids"][:args.max_len])),
                                 "loss_mask": list(map(float, e["loss_mask"][:args.max_len]))} for e in examples]}
            (tmp / "spec.json").write_text(json.dumps(spec))
            print(f"running torch reference with {args.torch_python} ...", file=sys.stderr, flush=True)
            torch_res = run_torch_script([args.torch_python, str(REPO / "bench" / "torch_sqsd.py"), "--spec",
                                          str(tmp / "spec.json"), "--threads", str(args.torch_threads)],
                                         timeout=args.torch_timeout)
            if not torch_res.get("ok"):
                why_no_torch = f"torch run failed: {torch_res.get('error')}"
                torch_res = None
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    # ---- agreement and ratios
    vm = scores["vmapped"]
    checks = {}
    if "batch1" in scores:
        b1 = scores["batch1"]
        checks["batch1_vs_vmapped"] = agreement(vm, b1.p_danger, b1.p_safe)
    if torch_res:
        paths["torch"] = {"batch_size": 1, "wall_s": torch_res["timings"]["total"],
                          "samples_per_s": len(examples) / torch_res["timings"]["total"],
                          "peak_rss_mib": torch_res["peak_rss_mib"]["end"]}
        nan = float("nan")
        checks["torch_vs_vmapped"] = agreement(vm, [nan if x is None else x for x in torch_res["p_danger"]],
                                               [nan if x is None else x for x in torch_res["p_safe"]])
    ratios = {f"vmapped_vs_{other}": paths["vmapped"]["samples_per_s"] / paths[other]["samples_per_s"]
              for other in ("batch1", "torch") if other in paths}
    ratios.update({"batch1_vs_torch": paths["batch1"]["samples_per_s"] / paths["torch"]["samples_per_s"]}
                  if {"batch1", "torch"} <= set(paths) else {})
    equal = checks.get("batch1_vs_vmapped", {}).get("max_abs_diff_score")
    goal = None
    if "vmapped_vs_batch1" in ratios:
        goal = {"ratio": ratios["vmapped_vs_batch1"], "scores_equal": equal is not None and equal <= EQUAL_TOL,
                "met": ratios["vmapped_vs_batch1"] >= GOAL and equal is not None and equal <= EQUAL_TOL}

    # ---- report
    print()
    print(f"SQSD scoring on {Path(path).name}: {len(examples)} samples, max_len {args.max_len}, rank-{args.rank} "
          f"adapters on all 7 projections ({n_terms} terms per side); jax {jax.__version__} on "
          f"{jax.default_backend()} {info['jax_devices']}, {os.cpu_count()} CPUs ({info['cpu_model']}), {info['date']}")
    if torch_res:
        print(f"torch {torch_res['torch']}, transformers {torch_res['transformers']}, peft {torch_res['peft']}, "
              f"{torch_res['threads']} threads")
    print(f"{'path':<28} {'batch':>5} {'samples/s':>10} {'wall s':>8} {'compile s':>10} {'peak RSS MiB':>13}")
    labels = {"vmapped": "safetrade vmapped", "batch1": "safetrade batch-1 loop", "torch": "torch+peft official loop"}
    for name in ("vmapped", "batch1", "torch"):
        if name in paths:
            p = paths[name]
            print(f"{labels[name]:<28} {p['batch_size']:>5} {p['samples_per_s']:>10.3f} {p['wall_s']:>8.2f} "
                  f"{fmt(p.get('compile_s'), '.1f'):>10} {p['peak_rss_mib']:>13.0f}")
    for name, r in ratios.items():
        print(f"ratio {name.replace('_vs_', ' / ')}: {r:.2f}x")
    for name, m in memory.items():
        if m and "error" not in m:
            print(f"XLA per-example gradient step, {name}, bucket {m['bucket']}: arguments {m['argument_mib']:.0f} "
                  f"MiB + temporaries {m['temp_mib']:.0f} MiB + outputs {m['output_mib']:.1f} MiB")
        elif m:
            print(f"XLA memory analysis, {name}: unavailable ({m['error']})")
    if torch_res:
        r = torch_res["peak_rss_mib"]
        print(f"torch process peak RSS: {r['after_load']:.0f} MiB after loading, {r['end']:.0f} MiB at the end")
    for name, c in checks.items():
        print(f"agreement {name.replace('_vs_', ' vs ')}: max |Δscore| {fmt(c['max_abs_diff_score'], '.2e')}, "
              f"|ΔP_danger| {fmt(c['max_abs_diff_p_danger'], '.2e')}, |ΔP_safe| {fmt(c['max_abs_diff_p_safe'], '.2e')}"
              f" (score range {fmt(c['score_range'], '.3f')}), Spearman {fmt(c['spearman_score'], '.6f')}, "
              f"NaNs in the same samples: {c['nan_match_score']}")
    if goal:
        print(f"goal: vmapped >= {GOAL:g}x the batch-1 loop at equal scores (|Δ| <= {EQUAL_TOL:g}): "
              f"{goal['ratio']:.2f}x, scores {'equal' if goal['scores_equal'] else 'NOT equal'} -> "
              f"{'MET' if goal['met'] else 'NOT MET'}")
    if len(examples) % args.batch_size:
        print(f"note: {len(examples)} samples is not a multiple of the batch {args.batch_size}: the vmapped path's "
              f"last batch also computes {args.batch_size - len(examples) % args.batch_size} empty padding rows "
              "(the scorer keeps one shape per bucket to avoid recompiling), which lowers its samples/s")
    if why_no_torch:
        print(f"torch numbers missing: {why_no_torch}")
    print(f"loadavg start {info['loadavg_start']} end {info['loadavg_end']}")
    busy = info["loadavg_start"] and info["loadavg_start"][0] > 0.5 * (os.cpu_count() or 1)
    if busy:
        print("BUSY: the machine was loaded when the run started; these timings are not meaningful")
    info["busy"] = bool(busy)

    if args.json:
        out = {"info": info, "config": {"num_layers": cfg.num_layers, "num_params": cfg.num_params,
                                        "n_samples": len(examples), "tokens": int(sum(lengths)),
                                        "max_tokens": max(lengths), "truncated": report.truncated,
                                        "n_terms": n_terms},
               "paths": paths, "ratios": ratios, "agreement": checks, "goal": goal, "xla_memory": memory,
               "torch": torch_res, "why_no_torch": why_no_torch}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
