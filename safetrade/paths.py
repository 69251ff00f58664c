"""Leaves of any pytree addressed by path strings: the keys from the root, joined with "/".

The one naming of leaves every method package uses (tradeoff, safedelta, sqsd), so a path a user writes for one
method names the same leaf in another.

    leaves_by_path({"hidden": {"kernel": w, "bias": b}})     # {"hidden/bias": b, "hidden/kernel": w}
    with_leaves(params, {"hidden/kernel": w2})               # a new tree, that one leaf replaced

Dict keys, attribute names (dataclass / NNX fields) and sequence indices all become path parts, and the `.value`
under an NNX Variable is left out, so the same strings name a leaf whether params are nested dicts (e.g.
`nnx.to_pure_dict`), an `nnx.State` or a registered dataclass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from safetrade.errors import SafetradeError

SEP = "/"


class PathError(SafetradeError, KeyError):
    """A path string names no leaf of the tree (the message names the path)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def _is_variable_value(key) -> bool:
    """The `.value` entry under an NNX Variable: not part of the name a user sees ("hidden/kernel")."""
    return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"


def path_string(key_path) -> str:
    """'a/b/c' for a jax key path (dict keys, attribute names and indices alike)."""
    return jax.tree_util.keystr(tuple(k for k in key_path if not _is_variable_value(k)), simple=True, separator=SEP)


def leaves_by_path(tree) -> dict[str, Any]:
    """{path: leaf} in the tree's flattening order; two leaves with the same path string are an error."""
    leaves: dict[str, Any] = {}
    for key_path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = path_string(key_path)
        if name in leaves:
            raise PathError(f"two leaves share the path string {name!r}; rename one of them")
        leaves[name] = value
    return leaves


def leaf(tree, path: str, what: str = "params"):
    """The leaf at `path`; a PathError naming the path (and the nearest existing paths) if there is none."""
    leaves = leaves_by_path(tree)
    if path not in leaves:
        raise PathError(f"{what} have no leaf {path!r}{_near(path, leaves)}")
    return leaves[path]


def _near(path: str, leaves: Mapping[str, Any]) -> str:
    parent = path.rsplit(SEP, 1)[0]
    siblings = [p for p in leaves if p.startswith(parent + SEP)] or sorted(leaves)[:6]
    return f" (paths nearby: {', '.join(siblings[:6])})" if siblings else " (the tree is empty)"


def with_leaves(tree, replacements: Mapping[str, Any]):
    """A copy of `tree` with the leaves at the given paths replaced (the input is not changed)."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [path_string(p) for p, _ in paths_leaves]
    unknown = sorted(set(replacements) - set(names))
    if unknown:
        raise PathError(f"params have no leaf {unknown[0]!r}{_near(unknown[0], dict.fromkeys(names))}")
    return jax.tree_util.tree_unflatten(treedef, [replacements.get(n, x) for n, (_, x) in zip(names, paths_leaves)])


Selector = str | Sequence[str] | Callable[[str], bool]


def select_paths(tree, wrt: Selector) -> tuple[str, ...]:
    """Leaf paths chosen by `wrt`: "all" (every leaf), a sequence of paths (kept in that order; each must exist)
    or a predicate over path strings (tree order)."""
    leaves = leaves_by_path(tree)
    if isinstance(wrt, str):
        if wrt != "all":
            raise SafetradeError(f"wrt must be 'all', a sequence of leaf paths or a predicate, got {wrt!r}")
        chosen = tuple(leaves)
    elif callable(wrt):
        chosen = tuple(p for p in leaves if wrt(p))
    else:
        chosen = tuple(wrt)
        for path in chosen:
            if path not in leaves:
                raise PathError(f"params have no leaf {path!r}{_near(path, leaves)}")
    if not chosen:
        raise SafetradeError("wrt selects no leaf of params")
    return chosen
