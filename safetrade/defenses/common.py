"""What the weight defenses share: their error, the structure check of several trees, kernel selection, layouts.

Kernel selection and the layout handling are Safe Delta's (safetrade/safedelta/tree.py), imported rather than
rewritten, so a `kernels=` regex, predicate or path list and `layout=` mean the same thing in every method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from safetrade.errors import SafetradeError
from safetrade.safedelta.config import SafeDeltaError
from safetrade.safedelta.tree import LAYOUTS, Kernels, select_kernels

Layout = str | Callable[[str], str]


class DefenseError(SafetradeError):
    """Bad input to a weight defense: trees of different structure or shape, an unknown kernel, a degenerate layer."""


def check_same_structure(trees: Mapping[str, Mapping[str, Any]]) -> None:
    """Every tree ({name: {path: leaf}}) has the same paths and the same leaf shapes; the error names the key."""
    (first_name, first), *others = trees.items()
    for name, leaves in others:
        if leaves.keys() != first.keys():
            only_first, only_other = sorted(first.keys() - leaves.keys()), sorted(leaves.keys() - first.keys())
            raise DefenseError(f"{first_name} and {name} params differ in structure: only in {first_name}: "
                               f"{only_first[:5] or 'none'}; only in {name}: {only_other[:5] or 'none'}")
        for path, leaf in first.items():
            if tuple(np.shape(leaf)) != tuple(np.shape(leaves[path])):
                raise DefenseError(f"{path}: {first_name} shape {tuple(np.shape(leaf))} != {name} shape "
                                   f"{tuple(np.shape(leaves[path]))}")


def choose_kernels(leaves: Mapping[str, Any], kernels: Kernels) -> list[str]:
    """Safe Delta's `select_kernels` (regex over leaves with >= 2 axes, predicate, or path list), as a DefenseError."""
    try:
        return select_kernels(leaves, {}, kernels)
    except SafeDeltaError as error:
        raise DefenseError(str(error)) from error


def layouts_of(paths, layout: Layout) -> dict[str, str]:
    """{path: "in_out" | "out_in"}; an unknown layout is an error naming the path."""
    layout_of = layout if callable(layout) else (lambda path: layout)
    out = {path: layout_of(path) for path in paths}
    for path, value in out.items():
        if value not in LAYOUTS:
            raise DefenseError(f"{path}: layout {value!r}; choose 'in_out' (y = x @ W) or 'out_in' (y = W x)")
    return out
