"""The trade-off paper's fine-tuning strategies as optax pieces and loss combinators that work on any pytree.

Case I bounds the alignment *loss* through a proxy safety set: `case1_penalty` (L_cap + λ·L_proxy) or
`case1_constrained` (L_proxy ≤ L_proxy(θ_s) + ε, λ by dual ascent, kept in its optax state: `current_lambda`).
Case II bounds the alignment *parameters*: `case2_projection` (‖θ − θ_s‖₂ ≤ r after every update, globally or per
tensor) or `case2_penalty` (+ (μ/2)‖θ − θ_s‖₂²). With LoRA the Case II distance is that of the merged update, through
a displacement hook (`lora_by_path`, `lora_displacement`; for safetrade's own adapters
`safetrade.tradeoff.adapters.llama_lora`, not imported here so that the core loads without safetrade's models).
The registry maps a strategy name to its config and its pieces (`strategy_config`, `build`). docs/library.md shows
each piece in a plain optax loop; docs/training.md the strategies of `safetrade finetune`.
"""

from safetrade.tradeoff.case1 import (Case1ConstrainedState, case1_constrained, case1_penalty, current_lambda,
                                      penalized)
from safetrade.tradeoff.case2 import ball_factors, case2_penalty, case2_projection, penalty_value
from safetrade.tradeoff.displacement import (Displacement, LoraPaths, anchored, lora_by_path, lora_displacement,
                                             merged_delta)
from safetrade.tradeoff.registry import (REGISTRY, Case1Constrained, Case1Penalty, Case2Penalty, Case2Projection,
                                         Lisa, Pieces, Sft, Strategy, StrategyConfig, StrategyError, build, strategy_config)

__all__ = [
    "REGISTRY", "Case1Constrained", "Case1ConstrainedState", "Case1Penalty", "Case2Penalty", "Case2Projection",
    "Displacement", "Lisa", "LoraPaths", "Pieces", "Sft", "Strategy", "StrategyConfig", "StrategyError", "anchored",
    "ball_factors", "build", "case1_constrained", "case1_penalty", "case2_penalty", "case2_projection",
    "current_lambda", "lora_by_path", "lora_displacement", "merged_delta", "penalized",
    "penalty_value", "strategy_config",
]
