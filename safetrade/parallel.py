"""Meshes, sharding rules and multi-host start-up.

One mesh shape serves every scale: axes (data, fsdp, tensor). On a laptop all three are 1; on 8 simulated CPU
devices or a GPU box they split the devices; on a TPU pod the same code runs after `initialize_distributed()`.
Weights name *logical* axes (models/llama.py); `RULES` maps each to a mesh axis, MaxText-style, so a new
parallelism layout is a change of rules, not of model code.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from safetrade.errors import SafetradeError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical weight axis -> mesh axis. Matrices are split over fsdp on their model dimension and over tensor on
# their head/MLP/vocab dimension (Megatron column/row pairs); norms and the layer axis are replicated.
RULES: Mapping[str, str | None] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "lora_rank": None,
}

# The batch dimension of activations and data is split over every axis that holds a copy of the model's work.
BATCH_AXES = ("data", "fsdp")


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


def logical_to_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh,
                    rules: Mapping[str, str | None] = RULES) -> P:
    """PartitionSpec for a weight with logical `axes`; a dimension its mesh axis does not divide is replicated."""
    spec = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axis = rules.get(name)
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            log.warning("dimension %s=%d is not divisible by mesh axis %s=%d; replicating it",
                        name, size, mesh_axis, mesh.shape[mesh_axis])
            mesh_axis = None
        spec.append(mesh_axis)
    return P(*spec)


def param_shardings(axes_tree, shapes_tree, mesh: Mesh, rules: Mapping[str, str | None] = RULES):
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
