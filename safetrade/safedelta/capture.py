"""Capture the inputs of a model's linear layers while it runs, without a copy of its forward pass.

While a `Capture` is active (one thread, one trace):
  * the `__call__` of the linear-like classes it is given records its first argument; which layer it was is read
    off the kernel itself: the kernel's array is a leaf of the params being traced, whose path names the layer.
    No attribute of the model is replaced, so any NNX model (nnx.Linear, a torch-style [out, in] module, our
    Llama's own Linear) is captured by the code that really runs;
  * `jax.lax.scan` is wrapped so that layers called inside a scan body (stacked layers run as a layer scan)
    return their inputs' Grams as extra per-iteration outputs: a kernel stacked as [L, in, out] gets an
    [L, in, in] Gram, keyed by the stacked kernel's path. Inside the body the kernel is a slice of the scanned
    params, so the wrapper maps each slice back to the path of the array it was sliced from.
Layers that read the very same array (q/k/v of an attention block, gate/up of a gated MLP) share one Gram: the
Gram is computed once per distinct input and the kernels are recorded as aliases of it.

Transforms other than jax.lax.scan (vmap, remat, lax.map, a scan imported before the capture started) hide the
layer calls inside their own trace; a capture there fails with an error that says so (use `inputs_fn` then, or
switch remat off: it does not change the values).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safetrade.paths import leaves_by_path
from safetrade.safedelta.config import SafeDeltaError
from safetrade.safedelta.factor import HIGHEST

_LETTERS = "abcdefghklmnopqrstuvw"  # einsum axis names for stacked and batch axes (x, y, z name features)
KERNEL_ATTRIBUTES = ("kernel", "weight")  # where a linear-like module keeps its matrix

_state = threading.local()  # .current: the Capture active in this thread
_capture_lock = threading.Lock()
_original_scan = jax.lax.scan


def input_gram(x, weight, stacked_axes: int = 0, where: str = "input"):
    """Σ xᵀx in float32 over every axis of x but the last and the first `stacked_axes`, rows weighted by `weight`.

    x: [*stacked, *batch, d]; weight: None or the batch mask, shaped like the batch axes (or with as many
    entries, e.g. [B, T] for a layer that sees tokens flattened to [B·T, d]); nonzero means "counts".
    """
    x = jnp.asarray(x).astype(jnp.float32)
    stacked, batch = x.shape[:stacked_axes], x.shape[stacked_axes:-1]
    if weight is not None and tuple(batch) != tuple(weight.shape):
        if int(np.prod(batch, dtype=np.int64)) != weight.size:
            raise SafeDeltaError(f"{where}: activations of shape {tuple(x.shape)} do not match the batch mask of "
                                 f"shape {tuple(weight.shape)} (stacked axes: {stacked_axes})")
        x = x.reshape(*stacked, *weight.shape, x.shape[-1])
        batch = weight.shape
    s, b = _LETTERS[:len(stacked)], _LETTERS[len(stacked):len(stacked) + len(batch)]
    lhs = x if weight is None else x * weight.astype(bool).astype(jnp.float32)[..., None]
    return jnp.einsum(f"{s}{b}y,{s}{b}z->{s}yz", lhs, x, precision=HIGHEST)


class _Frame:
    """What one trace level (the model's top level, or one scan body) has recorded."""

    def __init__(self):
        self.inputs: list[tuple[str, jax.Array]] = []  # (kernel path, input) per call, in call order
        self.grams: dict[str, jax.Array] = {}  # finished Grams (from inner scans), by group name
        self.names: dict[str, str] = {}  # kernel path -> group name, for the finished Grams
        self.paths: dict[int, str] = {}  # id(array in this body) -> params path, for scanned slices
        self.keep_alive: list = []  # the arrays whose ids are in `paths`

    def add_finished(self, grams: dict, names: dict) -> None:
        for name, gram in grams.items():
            self.grams[name] = self.grams[name] + gram if name in self.grams else gram
        self.names.update(names)

    def close(self, weight) -> tuple[dict, dict]:
        """(Grams by group name, kernel path -> group name): one Gram per distinct sequence of inputs."""
        grams, names = dict(self.grams), dict(self.names)
        calls: dict[str, list[int]] = {}
        arrays = {}
        for path, x in self.inputs:
            if path in names:
                raise SafeDeltaError(f"{path}: this layer ran both inside and outside a layer scan; its Hessian "
                                     "would mix stacked and unstacked inputs (pass inputs_fn instead)")
            calls.setdefault(path, []).append(id(x))
            arrays[id(x)] = (path, x)
        group_of: dict[tuple, str] = {}
        per_input: dict[int, jax.Array] = {}
        for path, ids in calls.items():
            signature = tuple(ids)
            if signature not in group_of:
                group_of[signature] = path
                for i in ids:
                    if i not in per_input:
                        where, x = arrays[i]
                        per_input[i] = input_gram(x, weight, where=f"input of {where}")
                total = per_input[ids[0]]
                for i in ids[1:]:  # a layer called several times: its loss, and so its Hessian, is a sum
                    total = total + per_input[i]
                grams[path] = total
            names[path] = group_of[signature]
        return grams, names


class Capture:
    """Records linear-layer inputs during one trace of a model call; see the module docstring.

        with Capture(params, weight, selected, classes) as capture:
            model(x)
        grams, names = capture.finish()

    Captures are serialised by a process-wide lock: the patches they install are visible to every thread (other
    threads' calls pass straight through them).
    """

    def __init__(self, params, weight, selected: Callable[[str], bool], classes: Sequence[type]):
        leaves = leaves_by_path(params)
        self.root = _Frame()
        self.root.paths = {id(leaf): path for path, leaf in leaves.items()}
        self.root.keep_alive = list(leaves.values())
        self.frames = [self.root]
        self.weight = weight
        self.selected = selected
        self.classes = _outermost(classes)
        self._inside: set[int] = set()  # ids of modules whose tapped call is running (subclass re-entry)
        self._patched: list[tuple[type, object]] = []

    def __enter__(self):
        if getattr(_state, "current", None) is not None:
            raise SafeDeltaError("a Hessian capture is already running in this thread (captures do not nest)")
        _capture_lock.acquire()
        _state.current = self
        jax.lax.scan = _scan_dispatch
        for cls in self.classes:
            self._patched.append((cls, cls.__dict__.get("__call__")))
            cls.__call__ = self._tapped(cls.__call__)
        return self

    def __exit__(self, *exc):
        for cls, own in reversed(self._patched):
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own
        self._patched.clear()
        jax.lax.scan = _original_scan
        _state.current = None
        _capture_lock.release()
        return False

    def path_of(self, array) -> str | None:
        for frame in reversed(self.frames):
            if id(array) in frame.paths:
                return frame.paths[id(array)]
        return None

    def record(self, module, x) -> None:
        attribute = next((a for a in KERNEL_ATTRIBUTES if hasattr(getattr(module, a, None), "get_value")), None)
        if attribute is None:
            raise SafeDeltaError(f"{type(module).__name__}: captured as a linear layer but has no Variable named "
                                 f"one of {KERNEL_ATTRIBUTES}")
        path = self.path_of(getattr(module, attribute).get_value())
        if path is None:
            raise SafeDeltaError(
                f"a {type(module).__name__} ran with a {attribute} that is not a leaf of the params being traced "
                "(built inside the forward from other arrays, or sliced by a transform other than jax.lax.scan); "
                "pass inputs_fn instead")
        if self.selected(path):
            self.frames[-1].inputs.append((path, x))

    def _tapped(self, call):
        capture = self

        def tapped(module, x, *args, **kwargs):
            if getattr(_state, "current", None) is not capture or id(module) in capture._inside:
                return call(module, x, *args, **kwargs)
            capture.record(module, x)
            capture._inside.add(id(module))
            try:
                return call(module, x, *args, **kwargs)
            finally:
                capture._inside.discard(id(module))

        return tapped

    def scan(self, f, init, xs, *args, **kwargs):
        """jax.lax.scan whose body's layer inputs come back as stacked Grams (see the module docstring)."""
        outer = jax.tree.leaves(xs)
        names_box = {}

        def body(carry, x):
            frame = _Frame()
            inner = jax.tree.leaves(x)
            for o, i in zip(outer, inner):
                path = self.path_of(o)
                if path is not None:
                    frame.paths[id(i)] = path
                    frame.keep_alive.append(i)
            self.frames.append(frame)
            try:
                carry, y = f(carry, x)
            finally:
                self.frames.pop()
            grams, names_box["names"] = frame.close(self.weight)
            return carry, (y, grams)

        carry, (ys, grams) = _original_scan(body, init, xs, *args, **kwargs)
        self.frames[-1].add_finished(grams, names_box["names"])
        return carry, ys

    def finish(self) -> tuple[dict, dict]:
        try:
            return self.root.close(self.weight)
        except jax.errors.UnexpectedTracerError:
            raise SafeDeltaError(
                "a linear layer's input was recorded inside a JAX transform other than jax.lax.scan (vmap, remat, "
                "lax.map, or a scan imported before the capture); switch remat off or pass inputs_fn") from None


def _outermost(classes: Sequence[type]) -> list[type]:
    """The classes to patch: a subclass that inherits its __call__ from a listed class is covered by it."""
    unique = list(dict.fromkeys(classes))
    return [c for c in unique if not any(c is not o and issubclass(c, o) and "__call__" not in c.__dict__
                                         for o in unique)]


def _scan_dispatch(f, init, xs=None, *args, **kwargs):
    capture = getattr(_state, "current", None)
    if capture is None:
        return _original_scan(f, init, xs, *args, **kwargs)
    return capture.scan(f, init, xs, *args, **kwargs)
