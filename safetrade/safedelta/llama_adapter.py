"""safetrade's own Llama (safetrade.models.llama) through the generic entry points: a thin adapter.

    hessians = collect_llama_hessians(cfg, aligned, batches, cache_dir=...)   # collect_hessians on our model
    params, report = safe_delta(aligned, finetuned, hessians, sd_cfg, kernels=KERNELS)

Safe Delta edits the seven projections of every decoder block, stacked [L, in, out] (`KERNELS`, in the order
the per-kernel keys of ablation="random" are drawn); embeddings, norms and lm_head follow cfg.other_params.
The Hessians come from the model's own forward (its layer scan included) through `collect_hessians`; q/k/v share
one input and gate/up another, and the arrays are named after those inputs ("attn_input", "o_proj_input",
"mlp_input", "down_proj_input"), as the reports have always called them. `kernel_hessians` turns such per-input
dicts (or keys by projection name or full path) into the per-kernel mapping `safe_delta` takes.

`collect_llama_hessians(..., stream=True)` runs the same forward one decoder layer at a time instead: the params
stay where they are (host memory, for a 7-8B model), each layer's weights go to the device in turn, and every
batch's residual stream stays on the device between layers; the Hessians come back to host memory layer by layer.
The device then holds one layer's weights and Grams and the calibration set's activations, not the whole model and
every layer's Grams (tens of GB at 7-8B). The results and the cache file are the same as the one-pass collection's
(tests/test_safedelta_stream.py compares them bit for bit).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safetrade.models import llama
from safetrade.safedelta.capture import Capture
from safetrade.safedelta.config import SafeDeltaConfig, SafeDeltaError
from safetrade.safedelta.hessians import (
    KernelHessians,
    batch_step,
    cached_collection,
    collect_hessians,
    count_sequences,
    describe_forward,
    hessian_of,
    linear_classes,
)
from safetrade.safedelta.tree import safe_delta

PROJECTIONS = llama.LORA_TARGETS  # q, k, v, o, gate, up, down: every linear layer of a decoder block
KERNELS = tuple(f"blocks/{'attn' if name in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}/{name}/kernel"
                for name in PROJECTIONS)

# Which layer input each projection reads: q/k/v share the attention norm's output, gate/up the MLP norm's output.
HESSIAN_INPUTS = {
    "q_proj": "attn_input", "k_proj": "attn_input", "v_proj": "attn_input",
    "o_proj": "o_proj_input",
    "gate_proj": "mlp_input", "up_proj": "mlp_input",
    "down_proj": "down_proj_input",
}
HESSIAN_KEYS = ("attn_input", "o_proj_input", "mlp_input", "down_proj_input")


def _projection(path: str) -> str:
    return path.split("/")[-2]


def kernel_hessians(hessians: Mapping[str, Any]) -> KernelHessians:
    """Per-kernel Hessians for KERNELS from keys by full path, projection name ("q_proj") or shared input
    ("attn_input"), the first present winning; a kernel with none is left out (safe_delta then names it)."""
    if isinstance(hessians, KernelHessians):
        return hessians
    arrays, names = {}, {}
    for path in KERNELS:
        key = next((k for k in (path, _projection(path), HESSIAN_INPUTS[_projection(path)]) if k in hessians), None)
        if key is not None:
            arrays[key], names[path] = hessians[key], key
    return KernelHessians(arrays, names)


def safe_delta_llama(aligned, finetuned, hessians: Mapping[str, Any], cfg: SafeDeltaConfig = SafeDeltaConfig()):
    """safe_delta on our Llama's params: the seven projections, Hessians keyed as `kernel_hessians` reads them."""
    return safe_delta(aligned, finetuned, kernel_hessians(hessians), cfg, kernels=KERNELS)


def normalised_batches(batches: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Calibration batches as {input_ids, attention_mask} int32 [B, T] (a missing mask means no padding)."""
    out = []
    for i, batch in enumerate(batches):
        if "input_ids" not in batch:
            raise SafeDeltaError(f"calibration batch {i} has no 'input_ids' (keys: {sorted(batch)})")
        ids = np.asarray(batch["input_ids"])
        mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise SafeDeltaError(f"calibration batch {i}: input_ids {ids.shape} and attention_mask {mask.shape} "
                                 "must both be [B, T]")
        out.append({"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)})
    if not out:
        raise SafeDeltaError("no calibration batches")
    return out


def _forward(model: llama.Llama, batch: dict):
    mask = batch["attention_mask"]
    return model(batch["input_ids"], llama.positions_from_mask(mask), mask.astype(bool))


def _named_by_input(hessians: KernelHessians) -> KernelHessians:
    """Rename the shared arrays after the Llama input they hold, checking the sharing is the expected one."""
    rename: dict[str, str] = {}
    for path, name in hessians.names.items():
        expected = HESSIAN_INPUTS[_projection(path)]
        if rename.setdefault(name, expected) != expected:
            raise SafeDeltaError(f"{path} shares its captured input with kernels that read {rename[name]!r}, "
                                 f"not {expected!r}: the model no longer has the layer inputs this adapter knows")
    if sorted(rename.values()) != sorted(HESSIAN_KEYS) or set(hessians.names) != set(KERNELS):
        raise SafeDeltaError(f"captured {sorted(hessians.names)} sharing {sorted(rename.values())}; expected the "
                             f"seven projections reading {list(HESSIAN_KEYS)}")
    return hessians.renamed(rename)


def collect_llama_hessians(cfg: llama.LlamaConfig, params, batches: Iterable[Mapping[str, Any]], *,
                           cache_dir=None, stream: bool = False) -> KernelHessians:
    """`collect_hessians` on our Llama: [L, d, d] float32 per projection kernel, from the aligned `params`.

    `batches`: dicts with input_ids [B, T] and (optional) attention_mask [B, T]. Rematerialisation is switched
    off for the capture (it changes no value, and its trace would hide the layer inputs). stream=True: one layer
    at a time (module docstring), the Hessians returned as numpy arrays in host memory.
    """
    if cfg.lora is not None:
        raise SafeDeltaError("collect_hessians needs the aligned model without adapters (cfg.lora is set)")
    forward_cfg, batches = cfg.replace(remat=False), normalised_batches(batches)
    if not stream:
        hessians = collect_hessians(llama.graphdef(forward_cfg), params, batches, call=_forward, kernels=KERNELS,
                                    cache_dir=cache_dir, cache_key=repr(cfg))
        return _named_by_input(hessians)
    # The one-pass collection's description and cache key: both paths read and write the same cache files.
    description = describe_forward(llama.graphdef(forward_cfg), _forward, None, repr(cfg))
    hessians = cached_collection(cache_dir, description, params, batches,
                                 lambda: _streamed(forward_cfg, params, batches), on_host=True)
    return _named_by_input(hessians)


def batch_hessian_step(cfg: llama.LlamaConfig):
    """The jitted program the one-pass collection runs per batch: fn(params, (), batch) -> {group: Σ XᵀX}."""
    return batch_step(llama.graphdef(cfg.replace(remat=False)), call=_forward, kernels=KERNELS)


class _LayerPrograms:
    """The streamed collection's two jitted programs for one config.

    embed(embedding, input_ids) -> h, the residual stream entering block 0 (the model's own Embed module);
    layer(layer_params, h, mask) -> (h after the block, {group: Σ XᵀX of this layer}), the model's own Block run
    under a Capture, as the layer scan's body runs it (same positions, rotary frequencies and mask). `names` (kernel
    path -> group, with the `blocks/` prefix the one-pass collection's paths have) is filled in at the first trace.
    """

    def __init__(self, cfg: llama.LlamaConfig):
        model = nnx.eval_shape(lambda: llama.Llama(cfg, nnx.Rngs(0)))
        embed_graph, block_graph = nnx.split(model.embed)[0], nnx.split(model.blocks)[0]
        inv_freq = llama.rope_inverse_frequencies(cfg)
        selected = {path.removeprefix("blocks/") for path in KERNELS}.__contains__
        self.names: dict[str, str] = {}

        def embed(embedding, input_ids):
            return nnx.merge(embed_graph, {"embedding": embedding})(input_ids)

        def layer(layer_params, h, mask):
            block = nnx.merge(block_graph, layer_params)
            with Capture(layer_params, mask, selected, linear_classes(block)) as capture:
                h, _, _ = block(h, llama.positions_from_mask(mask), jnp.asarray(inv_freq), mask.astype(bool))
            grams, names = capture.finish()
            self.names = {f"blocks/{path}": f"blocks/{name}" for path, name in names.items()}
            return h, {f"blocks/{name}": gram for name, gram in grams.items()}

        self.embed, self.layer = jax.jit(embed), jax.jit(layer)


@functools.lru_cache(maxsize=8)
def layer_programs(cfg: llama.LlamaConfig) -> _LayerPrograms:
    """The streamed collection's per-layer programs for `cfg` (remat off), compiled once per shape."""
    return _LayerPrograms(cfg.replace(remat=False))


def _streamed(cfg: llama.LlamaConfig, params, batches: list[dict]) -> tuple[KernelHessians, int]:
    """(Hessians as numpy [L, d, d], N): every batch through layer l before any goes through layer l + 1.

    Per layer the Grams of the batches are summed in batch order and scaled by `hessian_of`, exactly as the
    one-pass collection does with the stacked arrays, so each layer's float32 Hessian has the same value.
    """
    programs, device = layer_programs(cfg), jax.devices()[0]
    embedding = jax.device_put(params["embed"]["embedding"], device)
    streams = [programs.embed(embedding, jax.device_put(b["input_ids"], device)) for b in batches]
    masks = [jax.device_put(b["attention_mask"], device) for b in batches]
    del embedding
    sequences = sum(count_sequences(b) for b in batches)
    arrays: dict[str, np.ndarray] = {}
    for index in range(cfg.num_layers):
        layer_params = jax.device_put(jax.tree.map(lambda x: x[index], params["blocks"]), device)
        sums = None
        for i, mask in enumerate(masks):
            streams[i], grams = programs.layer(layer_params, streams[i], mask)
            sums = grams if sums is None else jax.tree.map(jnp.add, sums, grams)
        for name, total in sums.items():
            if name not in arrays:
                arrays[name] = np.empty((cfg.num_layers, *total.shape), np.float32)
            arrays[name][index] = np.asarray(jax.device_get(hessian_of(total, sequences)))
        del layer_params, sums
    return KernelHessians(arrays, programs.names), sequences
