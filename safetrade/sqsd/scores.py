"""SQSD scores: how one SGD step on each sample aligns with a danger direction versus a safety direction.

SQSD (Wang et al., ICML 2026) asks, for each benign training sample z, which way one plain SGD step on z would
move the weights (updates.py: the induced update δW_m(z), in rank space for LoRA sites):

  * P(z) = Σ_m cos(δW_m(z), D_m) (metric "cosine", the official one), or Σ_m ⟨δW_m(z), D_m⟩ / ‖D_m‖
    ("projection", the paper's wording, ‖δW_m‖·cos), over every module m and each of its stacked layers.
    A module whose δW_m or D_m is exactly zero contributes 0, as torch's eps-clamped cosine_similarity does.
  * SQSD(z) = P_danger(z) − P_safe(z). Higher means riskier.

Each side is a `Probe`: the state where the update is taken (loss_fn at params, sites saying where each module's
LoRA factors or kernel live) and the directions it is compared with. In the official procedure the two sides
have different states: P_danger at a benignly fine-tuned "initial" adapter against the danger adapter's B·A, P_safe
at the safety adapter itself (its LoRA scaling overridden to 1.0 or 0.8) against its own B·A; `score_probes`
takes such a pair (sqsd/llama.py builds it for our Llama). `score_samples` is the one-state form.

Differences from the official code, on purpose: fp32 throughout (it casts gradients and B·A to bf16); a direction
whose modules differ from the scoring adapter's is an error (it silently scored the intersection); samples without
response tokens get NaN and a flag (it got 0 and dropped every P_danger == 0 afterwards).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import numpy as np

from safetrade.sqsd.directions import (DenseDirection, Directions, KernelSite, LoraSite, Site, Sites, SQSDError,
                                       SQSDWarning)
from safetrade.paths import leaf
from safetrade.sqsd.samples import DEFAULT_MAX_LEN, SampleScores, Samples, as_samples
from safetrade.sqsd.updates import (METRICS, LossFn, alignment_terms, module_metric, per_example_grads, site_paths,
                                    total_metric)

__all__ = ["Probe", "SQSDConfig", "score_probes", "score_samples"]


@dataclasses.dataclass(frozen=True)
class SQSDConfig:
    """The scorer's knobs. max_len applies to token rows (longer ones are cut and flagged "truncated")."""

    metric: str = "cosine"
    batch_size: int = 8
    max_len: int | None = DEFAULT_MAX_LEN

    def __post_init__(self):
        if self.metric not in METRICS:
            raise SQSDError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.batch_size < 1:
            raise SQSDError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_len is not None and self.max_len < 2:
            raise SQSDError(f"max_len must be >= 2 (a target needs a preceding token), got {self.max_len}")


@dataclasses.dataclass(frozen=True)
class Probe:
    """One side of SQSD: a sample's update is one SGD step of rate `lr` on `loss_fn` at `params`, on the leaves
    `sites` names for each module of `directions` (LoraSite: rank-space update of A·B; KernelSite: −lr·∇W)."""

    loss_fn: LossFn
    params: Any
    directions: Directions
    sites: Sites
    lr: float = 1.0

    def check(self) -> dict[str, Site]:
        """The resolved sites; DirectionsMismatch (naming the path) when directions do not fit params."""
        if not self.lr > 0:
            raise SQSDError(f"lr must be > 0, got {self.lr}")
        resolved = self.directions.check(self.params, self.sites)
        fresh = [m for m, s in resolved.items() if isinstance(s, LoraSite) and not np.any(np.asarray(
            leaf(self.params, s.b)))]
        if fresh:
            warnings.warn(f"scoring adapter has B == 0 at {', '.join(fresh)}: induced updates there lie in the span "
                          "of a random A (score at a trained 'initial' adapter instead)", SQSDWarning, stacklevel=3)
        return resolved

    def gradient_paths(self) -> tuple[str, ...]:
        """The leaves per_example_grads differentiates for this probe."""
        return site_paths(sorted(self.check().items()))


def _probe_scores(probe: Probe, samples: Samples, metric: str, batch_size: int) -> np.ndarray:
    """Σ over modules and layers of the metric, per sample (values for invalid samples are discarded later)."""
    sites = tuple(sorted(probe.check().items()))
    wrt = site_paths(sites)
    # Kernel sites compare with dense matrices: made dense once here, outside the per-batch jit.
    directions = Directions({m: DenseDirection(probe.directions.modules[m].dense()) if isinstance(s, KernelSite)
                             else probe.directions.modules[m] for m, s in sites})
    totals = np.zeros(len(samples), np.float64)
    for chosen, batch in samples.batches(batch_size):
        _, grads = per_example_grads(probe.loss_fn, probe.params, batch, wrt=wrt)
        terms = alignment_terms(probe.params, grads, directions, probe.lr, sites=sites)
        totals[chosen] = total_metric(module_metric(jax.device_get(terms), metric))[: len(chosen)]
    return totals


def score_probes(examples, danger: Probe, safety: Probe | None = None, cfg: SQSDConfig = SQSDConfig()) -> SampleScores:
    """SQSD scores P_danger − P_safe of `examples`, each side at its own probe's state.

    `examples`: Samples, token rows (dicts with input_ids, loss_mask and optionally id) or a pytree of arrays with
    a leading row axis (see samples.py). P_safe = 0 when `safety` is None (the danger-only ablation). Samples that
    cannot be scored are NaN and flagged; token rows over cfg.max_len are cut and flagged "truncated".
    """
    samples = as_samples(examples, cfg.max_len)
    p_danger = _probe_scores(danger, samples, cfg.metric, cfg.batch_size)
    p_safe = np.zeros_like(p_danger) if safety is None else _probe_scores(safety, samples, cfg.metric,
                                                                            cfg.batch_size)
    method = "sqsd" if cfg.metric == "cosine" else f"sqsd-{cfg.metric}"
    return samples.finish(method, p_danger - p_safe, {"p_danger": p_danger, "p_safe": p_safe})


def score_samples(loss_fn: LossFn, params, examples, danger: Directions, safety: Directions | None = None, *,
                  sites: Sites, lr: float = 1.0, cfg: SQSDConfig = SQSDConfig()) -> SampleScores:
    """SQSD scores of `examples` for any model: both sides' updates taken at one state (`loss_fn` at `params`).

    `loss_fn(params, example) -> scalar` is one example's loss; `sites` says where each direction module's LoRA
    factors (LoraSite) or kernel (KernelSite) live in params, as a mapping or a function of the module path. For the
    official pairing (each side at its own adapter state) build two Probes and call `score_probes`.
    """
    danger_probe = Probe(loss_fn, params, danger, sites, lr)
    safety_probe = None if safety is None else Probe(loss_fn, params, safety, sites, lr)
    return score_probes(examples, danger_probe, safety_probe, cfg)
