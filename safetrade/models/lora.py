"""LoRA adapters as pytree transforms over llama params.

With `cfg.lora` set, every targeted projection carries two extra leaves beside its kernel, stacked over layers like
the kernel itself (models/llama.py computes y = x @ kernel + scale · (x @ lora_a) @ lora_b):

    params["blocks"]["attn"]["q_proj"] = {"kernel": [L, in, out], "lora_a": [L, in, r], "lora_b": [L, r, out]}

Everything here is a pure function of such trees:

    lora_cfg, params = add_adapters(cfg, params, LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")), key)
    base, adapters = split(params)                      # adapters: only the lora_a / lora_b leaves, same nesting
    grads = jax.grad(lambda a, b: loss(combine(b, a)))(adapters, base)   # gradients (and optimizer state) for
                                                                         # the adapters only
    merged_cfg, merged = merge(lora_cfg, params)        # kernel + scale · A @ B, adapters removed
    save_peft("out/adapter", lora_cfg, adapters)        # adapter_config.json + adapter_model.safetensors (peft)
    lora_cfg, params = load_peft("out/adapter", cfg, base_params)

PEFT layout: peft names a tensor after the module path of the wrapped transformers model, e.g.
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`, and stores lora_A as [r, in] and lora_B as
[out, r] (torch's [out, in] convention); ours are [in, r] and [r, out], so each is transposed per layer.
Its scaling is lora_alpha / r (rsLoRA, DoRA, per-module rank/alpha patterns and adapter biases are not supported).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from safetrade import parallel
from safetrade.errors import MissingPathError, SafetradeError
from safetrade.models import io, llama
from safetrade.models.llama import LORA_TARGETS, LlamaConfig, LoraConfig, Params

ADAPTER_KEYS = ("lora_a", "lora_b")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the transformers model

_HIGHEST = jax.lax.Precision.HIGHEST  # fp32 products even where the default matmul precision is TF32/bf16


class AdapterError(io.CheckpointError):
    """A PEFT adapter is missing a tensor, has one of the wrong shape, or uses a feature safetrade does not have."""


# ----------------------------------------------------------------------------------------------------------------
# Tree helpers


def _target_specs(cfg: LlamaConfig, targets) -> list[io.WeightSpec]:
    """io.weight_specs entries of the targeted kernels, in LORA_TARGETS order."""
    specs = {s.path[-2]: s for s in io.weight_specs(cfg) if s.path[-1] == "kernel" and s.path[-2] in LORA_TARGETS}
    return [specs[t] for t in LORA_TARGETS if t in targets]


def _module(tree: Params, spec: io.WeightSpec) -> dict:
    """The dict holding a projection's leaves (kernel and/or lora_a, lora_b)."""
    return io.tree_get(tree, spec.path[:-1])


def _require_lora(cfg: LlamaConfig, what: str) -> LoraConfig:
    if cfg.lora is None:
        raise SafetradeError(f"{what} needs a config with adapters (cfg.lora is None); use add_adapters or load_peft")
    return cfg.lora


def _mesh_of(params: Params):
    """The mesh the base weights live on, if they carry NamedShardings (else None: default device)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def _adapter_shardings(lora_cfg: LlamaConfig, params: Params):
    """NamedShardings for the adapter leaves (same rules as the base weights), or None when params are unsharded."""
    return _adapter_shardings_on(lora_cfg, _mesh_of(params))


def _adapter_shardings_on(lora_cfg: LlamaConfig, mesh):
    if mesh is None:
        return None
    shardings = parallel.param_shardings(llama.logical_axes(lora_cfg), llama.abstract_params(lora_cfg), mesh)
    return split(shardings)[1]


def split(params: Params) -> tuple[Params, Params]:
    """(base, adapters): adapters holds only the lora_a/lora_b leaves (same nesting), base everything else."""
    base, adapters = {}, {}
    for key, value in params.items():
        if key in ADAPTER_KEYS:
            adapters[key] = value
        elif isinstance(value, dict):
            b, a = split(value)
            base[key] = b
            if a:
                adapters[key] = a
        else:
            base[key] = value
    return base, adapters


def combine(base: Params, adapters: Params) -> Params:
    """Inverse of `split`: a new tree with the adapter leaves put back beside their kernels (inputs unchanged)."""
    out = dict(base)
    for key, value in adapters.items():
        if isinstance(value, dict):
            if not isinstance(base.get(key), dict):
                raise SafetradeError(f"combine: adapters have a subtree {key!r} that the base params lack")
            out[key] = combine(base[key], value)
        else:
            if key not in ADAPTER_KEYS:
                raise SafetradeError(f"combine: adapter leaf {key!r} is not one of {ADAPTER_KEYS}")
            if key in base:
                raise SafetradeError(f"combine: the base params already hold a {key!r} leaf")
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# Adding, merging, deltas


def add_adapters(cfg: LlamaConfig, params: Params, lora: LoraConfig, key: jax.Array) -> tuple[LlamaConfig, Params]:
    """Fresh adapters on `lora.targets`: (cfg with lora, params with lora_a/lora_b leaves). Logits are unchanged.

    The adapter leaves are the ones `llama.init(cfg_with_lora, key)` draws (A ~ N(0, 1/in), B = 0, as in
    llama.Linear; bit-identical to a jitted init, within 1 ulp of an eager one): init is traced under jit and
    everything but the adapters is dead code, so no full random model is ever allocated. If the base weights are
    sharded, the adapters get the same sharding rules on the same mesh.
    """
    if cfg.lora is not None or split(params)[1]:
        raise SafetradeError("params already carry adapters; merge() them first or start from base params")
    lora_cfg = cfg.replace(lora=lora)
    adapters = _adapter_init(lora_cfg, _mesh_of(params))(key)
    return lora_cfg, combine(params, adapters)


@functools.lru_cache(maxsize=8)
def _adapter_init(lora_cfg: LlamaConfig, mesh):
    """A jitted key -> adapters function (cached: tracing the whole init is the slow part)."""
    shardings = _adapter_shardings_on(lora_cfg, mesh)
    return jax.jit(lambda key: split(llama.init(lora_cfg, key))[1], out_shardings=shardings)


def delta(cfg: LlamaConfig, params: Params) -> Params:
    """The merged update ΔW = scale · A @ B of every targeted kernel, float32, as {..., "q_proj": {"kernel": ΔW}}.

    `params` may be the full params or the adapters alone (only lora_a/lora_b are read). The tree has the same
    paths as the targeted kernels, so `optax.tree.norm(delta(cfg, adapters))` is ‖θ_merged − θ_base‖₂.
    """
    lora = _require_lora(cfg, "delta")
    out: dict[str, Any] = {}
    for spec in _target_specs(cfg, lora.targets):
        m = _module(params, spec)
        a, b = m["lora_a"].astype(jnp.float32), m["lora_b"].astype(jnp.float32)
        io.tree_set(out, spec.path, lora.scale * jnp.einsum("lir,lro->lio", a, b, precision=_HIGHEST))
    return out


def delta_sqnorm(cfg: LlamaConfig, params: Params) -> jax.Array:
    """‖delta(cfg, params)‖² (sum over all targeted kernels and layers) without forming any ΔW.

    ‖s·A B‖_F² = s² · Σ (AᵀA) ⊙ (B Bᵀ): r×r Gram matrices only, so it is cheap enough for a per-step constraint.
    """
    lora = _require_lora(cfg, "delta_sqnorm")
    total = jnp.zeros((), jnp.float32)
    for spec in _target_specs(cfg, lora.targets):
        m = _module(params, spec)
        a, b = m["lora_a"].astype(jnp.float32), m["lora_b"].astype(jnp.float32)
        gram_a = jnp.einsum("lir,lis->lrs", a, a, precision=_HIGHEST)
        gram_b = jnp.einsum("lro,lso->lrs", b, b, precision=_HIGHEST)
        total = total + jnp.sum(gram_a * gram_b)
    return lora.scale**2 * total


def merge(cfg: LlamaConfig, params: Params) -> tuple[LlamaConfig, Params]:
    """(cfg without lora, params with kernel + scale · A @ B and no adapter leaves). Computed in float32, then cast
    to the param dtype; the merged model computes the same function up to fp32 rounding of the reordered sums."""
    lora = _require_lora(cfg, "merge")
    base, adapters = split(params)
    if not adapters:
        raise SafetradeError("merge: params hold no lora_a/lora_b leaves")
    deltas = delta(cfg, adapters)
    for spec in _target_specs(cfg, lora.targets):  # `base` is split's fresh copy of the dicts: safe to update
        kernel = io.tree_get(base, spec.path)
        merged = kernel.astype(jnp.float32) + io.tree_get(deltas, spec.path)
        io.tree_set(base, spec.path, merged.astype(kernel.dtype))
    return cfg.replace(lora=None), base


def save_merged_hf(directory: str | os.PathLike, cfg: LlamaConfig, params: Params, tokenizer=None) -> Path:
    """Merge the adapters and write a plain HF directory (transformers loads it without peft)."""
    merged_cfg, merged = merge(cfg, params)
    return io.save_hf(directory, merged_cfg, merged, tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# PEFT format


def _peft_names(spec: io.WeightSpec, i: int) -> tuple[str, str]:
    module = PEFT_PREFIX + spec.hf.format(i=i).removesuffix(".weight")
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def peft_config(lora: LoraConfig, base_model_name_or_path: str = "") -> dict:
    """peft's LoraConfig fields for these adapters (the ones peft reads; it fills the rest with its defaults)."""
    alpha = float(lora.alpha)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": lora.rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "target_modules": [t for t in LORA_TARGETS if t in lora.targets],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_peft(directory: str | os.PathLike, cfg: LlamaConfig, adapters: Params,
              base_model_name_or_path: str = "") -> Path:
    """Write adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads.

    `adapters` may be the adapter tree from `split` or the full params. Tensors keep the param dtype. On several
    hosts every process takes part in the gathers, and process 0 writes.
    """
    from safetensors.numpy import save_file

    lora = _require_lora(cfg, "save_peft")
    tensors = {}
    for spec in _target_specs(cfg, lora.targets):
        m = _module(adapters, spec)
        a = np.asarray(jax.device_get(io.gather_to_host(m["lora_a"])))  # [L, in, r]
        b = np.asarray(jax.device_get(io.gather_to_host(m["lora_b"])))  # [L, r, out]
        for i in range(cfg.num_layers):
            name_a, name_b = _peft_names(spec, i)
            tensors[name_a] = np.ascontiguousarray(a[i].T)  # [r, in]
            tensors[name_b] = np.ascontiguousarray(b[i].T)  # [out, r]
    directory = Path(directory)
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        config = peft_config(lora, base_model_name_or_path)
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def _check_peft_config(config: dict, where: str) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r} is not supported; only 'LORA'")
    unsupported = {
        "use_dora": (False, None),
        "use_rslora": (False, None),
        "fan_in_fan_out": (False, None),
        "bias": ("none", None),
        "lora_bias": (False, None),
        "rank_pattern": ({}, None),
        "alpha_pattern": ({}, None),
        "layers_to_transform": (None,),
        "modules_to_save": (None, []),
        "target_parameters": (None, []),
        "trainable_token_indices": (None,),
    }
    for field, allowed in unsupported.items():
        if field in config and config[field] not in allowed:
            raise AdapterError(
                f"{where}: {field}={config[field]!r} is not supported (safetrade adapters are plain LoRA: "
                f"W + (lora_alpha/r)·B·A on q/k/v/o/gate/up/down_proj of every decoder layer)"
            )
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise AdapterError(f"{where}: r={r!r} is not a positive integer")
    if not isinstance(config.get("lora_alpha"), (int, float)):
        raise AdapterError(f"{where}: lora_alpha={config.get('lora_alpha')!r} is not a number")


def _declared_targets(target_modules, where: str) -> set[str] | None:
    """Targets named by adapter_config's target_modules; None for a string (a regex or "all-linear": peft matches
    it against module names, so the tensors present decide)."""
    if isinstance(target_modules, str):
        return None
    if not target_modules:
        raise AdapterError(f"{where}: target_modules is empty")
    declared = set()
    for entry in target_modules:
        name = str(entry).rsplit(".", 1)[-1]  # peft matches "q_proj" and "self_attn.q_proj" as name suffixes
        if name in LORA_TARGETS:
            declared.add(name)
        else:
            raise AdapterError(
                f"{where}: target module {entry!r} is not supported; safetrade adapters go on {', '.join(LORA_TARGETS)}"
            )
    return declared


_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_[AB]\.weight$")


def load_peft(directory: str | os.PathLike, cfg: LlamaConfig, params: Params) -> tuple[LlamaConfig, Params]:
    """Read a peft LoRA adapter dir onto base `params`: (cfg with lora, params with adapters).

    Tensors are cast to the param dtype and placed like the base weights (same mesh and rules if sharded).
    """
    from safetensors import safe_open

    directory = Path(directory)
    if cfg.lora is not None or split(params)[1]:
        raise SafetradeError("load_peft: params already carry adapters; load onto base params (merge() first)")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise MissingPathError(f"{directory}: adapter directory not found")
    if not config_path.exists():
        raise MissingPathError(f"{config_path} not found; a peft adapter dir needs {CONFIG_NAME} + {WEIGHTS_NAME}")
    if not weights_path.exists():
        found = ", ".join(sorted(p.name for p in directory.iterdir()))
        raise MissingPathError(
            f"{weights_path} not found (found: {found}); only safetensors adapters are read (never adapter_model.bin)"
        )
    where = str(config_path)
    config = json.loads(config_path.read_text())
    _check_peft_config(config, where)
    rank = int(config["r"])
    declared = _declared_targets(config.get("target_modules"), where)

    handle = safe_open(str(weights_path), framework="numpy")
    names = set(handle.keys())
    found_targets = set()
    for name in sorted(names):
        m = _KEY.match(name)
        if m is None or m.group(2) not in LORA_TARGETS:
            raise AdapterError(
                f"{weights_path}: tensor {name!r} is not supported; safetrade adapters are lora_A/lora_B on "
                f"{', '.join(LORA_TARGETS)} of model.layers.<i> (no embedding, lm_head or bias adapters)"
            )
        if int(m.group(1)) >= cfg.num_layers:
            raise AdapterError(f"{weights_path}: tensor {name!r} names layer {m.group(1)}, "
                               f"but the model has {cfg.num_layers} layers")
        found_targets.add(m.group(2))
    if not found_targets:
        raise AdapterError(f"{weights_path}: no lora_A/lora_B tensors")
    if declared is not None and declared != found_targets:
        missing_targets = sorted(declared - found_targets)
        extra = sorted(found_targets - declared)
        raise AdapterError(
            f"{where}: target_modules {sorted(declared)} do not match the tensors in {WEIGHTS_NAME} "
            f"(declared but absent: {missing_targets or 'none'}; present but undeclared: {extra or 'none'})"
        )
    targets = tuple(t for t in LORA_TARGETS if t in found_targets)
    lora_cfg = cfg.replace(lora=LoraConfig(rank=rank, alpha=float(config["lora_alpha"]), targets=targets))

    abstract = llama.abstract_params(lora_cfg)
    shardings = _adapter_shardings(lora_cfg, params)
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    adapters: dict[str, Any] = {}
    for spec in _target_specs(lora_cfg, targets):
        for leaf, torch_name in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            path = (*spec.path[:-1], leaf)
            shape = tuple(io.tree_get(abstract, path).shape)  # [L, in, r] or [L, r, out]
            host = np.empty(shape, dtype)
            for i in range(cfg.num_layers):
                name = _peft_names(spec, i)[0 if leaf == "lora_a" else 1]
                if name not in names:
                    raise AdapterError(f"{weights_path}: tensor {name!r} is missing")
                array = handle.get_tensor(name)
                if array.shape != shape[1:][::-1]:
                    raise AdapterError(
                        f"{weights_path}: tensor {name!r} has shape {tuple(array.shape)}, but r={rank} from "
                        f"{CONFIG_NAME} and the model's dimensions imply {shape[1:][::-1]}"
                    )
                host[i] = array.T
            sharding = None if shardings is None else io.tree_get(shardings, path)
            io.tree_set(adapters, path, io.place(host, sharding))
    return lora_cfg, combine(params, adapters)


def scale_b(params: Params, factors: Params) -> Params:
    """Multiply each targeted module's lora_b by its factor; `factors` has delta()'s paths ({..., "kernel": f}).

    ΔW = scale·A·B is linear in B, so this scales each merged update by exactly f: how Case II keeps a LoRA run
    inside ‖ΔW‖ ≤ r without touching A.
    """
    out = jax.tree.map(lambda x: x, params)
    for path, factor in jax.tree_util.tree_flatten_with_path(factors)[0]:
        keys = tuple(getattr(k, "key", k) for k in path)[:-1]  # drop the trailing "kernel"
        module = io.tree_get(out, keys)
        module["lora_b"] = (module["lora_b"].astype(jnp.float32) * factor).astype(module["lora_b"].dtype)
    return out
