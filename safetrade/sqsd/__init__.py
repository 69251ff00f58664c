"""SQSD: per-sample safety-degradation risk scores for any model's per-example loss, and the baselines.

    from safetrade import sqsd
    directions = sqsd.Directions.from_lora(danger_params, sites)            # or Directions.from_difference(...)
    scores = sqsd.score_samples(loss_fn, params, examples, directions, sites=sites)
    windows = sqsd.rank_windows(scores, n_windows=5)

Modules: directions (directions, LoRA / kernel sites, PEFT reading) | updates
(vmapped per-example gradients, rank-space algebra) | samples (examples -> batches, SampleScores) | scores (Probe,
score_probes, score_samples) | baselines (He et al. gradient and representation matching, Self-Inf-N, random) |
io (windows, JSONL) | llama (our Llama through the same entry points) | job (`safetrade sqsd`).
"""

from safetrade.sqsd.baselines import (FeaturesFn, gradient_matching_scores, random_scores, representation_scores,
                                      self_influence_scores)
from safetrade.sqsd.directions import (LAYOUTS, DenseDirection, Directions, DirectionsMismatch, FactoredDirection,
                                       KernelSite, LoraSite, Site, Sites, SQSDError, SQSDWarning, kernel_sites,
                                       lora_sites, peft_adapters, resolve_sites)
from safetrade.sqsd.io import rank_windows, write_jsonl
from safetrade.sqsd.llama import (MODULE_KEYS, SPACES, LlamaFeatures, LlamaLoss, directions_from_adapters,
                                  directions_from_checkpoints, is_adapter_leaf, llama_kernel_sites, llama_lora_sites,
                                  llama_probe, llama_probes, with_lora_scale)
from safetrade.paths import PathError, leaves_by_path, select_paths, with_leaves
from safetrade.sqsd.samples import (DEFAULT_MAX_LEN, FLAGS, INVALID_FLAGS, SampleScores, Samples, array_samples,
                                    as_samples, only_first_targets, token_samples)
from safetrade.sqsd.scores import Probe, SQSDConfig, score_probes, score_samples
from safetrade.sqsd.updates import METRICS, LossFn, alignment_terms, module_metric, per_example_grads, total_metric

__all__ = [
    "DEFAULT_MAX_LEN", "FLAGS", "INVALID_FLAGS", "LAYOUTS", "METRICS", "MODULE_KEYS", "SPACES", "DenseDirection",
    "Directions", "DirectionsMismatch", "FactoredDirection", "FeaturesFn", "KernelSite", "LlamaFeatures",
    "LlamaLoss", "LoraSite", "LossFn", "PathError", "Probe", "SQSDConfig", "SQSDError", "SQSDWarning",
    "SampleScores", "Samples", "Site", "Sites", "alignment_terms", "array_samples", "as_samples",
    "directions_from_adapters", "directions_from_checkpoints", "gradient_matching_scores", "is_adapter_leaf",
    "kernel_sites", "leaves_by_path", "llama_kernel_sites", "llama_lora_sites", "llama_probe", "llama_probes",
    "lora_sites", "module_metric", "only_first_targets", "peft_adapters", "per_example_grads", "random_scores",
    "rank_windows", "representation_scores", "resolve_sites", "score_probes", "score_samples", "select_paths",
    "self_influence_scores", "token_samples", "total_metric", "with_leaves", "with_lora_scale", "write_jsonl",
]
