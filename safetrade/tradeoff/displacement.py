"""θ − θ_s as Case II sees it: a hook that maps params to their displacement from the aligned point, and back.

    hook = anchored(aligned)                                   # full fine-tuning: params − aligned
    hook = lora_by_path({"dense/kernel": LoraPaths("dense/lora_a", "dense/lora_b", scale=2.0)})
    hook = lora_displacement(my_merged_deltas, {"dense": "dense/lora_b"})   # any LoRA: your ΔW, your B paths
    hook.of(params)              # a tree of float32 displacement leaves; ‖hook.of(params)‖ is the Case II distance
    hook.scale(params, factors)  # params whose displacement is factor · displacement, leaf by leaf

With LoRA the model is W + ΔW, ΔW = s·A·B ([in, out] kernels) or s·B·A (torch's [out, in]); the aligned point is
ΔW = 0, so the displacement is the merged update itself and the anchor is implicit. ΔW is linear in B: scaling B
by f scales ΔW by exactly f, which is how a LoRA run is brought back inside the ball without touching A.

Paths are the leaves' key paths joined with "/" ("hidden/kernel"), the `.value` under an NNX Variable left out: the
same string names a leaf of a nested dict (e.g. `nnx.to_pure_dict(state)`) and of the `nnx.State` itself, as in
safetrade's other packages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from safetrade.errors import SafetradeError
from safetrade.paths import leaves_by_path, path_string

_HIGHEST = jax.lax.Precision.HIGHEST  # fp32 products even where the default matmul precision is TF32/bf16
LAYOUTS = ("in_out", "out_in")


@dataclasses.dataclass(frozen=True)
class Displacement:
    """`of(params)`: the displacement θ − θ_s as a tree of float32 leaves. `scale(params, factors)`: params whose
    displacement is factors ⊙ displacement (`factors` has `of`'s structure, one scalar per leaf)."""

    of: Callable[[Any], Any]
    scale: Callable[[Any, Any], Any]


def _check_same_structure(params, anchor) -> None:
    if jax.tree.structure(params) == jax.tree.structure(anchor):
        return
    have, want = set(leaves_by_path(params)), set(leaves_by_path(anchor))
    raise SafetradeError(
        "params and the anchor differ in structure: "
        f"only in params: {sorted(have - want)[:5] or 'none'}; only in the anchor: {sorted(want - have)[:5] or 'none'}"
    )


def anchored(anchor) -> Displacement:
    """Full fine-tuning: the displacement is params − anchor (both trees of the same structure)."""

    def of(params):
        _check_same_structure(params, anchor)
        return jax.tree.map(lambda p, a: p.astype(jnp.float32) - a.astype(jnp.float32), params, anchor)

    def scale(params, factors):
        return jax.tree.map(lambda a, d, f: (a.astype(jnp.float32) + f * d).astype(a.dtype), anchor, of(params),
                            factors)

    return Displacement(of, scale)


def resolve(displacement: Displacement | None, anchor, what: str) -> Displacement:
    """The hook a Case II piece uses: the one given, else params − anchor."""
    if displacement is not None:
        return displacement
    if anchor is None:
        raise SafetradeError(f"{what}: no anchor: pass it as {what}(anchor, ...) or with each update "
                             f"(`tx.update(updates, state, params, anchor=aligned)`), or give a displacement hook")
    return anchored(anchor)


def lora_displacement(merged_deltas: Callable[[Any], Mapping[str, jax.Array]], b_paths: Mapping[str, str]):
    """Any LoRA parametrisation: `merged_deltas(params) -> {name: ΔW}` computes each adapted weight's merged
    update (linear in its B), and `b_paths[name]` is the path of that adapter's B in params."""
    b_paths = dict(b_paths)

    def of(params):
        deltas = dict(merged_deltas(params))
        if set(deltas) != set(b_paths):
            raise SafetradeError(f"lora displacement: merged_deltas gave {sorted(deltas)} but b_paths name "
                                 f"{sorted(b_paths)}; they must name the same adapters")
        return {name: jnp.asarray(d, jnp.float32) for name, d in deltas.items()}

    def scale(params, factors):
        leaves = leaves_by_path(params)
        missing = sorted(p for p in b_paths.values() if p not in leaves)
        if missing:
            raise SafetradeError(f"lora displacement: params have no leaf {missing[0]!r} (a B path); "
                                 f"paths present: {', '.join(sorted(leaves)[:8])}")
        factor_at = {b_paths[name]: factors[name] for name in b_paths}

        def shrink(key_path, leaf):
            factor = factor_at.get(path_string(key_path))
            return leaf if factor is None else (leaf.astype(jnp.float32) * factor).astype(leaf.dtype)

        return jax.tree_util.tree_map_with_path(shrink, params)

    return Displacement(of, scale)


@dataclasses.dataclass(frozen=True)
class LoraPaths:
    """One adapter: the paths of its A and B, its scale s (e.g. alpha / rank) and the layout of the weight it adapts:
    "in_out" (Flax): ΔW = s·A·B, A [..., in, r], B [..., r, out]; "out_in" (torch): ΔW = s·B·A, B [..., out, r],
    A [..., r, in]. Leading dimensions (stacked layers) are batch dimensions."""

    a: str
    b: str
    scale: float
    layout: str = "in_out"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise SafetradeError(f"LoraPaths({self.a!r}, ...): layout {self.layout!r}; choose {' or '.join(LAYOUTS)}")


def merged_delta(a: jax.Array, b: jax.Array, scale: float, layout: str = "in_out") -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if layout == "in_out":
        return scale * jnp.einsum("...ir,...ro->...io", a, b, precision=_HIGHEST)
    return scale * jnp.einsum("...or,...ri->...oi", b, a, precision=_HIGHEST)


def _rank_mismatch(name: str, spec: LoraPaths, a, b) -> str | None:
    rank_a, rank_b = (a.shape[-1], b.shape[-2]) if spec.layout == "in_out" else (a.shape[-2], b.shape[-1])
    if a.ndim < 2 or b.ndim < 2 or a.shape[:-2] != b.shape[:-2] or rank_a != rank_b:
        return (f"lora adapter {name!r}: A {spec.a!r} {tuple(a.shape)} and B {spec.b!r} {tuple(b.shape)} do not "
                f"make a rank-r product in layout {spec.layout!r}")
    return None


def lora_by_path(adapters: Mapping[str, LoraPaths | tuple]) -> Displacement:
    """LoRA params read by path: `{name: LoraPaths(a_path, b_path, scale, layout)}` (or plain tuples in that order),
    whatever made them. `name` labels the adapter in the displacement tree (e.g. the adapted kernel's path)."""
    specs = {name: spec if isinstance(spec, LoraPaths) else LoraPaths(*spec) for name, spec in adapters.items()}
    if not specs:
        raise SafetradeError("lora_by_path: no adapters given")

    def merged_deltas(params):
        leaves = leaves_by_path(params)
        out = {}
        for name, spec in specs.items():
            for path in (spec.a, spec.b):
                if path not in leaves:
                    raise SafetradeError(f"lora adapter {name!r}: params have no leaf {path!r}; paths present: "
                                         f"{', '.join(sorted(leaves)[:8])}")
            a, b = leaves[spec.a], leaves[spec.b]
            problem = _rank_mismatch(name, spec, a, b)
            if problem:
                raise SafetradeError(problem)
            out[name] = merged_delta(a, b, spec.scale, spec.layout)
        return out

    return lora_displacement(merged_deltas, {name: spec.b for name, spec in specs.items()})
