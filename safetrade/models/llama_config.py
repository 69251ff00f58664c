"""Llama-family configuration: LlamaConfig, LoRA and rope-scaling settings, presets, and the conversions to and from
Hugging Face config.json and GGUF metadata. The network itself is models/llama.py, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from safetrade.errors import SafetradeError

# Logical axis names used in `axes=` metadata; `layers` is prepended for stacked block weights.
LOGICAL_AXES = ("layers", "vocab", "embed", "heads", "kv_heads", "mlp", "norm", "lora_rank")


class UnsupportedArchitectureError(SafetradeError):
    pass


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3`: Llama-3.1's piecewise rule; `linear`: divide every frequency by factor."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("llama3", "linear"):
            raise UnsupportedArchitectureError(
                f"rope scaling type {self.kind!r} is not supported; supported: 'llama3', 'linear' (or none)"
            )


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters W + (alpha/rank)·A·B on the named projections (q/k/v/o_proj, gate/up/down_proj)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown or not self.targets:
            raise SafetradeError(f"LoRA targets {sorted(unknown) or '()'} are not projections; choose from {LORA_TARGETS}")
        if self.rank < 1:
            raise SafetradeError(f"LoRA rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v (Qwen2); o_proj and the MLP never have one
    family: str = "llama"  # "llama" | "qwen2" | "mistral": which HF class an export names
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; norms, softmax and logits are always float32
    remat: bool = False  # recompute each layer's activations in the backward pass
    lora: LoraConfig | None = None  # adapters live in params as lora_a [in, r] / lora_b [r, out] beside kernels

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedArchitectureError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name}={getattr(self, name)!r}; supported: float32, bfloat16, float16")

    @property
    def num_params(self) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
        if self.attention_bias:
            per_layer += q + 2 * kv
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + L * per_layer + d + head

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        max_position_embeddings=128, tie_word_embeddings=True,
    ),
    "smollm2_135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    ),
    "llama2_7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
        rope_theta=10000.0, max_position_embeddings=4096,
    ),
    "llama3_8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "llama3_2_1b": LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
    ),
    "llama3_1_8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
    ),
}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise SafetradeError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None


# ----------------------------------------------------------------------------------------------------------------
# Config <-> Hugging Face config.json and GGUF metadata

_HF_FAMILIES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
_FAMILY_TO_HF = {v: k for k, v in _HF_FAMILIES.items()}
_FAMILY_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}


def _rope_from_hf(hf: dict, where: str) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (rope_type, rope_theta, ...); 4.x wrote rope_theta + rope_scaling.
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind not in ("llama3", "linear"):
        raise UnsupportedArchitectureError(
            f"{where}: rope type {kind!r} is not supported; supported: default, llama3, linear"
        )
    return theta, RopeScaling(
        kind=kind,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        ),
    )


def config_from_hf(hf: dict, where: str = "config.json", **overrides) -> LlamaConfig:
    """Build a LlamaConfig from a parsed HF config.json; `where` names the file in errors."""
    archs = hf.get("architectures") or []
    family = next((_HF_FAMILIES[a] for a in archs if a in _HF_FAMILIES), None)
    if family is None:
        family = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}.get(hf.get("model_type", ""))
    if family is None:
        raise UnsupportedArchitectureError(
            f"{where}: architecture {archs or hf.get('model_type')!r} is not supported; "
            f"supported: {', '.join(_HF_FAMILIES)}"
        )
    if family in ("qwen2", "mistral") and hf.get("use_sliding_window", family == "mistral") and hf.get(
        "sliding_window"
    ):
        raise UnsupportedArchitectureError(f"{where}: sliding-window attention is not supported")
    theta, scaling = _rope_from_hf(hf, where)
    heads = int(hf["num_attention_heads"])
    cfg = LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or 0),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
        family=family,
    )
    return cfg.replace(**overrides) if overrides else cfg


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The config.json transformers needs to rebuild this model (float32 weights)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.kind, "rope_theta": cfg.rope_theta, "factor": s.factor}
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
    hf = {
        "architectures": [_FAMILY_TO_HF[cfg.family]],
        "model_type": _FAMILY_MODEL_TYPE[cfg.family],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "dtype": cfg.param_dtype,
    }
    if cfg.family == "llama":
        hf.update(attention_bias=cfg.attention_bias, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


def config_from_gguf(meta: dict, where: str, *, tied: bool, **overrides) -> LlamaConfig:
    """Build a LlamaConfig from GGUF key/values (`tied`: the file has no output.weight)."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise UnsupportedArchitectureError(
            f"{where}: GGUF architecture {arch!r} is not supported; supported: llama, qwen2"
        )

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise SafetradeError(f"{where}: GGUF metadata has no key {arch}.{name}")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = RopeScaling("linear", factor=float(key("rope.scaling.factor")))
    cfg = LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings=tied,
        attention_bias=arch == "qwen2",
        family=arch,
    )
    return cfg.replace(**overrides) if overrides else cfg
