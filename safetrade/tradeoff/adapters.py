"""The Case II displacement of safetrade's own LoRA adapters (safetrade/models/lora.py), by path like anyone's.

Our adapters sit beside each targeted kernel, stacked over layers: `blocks/attn/q_proj/lora_a` [L, in, r] and
`blocks/attn/q_proj/lora_b` [L, r, out], ΔW = (alpha / rank)·A·B. The hook reads them through the generic
`lora_by_path`, from the adapter tree alone (`lora.split(params)[1]`) or the full params.
"""

from __future__ import annotations

from safetrade.errors import SafetradeError
from safetrade.models import llama, lora
from safetrade.models.llama import LlamaConfig
from safetrade.paths import leaves_by_path
from safetrade.tradeoff.displacement import Displacement, LoraPaths, lora_by_path


def llama_lora(cfg: LlamaConfig) -> Displacement:
    """Displacement = the merged update of every adapter of `cfg` (a config with `cfg.lora` set)."""
    if cfg.lora is None:
        raise SafetradeError("llama_lora needs a config with adapters (cfg.lora is None); use lora.add_adapters")
    adapter_paths = leaves_by_path(lora.split(llama.abstract_params(cfg))[1])
    modules = sorted({path.rsplit("/", 1)[0] for path in adapter_paths})
    return lora_by_path({f"{m}/kernel": LoraPaths(f"{m}/lora_a", f"{m}/lora_b", cfg.lora.scale) for m in modules})
