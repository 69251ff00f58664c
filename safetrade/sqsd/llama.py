"""SQSD on safetrade's own Llama, through the generic entry points: its loss, features and adapter sites.

    danger, safety = llama_probes(initial=(init_cfg, init_params), danger=(danger_cfg, danger_params),
                                  safety=(safe_cfg, safe_params), safety_scale=1.0)   # e.g. lora.load_peft results
    scores = score_probes(token_samples(examples, max_len, eos_id), danger, safety, SQSDConfig())

Our kernels are [in, out] (the transpose of torch's, which changes no inner product), stacked over layers
([L, in, out]); adapters are models/lora.py's lora_a [L, in, r] and lora_b [L, r, out] beside each targeted kernel.
The loss is the response-only token-mean cross-entropy of one row (train.losses.per_example_loss).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from safetrade.models import io, llama
from safetrade.models.lora import ADAPTER_KEYS
from safetrade.models.llama import LORA_TARGETS, LlamaConfig
from safetrade.sqsd.directions import (DirectionsMismatch, Directions, KernelSite, LoraSite, SQSDError,
                                       kernel_sites)
from safetrade.paths import SEP, leaves_by_path
from safetrade.sqsd.scores import Probe
from safetrade.train.losses import per_example_loss

__all__ = ["MODULE_KEYS", "SPACES", "LlamaFeatures", "LlamaLoss", "directions_from_adapters",
           "directions_from_checkpoints", "is_adapter_leaf", "llama_kernel_sites", "llama_lora_sites",
           "llama_probe", "llama_probes", "with_lora_scale"]

SPACES = ("lora", "full")
_ROW_KEYS = ("input_ids", "attention_mask", "loss_mask")

# Module path ("blocks/attn/q_proj") of each projection; the paths do not depend on the model's dimensions.
MODULE_KEYS = {
    spec.path[-2]: SEP.join(spec.path[:-1])
    for spec in io.weight_specs(llama.preset("tiny"))
    if spec.path[-1] == "kernel" and spec.path[-2] in LORA_TARGETS
}


@dataclasses.dataclass(frozen=True)
class LlamaLoss:
    """loss_fn(params, row) of one token row (input_ids, attention_mask, loss_mask [T]): its response-only
    token-mean cross-entropy. Equal configs give equal (hashable) loss functions, so jit compiles once."""

    cfg: LlamaConfig

    def __call__(self, params, row) -> jax.Array:
        return per_example_loss(self.cfg, params, {name: row[name][None] for name in _ROW_KEYS})[0]


@dataclasses.dataclass(frozen=True)
class LlamaFeatures:
    """features_fn(params, row): the final-layer hidden state (after the final norm) at the row's last real token,
    the representation He et al. (2024) match."""

    cfg: LlamaConfig

    def __call__(self, params, row) -> jax.Array:
        _, hidden = llama.forward(self.cfg, params, row["input_ids"][None],
                                  attention_mask=row["attention_mask"][None], return_hidden=True)
        last = jnp.maximum(row["attention_mask"].sum() - 1, 0)
        return hidden["final"][0, last]


def is_adapter_leaf(path: str) -> bool:
    """A `wrt` predicate for the baselines: every lora_a / lora_b leaf (LESS-style adapter gradients)."""
    return path.rsplit(SEP, 1)[-1] in ADAPTER_KEYS


def _module_key(target: str) -> str:
    if target not in MODULE_KEYS:
        raise DirectionsMismatch(f"{target!r} is not a projection; choose from {', '.join(LORA_TARGETS)}")
    return MODULE_KEYS[target]


def llama_lora_sites(cfg: LlamaConfig) -> dict[str, LoraSite]:
    """The adapter site of every projection `cfg.lora` targets, with its scale alpha / rank."""
    if cfg.lora is None:
        raise DirectionsMismatch("LoRA-space scoring needs a model with adapters (cfg.lora is None); "
                                 "use space='full' for full-parameter updates")
    return {_module_key(t): LoraSite(f"{_module_key(t)}{SEP}lora_a", f"{_module_key(t)}{SEP}lora_b",
                                     cfg.lora.scale) for t in cfg.lora.targets}


def llama_kernel_sites(targets=LORA_TARGETS) -> dict[str, KernelSite]:
    """The kernel site of each named projection (full-space SQSD)."""
    return kernel_sites([_module_key(t) for t in targets])


def directions_from_adapters(lora_cfg: LlamaConfig, adapter_params) -> Directions:
    """The task vector scale·A·B of every adapter `lora_cfg` targets (full params or `lora.split`'s adapters)."""
    return Directions.from_lora(adapter_params, llama_lora_sites(lora_cfg))


def directions_from_checkpoints(base_params, tuned_params, targets=LORA_TARGETS) -> Directions:
    """Dense directions tuned − base of the `targets` projection kernels (both trees without adapters)."""
    sites = llama_kernel_sites(targets)
    for name, tree in (("base_params", base_params), ("tuned_params", tuned_params)):
        paths = leaves_by_path(tree)
        for module in sites:
            if any(f"{module}{SEP}{k}" in paths for k in ADAPTER_KEYS):
                raise DirectionsMismatch(f"{name} carries adapters at {module!r}; merge them first (lora.merge)")
    return Directions.from_difference(base_params, tuned_params, sites)


def with_lora_scale(cfg: LlamaConfig, scale: float) -> LlamaConfig:
    """`cfg` with its LoRA scaling (alpha / rank) overridden to `scale`: the official safety-side override."""
    if cfg.lora is None:
        raise SQSDError("with_lora_scale needs a config with adapters (cfg.lora is None)")
    if not scale > 0:
        raise SQSDError(f"LoRA scale override must be > 0 (at 0 every adapter gradient vanishes), got {scale}")
    return cfg.replace(lora=dataclasses.replace(cfg.lora, alpha=float(scale) * cfg.lora.rank))


def llama_probe(cfg: LlamaConfig, params, directions: Directions, space: str = "lora", lr: float = 1.0) -> Probe:
    """A Probe on our Llama: `space="lora"` takes the update of the adapters' A·B (params must carry the adapters
    cfg.lora names), `"full"` the update −lr·∇W of the direction modules' kernels."""
    if space not in SPACES:
        raise SQSDError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}")
    sites = llama_lora_sites(cfg) if space == "lora" else kernel_sites(directions.keys)
    return Probe(LlamaLoss(cfg), params, directions, sites, lr)


def llama_probes(initial: tuple[LlamaConfig, dict], danger: tuple[LlamaConfig, dict],
                 safety: tuple[LlamaConfig, dict], *, safety_scale: float = 1.0,
                 lr: float = 1.0) -> tuple[Probe, Probe]:
    """The official pair of probes from three (lora_cfg, params) pairs, e.g. lora.load_peft results on one base:

    danger: updates at the `initial` (benignly fine-tuned) adapter against the danger adapter's B·A;
    safety: updates at the safety adapter itself, LoRA scaling overridden to `safety_scale`, against its own B·A.
    """
    (initial_cfg, initial_params), (danger_cfg, danger_params), (safety_cfg, safety_params) = initial, danger, safety
    danger_probe = llama_probe(initial_cfg, initial_params, directions_from_adapters(danger_cfg, danger_params),
                               lr=lr)
    safety_probe = llama_probe(with_lora_scale(safety_cfg, safety_scale), safety_params,
                               directions_from_adapters(safety_cfg, safety_params), lr=lr)
    return danger_probe, safety_probe
