"""SQSD directions: per-module task vectors D_m, matched to any model's params by path.

A *module* is a weight matrix of the model, named by a path string ("blocks/attn/q_proj", "hidden"). Where its
trainable leaves live in the params tree is a *site*:

    LoraSite(a="hidden/lora_a", b="hidden/lora_b", scale=2.0, layout="in_out")   # LoRA factors: rank-space SQSD
    KernelSite("hidden/kernel", layout="in_out")                                 # the full matrix: full-space SQSD

`lora_sites(params)` finds every module holding both factor names (safetrade's adapters: lora_a / lora_b);
`peft_adapters(directory)` reads a PEFT adapter directory into a tree and its sites; for LoRA params of your own,
write the mapping (module -> LoraSite) or a function of the module path that returns one.

Layouts. A direction is held in the in/out layout: a matrix [..., in, out] (Flax's kernel layout and ours) or
factors a [..., in, q], b [..., q, out] with D = scale · a @ b. `layout="out_in"` declares torch's convention
(A [..., r, in], B [..., out, r]; a kernel [..., out, in]); such leaves are transposed when read, which changes no
inner product. Leading axes are stacked layers (our Llama scans its layers: [L, in, out]): each leading index is one
term of SQSD's module sum, so a 30-layer model with seven adapted projections sums 210 terms.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from safetrade.errors import SafetradeError
from safetrade.paths import SEP, PathError, leaf, leaves_by_path

__all__ = ["LAYOUTS", "DenseDirection", "Directions", "DirectionsMismatch", "FactoredDirection", "KernelSite",
           "LoraSite", "SQSDError", "SQSDWarning", "Site", "Sites", "kernel_sites", "lora_sites", "peft_adapters",
           "resolve_sites"]

LAYOUTS = ("in_out", "out_in")
HIGHEST = jax.lax.Precision.HIGHEST  # fp32 products even where the default matmul precision is TF32/bf16


class SQSDError(SafetradeError):
    """Scoring cannot proceed (bad options, unusable anchors, ids that do not match)."""


class DirectionsMismatch(SQSDError):
    """Directions do not fit the model they are scored against (the message names the module or leaf path)."""


class SQSDWarning(UserWarning):
    """A setting that makes scores degenerate (a zero direction, a fresh adapter)."""


def _check_layout(layout: str, where: str) -> None:
    if layout not in LAYOUTS:
        raise SQSDError(f"{where}: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


@dataclasses.dataclass(frozen=True)
class LoraSite:
    """A module's LoRA factors in a params tree: the paths of A and B, the adapter's scale and their layout.

    in_out: A [..., in, r], B [..., r, out], merged update scale·A@B (safetrade, Flax-style LoRA).
    out_in: A [..., r, in], B [..., out, r], merged update scale·B@A (torch / PEFT).
    """

    a: str
    b: str
    scale: float = 1.0
    layout: str = "in_out"

    def __post_init__(self):
        _check_layout(self.layout, f"LoraSite({self.a!r}, {self.b!r})")


@dataclasses.dataclass(frozen=True)
class KernelSite:
    """A module's full weight matrix in a params tree: [..., in, out] (in_out) or [..., out, in] (out_in)."""

    path: str
    layout: str = "in_out"

    def __post_init__(self):
        _check_layout(self.layout, f"KernelSite({self.path!r})")


Site = Union[LoraSite, KernelSite]
Sites = Union[Mapping[str, Site], Callable[[str], Site]]


def to_in_out(x: jax.Array, layout: str) -> jax.Array:
    """A leaf (or a per-sample stack of them) in the in/out layout."""
    return x if layout == "in_out" else jnp.swapaxes(x, -1, -2)


def lora_sites(params, a: str = "lora_a", b: str = "lora_b", scale: float = 1.0,
               layout: str = "in_out") -> dict[str, LoraSite]:
    """Every module of `params` that holds both `{module}/{a}` and `{module}/{b}` leaves, as LoraSites.

    The defaults read safetrade's adapters (models/lora.py); `a="lora_A/weight", b="lora_B/weight",
    layout="out_in"` reads a PEFT tree. One scale for all (adapters with per-module scales: write the mapping).
    """
    paths = leaves_by_path(params)
    suffix = SEP + a
    modules = [p[: -len(suffix)] for p in paths if p.endswith(suffix) and p[: -len(suffix)] + SEP + b in paths]
    return {m: LoraSite(f"{m}{SEP}{a}", f"{m}{SEP}{b}", float(scale), layout) for m in modules}


def kernel_sites(modules, name: str = "kernel", layout: str = "in_out") -> dict[str, KernelSite]:
    """KernelSites `{module}/{name}` for the given module paths (Flax: "kernel"; torch-style trees: "weight")."""
    return {m: KernelSite(f"{m}{SEP}{name}", layout) for m in modules}


def resolve_sites(sites: Sites, modules) -> dict[str, Site]:
    """{module: site} for exactly `modules`, from a mapping (which must cover the same modules) or a function."""
    modules = sorted(modules)
    if callable(sites) and not isinstance(sites, Mapping):
        resolved = {m: sites(m) for m in modules}
    else:
        missing = sorted(set(sites) - set(modules))
        extra = sorted(set(modules) - set(sites))
        if missing or extra:
            raise DirectionsMismatch(
                "directions and the scoring model's sites cover different modules: "
                + (f"no direction for adapted module(s) {', '.join(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"no site (adapter or kernel) at direction module(s) {', '.join(extra)}" if extra else ""))
        resolved = {m: sites[m] for m in modules}
    for module, site in resolved.items():
        if not isinstance(site, (LoraSite, KernelSite)):
            raise SQSDError(f"site of module {module!r} must be a LoraSite or KernelSite, got {site!r}")
    return resolved


def _read(params, path: str, module: str, what: str):
    try:
        return leaf(params, path)
    except PathError as err:
        raise DirectionsMismatch(f"{err} ({what} of module {module!r})") from None


def site_shape(params, module: str, site: Site) -> tuple[int, ...]:
    """The module's weight shape [..., in, out] as the site's leaves in `params` imply (shapes only are read, so
    abstract params (jax.ShapeDtypeStruct leaves) work too); DirectionsMismatch if they do not chain."""
    if isinstance(site, KernelSite):
        shape = tuple(_read(params, site.path, module, "the kernel").shape)
        if len(shape) < 2:
            raise DirectionsMismatch(f"kernel {site.path!r} of module {module!r} has shape {shape}; need [..., m, n]")
        return shape if site.layout == "in_out" else (*shape[:-2], shape[-1], shape[-2])
    a = tuple(_read(params, site.a, module, "the LoRA A factor").shape)
    b = tuple(_read(params, site.b, module, "the LoRA B factor").shape)
    if site.layout == "out_in":
        a, b = (*a[:-2], a[-1], a[-2]), (*b[:-2], b[-1], b[-2])
    if len(a) < 2 or len(a) != len(b) or a[:-2] != b[:-2] or a[-1] != b[-2]:
        raise DirectionsMismatch(f"LoRA factors of module {module!r} ({site.a!r} {a}, {site.b!r} {b} in the "
                                 "in/out layout) do not chain as [..., in, r] @ [..., r, out]")
    return (*a[:-1], b[-1])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FactoredDirection:
    """D = scale · a @ b per leading index: a [..., in, q], b [..., q, out] (e.g. a LoRA adapter's factors)."""

    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(default=1.0, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.a.shape[:-1], self.b.shape[-1])

    def dense(self) -> jax.Array:
        a, b = self.a.astype(jnp.float32), self.b.astype(jnp.float32)
        return self.scale * jnp.einsum("...nq,...qk->...nk", a, b, precision=HIGHEST)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseDirection:
    """D as a matrix per leading index, [..., in, out] (e.g. the difference of two checkpoints' kernels)."""

    matrix: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.matrix.shape)

    def dense(self) -> jax.Array:
        return self.matrix.astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Directions:
    """Per-module directions D_m keyed by module path; a pytree (jit-able)."""

    modules: dict[str, FactoredDirection | DenseDirection]

    @classmethod
    def from_lora(cls, params, sites: Mapping[str, LoraSite]) -> Directions:
        """The task vector scale·A·B of every site's adapter in `params` (a LoRA fine-tune's adapters).

        The scale only matters to a raw dot product; cosines and projections are invariant to it.
        """
        if not sites:
            raise DirectionsMismatch("Directions.from_lora: no LoRA sites given (lora_sites found no adapters?)")
        modules = {}
        for module, site in sites.items():
            if not isinstance(site, LoraSite):
                raise SQSDError(f"Directions.from_lora: the site of {module!r} is not a LoraSite: {site!r}")
            site_shape(params, module, site)  # factors exist and chain
            a = to_in_out(jnp.asarray(leaf(params, site.a), jnp.float32), site.layout)
            b = to_in_out(jnp.asarray(leaf(params, site.b), jnp.float32), site.layout)
            modules[module] = FactoredDirection(a, b, site.scale)
        zero = [k for k, v in modules.items() if not np.any(np.asarray(v.b))]
        if zero:
            warnings.warn(f"direction adapters have B == 0 at {', '.join(zero)}: those directions are zero "
                          "(a fresh adapter?), so every cosine with them is 0", SQSDWarning, stacklevel=2)
        return cls(modules)

    @classmethod
    def from_difference(cls, base, tuned, sites: Mapping[str, KernelSite]) -> Directions:
        """Dense directions tuned − base of each site's kernel (e.g. a full fine-tune's update)."""
        if not sites:
            raise DirectionsMismatch("Directions.from_difference: no kernel sites given")
        modules = {}
        for module, site in sites.items():
            kernels = []
            for name, tree in (("base params", base), ("tuned params", tuned)):
                try:
                    kernels.append(leaf(tree, site.path, name))
                except PathError as err:
                    raise DirectionsMismatch(str(err)) from None
            old, new = kernels
            if old.shape != new.shape:
                raise DirectionsMismatch(f"{site.path} has shape {tuple(old.shape)} in base but "
                                         f"{tuple(new.shape)} in tuned")
            diff = jnp.asarray(new, jnp.float32) - jnp.asarray(old, jnp.float32)
            modules[module] = DenseDirection(to_in_out(diff, site.layout))
        return cls(modules)

    @property
    def keys(self) -> list[str]:
        return sorted(self.modules)

    def dense(self) -> Directions:
        """Every module as a dense matrix (what full-space scoring compares with)."""
        return Directions({k: DenseDirection(v.dense()) for k, v in self.modules.items()})

    def renamed(self, rename: Callable[[str], str]) -> Directions:
        """The same directions under other module paths (e.g. a PEFT tree's names mapped onto your model's)."""
        renamed = {rename(k): v for k, v in self.modules.items()}
        if len(renamed) != len(self.modules):
            raise DirectionsMismatch("renamed: two modules map to the same path")
        return Directions(renamed)

    def check(self, params, sites: Sites) -> dict[str, Site]:
        """The resolved sites, or DirectionsMismatch naming the module / leaf path, unless every direction has a
        site in `params` whose weight shape [..., in, out] equals the direction's."""
        if not self.modules:
            raise DirectionsMismatch("directions hold no modules")
        resolved = resolve_sites(sites, self.modules)
        for key, site in resolved.items():
            direction = self.modules[key]
            if isinstance(direction, FactoredDirection):
                a, b = direction.a.shape, direction.b.shape
                if len(a) < 2 or len(a) != len(b) or a[-1] != b[-2] or a[:-2] != b[:-2]:
                    raise DirectionsMismatch(f"direction {key!r}: factors of shapes {a} and {b} do not chain "
                                             "as [..., in, q] @ [..., q, out]")
            expected = site_shape(params, key, site)
            if tuple(direction.shape) != expected:
                raise DirectionsMismatch(f"direction {key!r} has shape {tuple(direction.shape)} [..., in, out], "
                                         f"but the model's weight there is {expected}")
        return resolved


def peft_adapters(directory) -> tuple[dict, dict[str, LoraSite]]:
    """(tree, sites) of a PEFT LoRA adapter directory, whatever model it was trained on.

    The tree nests adapter_model.safetensors' tensors by their dotted names ("base_model.model.model.layers.3.
    self_attn.q_proj.lora_A.weight" -> path "base_model/model/model/layers/3/self_attn/q_proj/lora_A/weight"); the
    sites are torch-layout (out_in) with scale lora_alpha / r from adapter_config.json. `Directions.from_lora(tree,
    sites)` gives per-layer directions; `.renamed(...)` maps the module paths onto your model's.
    """
    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.exists():
            raise SQSDError(f"{directory} is not a PEFT adapter directory: {path.name} is missing")
    config = json.loads(config_path.read_text())
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise SQSDError(f"{config_path}: no {key!r}, so the adapter's scale lora_alpha / r is unknown")
    if config.get("use_rslora") or config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise SQSDError(f"{config_path}: rsLoRA, DoRA and per-module rank/alpha patterns are not supported")
    tree: dict = {}
    for name, value in load_file(str(weights_path)).items():
        node = tree
        *parents, last = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    sites = lora_sites(tree, a="lora_A/weight", b="lora_B/weight", scale=config["lora_alpha"] / config["r"],
                       layout="out_in")
    if not sites:
        raise SQSDError(f"{weights_path}: no lora_A / lora_B weight pairs")
    return tree, sites
