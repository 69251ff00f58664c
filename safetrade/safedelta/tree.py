"""Safe Delta over a whole parameter tree: any two pytrees of the same structure, kernels picked by path.

    params, report = safe_delta(aligned, finetuned, hessians, SafeDeltaConfig(s=0.1))

Path strings join a leaf's keys with "/" ("encoder/dense/kernel"; an nnx.State leaf's trailing `.value` is not
part of it). `hessians` maps a kernel's path to its input Hessian H = (2/N) Σ XᵀX ([in, in], or [L, in, in] for a
kernel stacked as [L, in, out]); `collect_hessians` (hessians.py) produces such a mapping for any Flax NNX model.
Which leaves are edited: every leaf with a Hessian by default, or those `kernels` names (a regex matched in full
against the paths of the leaves with at least two axes, a predicate over path strings, or a sequence of paths,
which also fixes the order: the per-kernel keys of ablation="random" are drawn in that order). Every other leaf
comes from the aligned tree (official behaviour) or, with cfg.other_params="finetuned", from the fine-tuned one.

`layout` says how a kernel maps inputs to outputs: "in_out" for y = x @ W (Flax, W [in, out]) or "out_in" for
y = W x (torch, W [out, in]); a function of the path gives each kernel its own (a model mixing both). The
per-layer rules (layer.py) run on the [in, out] view either way, so an [out, in]
kernel gives the transposed result of its [in, out] transpose, bit for bit. Leading axes beyond the last two are
layers ([L, in, out] with [L, in, in] Hessians; several leading axes are flattened into one), run through
`lax.map` (cfg.layer_batch of them vmapped together).

With cfg.stream_layers = n > 0 a stacked kernel, its fine-tuned version and its Hessian are read in host memory
(numpy; device arrays are copied to the host first) and only n layers at a time are sent to the device, through
the same compiled per-layer program; the edited kernels come back as numpy arrays. A 7-8B model's aligned,
fine-tuned and Hessian trees (~100 GB in float32) then never have to fit on the device together.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safetrade.paths import leaves_by_path, path_string
from safetrade.safedelta.config import SafeDeltaConfig, SafeDeltaError, static_structure, traced_knobs
from safetrade.safedelta.layer import apply_layer, stacked_layers

LAYOUTS = ("in_out", "out_in")
LORA_LEAVES = ("lora_a", "lora_b")  # compared case-insensitively, so PEFT's lora_A / lora_B count too

Kernels = str | re.Pattern | Callable[[str], bool] | Sequence[str] | None


def _check_same_structure(aligned: dict, finetuned: dict) -> None:
    lora_leaves = sorted(p for p in finetuned if p.rsplit("/", 1)[-1].lower() in LORA_LEAVES)
    if lora_leaves:
        raise SafeDeltaError(
            f"fine-tuned params carry LoRA adapters ({lora_leaves[0]}, ...); merge them first "
            "(for safetrade's Llama: safetrade.models.lora.merge) so the delta is a plain kernel difference"
        )
    if aligned.keys() != finetuned.keys():
        only_a, only_f = sorted(aligned.keys() - finetuned.keys()), sorted(finetuned.keys() - aligned.keys())
        raise SafeDeltaError(
            "aligned and fine-tuned params differ in structure: "
            f"only in aligned: {only_a[:5] or 'none'}; only in fine-tuned: {only_f[:5] or 'none'}"
        )
    for path in aligned:
        if tuple(np.shape(aligned[path])) != tuple(np.shape(finetuned[path])):
            raise SafeDeltaError(f"{path}: aligned shape {tuple(np.shape(aligned[path]))} != fine-tuned shape "
                                 f"{tuple(np.shape(finetuned[path]))}")


def select_kernels(leaves: Mapping[str, Any], hessians: Mapping[str, Any], kernels: Kernels) -> list[str]:
    """The paths to edit, in order; an explicit path that is not a leaf, or a Hessian for no leaf, is an error."""
    if kernels is None:
        chosen = [path for path in leaves if path in hessians]
        unknown = sorted(set(hessians) - set(leaves))
        if unknown:
            raise SafeDeltaError(f"Hessians given for {unknown[:5]}, which are not leaves of the params "
                                 f"(some leaves: {list(leaves)[:5]})")
    elif isinstance(kernels, (str, re.Pattern)):
        pattern = re.compile(kernels)
        chosen = [path for path, leaf in leaves.items() if np.ndim(leaf) >= 2 and pattern.fullmatch(path)]
    elif callable(kernels):
        chosen = [path for path, leaf in leaves.items() if np.ndim(leaf) >= 2 and kernels(path)]
    else:
        chosen = list(kernels)
        missing = [path for path in chosen if path not in leaves]
        if missing:
            raise SafeDeltaError(f"{missing[0]}: not a leaf of the params (some leaves: {list(leaves)[:5]})")
    if not chosen:
        raise SafeDeltaError(f"no kernel selected (kernels={kernels!r}"
                             + (f"; Hessians for {sorted(hessians)[:5]})" if hessians else
                                f"; some leaves: {list(leaves)[:5]})"))
    return chosen


def hessian_name(hessians: Mapping[str, Any], path: str) -> str:
    """What the report calls the Hessian of `path`: a shared input's name where the mapping has one."""
    name_of = getattr(hessians, "name_of", None)
    return name_of(path) if name_of is not None else path


@jax.jit
def _finite_per_layer(x, minus=None):
    """[L] bools: layer l of x (or of x − minus, in float32) has only finite entries."""
    x = x.astype(jnp.float32) if minus is None else x.astype(jnp.float32) - minus.astype(jnp.float32)
    return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


def _finite_per_layer_on_host(x, minus=None) -> np.ndarray:
    """`_finite_per_layer` in numpy, one layer at a time (a float32 temporary of one layer, not of the stack)."""
    def finite(layer):
        v = x[layer].astype(np.float32) if minus is None else x[layer].astype(np.float32) - minus[layer].astype(
            np.float32)
        return bool(np.isfinite(v).all())

    return np.array([finite(layer) for layer in range(x.shape[0])], bool)


def _bad_layers(finite_per_layer) -> list[int]:
    return [int(i) for i in np.flatnonzero(~np.asarray(finite_per_layer))]


def as_in_out(kernel, layout: str):
    """A kernel in the [.., in, out] layout from `layout` ("in_out" or "out_in"); its own inverse."""
    if layout == "in_out":
        return kernel
    return np.swapaxes(kernel, -1, -2) if isinstance(kernel, np.ndarray) else jnp.swapaxes(kernel, -1, -2)


def _on_host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _checked_inputs(path: str, w_a, w_f, hessians: Mapping[str, Any], layout: str, on_host: bool = False):
    """(aligned, fine-tuned, Hessian) as [L, in, out], [L, in, out], [L, in, in], each checked, naming `path`;
    numpy arrays in host memory when `on_host` (checked there, layer by layer), else device arrays."""
    if np.ndim(w_a) < 2:
        raise SafeDeltaError(f"{path}: a kernel needs at least 2 axes, got shape {tuple(np.shape(w_a))}")
    name = hessian_name(hessians, path)
    to_array, finite_per_layer = (_on_host, _finite_per_layer_on_host) if on_host else (jnp.asarray,
                                                                                          _finite_per_layer)
    w_a, w_f = as_in_out(to_array(w_a), layout), as_in_out(to_array(w_f), layout)
    lead, d_in = w_a.shape[:-2], w_a.shape[-2]
    hessian = to_array(hessians[path])
    if tuple(hessian.shape) != (*lead, d_in, d_in):
        raise SafeDeltaError(f"Hessian {name!r} for {path} has shape {tuple(hessian.shape)}; expected "
                             f"{(*lead, d_in, d_in)} (layout={layout!r}: inputs are axis "
                             f"{-2 if layout == 'in_out' else -1} of the kernel)")
    layers = int(np.prod(lead, dtype=np.int64))
    w_a, w_f = w_a.reshape(layers, *w_a.shape[-2:]), w_f.reshape(layers, *w_f.shape[-2:])
    hessian = hessian.reshape(layers, d_in, d_in)
    bad = _bad_layers(finite_per_layer(hessian))
    if bad:
        raise SafeDeltaError(f"Hessian {name!r} for {path} has non-finite entries in layer(s) {bad}")
    bad = _bad_layers(finite_per_layer(w_f, w_a))
    if bad:
        raise SafeDeltaError(f"{path}: fine-tuned minus aligned has non-finite entries in layer(s) {bad}")
    return w_a, w_f, hessian, lead, name


def _run_rule(w_a, w_f, hessian, key, cfg: SafeDeltaConfig, stacked: bool):
    """The per-layer rule on [L, in, out] kernels: lax.map over layers, or one plain call for a single kernel
    (the program `apply_layer` runs, so a 2-D kernel costs no extra compilation). Stats come back on the host.

    With cfg.stream_layers = n the host arrays go to the device n layers at a time, each chunk through
    `stacked_layers` with the per-layer keys of the whole stack; n is a multiple of layer_batch, so every chunk
    groups its layers as lax.map groups the whole stack. The kernel comes back as a host array.
    """
    if not stacked:
        kernel, stats = apply_layer(w_a[0], w_f[0], hessian[0], cfg, key)
        kernel, stats = kernel[None], jax.tree.map(lambda v: jnp.asarray(v)[None], stats)
        return (_on_host(kernel) if cfg.stream_layers else kernel), jax.device_get(stats)
    keys = jax.random.split(key, w_a.shape[0])
    knobs, structure = traced_knobs(cfg, w_a.shape), static_structure(cfg)
    if not cfg.stream_layers:
        kernel, stats = stacked_layers(w_a, w_f, hessian, keys, knobs, structure)
        return kernel, jax.device_get(stats)
    kernel, chunks = np.empty(w_a.shape, w_a.dtype), []
    for start in range(0, w_a.shape[0], cfg.stream_layers):
        layers = slice(start, start + cfg.stream_layers)
        device = [jax.device_put(np.ascontiguousarray(x[layers])) for x in (w_a, w_f, hessian)]
        chunk, stats = stacked_layers(*device, keys[layers], knobs, structure)
        kernel[layers] = _on_host(chunk)
        chunks.append(jax.device_get(stats))
        del device, chunk  # this chunk's device buffers go before the next chunk's arrive
    return kernel, {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def _layer_stats(stats: dict, stacked: bool) -> dict:
    """JSON-ready stats: lists over layers for a stacked kernel, plain numbers for a single one."""
    out = {}
    for key, value in stats.items():
        if key != "factor_ok":
            values = np.asarray(value).tolist()
            out[key] = values if stacked else values[0]
    return out


def safe_delta(aligned, finetuned, hessians: Mapping[str, Any], cfg: SafeDeltaConfig = SafeDeltaConfig(), *,
               kernels: Kernels = None, layout: str | Callable[[str], str] = "in_out") -> tuple[Any, dict]:
    """Apply Safe Delta to the selected kernels of `finetuned`; returns (params, report).

    params has the structure of `aligned` (nested dicts, an nnx.State, any pytree); edited kernels keep their
    dtype, other leaves are those of cfg.other_params' tree. The report is JSON-ready: per kernel path, the
    stats of layer.py (lists over layers for stacked kernels) and the Hessian's name; the damping fallbacks;
    the overall kept fraction. See the module docstring for `kernels` and `layout`.
    """
    layout_of = layout if callable(layout) else lambda path: layout
    leaves_a, treedef = leaves_by_path(aligned), jax.tree.structure(aligned)
    leaves_f = leaves_by_path(finetuned)
    _check_same_structure(leaves_a, leaves_f)
    chosen = select_kernels(leaves_a, hessians, kernels)
    layouts = {path: layout_of(path) for path in chosen}
    bad = {path: value for path, value in layouts.items() if value not in LAYOUTS}
    if bad:
        path = next(iter(bad))
        raise SafeDeltaError(f"{path}: layout {bad[path]!r}; choose 'in_out' (y = x @ W) or 'out_in' (y = W x)")
    missing = [path for path in chosen if path not in hessians]
    if missing:  # before any layer is computed
        raise SafeDeltaError(f"no Hessian for {missing[0]}" + (f" (and {len(missing) - 1} more kernels)"
                             if len(missing) > 1 else "") + f"; have Hessians for {sorted(hessians)[:8]}")
    out = dict(leaves_a if cfg.other_params == "aligned" else leaves_f)
    base_key = jax.random.key(cfg.seed)
    report: dict[str, Any] = {"config": dataclasses.asdict(cfg), "kernels": {},
                              "damping_fallbacks": []}
    kept_entries = total_entries = 0.0

    for index, path in enumerate(chosen):
        w_a, w_f, hessian, lead, name = _checked_inputs(path, leaves_a[path], leaves_f[path], hessians,
                                                        layouts[path], on_host=bool(cfg.stream_layers))
        new_kernel, stats = _run_rule(w_a, w_f, hessian, jax.random.fold_in(base_key, index), cfg, bool(lead))
        failed = _bad_layers(stats["factor_ok"])
        if failed:
            raise SafeDeltaError(
                f"{path}: Hessian {name!r} could not be factorised in layer(s) {failed} even with damping "
                f"{cfg.damp_limit} × mean(diag H); check the calibration activations"
            )
        out[path] = as_in_out(new_kernel.reshape(*lead, *new_kernel.shape[-2:]), layouts[path])
        for layer, damping in enumerate(np.asarray(stats["damping"])):
            if damping > cfg.damp * (1 + 1e-6):
                report["damping_fallbacks"].append({"kernel": path, "layer": layer if lead else None,
                                                    "damping": float(damping)})
        report["kernels"][path] = {**_layer_stats(stats, bool(lead)), "hessian": name, "layout": layouts[path]}
        kept_entries += float(np.sum(stats["kept_fraction"])) * w_a[0].size
        total_entries += w_a.size

    report["kept_fraction"] = kept_entries / max(total_entries, 1.0)
    report["other_params"] = cfg.other_params
    return jax.tree_util.tree_unflatten(treedef, list(out.values())), report
