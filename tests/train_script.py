"""A tiny deterministic training run, started as a subprocess by tests (resume after kill -9; jax.distributed).

    python -m tests.train_script OUT --steps 12 --save-every 2 [--sleep 0.2]
    python -m tests.train_script OUT --steps 5 --process-id 0 --num-processes 2 --coordinator 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to wait after each step (lets a test kill us)")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices in this process")
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    args = parser.parse_args(argv)

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from safetrade import parallel

        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    import numpy as np
    import optax

    from safetrade import parallel
    from safetrade.models import llama
    from safetrade.train import loop, step as step_lib
    from safetrade.tradeoff import strategy_config
    from tests.test_train import CFG, batches

    mesh = parallel.make_mesh(data=-1, fsdp=2, tensor=1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    strategy = strategy_config("case1_penalty", lam=0.5)
    params = llama.init(CFG, jax.random.key(0))
    shard = parallel.param_shardings(llama.logical_axes(CFG), params, mesh)
    params = jax.device_put(params, shard)
    state = step_lib.init_state(params, tx, strategy)
    shardings = step_lib.state_shardings(state, shard, mesh, tx, strategy)
    state = jax.device_put(state, shardings)
    fn = step_lib.jit_train_step(step_lib.make_train_step(CFG, tx, strategy), mesh, shardings, {})

    def local_batch(k):
        # Every process holds only its own rows of the global batch.
        batch = batches(k)
        rows = batch["cap"]["input_ids"].shape[0]
        per = rows // jax.process_count()
        lo = jax.process_index() * per
        local = jax.tree.map(lambda x: x[lo : lo + per], batch)
        return {name: parallel.host_local_batch_to_global(part, mesh) for name, part in local.items()}

    losses = []

    def step_and_record(state, batch, frozen):
        state, metrics = fn(state, batch, frozen)
        losses.append(float(metrics["loss_cap"]))
        if args.sleep:
            time.sleep(args.sleep)
        return state, metrics

    out_dir = args.out if args.save_every else None
    state = loop.run(step_and_record, state, {}, local_batch,
                     loop.LoopConfig(steps=args.steps, save_every=args.save_every, progress=False), out_dir)
    if jax.process_index() == 0:
        from jax.experimental import multihost_utils

        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(multihost_utils.process_allgather(v, tiled=True))
                for path, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
        os.makedirs(args.out, exist_ok=True)
        np.savez(os.path.join(args.out, "final_params.npz"), **flat)
        with open(os.path.join(args.out, "losses.json"), "w") as f:
            json.dump(losses, f)
    else:
        from jax.experimental import multihost_utils

        for v in jax.tree.leaves(state.params):
            multihost_utils.process_allgather(v, tiled=True)
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
