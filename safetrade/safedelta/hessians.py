"""Safety Hessians H = (2/N) Σ_n X_nᵀ X_n of the inputs of a model's linear layers, and their disk cache.

    hessians = collect_hessians(model, params, batches)                   # any Flax NNX model (or its GraphDef)
    hessians = collect_hessians(apply_fn, params, batches)                # apply_fn(params, batch) building NNX layers
    hessians = collect_hessians(None, params, batches, inputs_fn=fn)      # fn(params, batch) -> {path: activations}

The result maps each kernel's path to its Hessian (`KernelHessians`, what `safe_delta` takes). The model runs as
written (capture.py records its layers' inputs; no copy of its forward pass exists here), once per batch in one
jitted function, on the *aligned* params: every layer's inputs come from the aligned model. As in the official
code, every real token counts (the batch mask: `attention_mask` of a dict batch by default, `mask_fn` otherwise),
padding does not, and N counts sequences (mask rows with a real token); without a mask every row counts and N is
the batch's leading axis. Kernels reading the same input (q/k/v, gate/up) share one array; the report of
`safe_delta` names it after the first kernel that read it.

With `cache_dir`, the result is stored as hessians-<fingerprint>.safetensors, the fingerprint being a sha256 over
a description of the forward (the model's class, `call` / `apply_fn` / `inputs_fn` by name, and `cache_key`:
pass one when the forward depends on anything else, such as a config), every param's bytes and the batches; a
later call with the same inputs loads the file instead of running the model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from safetrade.paths import leaves_by_path
from safetrade.safedelta.capture import Capture, KERNEL_ATTRIBUTES, input_gram
from safetrade.safedelta.config import SafeDeltaError
from safetrade.safedelta.factor import HIGHEST

CACHE_VERSION = "safetrade-safedelta-hessians-v2"
# Modules with a `kernel` that are not y = x @ W over the last axis of their first argument: capture them with
# inputs_fn (a convolution's Hessian is over its patches, not its channels).
NOT_LINEAR = (nnx.Conv, nnx.ConvTranspose, nnx.Embed, nnx.Einsum, nnx.LinearGeneral)


class KernelHessians(Mapping):
    """Hessians by kernel path; kernels that read the same input share one array, named in `arrays`.

    `arrays`: {name: H}; `names`: {kernel path: name}. `self[path]` is arrays[names[path]].
    """

    def __init__(self, arrays: Mapping[str, Any], names: Mapping[str, str]):
        missing = sorted(set(names.values()) - set(arrays))
        if missing:
            raise SafeDeltaError(f"Hessian names {missing} are used by kernels but have no array")
        self.arrays = dict(arrays)
        self.names = dict(names)

    def __getitem__(self, path: str):
        return self.arrays[self.names[path]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def name_of(self, path: str) -> str:
        return self.names[path]

    def renamed(self, new_names: Mapping[str, str]) -> KernelHessians:
        """The same Hessians with arrays renamed old -> new (names not listed stay)."""
        rename = lambda name: new_names.get(name, name)  # noqa: E731
        return KernelHessians({rename(n): h for n, h in self.arrays.items()},
                              {path: rename(n) for path, n in self.names.items()})


def hessians_from_activations(activations, attention_mask=None) -> jax.Array:
    """H = (2/N) Σ_n X_nᵀ X_n (float32) for one linear input; X [B, T, d], N = sequences with a real token."""
    x = jnp.asarray(activations).astype(jnp.float32)
    mask = jnp.ones(x.shape[:2], jnp.float32) if attention_mask is None else jnp.asarray(attention_mask, jnp.float32)
    gram = jnp.einsum("btd,bte->de", x * mask[..., None], x, precision=HIGHEST)
    sequences = jnp.sum(jnp.any(mask > 0, axis=1))
    return 2.0 * gram / jnp.maximum(sequences, 1)


def batch_mask(batch):
    """The default mask_fn: a dict batch's `attention_mask`, else None (every row counts)."""
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def count_sequences(batch, mask_fn=batch_mask) -> int:
    """N contributed by one batch: mask rows with a real token, or the leading axis without a mask."""
    mask = mask_fn(batch)
    if mask is None:
        leaves = jax.tree.leaves(batch)
        if not leaves or np.ndim(leaves[0]) == 0:
            raise SafeDeltaError("a calibration batch without a mask needs a leading batch axis")
        return int(np.shape(leaves[0])[0])
    mask = np.asarray(mask)
    return int(np.sum(np.any(mask.reshape(mask.shape[0], -1) != 0, axis=1)))


def _selector(kernels) -> Callable[[str], bool]:
    if kernels is None:
        return lambda path: True
    if isinstance(kernels, (str, re.Pattern)):
        return re.compile(kernels).fullmatch
    if callable(kernels):
        return kernels
    chosen = frozenset(kernels)
    return chosen.__contains__


def _looks_linear(module) -> bool:
    if isinstance(module, NOT_LINEAR):
        return False
    return any(isinstance(getattr(module, a, None), nnx.Param) and np.ndim(getattr(module, a).get_value()) >= 2
               for a in KERNEL_ATTRIBUTES)


def linear_classes(model) -> list[type]:
    """The classes of the model's linear-like submodules: a 2-D (or stacked) `kernel` or `weight` Param."""
    return list(dict.fromkeys(type(m) for path, m in nnx.iter_modules(model) if path and _looks_linear(m)))


def _call_module(model, batch):
    return model(batch)


class _Step:
    """One batch's Σ XᵀX per group (jitted); `names` (kernel path -> group) is filled in when it is traced."""

    def __init__(self, target, call, selected, linear_types, mask_fn, inputs_fn):
        self.target, self.call, self.selected = target, call, selected
        self.linear_types, self.mask_fn, self.inputs_fn = linear_types, mask_fn, inputs_fn
        self.names: dict[str, str] | None = None
        self.jitted = jax.jit(self._grams)

    def _grams(self, params, rest, batch):
        weight = self.mask_fn(batch)
        if self.inputs_fn is not None:
            grams, self.names = _grams_of_inputs(self.inputs_fn(params, batch), params, weight, self.selected)
            return grams
        if isinstance(self.target, nnx.GraphDef):
            model = nnx.merge(self.target, params, *rest)
            classes, run = [*linear_classes(model), *self.linear_types], lambda: self.call(model, batch)
        else:
            classes, run = list(self.linear_types), lambda: self.target(params, batch)
        with Capture(params, weight, self.selected, classes) as capture:
            run()
        grams, self.names = capture.finish()
        return grams


def _grams_of_inputs(inputs: Mapping[str, Any], params, weight, selected) -> tuple[dict, dict]:
    """inputs_fn's activations -> (Grams by group, kernel path -> group); the same array object is one group."""
    leaves = leaves_by_path(params)
    grams, names, first = {}, {}, {}
    for path, x in inputs.items():
        if path not in leaves:
            raise SafeDeltaError(f"inputs_fn returned activations for {path!r}, which is not a leaf of the params "
                                 f"(some leaves: {list(leaves)[:5]})")
        if not selected(path):
            continue
        if id(x) not in first:
            first[id(x)] = path
            grams[path] = input_gram(x, weight, stacked_axes=max(np.ndim(leaves[path]) - 2, 0),
                                     where=f"inputs_fn[{path!r}]")
        names[path] = first[id(x)]
    return grams, names


@functools.lru_cache(maxsize=16)
def _step(target, call, kernels, linear_types, mask_fn, inputs_fn) -> _Step:
    # Cached so that repeated collections over the same forward reuse one compiled function.
    return _Step(target, call, _selector(kernels), linear_types, mask_fn, inputs_fn)


def _hashable(kernels):
    return kernels if kernels is None or isinstance(kernels, (str, re.Pattern)) or callable(kernels) \
        else tuple(kernels)


def batch_step(graphdef_or_apply_fn, *, call: Callable | None = None, kernels=None,
               linear_types: tuple[type, ...] = (nnx.Linear,), inputs_fn: Callable | None = None,
               mask_fn: Callable = batch_mask):
    """The jitted program `collect_hessians` runs once per batch: fn(params, (), batch) -> {group: Σ XᵀX}.

    For an nnx.GraphDef, an apply_fn or None (with inputs_fn), with collect_hessians' keywords; the very function
    collect_hessians calls (one compiled program per shape), so it can be lowered on abstract shapes to see what
    one batch costs (bench/memory_plan.py).
    """
    return _step(graphdef_or_apply_fn, call or _call_module, _hashable(kernels), tuple(linear_types), mask_fn,
                 inputs_fn).jitted


def collect_hessians(model_or_apply_fn, params, batches: Iterable, *, call: Callable | None = None,
                     kernels=None, linear_types: tuple[type, ...] = (nnx.Linear,), inputs_fn: Callable | None = None,
                     mask_fn: Callable = batch_mask, cache_dir: str | os.PathLike | None = None,
                     cache_key: str = "") -> KernelHessians:
    """Safety Hessians of every linear layer's input (float32), keyed by kernel path; see the module docstring.

    model_or_apply_fn: an nnx.Module (params None: its own Params) or nnx.GraphDef, run as call(model, batch)
    (default model(batch)); or apply_fn(params, batch), whose `linear_types` modules are captured; or None with
    inputs_fn(params, batch) -> {kernel path: activations [*stacked, *batch, d]} (stacked axes: those of the
    kernel beyond two). kernels: which kernel paths to keep (regex matched in full, predicate, or paths).
    """
    target, rest = model_or_apply_fn, ()
    if isinstance(target, nnx.Module):
        graphdef, own, *rest = nnx.split(target, nnx.Param, ...)
        target, params = graphdef, own if params is None else params
        rest = tuple(rest)
    elif isinstance(target, nnx.GraphDef) and params is None:
        raise SafeDeltaError("collect_hessians: a GraphDef needs the params to merge it with")
    elif target is None and inputs_fn is None:
        raise SafeDeltaError("collect_hessians needs a model, an apply_fn or inputs_fn")
    elif not isinstance(target, nnx.GraphDef) and target is not None and not callable(target):
        raise SafeDeltaError(f"collect_hessians: {type(target).__name__} is not a model, GraphDef or function")
    batches = list(batches)
    if not batches:
        raise SafeDeltaError("no calibration batches")
    step = _step(target, call or _call_module, _hashable(kernels), tuple(linear_types), mask_fn, inputs_fn)

    def compute():
        sums, sequences = None, 0
        for batch in batches:
            grams = step.jitted(params, rest, batch)
            sums = grams if sums is None else jax.tree.map(jnp.add, sums, grams)
            sequences += count_sequences(batch, mask_fn)
        if not step.names:
            raise SafeDeltaError("no linear layer was captured: none ran, or `kernels` matched none of them")
        return KernelHessians({name: hessian_of(total, sequences) for name, total in sums.items()},
                              step.names), sequences

    return cached_collection(cache_dir, describe_forward(model_or_apply_fn, call, inputs_fn, cache_key), params,
                             batches, compute)


def hessian_of(gram_sum, sequences: int):
    """H = (2/N) Σ XᵀX from the summed Grams (the one place the scale is applied, so every path rounds alike)."""
    return 2.0 * gram_sum / max(sequences, 1)


# ----------------------------------------------------------------------------------------------------------------
# Cache


def cached_collection(cache_dir, description: str, params, batches: list,
                      compute: Callable[[], tuple[KernelHessians, int]], *, on_host: bool = False) -> KernelHessians:
    """compute() -> (Hessians, N), through the disk cache when cache_dir is given: a file with the fingerprint of
    (description, params, batches) is read instead of computing; a new result is written. on_host: a cached
    result comes back as numpy arrays in host memory rather than on the default device."""
    if cache_dir is None:
        return compute()[0]
    fingerprint = _fingerprint(description, params, batches)
    cache_path = Path(cache_dir) / f"hessians-{fingerprint[:32]}.safetensors"
    if cache_path.exists():
        return _load(cache_path, fingerprint, on_host)
    hessians, sequences = compute()
    _save(cache_path, hessians, fingerprint, sequences)
    return hessians


def _qualname(obj) -> str:
    return "" if obj is None else f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def describe_forward(target, call=None, inputs_fn=None, cache_key: str = "") -> str:
    """What the cache fingerprint says of the forward: its class / function names and `cache_key`."""
    if isinstance(target, nnx.Module):
        kind = _qualname(type(target))
    elif isinstance(target, nnx.GraphDef):
        kind = "graphdef:" + str(getattr(target.nodes[0], "type", "")) if getattr(target, "nodes", None) else ""
    else:
        kind = _qualname(target)
    return json.dumps([CACHE_VERSION, kind, _qualname(call), _qualname(inputs_fn), cache_key])


def _digest_tree(digest, tree, label: str) -> None:
    leaves = leaves_by_path(tree)
    for path in sorted(leaves):
        host = np.ascontiguousarray(np.asarray(jax.device_get(leaves[path])))
        digest.update(f"{label}/{path}:{host.dtype}:{host.shape}".encode())
        digest.update(host.tobytes())


def _fingerprint(description: str, params, batches: list) -> str:
    digest = hashlib.sha256(description.encode())
    _digest_tree(digest, params, "params")
    for i, batch in enumerate(batches):
        _digest_tree(digest, batch, f"batch{i}")
    return digest.hexdigest()


def _save(path: Path, hessians: KernelHessians, fingerprint: str, sequences: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(np.asarray(jax.device_get(h), np.float32))
               for name, h in hessians.arrays.items()}
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"fingerprint": fingerprint, "num_sequences": str(sequences),
                                               "names": json.dumps(hessians.names)})
    os.replace(partial, path)  # readers never see a half-written cache file


def _load(path: Path, fingerprint: str, on_host: bool = False) -> KernelHessians:
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("fingerprint") != fingerprint:
            raise SafeDeltaError(f"{path}: cached Hessians belong to fingerprint {metadata.get('fingerprint')}, "
                                 f"not {fingerprint}; delete the file")
        place = np.asarray if on_host else jnp.asarray
        arrays = {name: place(handle.get_tensor(name)) for name in handle.keys()}
    return KernelHessians(arrays, json.loads(metadata["names"]))
