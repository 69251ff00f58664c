"""Ahead-of-time compile of a full train step for a large preset on simulated devices, from abstract shapes only.

    python bench/aot_compile.py --preset llama2_7b --devices 8 --fsdp 8 --batch 8 --seq 2048

Nothing of the model is allocated: params, optimizer state and batch are ShapeDtypeStructs with shardings, the
step is lowered and compiled, and XLA's `memory_analysis()` reports what one device would need. This is the pod
path (FSDP over 8 chips) checked on a laptop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama2_7b", help="model preset (default: llama2_7b)")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (default: 8)")
    parser.add_argument("--fsdp", type=int, default=8, help="fsdp axis size; data takes the rest (default: 8)")
    parser.add_argument("--tensor", type=int, default=1, help="tensor axis size (default: 1)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (default: 8)")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (default: 2048)")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype; master weights stay float32")
    parser.add_argument("--remat", action="store_true", default=True, help="recompute layer activations (default)")
    parser.add_argument("--no-remat", dest="remat", action="store_false")
    parser.add_argument("--json", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from safetrade import parallel
    from safetrade.models import llama
    from safetrade.train import step as step_lib
    from safetrade.train.jobs import make_optimizer
    from safetrade.config import OptimSection
    from safetrade.tradeoff import strategy_config

    cfg = llama.preset(args.preset).replace(dtype=args.dtype, remat=args.remat)
    mesh = parallel.make_mesh(-1, args.fsdp, args.tensor)
    tx = make_optimizer(OptimSection(lr=1e-5), 1000)
    strategy = strategy_config("sft")

    abstract = llama.abstract_params(cfg)
    shardings = parallel.param_shardings(llama.logical_axes(cfg), abstract, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, strategy), params)
    state_sh = step_lib.state_shardings(state, shardings, mesh, tx, strategy)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sh)
    row = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32, sharding=parallel.batch_sharding(mesh))
    batch = {"cap": {"input_ids": row, "attention_mask": row,
                     "loss_mask": jax.ShapeDtypeStruct(row.shape, jnp.float32, sharding=row.sharding)}}
    fn = step_lib.jit_train_step(step_lib.make_train_step(cfg, tx, strategy), mesh, state_sh, {})

    t0 = time.perf_counter()
    lowered = fn.lower(state, batch, {})
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    gib = 1024**3
    result = {
        "preset": args.preset, "params": cfg.num_params, "mesh": dict(mesh.shape), "batch": args.batch,
        "seq": args.seq, "compute_dtype": args.dtype, "remat": args.remat,
        "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
        "per_device_GiB": {
            "arguments": mem.argument_size_in_bytes / gib,
            "outputs": mem.output_size_in_bytes / gib,
            "temporaries": mem.temp_size_in_bytes / gib,
            "aliased (donated)": mem.alias_size_in_bytes / gib,
            "generated_code": mem.generated_code_size_in_bytes / gib,
        },
    }
    args_gib = result["per_device_GiB"]["arguments"]
    expected = cfg.num_params * 4 * 3 / mesh.size / gib  # fp32 params + Adam's two moments, split over the mesh
    result["expected_state_GiB_per_device"] = expected
    print(json.dumps(result, indent=2))
    print(f"\n{args.preset}: {cfg.num_params / 1e9:.2f}B params; state per device {args_gib:.2f} GiB "
          f"(params + Adam moments / {mesh.size} = {expected:.2f} GiB); temporaries "
          f"{result['per_device_GiB']['temporaries']:.2f} GiB; compiled in {result['compile_s']} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
