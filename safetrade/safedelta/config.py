"""Safe Delta settings, and how they split into compile-time structure and traced knobs.

`SafeDeltaConfig` holds every knob of the method (the rules themselves are described in `layer.py` and
docs/safedelta.md). Only what changes the shape of the compiled program is static: the mode, and in official
mode the block size, the lazy group and the layer batch. s, the damping, the exclusion and the ablation are
traced values (`traced_knobs`), so sweeping s (the paper's sensitivity study) or switching ablations reuses one
compiled function per kernel shape.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from safetrade.errors import SafetradeError

MODES = ("official", "paper")
ABLATIONS = (None, "no_compensation", "random", "magnitude")
OTHER_PARAMS = ("aligned", "finetuned")

# Which order entries are offered to the budget in (a traced switch: one program serves all three).
ORDER_RATIO, ORDER_RANDOM, ORDER_MAGNITUDE = 0, 1, 2


class SafeDeltaError(SafetradeError):
    """Bad Safe Delta input: mismatched trees, a missing or broken Hessian, a non-finite delta."""


@dataclasses.dataclass(frozen=True)
class SafeDeltaConfig:
    """Safe Delta settings; the defaults are the official run's (s = 0.1, 1 % damping, blocks of 2048, 15 %)."""

    s: float = 0.1  # budget scale (official CLI --scale default 0.1; its scripts use 0.1 or 0.11)
    mode: str = "official"
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    damp_limit: float = 1.0  # largest damping fraction the ×10 fallback may reach
    block_size: int = 2048  # official: input columns per selection block
    exclude_frac: float = 0.15  # official: fraction of each block's sorted entries that can never be selected
    lazy_group: int = 4  # official: columns per lazy OBS group
    ablation: str | None = None
    seed: int = 0  # for ablation="random"
    other_params: str = "aligned"  # leaves that are not edited: "aligned" (official) or "finetuned"
    layer_batch: int = 1  # stacked kernels: layers processed together (vmapped) inside lax.map; 1 = one at a time
    # > 0: stacked kernels and their Hessians stay in host memory and this many layers of one kernel at a time go
    # to the device (a multiple of layer_batch, so the layers are grouped as lax.map groups them); 0: whole stacks,
    # on whatever device the arrays are. Same numbers either way (tests/test_safedelta_stream.py).
    stream_layers: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise SafeDeltaError(f"Safe Delta mode {self.mode!r} is unknown; choose from {', '.join(MODES)}")
        if self.ablation not in ABLATIONS:
            raise SafeDeltaError(f"Safe Delta ablation {self.ablation!r} is unknown; choose from {ABLATIONS}")
        if self.other_params not in OTHER_PARAMS:
            raise SafeDeltaError(f"other_params={self.other_params!r}; choose 'aligned' or 'finetuned'")
        if self.s < 0 or self.damp < 0 or not 0 <= self.exclude_frac < 1:
            raise SafeDeltaError(f"need s >= 0, damp >= 0 and 0 <= exclude_frac < 1; got {self}")
        if self.damp > self.damp_limit:
            raise SafeDeltaError(f"damp={self.damp} exceeds damp_limit={self.damp_limit}")
        if self.block_size < 1 or self.lazy_group < 1 or self.layer_batch < 1:
            raise SafeDeltaError("block_size, lazy_group and layer_batch must be >= 1")
        if self.stream_layers < 0 or self.stream_layers % self.layer_batch:
            raise SafeDeltaError(f"stream_layers={self.stream_layers} must be 0 (off) or a positive multiple of "
                                 f"layer_batch={self.layer_batch}")


def static_structure(cfg: SafeDeltaConfig) -> SafeDeltaConfig:
    """cfg with every traced field reset to its default: the static (hashable) key of the compiled functions.

    Paper mode has no blocks or groups, so those are reset too.
    """
    if cfg.mode == "paper":
        return SafeDeltaConfig(mode="paper", layer_batch=cfg.layer_batch)
    return SafeDeltaConfig(mode=cfg.mode, block_size=cfg.block_size, lazy_group=cfg.lazy_group,
                           layer_batch=cfg.layer_batch)


def block_bounds(cols: int, block_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + block_size, cols)) for start in range(0, cols, block_size)]


def candidate_count(n: int, exclude_frac: float) -> int:
    """Entries of a block that may be selected: official `sorted[0:-int(exclude_frac*n)]`, in Python float64."""
    dropped = int(exclude_frac * n)
    if dropped == 0:
        # The official slice `sorted[0:-0]` is empty (n < 7 at 15 %): nothing can be selected. exclude_frac = 0
        # means "exclude nothing" here, which the official code never does.
        return 0 if exclude_frac > 0 else n
    return n - dropped


def traced_knobs(cfg: SafeDeltaConfig, kernel_shape) -> dict:
    """The traced settings for one kernel of shape [..., in, out]."""
    d_in, d_out = kernel_shape[-2:]
    # Paper mode ignores the candidate counts; its structure's default block size keeps the array's shape (and
    # so the compiled function) the same whatever block_size the caller's config carries.
    candidates = [candidate_count(d_out * (stop - start), cfg.exclude_frac)
                  for start, stop in block_bounds(d_in, static_structure(cfg).block_size)]
    return {
        "s": jnp.float32(cfg.s),
        "damp": jnp.float32(cfg.damp),
        "damp_limit": jnp.float32(cfg.damp_limit),
        "order": jnp.int32({"random": ORDER_RANDOM, "magnitude": ORDER_MAGNITUDE}.get(cfg.ablation, ORDER_RATIO)),
        "compensate": jnp.float32(cfg.ablation != "no_compensation"),
        "candidates": jnp.asarray(candidates, jnp.int32),  # per official block
    }
