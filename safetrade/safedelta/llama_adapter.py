"""safetrade's own Llama (safetrade.models.llama) through the generic entry points: a thin adapter.

    hessians = collect_llama_hessians(cfg, aligned, batches, cache_dir=...)   # collect_hessians on our model
    params, report = safe_delta(aligned, finetuned, hessians, sd_cfg, kernels=KERNELS)

Safe Delta edits the seven projections of every decoder block, stacked [L, in, out] (`KERNELS`, in the order
the per-kernel keys of ablation="random" are drawn); embeddings, norms and lm_head follow cfg.other_params.
The Hessians come from the model's own forward (its layer scan included) through `collect_hessians`; q/k/v share
one input and gate/up another, and the arrays are named after those inputs ("attn_input", "o_proj_input",
"mlp_input", "down_proj_input"), as the reports have always called them. `kernel_hessians` turns such per-input
dicts (or keys by projection name or full path) into the per-kernel mapping `safe_delta` takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from safetrade.models import llama
from safetrade.safedelta.config import SafeDeltaConfig, SafeDeltaError
from safetrade.safedelta.hessians import KernelHessians, collect_hessians
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
                           cache_dir=None) -> KernelHessians:
    """`collect_hessians` on our Llama: [L, d, d] float32 per projection kernel, from the aligned `params`.

    `batches`: dicts with input_ids [B, T] and (optional) attention_mask [B, T]. Rematerialisation is switched
    off for the capture (it changes no value, and its trace would hide the layer inputs).
    """
    if cfg.lora is not None:
        raise SafeDeltaError("collect_hessians needs the aligned model without adapters (cfg.lora is set)")
    hessians = collect_hessians(llama.graphdef(cfg.replace(remat=False)), params, normalised_batches(batches),
                                call=_forward, kernels=KERNELS, cache_dir=cache_dir, cache_key=repr(cfg))
    return _named_by_input(hessians)
