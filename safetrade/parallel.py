"""Meshes, sharding rules and multi-host start-up.

One mesh shape serves every scale: axes (data, fsdp, tensor). On a laptop all three are 1; on 8 simulated CPU
devices or a GPU box they split the devices; on a TPU pod the same code runs after `initialize_distributed()`.
Weights and activations name *logical* axes (models/llama.py); `RULES` maps each to mesh axes, MaxText-style, so a
new parallelism layout is a change of rules, not of model code.

Activations are constrained (`constrain`) only while a mesh is in context: `train.step.jit_train_step` traces the
step under `within_mesh(mesh)`; a user's own `jax.jit` gets the same under `with jax.set_mesh(mesh):`. Without a
mesh (plain CPU use, a jit over unsharded inputs) `constrain` returns its input unchanged, so the traced program is
the one of a model without constraints.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from safetrade.errors import SafetradeError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# The batch dimension of activations and data is split over every axis that holds a copy of the model's work.
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis, or a tuple of them (None: replicated).
# Weights: matrices are split over fsdp on their model dimension and over tensor on their head/MLP/vocab dimension
# (Megatron column/row pairs); norms and the layer axis are replicated.
# Activations (the activation_* names the model constrains), MaxText's defaults for a (data, fsdp, tensor) mesh:
# the batch over the data-parallel axes, the sequence whole, heads / MLP hidden / vocab over tensor. One exception:
# MaxText also splits the residual stream's model dimension over tensor, but XLA's SPMD partitioner (jax 0.10.2,
# Shardy and GSPMD alike) computes x @ W wrongly (O(1) errors) for x [B (data, fsdp), D (tensor)] and o_proj /
# down_proj's W [(tensor), D (fsdp)] with the result constrained back to that layout, once data, fsdp and tensor
# all exceed 1 (reproducer in docs/accelerators.md); so the residual stream is whole over tensor (Megatron's layout).
RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "lora_rank": None,
    "activation_batch": BATCH_AXES,
    "activation_length": None,
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_kv_heads": "tensor",
    "activation_head_dim": None,
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise SafetradeError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise SafetradeError(f"{len(devices)} devices do not divide into fsdp={fsdp} x tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise SafetradeError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} devices, "
            f"found {len(devices)}"
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh | jax.sharding.AbstractMesh,
                    rules: Mapping[str, str | tuple[str, ...] | None] = RULES) -> P:
    """PartitionSpec for an array (weight or activation) with logical `axes` on `mesh`.

    A dimension its mesh axes do not divide keeps the longest leading group of them that does, replicated if none
    does (SmolLM2's 9 heads on tensor=2; a micro-batch of 4 rows on data=2 x fsdp=4 goes over data only). A mesh
    axis already taken by an earlier dimension is not used again, as XLA requires.
    """
    spec, taken = [], set()
    for name, size in zip(axes, shape, strict=True):
        wanted = _as_mesh_axes(rules.get(name))
        kept = tuple(a for a in wanted if a not in taken)
        while kept and size % math.prod(mesh.shape[a] for a in kept):
            kept = kept[:-1]
        if kept != wanted:
            _warn_indivisible(name, size, wanted, tuple(mesh.shape[a] for a in wanted), kept)
        taken.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*spec)


def _as_mesh_axes(rule: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


@functools.lru_cache(maxsize=None)
def _warn_indivisible(name: str, size: int, wanted: tuple[str, ...], sizes: tuple[int, ...], kept: tuple[str, ...]):
    # Once per dimension and mesh shape: activations are constrained at every trace, and one line says it all.
    log.warning("dimension %s=%d is not divisible by mesh axes %s of sizes %s; split over %s", name, size,
                "x".join(wanted), "x".join(map(str, sizes)), "x".join(kept) if kept else "none (replicated)")


def param_shardings(axes_tree, shapes_tree, mesh: Mesh, rules: Mapping[str, str | tuple[str, ...] | None] = RULES):
    """NamedShardings for a params tree, given its logical axes tree and a tree of arrays/ShapeDtypeStructs."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)  # noqa: E731
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)),
        axes_tree, shapes_tree, is_leaf=is_axes,
    )


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Split dimension 0 (the batch) over the data-parallel axes; replicate the rest."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain(x: jax.Array, axes: tuple[str, ...], rules: Mapping[str, str | tuple[str, ...] | None] = RULES):
    """`x` constrained to the sharding its logical activation `axes` give on the mesh in context.

    Returns `x` itself unless the abstract mesh in context (`jax.set_mesh`, `within_mesh`) has the (data, fsdp,
    tensor) axes, all of type Auto: with no mesh nothing is sharded; a mesh of other axis names is a layout these
    rules do not describe; inside `shard_map` (Manual axes) the caller partitions by hand; with Explicit axes the
    array types already carry their shardings.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    if any(kind != AxisType.Auto for kind in mesh.axis_types):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))


def within_mesh(fn: Callable, mesh: Mesh | None) -> Callable:
    """`fn`, traced with `mesh` as the abstract mesh in context, so the model's activation constraints apply.

    Wrap before `jax.jit`: `jax.set_mesh` may not be entered while tracing, the abstract mesh may, and doing it
    inside the traced function leaves jit's cache key and the caller's eager context as they were.
    mesh=None returns `fn` itself.
    """
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Start jax.distributed when running on several hosts; a no-op for a single process.

    On TPU pods, Slurm and Open MPI every argument may be omitted (JAX discovers them). Elsewhere pass them, or
    set SAFETRADE_COORDINATOR / SAFETRADE_NUM_PROCESSES / SAFETRADE_PROCESS_ID.
    """
    coordinator_address = coordinator_address or os.environ.get("SAFETRADE_COORDINATOR")
    if num_processes is None and "SAFETRADE_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["SAFETRADE_NUM_PROCESSES"])
    if process_id is None and "SAFETRADE_PROCESS_ID" in os.environ:
        process_id = int(os.environ["SAFETRADE_PROCESS_ID"])
    on_pod = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))
    if coordinator_address is None and not on_pod:
        return
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    log.info("jax.distributed: process %d of %d, %d global devices",
             jax.process_index(), jax.process_count(), jax.device_count())


def host_local_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble one global, batch-sharded array per key from each host's own rows."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in batch.items()
    }
