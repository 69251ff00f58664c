"""SQSD: per-sample safety-degradation risk scores, and the baselines it is compared with.

SQSD (Wang et al., ICML 2026; reconstructed from the official code in research/sqsd.md) asks, for each benign
training sample z, which way one plain SGD step on z would move the weights: towards a *danger* direction (a LoRA
task vector trained on harmful data) or towards a *safety* direction (one trained on safe responses).

    # each pair is (lora_cfg, params), e.g. lora.load_peft(adapter_dir, cfg, base_params)
    danger, safety = sqsd_probes(initial=(init_cfg, init_params), danger=(danger_cfg, danger_params),
                                 safety=(safe_cfg, safe_params), safety_scale=1.0)
    scores = score_samples(examples, danger, safety)            # examples: formatting.encode_rows output
    windows = rank_windows(scores, n_windows=5)                 # S1 (highest risk) .. S5, index arrays
    write_jsonl("scores.jsonl", rows, scores, windows)

Definitions (per targeted projection m and layer l, a "module"; our kernels are [in, out], the transpose of
torch's, which changes no inner product):

  * A sample's induced update at a LoRA state (A, B, scale s) is the first-order change of the product A·B under
    one SGD step of rate lr on A and B, as in the official `compute_task_vector_delta_step`:
        δW_m(z) = −lr · (∇_A ℓ(z) · B + A · ∇_B ℓ(z))
    (the official −lr·(g_B·A + B·g_A) in torch's layout). The second-order term lr²·∇_A·∇_B is dropped, and the
    LoRA scale s is not applied: the gradients already carry one factor s, and a positive constant per state
    changes no cosine. ℓ is the response-only token-mean cross-entropy (train.losses.per_example_loss) of the
    sample alone. With B = 0 (a fresh adapter) δW = −lr·A·∇_B ℓ lies in the span of a random A, which is why the
    danger side is scored at a benignly fine-tuned "initial" adapter, never a fresh one.
  * In full-parameter space δW_m(z) = −lr · ∇_{W_m} ℓ(z).
  * P(z) = Σ_m cos(δW_m(z), D_m) (metric "cosine", the official one), or Σ_m ⟨δW_m(z), D_m⟩ / ‖D_m‖ ("projection",
    the paper's wording, ‖δW_m‖·cos). A module whose δW_m or D_m is exactly zero contributes 0, as torch's
    eps-clamped cosine_similarity does.
  * SQSD(z) = P_danger(z) − P_safe(z): P_danger at the initial-state adapter against the danger adapter's B·A,
    P_safe at the safety adapter itself, with its LoRA scaling overridden (`with_lora_scale`, 1.0 or 0.8 in the
    official scripts), against its own B·A. Higher means riskier.

Rank-space algebra (no per-sample d×k matrix is ever formed). With A [n, r], B [r, k], per-sample gradients
G_A [n, r], G_B [r, k], and a factored direction D = c·P·Q (P [n, q], Q [q, k]), using
⟨X·Y, P·Q⟩_F = tr(Yᵀ Xᵀ P Q) = Σ (XᵀP) ⊙ (Y Qᵀ) and ‖X·Y‖_F² = Σ (XᵀX) ⊙ (Y Yᵀ):

    ⟨δW, D⟩  = −lr·c · [ Σ (G_Aᵀ P) ⊙ (B Qᵀ)  +  Σ (Aᵀ P) ⊙ (G_B Qᵀ) ]                     (r×q matrices)
    ‖δW‖²    = lr² · [ Σ (G_Aᵀ G_A) ⊙ (B Bᵀ) + Σ (Aᵀ A) ⊙ (G_B G_Bᵀ) + 2 Σ (G_Aᵀ A) ⊙ (B G_Bᵀ) ]   (r×r)
    ‖D‖²     = c² · Σ (Pᵀ P) ⊙ (Q Qᵀ)                                                      (q×q)

and for a dense direction D [n, k] (e.g. a full fine-tuning difference): ⟨δW, D⟩ = −lr·[Σ G_A ⊙ (D Bᵀ) +
Σ G_B ⊙ (Aᵀ D)], where D Bᵀ and Aᵀ D are per-state constants. Per sample that is O((n + k)·r·(r + q)) work.

Differences from the official code, on purpose: fp32 throughout (it casts gradients and B·A to bf16); a direction
whose modules differ from the scoring adapter's is an error (it silently scored the intersection); samples without
response tokens get NaN and a flag (it got 0 and dropped every P_danger == 0 afterwards).

Baselines share the interface `scorer(examples, ...) -> SampleScores` (bind the options with functools.partial):
`random_scores`, `representation_scores` (He et al. 2024), `gradient_matching_scores` (He et al. 2024, bidirectional
anchoring) and `self_influence_scores` (Self-Inf-N).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safetrade.data.batching import bucket_for, bucket_lengths, make_batch
from safetrade.errors import SafetradeError
from safetrade.models import io, llama, lora
from safetrade.models.llama import LORA_TARGETS, LlamaConfig, Params
from safetrade.train.losses import per_example_loss

__all__ = [
    "DEFAULT_MAX_LEN", "FLAGS", "INVALID_FLAGS", "METRICS", "MODULE_KEYS", "SPACES", "DenseDirection",
    "DirectionProbe", "Directions", "DirectionsMismatch", "FactoredDirection", "SQSDError", "SQSDWarning",
    "SampleScores", "Scorer", "alignment_terms", "gradient_matching_scores", "module_metric", "per_example_grads",
    "random_scores", "rank_windows", "representation_scores", "score_samples", "self_influence_scores",
    "sqsd_probes", "with_lora_scale", "write_jsonl",
]

METRICS = ("cosine", "projection")
SPACES = ("lora", "full")
# Per-sample flags. The invalid ones make the score NaN; "truncated" is informational (the sample is scored on
# its first max_len tokens).
FLAGS = ("empty", "no_targets", "non_finite", "truncated")
INVALID_FLAGS = ("empty", "no_targets", "non_finite")
DEFAULT_MAX_LEN = 1024  # the official scripts' cutoff

_HIGHEST = jax.lax.Precision.HIGHEST  # fp32 products even where the default matmul precision is TF32/bf16
_SEP = "/"

# Module key ("blocks/attn/q_proj") of each projection; the paths do not depend on the model's dimensions.
MODULE_KEYS = {
    spec.path[-2]: _SEP.join(spec.path[:-1])
    for spec in io.weight_specs(llama.preset("tiny"))
    if spec.path[-1] == "kernel" and spec.path[-2] in LORA_TARGETS
}


class SQSDError(SafetradeError):
    """Scoring cannot proceed (bad options, unusable anchors, ids that do not match)."""


class DirectionsMismatch(SQSDError):
    """Directions do not fit the model they are scored against (the message names the module path)."""


class SQSDWarning(UserWarning):
    """A setting that makes scores degenerate (a zero direction, a fresh adapter)."""


def _path(key: str) -> tuple[str, ...]:
    return tuple(key.split(_SEP))


def _module_key(target: str) -> str:
    return MODULE_KEYS[target]


# ----------------------------------------------------------------------------------------------------------------
# Directions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FactoredDirection:
    """D = scale · a @ b per layer: a [L, in, q], b [L, q, out] (a LoRA adapter's lora_a, lora_b)."""

    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(default=1.0, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.a.shape[0], self.a.shape[1], self.b.shape[2])

    def dense(self) -> jax.Array:
        a, b = self.a.astype(jnp.float32), self.b.astype(jnp.float32)
        return self.scale * jnp.einsum("lnq,lqk->lnk", a, b, precision=_HIGHEST)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseDirection:
    """D as a matrix per layer, [L, in, out] (e.g. the difference of two checkpoints' kernels)."""

    matrix: jax.Array

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.matrix.shape)

    def dense(self) -> jax.Array:
        return self.matrix.astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Directions:
    """Per-module directions D_m, keyed by module path ("blocks/attn/q_proj"); each holds all layers.

    A pytree (jit-able). Every (module, layer) pair is one term of the module sum, so a 32-layer model with all
    seven projections has 224 terms, as in the official scores.
    """

    modules: dict[str, FactoredDirection | DenseDirection]

    @classmethod
    def from_adapters(cls, lora_cfg: LlamaConfig, adapter_params: Params) -> Directions:
        """The task vector scale·A·B of every adapter in `adapter_params` (full params or `lora.split`'s adapters).

        The scale only matters to a raw dot product; cosines and projections are invariant to it.
        """
        spec = lora_cfg.lora
        if spec is None:
            raise DirectionsMismatch("Directions.from_adapters needs a config with adapters (cfg.lora is None)")
        modules = {}
        for target in spec.targets:
            key = _module_key(target)
            try:
                module = io.tree_get(adapter_params, _path(key))
                a, b = module["lora_a"], module["lora_b"]
            except (KeyError, TypeError):
                raise DirectionsMismatch(f"adapter params have no lora_a/lora_b at {key!r}, which the config "
                                         f"targets ({', '.join(spec.targets)})") from None
            modules[key] = FactoredDirection(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), spec.scale)
        directions = cls(modules)
        zero = [k for k, v in modules.items() if not np.any(np.asarray(v.b))]
        if zero:
            warnings.warn(f"direction adapters have lora_b == 0 at {', '.join(zero)}: those directions are zero "
                          "(a fresh adapter?), so every cosine with them is 0", SQSDWarning, stacklevel=2)
        return directions

    @classmethod
    def from_checkpoints(cls, base_params: Params, tuned_params: Params,
                         targets: Sequence[str] = LORA_TARGETS) -> Directions:
        """Dense directions tuned − base of the `targets` projection kernels (both trees without adapters)."""
        modules = {}
        for target in targets:
            if target not in MODULE_KEYS:
                raise DirectionsMismatch(f"{target!r} is not a projection; choose from {', '.join(LORA_TARGETS)}")
            key = _module_key(target)
            kernels = []
            for name, tree in (("base_params", base_params), ("tuned_params", tuned_params)):
                try:
                    module = io.tree_get(tree, _path(key))
                except (KeyError, TypeError):
                    raise DirectionsMismatch(f"{name} has no module {key!r}") from None
                if any(k in module for k in lora.ADAPTER_KEYS):
                    raise DirectionsMismatch(f"{name} carries adapters at {key!r}; merge them first (lora.merge)")
                kernels.append(module["kernel"])
            base, tuned = kernels
            if base.shape != tuned.shape:
                raise DirectionsMismatch(f"{key}/kernel has shape {tuple(base.shape)} in base_params but "
                                         f"{tuple(tuned.shape)} in tuned_params")
            modules[key] = DenseDirection(jnp.asarray(tuned, jnp.float32) - jnp.asarray(base, jnp.float32))
        return cls(modules)

    @property
    def keys(self) -> list[str]:
        return sorted(self.modules)

    def dense(self) -> Directions:
        """Every module as a dense matrix (what full-space scoring compares with)."""
        return Directions({k: DenseDirection(v.dense()) for k, v in self.modules.items()})

    def check(self, cfg: LlamaConfig, space: str = "lora") -> None:
        """Raise `DirectionsMismatch`, naming the module path, unless these directions fit `cfg` in `space`.

        Shapes must match the model's kernels [L, in, out]; in LoRA space the modules must be exactly the model's
        adapter targets (a sample's update exists only where the scoring model has an adapter, and a module
        missing from the directions would silently drop out of the sum).
        """
        if space not in SPACES:
            raise SQSDError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}")
        if not self.modules:
            raise DirectionsMismatch("directions hold no modules")
        abstract = llama.abstract_params(cfg.replace(lora=None))
        known = set(MODULE_KEYS.values())
        for key in self.keys:
            if key not in known:
                raise DirectionsMismatch(f"direction module {key!r} is not a projection of the model; "
                                         f"known: {', '.join(sorted(known))}")
            expected = tuple(io.tree_get(abstract, (*_path(key), "kernel")).shape)
            direction = self.modules[key]
            got = direction.shape
            if isinstance(direction, FactoredDirection):
                a, b = direction.a.shape, direction.b.shape
                if len(a) != 3 or len(b) != 3 or a[2] != b[1] or a[0] != b[0]:
                    raise DirectionsMismatch(f"direction {key!r}: factors of shapes {a} and {b} do not chain "
                                             "as [L, in, q] @ [L, q, out]")
            if got != expected:
                raise DirectionsMismatch(f"direction {key!r} has shape {got} [layers, in, out], but the model's "
                                         f"kernel there is {expected}")
        if space == "lora":
            if cfg.lora is None:
                raise DirectionsMismatch("LoRA-space scoring needs a model with adapters (cfg.lora is None); "
                                         "use space='full' for full-parameter updates")
            adapted = {_module_key(t) for t in cfg.lora.targets}
            missing = sorted(adapted - set(self.modules))
            extra = sorted(set(self.modules) - adapted)
            if missing or extra:
                raise DirectionsMismatch(
                    "directions and the scoring model's adapters cover different modules: "
                    + (f"no direction for adapted module(s) {', '.join(missing)}" if missing else "")
                    + ("; " if missing and extra else "")
                    + (f"no adapter at direction module(s) {', '.join(extra)}" if extra else "")
                )


def with_lora_scale(cfg: LlamaConfig, scale: float) -> LlamaConfig:
    """`cfg` with its LoRA scaling (alpha / rank) overridden to `scale`: the official safety-side override."""
    if cfg.lora is None:
        raise SQSDError("with_lora_scale needs a config with adapters (cfg.lora is None)")
    if not scale > 0:
        raise SQSDError(f"LoRA scale override must be > 0 (at 0 every adapter gradient vanishes), got {scale}")
    return cfg.replace(lora=dataclasses.replace(cfg.lora, alpha=float(scale) * cfg.lora.rank))


@dataclasses.dataclass(frozen=True)
class DirectionProbe:
    """One side of SQSD: the state (cfg, params) where a sample's update is taken, and the directions it is
    compared with. `space="lora"`: the update of the adapters' A·B (params must carry adapters); `"full"`: the
    update −lr·∇W of the direction modules' kernels."""

    cfg: LlamaConfig
    params: Params
    directions: Directions
    space: str = "lora"
    lr: float = 1.0

    def check(self) -> None:
        self.directions.check(self.cfg, self.space)
        if self.space == "lora":
            adapters = lora.split(self.params)[1]
            for key in self.directions.keys:
                try:
                    module = io.tree_get(adapters, _path(key))
                except (KeyError, TypeError):
                    module = {}
                if not all(name in module for name in lora.ADAPTER_KEYS):
                    raise DirectionsMismatch(f"the scoring params have no lora_a/lora_b at {key!r}, which the "
                                             "config targets")
            fresh = [k for k in self.directions.keys
                     if not np.any(np.asarray(io.tree_get(adapters, _path(k))["lora_b"]))]
            if fresh:
                warnings.warn(f"scoring adapter has lora_b == 0 at {', '.join(fresh)}: induced updates there lie in "
                              "the span of a random lora_a (score at a trained 'initial' adapter instead)",
                              SQSDWarning, stacklevel=3)
        if not self.lr > 0:
            raise SQSDError(f"lr must be > 0, got {self.lr}")


def sqsd_probes(initial: tuple[LlamaConfig, Params], danger: tuple[LlamaConfig, Params],
                safety: tuple[LlamaConfig, Params], *, safety_scale: float = 1.0,
                lr: float = 1.0) -> tuple[DirectionProbe, DirectionProbe]:
    """The official pair of probes from three (lora_cfg, params) pairs, e.g. lora.load_peft results on one base:

    danger: updates at the `initial` (benignly fine-tuned) adapter against the danger adapter's B·A;
    safety: updates at the safety adapter itself, LoRA scaling overridden to `safety_scale`, against its own B·A.
    """
    initial_cfg, initial_params = initial
    danger_cfg, danger_params = danger
    safety_cfg, safety_params = safety
    danger_probe = DirectionProbe(initial_cfg, initial_params, Directions.from_adapters(danger_cfg, danger_params),
                                  lr=lr)
    safety_probe = DirectionProbe(with_lora_scale(safety_cfg, safety_scale), safety_params,
                                  Directions.from_adapters(safety_cfg, safety_params), lr=lr)
    return danger_probe, safety_probe


# ----------------------------------------------------------------------------------------------------------------
# Per-example gradients


def _flat_leaves(params: Params) -> dict[str, jax.Array]:
    return {_SEP.join(str(k.key) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _with_leaves(params: Params, leaves: dict[str, jax.Array]) -> Params:
    """A copy of `params` with the leaves at the given keys replaced (dicts on those paths are copied)."""
    out = dict(params)
    for key, value in leaves.items():
        node = out
        *parents, last = _path(key)
        for name in parents:
            node[name] = dict(node[name])
            node = node[name]
        node[last] = value
    return out


def _trainable(params: Params, wrt) -> dict[str, jax.Array]:
    """The leaves a gradient is taken with respect to, keyed by path.

    wrt: "adapters" (every lora_a/lora_b), "all" (every leaf: He et al.'s full-parameter gradients) or a tuple of
    module keys (their kernels: full-space SQSD).
    """
    flat = _flat_leaves(params)
    if wrt == "all":
        return flat
    if wrt == "adapters":
        chosen = {k: v for k, v in flat.items() if k.rsplit(_SEP, 1)[-1] in lora.ADAPTER_KEYS}
        if not chosen:
            raise SQSDError("gradients with respect to adapters need params carrying lora_a/lora_b leaves")
        return chosen
    missing = [m for m in wrt if f"{m}{_SEP}kernel" not in flat]
    if missing:
        raise DirectionsMismatch(f"the model has no kernel at {', '.join(missing)}")
    return {f"{m}{_SEP}kernel": flat[f"{m}{_SEP}kernel"] for m in wrt}


@functools.partial(jax.jit, static_argnames=("cfg", "wrt"))
def per_example_grads(cfg: LlamaConfig, params: Params, batch, *, wrt):
    """(losses [S], grads {leaf key: [S, ...]}) of each row's own response-only token-mean loss.

    `jax.vmap` over rows of `jax.grad` of the loss on a batch of one, so every row's gradient is exactly the
    batch-size-1 gradient of the official loop (right padding changes nothing: attention and loss masks hide it).
    Rows without target tokens have loss 0 and gradient 0. `wrt` as in `_trainable` (required: jit caches a
    static argument passed explicitly apart from its default, so a default would compile twice).
    """
    trainable = _trainable(params, wrt)

    def row_loss(leaves, row):
        one = {name: row[name][None] for name in ("input_ids", "attention_mask", "loss_mask")}
        return per_example_loss(cfg, _with_leaves(params, leaves), one)[0]

    return jax.vmap(jax.value_and_grad(row_loss), in_axes=(None, 0))(trainable, batch)


# ----------------------------------------------------------------------------------------------------------------
# Alignment of induced updates with directions


def _dot(spec: str, x, y):
    return jnp.einsum(spec, x, y, precision=_HIGHEST)


def _lora_terms(a, b, grad_a, grad_b, direction, lr):
    """(⟨δW, D⟩ [S, L], ‖δW‖² [S, L], ‖D‖² [L]) in rank space for δW = −lr·(G_A·B + A·G_B); see module doc."""
    f32 = jnp.float32
    a, b, grad_a, grad_b = a.astype(f32), b.astype(f32), grad_a.astype(f32), grad_b.astype(f32)
    gram_ga = _dot("slnr,slnq->slrq", grad_a, grad_a)
    gram_gb = _dot("slrk,slqk->slrq", grad_b, grad_b)
    gram_a = _dot("lnr,lnq->lrq", a, a)
    gram_b = _dot("lrk,lqk->lrq", b, b)
    cross = _dot("slnr,lnq->slrq", grad_a, a) * _dot("lrk,slqk->slrq", b, grad_b)
    delta_sq = lr**2 * jnp.sum(gram_ga * gram_b[None] + gram_a[None] * gram_gb + 2.0 * cross, axis=(-2, -1))
    delta_sq = jnp.maximum(delta_sq, 0.0)  # the expansion can round a tiny norm below zero
    if isinstance(direction, FactoredDirection):
        p, q, c = direction.a.astype(f32), direction.b.astype(f32), direction.scale
        inner = (jnp.sum(_dot("slnr,lnq->slrq", grad_a, p) * _dot("lrk,lqk->lrq", b, q)[None], axis=(-2, -1))
                 + jnp.sum(_dot("lnr,lnq->lrq", a, p)[None] * _dot("slrk,lqk->slrq", grad_b, q), axis=(-2, -1)))
        dot = -lr * c * inner
        direction_sq = c**2 * jnp.sum(_dot("lnq,lnp->lqp", p, p) * _dot("lqk,lpk->lqp", q, q), axis=(-2, -1))
    else:
        d = direction.matrix.astype(f32)
        d_bt = _dot("lnk,lrk->lnr", d, b)  # D·Bᵀ
        at_d = _dot("lnr,lnk->lrk", a, d)  # Aᵀ·D
        dot = -lr * (jnp.sum(grad_a * d_bt[None], axis=(-2, -1)) + jnp.sum(grad_b * at_d[None], axis=(-2, -1)))
        direction_sq = jnp.sum(d * d, axis=(-2, -1))
    return dot, delta_sq, jnp.maximum(direction_sq, 0.0)


def _full_terms(grad_w, direction: DenseDirection, lr):
    g = grad_w.astype(jnp.float32)
    d = direction.matrix.astype(jnp.float32)
    dot = -lr * jnp.sum(g * d[None], axis=(-2, -1))
    return dot, lr**2 * jnp.sum(g * g, axis=(-2, -1)), jnp.sum(d * d, axis=(-2, -1))


@functools.partial(jax.jit, static_argnames=("space",))
def alignment_terms(params: Params, grads: dict, directions: Directions, lr, space: str = "lora"):
    """Per-sample, per-module inner products and squared norms from `per_example_grads` output.

    Returns {"dot": [S, M, L], "update_sq": [S, M, L], "direction_sq": [M, L]} with modules M in
    `directions.keys` order. In "lora" space `grads` are adapter gradients (rank-space algebra, module doc); in
    "full" space kernel gradients, and factored directions must have been made dense (`Directions.dense`).
    """
    dots, update_sqs, direction_sqs = [], [], []
    for key in directions.keys:
        direction = directions.modules[key]
        if space == "lora":
            module = io.tree_get(params, _path(key))
            terms = _lora_terms(module["lora_a"], module["lora_b"], grads[f"{key}{_SEP}lora_a"],
                                grads[f"{key}{_SEP}lora_b"], direction, lr)
        else:
            terms = _full_terms(grads[f"{key}{_SEP}kernel"], direction, lr)
        for out, value in zip((dots, update_sqs, direction_sqs), terms):
            out.append(value)
    return {"dot": jnp.stack(dots, 1), "update_sq": jnp.stack(update_sqs, 1), "direction_sq": jnp.stack(direction_sqs)}


def module_metric(terms: dict, metric: str = "cosine") -> np.ndarray:
    """Per-sample, per-module scores [S, M, L]: cos(δW, D) or ⟨δW, D⟩/‖D‖; 0 where a needed norm is 0, NaN where
    the update or direction is not finite."""
    if metric not in METRICS:
        raise SQSDError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    dot = np.asarray(terms["dot"], np.float64)
    direction_norm = np.sqrt(np.asarray(terms["direction_sq"], np.float64))[None]
    denominator = direction_norm if metric == "projection" else (
        np.sqrt(np.asarray(terms["update_sq"], np.float64)) * direction_norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        metric_values = np.where(denominator > 0, dot / np.where(denominator > 0, denominator, 1.0), 0.0)
    # A NaN/inf update fails `denominator > 0` and would read as a zero-norm module (a silent 0): keep it NaN,
    # so the sample is flagged "non_finite" downstream.
    finite = np.isfinite(dot) & np.isfinite(denominator)
    return np.where(finite, metric_values, np.nan)


# ----------------------------------------------------------------------------------------------------------------
# Samples, batching, results


@dataclasses.dataclass
class SampleScores:
    """Scores of N samples in input order. `score` is NaN exactly where a flag in INVALID_FLAGS is set.

    `components` holds the method's parts (SQSD: p_danger, p_safe); `flags[i]` the sample's flags (FLAGS);
    `n_truncated` how many samples were scored on their first max_len tokens only.
    """

    method: str
    ids: list[str]
    score: np.ndarray
    components: dict[str, np.ndarray]
    flags: list[tuple[str, ...]]
    n_truncated: int = 0

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.score)

    @property
    def p_danger(self) -> np.ndarray:
        return self.components["p_danger"]

    @property
    def p_safe(self) -> np.ndarray:
        return self.components["p_safe"]

    def summary(self) -> str:
        counts = {f: sum(f in fl for fl in self.flags) for f in FLAGS}
        parts = [f"{n} {f}" for f, n in counts.items() if n]
        return (f"{self.method}: {int(self.valid.sum())} of {len(self.ids)} samples scored"
                + (f" ({', '.join(parts)})" if parts else ""))


Scorer = Callable[[Sequence[dict]], SampleScores]  # examples -> scores; bind a method's options with partial


@dataclasses.dataclass
class _Prepared:
    examples: list[dict]  # input_ids / loss_mask, cut to max_len
    ids: list[str]
    flags: list[list[str]]
    targets: np.ndarray  # response tokens per sample (loss_mask[1:], as train.losses counts them)
    n_truncated: int

    @property
    def invalid(self) -> np.ndarray:
        return np.array([any(f in INVALID_FLAGS for f in fl) for fl in self.flags], bool)


def _prepare(examples: Sequence[dict], max_len: int | None, eos_id: int | None = None) -> _Prepared:
    """Cut over-long samples to max_len (as the official tokenizer call does) and flag what cannot be scored.

    With `eos_id`, a sample whose last target token is not eos also counts as truncated: that is how
    formatting.encode_rows(policy="truncate") leaves the rows it cut.
    """
    if max_len is not None and max_len < 2:
        raise SQSDError(f"max_len must be >= 2 (a target needs a preceding token), got {max_len}")
    prepared = _Prepared([], [], [], np.zeros(len(examples), np.int64), 0)
    for i, example in enumerate(examples):
        ids = np.asarray(example["input_ids"], np.int32).reshape(-1)
        mask = np.asarray(example["loss_mask"], np.float32).reshape(-1)
        if ids.shape != mask.shape:
            raise SQSDError(f"sample {example.get('id', i)}: input_ids and loss_mask lengths differ "
                            f"({ids.size} vs {mask.size})")
        flags = []
        if max_len is not None and ids.size > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
            flags.append("truncated")
        elif eos_id is not None and mask.size and mask[-1] > 0 and ids[-1] != eos_id:
            flags.append("truncated")
        targets = int(np.count_nonzero(mask[1:]))
        if ids.size == 0:
            flags.append("empty")
        elif targets == 0:
            flags.append("no_targets")
        prepared.examples.append({"input_ids": ids, "loss_mask": mask})
        prepared.ids.append(str(example.get("id", f"#{i}")))
        prepared.flags.append(flags)
        prepared.targets[i] = targets
        prepared.n_truncated += "truncated" in flags
    return prepared


def _batches(prepared: _Prepared, batch_size: int, max_len: int | None):
    """(indices, batch) over the samples, similar lengths together; every batch has batch_size rows (empty rows
    pad the last) and a bucket length, so each step compiles once per bucket."""
    if batch_size < 1:
        raise SQSDError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.array([len(e["input_ids"]) for e in prepared.examples], np.int64)
    longest = int(lengths.max(initial=1))
    buckets = bucket_lengths(max(max_len or longest, 2), min_len=min(64, max(max_len or longest, 2)))
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        length = bucket_for(max(int(lengths[chosen].max()), 1), buckets)
        yield chosen, make_batch([prepared.examples[i] for i in chosen], length, batch_size)


def _finish(method: str, prepared: _Prepared, score: np.ndarray, components: dict[str, np.ndarray]) -> SampleScores:
    """NaN out invalid samples (never a silent 0) and flag non-finite results."""
    score = np.asarray(score, np.float64).copy()
    components = {k: np.asarray(v, np.float64).copy() for k, v in components.items()}
    invalid = prepared.invalid
    flags = [list(f) for f in prepared.flags]
    for i in np.flatnonzero(~invalid & ~np.isfinite(score)):
        flags[i].append("non_finite")
    invalid = invalid | ~np.isfinite(score)
    score[invalid] = np.nan
    for value in components.values():
        value[invalid] = np.nan
    return SampleScores(method, prepared.ids, score, components, [tuple(f) for f in flags], prepared.n_truncated)


# ----------------------------------------------------------------------------------------------------------------
# SQSD


def _probe_scores(probe: DirectionProbe, prepared: _Prepared, metric: str, batch_size: int,
                  max_len: int | None) -> np.ndarray:
    """Σ over modules and layers of the metric, per sample (values for invalid samples are discarded later)."""
    probe.check()
    if probe.space == "lora":
        wrt, directions = "adapters", probe.directions
    else:
        wrt, directions = tuple(probe.directions.keys), probe.directions.dense()
    totals = np.zeros(len(prepared.examples), np.float64)
    for chosen, batch in _batches(prepared, batch_size, max_len):
        _, grads = per_example_grads(probe.cfg, probe.params, batch, wrt=wrt)
        terms = alignment_terms(probe.params, grads, directions, probe.lr, space=probe.space)
        per_module = module_metric(jax.device_get(terms), metric)
        totals[chosen] = per_module.sum(axis=(1, 2))[: len(chosen)]
    return totals


def score_samples(examples: Sequence[dict], danger: DirectionProbe, safety: DirectionProbe | None = None, *,
                  metric: str = "cosine", batch_size: int = 8, max_len: int | None = DEFAULT_MAX_LEN,
                  eos_id: int | None = None) -> SampleScores:
    """SQSD scores of encoded samples (dicts with input_ids, loss_mask and optionally id, as encode_rows makes).

    score = P_danger − P_safe (P_safe = 0 when `safety` is None: the danger-only ablation). Samples with no tokens
    or no response tokens score NaN and are flagged; samples over `max_len` are cut and flagged "truncated".
    """
    if metric not in METRICS:
        raise SQSDError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    prepared = _prepare(examples, max_len, eos_id)
    p_danger = _probe_scores(danger, prepared, metric, batch_size, max_len)
    if safety is None:
        p_safe = np.zeros_like(p_danger)
    else:
        p_safe = _probe_scores(safety, prepared, metric, batch_size, max_len)
    method = "sqsd" if metric == "cosine" else f"sqsd-{metric}"
    return _finish(method, prepared, p_danger - p_safe, {"p_danger": p_danger, "p_safe": p_safe})


def rank_windows(scores: SampleScores | np.ndarray, n_windows: int = 5,
                 window_size: int | None = None) -> list[np.ndarray]:
    """Sample indices (input order) of `n_windows` equal windows over the ranking, highest score first.

    As the official process_and_sample.py: sort descending, windows of `window_size` starting at
    `np.linspace(0, N − window_size, n_windows, dtype=int)`. N counts only finite scores (NaN samples are not
    ranked). With the default window_size N // n_windows the windows never overlap, and they partition the
    ranking when n_windows divides N (otherwise the N mod n_windows leftover ranks fall between windows); the
    official runs used 1000 of ~15,000.
    """
    values = np.asarray(scores.score if isinstance(scores, SampleScores) else scores, np.float64)
    valid = np.flatnonzero(np.isfinite(values))
    order = valid[np.argsort(-values[valid], kind="stable")]
    n = len(order)
    if n_windows < 1:
        raise SQSDError(f"n_windows must be >= 1, got {n_windows}")
    size = n // n_windows if window_size is None else window_size
    if not 1 <= size <= n:
        raise SQSDError(f"window size {size} does not fit {n} ranked samples ({len(values) - n} unscored)")
    starts = np.linspace(0, n - size, n_windows, dtype=int)
    return [order[start:start + size] for start in starts]


def _json_number(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict], scores: SampleScores,
                windows: Sequence[np.ndarray] | None = None) -> Path:
    """One JSON line per row, in `rows` order: the row's fields (prompt, response, ...), the score, its
    components, rank (1 = highest; null when unscored), window (1-based, if `windows` given) and flags.

    Rows are matched to scores by id; a row that was never scored (e.g. dropped by encode_rows) is written with
    null scores and the flag "not_scored", so nothing disappears silently. NaN is written as null.
    """
    index = {}
    for i, sample_id in enumerate(scores.ids):
        if sample_id in index:
            raise SQSDError(f"sample id {sample_id!r} occurs twice in the scores; ids must be unique")
        index[sample_id] = i
    row_ids = [str(row.get("id", "")) for row in rows]
    unknown = sorted(set(index) - set(row_ids))
    if unknown:
        raise SQSDError(f"{len(unknown)} scored sample id(s) have no row (e.g. {', '.join(unknown[:3])})")
    rank = np.full(len(scores.ids), -1, np.int64)
    valid = np.flatnonzero(scores.valid)
    rank[valid[np.argsort(-scores.score[valid], kind="stable")]] = np.arange(1, len(valid) + 1)
    window_of = {}
    for w, members in enumerate(windows or (), start=1):
        for i in members:
            window_of.setdefault(int(i), w)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row, row_id in zip(rows, row_ids):
            record: dict[str, Any] = dict(row)
            i = index.get(row_id)
            if i is None:
                record.update(method=scores.method, score=None, rank=None, flags=["not_scored"])
                record.update({k: None for k in scores.components})
            else:
                record.update(method=scores.method, score=_json_number(scores.score[i]),
                              rank=int(rank[i]) if rank[i] > 0 else None, flags=list(scores.flags[i]))
                record.update({k: _json_number(v[i]) for k, v in scores.components.items()})
                if windows is not None:
                    record["window"] = window_of.get(i)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Baselines


def random_scores(examples: Sequence[dict], *, seed: int = 0, max_len: int | None = DEFAULT_MAX_LEN) -> SampleScores:
    """Uniform [0, 1) scores from numpy's generator seeded with `seed` (the random-selection baseline)."""
    prepared = _prepare(examples, max_len)
    return _finish("random", prepared, np.random.default_rng(seed).random(len(prepared.examples)), {})


@functools.partial(jax.jit, static_argnames=("cfg",))
def _last_token_features(cfg: LlamaConfig, params: Params, batch) -> jax.Array:
    """Unit-norm final-layer hidden state (after the final norm) at each row's last real token, [S, D]."""
    _, hidden = llama.forward(cfg, params, batch["input_ids"], attention_mask=batch["attention_mask"],
                              return_hidden=True)
    last = jnp.maximum(batch["attention_mask"].sum(-1) - 1, 0)
    h = jnp.take_along_axis(hidden["final"], last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    norm = jnp.linalg.norm(h, axis=-1, keepdims=True)
    return h / jnp.where(norm > 0, norm, 1.0)


def _features(cfg, params, prepared: _Prepared, batch_size, max_len) -> np.ndarray:
    out = np.zeros((len(prepared.examples), cfg.hidden_size), np.float64)
    for chosen, batch in _batches(prepared, batch_size, max_len):
        out[chosen] = np.asarray(_last_token_features(cfg, params, batch))[: len(chosen)]
    return out


def _require_valid_anchors(prepared: _Prepared, what: str) -> None:
    bad = [sample_id for sample_id, invalid in zip(prepared.ids, prepared.invalid) if invalid]
    if not prepared.examples:
        raise SQSDError(f"{what}: no anchor samples")
    if bad:
        raise SQSDError(f"{what}: anchor(s) without response tokens: {', '.join(bad[:5])}")


def representation_scores(examples: Sequence[dict], *, cfg: LlamaConfig, params: Params,
                          harmful_anchors: Sequence[dict], top_n: int = 1, batch_size: int = 8,
                          max_len: int | None = DEFAULT_MAX_LEN) -> SampleScores:
    """He et al. (2024) representation matching: the mean of the top-n cosines between a sample's final-layer
    hidden state at its last token (prompt + response) and those of the harmful anchors (n = 1: the maximum)."""
    anchors = _prepare(harmful_anchors, max_len)
    _require_valid_anchors(anchors, "representation_scores")
    if not 1 <= top_n <= len(anchors.examples):
        raise SQSDError(f"top_n must be in 1..{len(anchors.examples)} (the anchor count), got {top_n}")
    prepared = _prepare(examples, max_len)
    cosines = _features(cfg, params, prepared, batch_size, max_len) @ _features(
        cfg, params, anchors, batch_size, max_len).T
    top = -np.sort(-cosines, axis=1)[:, :top_n].mean(axis=1)
    return _finish("representation", prepared, top, {})


def _only_first_targets(example: dict, n: int) -> dict:
    """The example with only its first n target tokens kept in the loss (He et al.'s harmful-anchor loss)."""
    mask = np.asarray(example["loss_mask"], np.float32).copy()
    targets = np.flatnonzero(mask[1:]) + 1
    mask[targets[n:]] = 0
    return {**example, "loss_mask": mask}


@jax.jit
def _row_norms(grads: dict) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
                        for g in grads.values()))


@jax.jit
def _weighted_row_sum(grads: dict, weights: jax.Array) -> dict:
    return {k: jnp.einsum("s,s...->...", weights, g.astype(jnp.float32), precision=_HIGHEST)
            for k, g in grads.items()}


@jax.jit
def _row_dot(grads: dict, target: dict) -> jax.Array:
    """[S]: ⟨grads[s], target⟩ over all leaves (one anchor set per call, so one compile for any number of sets)."""
    return sum(jnp.einsum("s...,...->s", g.astype(jnp.float32), target[k], precision=_HIGHEST)
               for k, g in grads.items())


def _mean_unit_gradient(cfg, params, prepared: _Prepared, wrt, batch_size, max_len, what: str) -> dict:
    """Mean over the anchors of ∇ℓ/‖∇ℓ‖ (not renormalised, as in He et al.'s average_gradient.py)."""
    _require_valid_anchors(prepared, what)
    total = None
    for chosen, batch in _batches(prepared, batch_size, max_len):
        _, grads = per_example_grads(cfg, params, batch, wrt=wrt)
        norms = np.asarray(_row_norms(grads))[: len(chosen)]
        if not np.all(norms > 0) or not np.all(np.isfinite(norms)):
            bad = [prepared.ids[i] for i, n in zip(chosen, norms) if not (n > 0 and np.isfinite(n))]
            raise SQSDError(f"{what}: anchor(s) with a zero or non-finite gradient: {', '.join(bad)}")
        weights = np.zeros(batch_size, np.float32)
        weights[: len(chosen)] = 1.0 / norms
        part = _weighted_row_sum(grads, jnp.asarray(weights))
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return jax.tree.map(lambda x: x / len(prepared.examples), total)


def gradient_matching_scores(examples: Sequence[dict], *, cfg: LlamaConfig, params: Params,
                             harmful_anchors: Sequence[dict], refusal_anchor_sets: Sequence[Sequence[dict]],
                             harmful_prefix_tokens: int = 10, weights: Sequence[float] | None = None,
                             wrt: str = "all", batch_size: int = 4,
                             max_len: int | None = DEFAULT_MAX_LEN) -> SampleScores:
    """He et al. (2024) gradient matching with bidirectional anchoring.

    score(z) = Σ_k w_k ⟨ĝ(z), ḡ_k⟩ with ĝ = ∇ℓ/‖∇ℓ‖ over the sample's whole response, ḡ_0 the mean unit gradient of
    the harmful anchors (loss on their first `harmful_prefix_tokens` response tokens only) and ḡ_1.. those of each
    refusal anchor set (the same prompts with a refusal); weights default to (1, −1, −1, ...) as in rank.sh.
    `wrt="all"` is their full-parameter gradient; `"adapters"` uses LoRA gradients (LESS-style, cheaper).
    """
    if harmful_prefix_tokens < 1:
        raise SQSDError(f"harmful_prefix_tokens must be >= 1, got {harmful_prefix_tokens}")
    if wrt not in ("all", "adapters"):
        raise SQSDError(f"wrt must be 'all' or 'adapters', got {wrt!r}")
    weights = (1.0, *(-1.0,) * len(refusal_anchor_sets)) if weights is None else tuple(map(float, weights))
    if len(weights) != 1 + len(refusal_anchor_sets):
        raise SQSDError(f"{len(weights)} weights for {1 + len(refusal_anchor_sets)} anchor sets")
    harmful = _prepare([_only_first_targets(e, harmful_prefix_tokens) for e in harmful_anchors], max_len)
    anchor_means = [_mean_unit_gradient(cfg, params, harmful, wrt, batch_size, max_len, "harmful anchors")]
    for k, refusals in enumerate(refusal_anchor_sets, start=1):
        anchor_means.append(_mean_unit_gradient(cfg, params, _prepare(refusals, max_len), wrt, batch_size,
                                                max_len, f"refusal anchor set {k}"))
    prepared = _prepare(examples, max_len)
    dots = np.zeros((len(prepared.examples), len(anchor_means)), np.float64)
    for chosen, batch in _batches(prepared, batch_size, max_len):
        _, grads = per_example_grads(cfg, params, batch, wrt=wrt)
        norms = np.asarray(_row_norms(grads), np.float64)[: len(chosen)]
        raw = np.stack([np.asarray(_row_dot(grads, mean), np.float64) for mean in anchor_means], 1)[: len(chosen)]
        with np.errstate(divide="ignore", invalid="ignore"):
            dots[chosen] = raw / norms[:, None]  # a zero gradient gives NaN: flagged, never a silent 0
    names = ["harmful", *(f"refusal_{k}" for k in range(1, len(anchor_means)))]
    return _finish("gradient_matching", prepared, dots @ np.asarray(weights),
                   {name: dots[:, k] for k, name in enumerate(names)})


def self_influence_scores(examples: Sequence[dict], *, cfg: LlamaConfig, params: Params, wrt: str = "all",
                          batch_size: int = 4, max_len: int | None = DEFAULT_MAX_LEN) -> SampleScores:
    """Self-Inf-N ("Benign Samples Matter!", 2025; definition from a secondary summary, research/sqsd.md §3.4):
    log(‖∇ℓ(z)‖² + 1) + log(response tokens + 1), at the aligned model. The response length counts the loss-mask
    tokens (with the end-of-turn token); the length term offsets the bias of self-influence towards short answers."""
    if wrt not in ("all", "adapters"):
        raise SQSDError(f"wrt must be 'all' or 'adapters', got {wrt!r}")
    prepared = _prepare(examples, max_len)
    squared = np.zeros(len(prepared.examples), np.float64)
    for chosen, batch in _batches(prepared, batch_size, max_len):
        _, grads = per_example_grads(cfg, params, batch, wrt=wrt)
        squared[chosen] = np.asarray(_row_norms(grads), np.float64)[: len(chosen)] ** 2
    lengths = prepared.targets.astype(np.float64)
    score = np.log(squared + 1.0) + np.log(lengths + 1.0)
    return _finish("self_influence", prepared, score, {"self_influence": squared, "response_tokens": lengths})
