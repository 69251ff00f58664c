#!/usr/bin/env python
"""Cost of the theory estimators: a Hessian-vector product and a power-iteration step against a gradient, same batch.

A benchmark, never a test: it prints numbers and ratios and exits 0 whatever they are.

    python bench/theory.py                                  # what `make bench-theory` runs (SmolLM2-135M, 4 × 128)
    python bench/theory.py --layers 2 --batch 2 --seq 32    # smoke-test size

On the registered smollm2-135m-instruct (or --model), one fixed batch of --batch × --seq token ids (seeded random
ids, every token a target: the cost does not depend on which tokens they are), the response-only token-mean loss of
safetrade.train.losses.lm_loss, fp32:
  grad        jax.jit(jax.grad(L)): one forward + one backward pass, the gradient materialised
  hvp         jax.jit(theory.landscape.hvp): forward-over-reverse (jvp of grad), the product materialised
  power step  one iteration of the power method: v ← H v / ‖H v‖ (landscape.normalized of landscape.hvp), jitted
  power loop  landscape.top_eigenvalues(k=1, iters=N): wall time / (N + 1) HVPs, the per-iteration cost inside the
              compiled loop (first call compiles; the timed calls reuse it)
  segment pt  one point of the a-posteriori certificate (theory.landscape.segment_profile): L, φ' and uᵀ∇²L u at
              θ + tΔ, by jvp of value_and_grad ("jvp_of_grad") and by forward-over-forward ("forward")
Each figure is the median of --repeats calls after one untimed call (its time is reported as compile + first run).
Goal (issue 7): power iteration per iteration ≤ 3× a gradient evaluation; (issue 18) a certificate point ≤ 3×. Forward-over-reverse needs about one
forward and one backward pass with tangents carried alongside, so ~2-3× a gradient is the expected range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/theory.py` from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.forward import run_info  # noqa: E402

GOAL_RATIO = 3.0


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, compile included; median seconds of `repeats` further calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def truncate_layers(cfg, params, layers: int):
    """Keep the first `layers` decoder layers (stacked leaves under "blocks" are sliced on their leading axis)."""
    if not layers or layers >= cfg.num_layers:
        return cfg, params
    params = dict(params)
    params["blocks"] = jax.tree.map(lambda x: x[:layers], params["blocks"])
    return cfg.replace(num_layers=layers), params


def bench(args) -> dict:
    from safetrade.models import io
    from safetrade.train.losses import lm_loss
    from theory import landscape

    cfg, params = io.load_model(args.model)
    cfg, params = truncate_layers(cfg, params, args.layers)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32),
             "attention_mask": np.ones((args.batch, args.seq), np.int32),
             "loss_mask": np.ones((args.batch, args.seq), np.float32)}

    def loss(p):
        return lm_loss(cfg, p, batch)

    v = landscape.normalized(landscape.random_direction(jax.random.key(1), params))
    grad_fn = jax.jit(jax.grad(loss))
    hvp_fn = jax.jit(lambda p, t: landscape.hvp(loss, p, t))
    power_step = jax.jit(lambda p, t: landscape.normalized(landscape.hvp(loss, p, t)))

    out = {"model": args.model, "layers": cfg.num_layers, "params_millions": cfg.num_params / 1e6,
           "batch": args.batch, "seq": args.seq, "repeats": args.repeats}
    for name, fn, fn_args in (("grad", grad_fn, (params,)), ("hvp", hvp_fn, (params, v)),
                              ("power_step", power_step, (params, v))):
        first, median = timed(fn, *fn_args, repeats=args.repeats)
        out[f"{name}_first_s"], out[f"{name}_s"] = first, median
        print(f"{name:<11} median {median * 1e3:9.1f} ms   first call (compile + run) {first:6.1f} s", flush=True)

    def power_loop():
        return landscape.top_eigenvalues(loss, params, k=1, iters=args.power_iters).eigenvalues

    first, median = timed(power_loop, repeats=max(1, args.repeats // 2))
    # top_eigenvalues runs `iters` HVPs in the loop plus one for the Rayleigh quotient and residual.
    out["power_loop_first_s"], out["power_loop_per_iter_s"] = first, median / (args.power_iters + 1)
    print(f"power loop  {args.power_iters} iterations: median {median:.2f} s = "
          f"{out['power_loop_per_iter_s'] * 1e3:.1f} ms per HVP (first call {first:.1f} s)", flush=True)

    # One point of the a-posteriori certificate's segment (value, slope, directional curvature), both methods.
    end = jax.tree.map(lambda p, d: p + 1e-3 * d.astype(p.dtype), params, v)
    delta = landscape.tree_sub(end, params)
    for method in landscape.SEGMENT_METHODS:
        point = jax.jit(lambda p, d, t, m=method: landscape._segment_point(loss, p, d, t, method=m))
        first, median = timed(point, params, delta, np.float32(0.5), repeats=args.repeats)
        out[f"segment_{method}_first_s"], out[f"segment_{method}_s"] = first, median
        out[f"ratio_segment_{method}_over_grad"] = median / out["grad_s"]
        print(f"segment pt  {method:<11} median {median * 1e3:9.1f} ms   first call {first:6.1f} s", flush=True)

    out["ratio_hvp_over_grad"] = out["hvp_s"] / out["grad_s"]
    out["ratio_power_step_over_grad"] = out["power_step_s"] / out["grad_s"]
    out["ratio_power_loop_over_grad"] = out["power_loop_per_iter_s"] / out["grad_s"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registered name, GGUF or HF dir")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=0, help="keep only the first L layers (0: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure (median reported)")
    parser.add_argument("--power-iters", type=int, default=5, help="iterations of the timed power loop")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    info = run_info(args, argv)
    try:
        result = bench(args)
    except Exception as err:  # a benchmark reports, never fails the caller
        print(f"bench/theory.py failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 0
    print(f"\n{result['model']} ({result['layers']} layers, {result['params_millions']:.1f}M params), "
          f"batch {result['batch']} x {result['seq']} tokens, fp32, {jax.default_backend()}")
    for key, label in (("ratio_hvp_over_grad", "HVP / grad"),
                       ("ratio_power_step_over_grad", "power step / grad"),
                       ("ratio_power_loop_over_grad", "power loop per iteration / grad"),
                       ("ratio_segment_jvp_of_grad_over_grad", "certificate point (jvp of grad) / grad"),
                       ("ratio_segment_forward_over_grad", "certificate point (forward) / grad")):
        verdict = "meets" if result[key] <= GOAL_RATIO else "MISSES"
        print(f"{label:<40} {result[key]:5.2f}x   ({verdict} the goal <= {GOAL_RATIO:g}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"run_info": info, **result}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
