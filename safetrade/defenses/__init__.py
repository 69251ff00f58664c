"""Post-hoc weight defenses against harmful fine-tuning, as pure functions of params pytrees.

Both need an aligned model, its unaligned counterpart (a base/chat pair's base) and the fine-tuned model, as
pytrees of one structure (nested dicts, an nnx.State, our stacked Llama params; a LoRA fine-tune may carry
lora_a / lora_b leaves for Safe LoRA). docs/defenses.md describes each rule, its defaults and our choices.

    params, report = safe_lora(aligned, unaligned, finetuned, num_layers=10)    # Hsu et al., NeurIPS 2024
    params, report = resta(aligned, unaligned, finetuned, gamma=1.0, dare_p=0.0) # Bhardwaj et al., ACL 2024

Modules:
  safe_lora.py  safe_lora, SafeLoraConfig: project the least alignment-similar layers' updates (ΔW ← C ΔW)
  resta.py      resta, RestaConfig: add the safety vector back, optionally after DARE on the fine-tuning delta
  common.py     DefenseError, the structure check, kernel selection (Safe Delta's) and layouts
"""

from safetrade.defenses.common import DefenseError
from safetrade.defenses.resta import RestaConfig, resta
from safetrade.defenses.safe_lora import OFFICIAL_NUM_LAYERS, OFFICIAL_THRESHOLD, SafeLoraConfig, safe_lora

__all__ = ["OFFICIAL_NUM_LAYERS", "OFFICIAL_THRESHOLD", "DefenseError", "RestaConfig", "SafeLoraConfig", "resta",
           "safe_lora"]
