"""Safe Delta (Lu et al., ICML 2025): after fine-tuning, keep the part of ΔW = W_ft − W_aligned that buys the most
utility per unit of estimated safety loss, one linear layer at a time, and compensate the rest.

On any two pytrees of the same structure and any Flax NNX model (docs/library.md has a runnable example):

    hessians = collect_hessians(model, aligned, safety_batches)       # H = (2/N) Σ XᵀX per kernel, by path
    params, report = safe_delta(aligned, finetuned, hessians, SafeDeltaConfig(s=0.1))

Modules, by concern:
  config.py         SafeDeltaConfig, SafeDeltaError; static structure vs traced knobs
  layer.py          the per-layer rules ("official": the released code's procedure, "paper": the stated rule),
                    with factor.py (H regularisation, factors, damping fallback) and order.py (entry orders)
  tree.py           safe_delta: the whole-tree driver over path-selected kernels, either layout, stacked layers
  hessians.py       collect_hessians / hessians_from_activations, KernelHessians, the safetensors cache;
                    capture.py records linear-layer inputs of a running model
  llama_adapter.py  safetrade's own Llama through the same entry points
  job.py            `safetrade safedelta`: checkpoints -> calibration -> Hessians -> transform -> HF dir + report
"""

from safetrade.safedelta.config import ABLATIONS, MODES, SafeDeltaConfig, SafeDeltaError
from safetrade.safedelta.hessians import KernelHessians, collect_hessians, hessians_from_activations
from safetrade.safedelta.layer import apply_layer, official_layer, paper_layer
from safetrade.safedelta.tree import LAYOUTS, path_string, safe_delta

__all__ = [
    "ABLATIONS", "LAYOUTS", "MODES", "KernelHessians", "SafeDeltaConfig", "SafeDeltaError", "apply_layer",
    "collect_hessians", "hessians_from_activations", "official_layer", "paper_layer", "path_string", "safe_delta",
]
