"""Ahead-of-time compile of a full train step for a large preset on simulated devices, from abstract shapes only.

    python bench/aot_compile.py --preset llama2_7b --devices 8 --fsdp 8 --batch 8 --seq 2048

Nothing of the model is allocated: params, optimizer state and batch are ShapeDtypeStructs with shardings, the
step is lowered and compiled, and XLA's `memory_analysis()` reports what one device would need. This is the pod
path (FSDP over 8 chips) checked on a laptop.

The pieces are shared with bench/memory_plan.py (the 7-8B memory plans): `simulate_devices`, `train_step_program`
(the project's real train step on abstract sharded state) and `memory_of` (lower + compile + XLA's analysis).
jax is imported inside them, not at the top: XLA reads the simulated device count once, when jax first starts a
backend, so `simulate_devices` must be able to run before anything of jax has.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

GIB = 1024**3
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def simulate_devices(count: int, env=os.environ) -> None:
    """Ask XLA for `count` CPU devices in `env` (other XLA_FLAGS are kept): this process's environment, before jax
    starts a backend, or a child process's."""
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={count}"])
    env.setdefault("JAX_PLATFORMS", "cpu")


def shaped(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves (arrays or structs) carrying the matching `shardings`."""
    import jax

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def train_step_program(cfg, mesh, batch: int, seq: int, *, lora=None, optim=None, steps: int = 1000):
    """(jitted train step, (state, batch, frozen)) of safetrade/train/step.py on abstract, sharded inputs.

    Built as `train.jobs.run_train_job` builds its step: the optimizer of `make_optimizer(optim, steps)` (default
    AdamW at lr 1e-5) under the "sft" strategy; full fine-tuning, or with `lora` (a llama.LoraConfig) only the
    adapters train and the base weights are frozen inputs sharded like params. Nothing is allocated.
    """
    import jax
    import jax.numpy as jnp

    from safetrade import parallel
    from safetrade.config import OptimSection
    from safetrade.models import llama, lora as lora_lib
    from safetrade.tradeoff import strategy_config
    from safetrade.train import step as step_lib
    from safetrade.train.jobs import make_optimizer

    tx = make_optimizer(optim if optim is not None else OptimSection(lr=1e-5), steps)
    strategy = strategy_config("sft")
    if lora is None:
        train_cfg, trainable, axes, frozen = cfg, llama.abstract_params(cfg), llama.logical_axes(cfg), {}
    else:
        train_cfg = cfg.replace(lora=lora)
        base, trainable = lora_lib.split(llama.abstract_params(train_cfg))
        axes = lora_lib.split(llama.logical_axes(train_cfg))[1]
        frozen = step_lib.make_frozen(base=base)
    frozen_sh = step_lib.frozen_shardings_for(frozen, cfg, mesh)
    param_sh = parallel.param_shardings(axes, trainable, mesh)
    state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, strategy), shaped(trainable, param_sh))
    state_sh = step_lib.state_shardings(state, param_sh, mesh, tx, strategy)
    state = shaped(state, state_sh)
    row = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=parallel.batch_sharding(mesh))
    tokens = {"cap": {"input_ids": row, "attention_mask": row,
                      "loss_mask": jax.ShapeDtypeStruct(row.shape, jnp.float32, sharding=row.sharding)}}
    fn = step_lib.jit_train_step(step_lib.make_train_step(train_cfg, tx, strategy, lora=lora is not None),
                                 mesh, state_sh, frozen_sh)
    return fn, (state, tokens, shaped(frozen, frozen_sh))


def memory_of(fn, *args) -> dict:
    """Lower and compile `fn` on abstract `args`; XLA's per-device memory analysis in bytes, and the times.

    peak = arguments + outputs + temporaries − aliased: donated inputs that the outputs reuse are counted once.
    """
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    sizes = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
             "temporaries": mem.temp_size_in_bytes, "aliased": mem.alias_size_in_bytes,
             "generated_code": mem.generated_code_size_in_bytes}
    return {"bytes": sizes, "peak_bytes": sizes["arguments"] + sizes["outputs"] + sizes["temporaries"]
            - sizes["aliased"], "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1)}


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

    simulate_devices(args.devices)
    from safetrade import parallel
    from safetrade.models import llama

    cfg = llama.preset(args.preset).replace(dtype=args.dtype, remat=args.remat)
    mesh = parallel.make_mesh(-1, args.fsdp, args.tensor)
    fn, fn_args = train_step_program(cfg, mesh, args.batch, args.seq)
    memory = memory_of(fn, *fn_args)
    result = {
        "preset": args.preset, "params": cfg.num_params, "mesh": dict(mesh.shape), "batch": args.batch,
        "seq": args.seq, "compute_dtype": args.dtype, "remat": args.remat,
        "lower_s": memory["lower_s"], "compile_s": memory["compile_s"],
        "per_device_GiB": {
            "arguments": memory["bytes"]["arguments"] / GIB,
            "outputs": memory["bytes"]["outputs"] / GIB,
            "temporaries": memory["bytes"]["temporaries"] / GIB,
            "aliased (donated)": memory["bytes"]["aliased"] / GIB,
            "generated_code": memory["bytes"]["generated_code"] / GIB,
        },
    }
    args_gib = result["per_device_GiB"]["arguments"]
    expected = cfg.num_params * 4 * 3 / mesh.size / GIB  # fp32 params + Adam's two moments, split over the mesh
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
