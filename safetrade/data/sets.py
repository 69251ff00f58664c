"""Rows by name for every job: the built safety sets, registry datasets and local files, and the held-out cut.

    rows = rows_for("alignment", data)          # data: any object with the DataSection fields used below
    train, held = held_out(rows, n=32, seed=0)  # the same rows are held out on every run with that seed
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

from safetrade.data.alignment import build_safety_data
from safetrade.data.registry import load_dataset
from safetrade.data.rows import Row
from safetrade.data.splits import stable_order

__all__ = ["BUILT_SETS", "held_out", "rows_for"]

BUILT_SETS = ("alignment", "proxy", "capability", "attack")


class SafetySetOptions(Protocol):
    """The fields of config.DataSection that shape the built sets."""

    seed: int
    n_attack: int
    benign_ratio: float
    rephrased: float
    benign_rephrased: float


@lru_cache(maxsize=4)
def _safety_data(seed: int, n_attack: int, benign_ratio: float, rephrased: float, benign_rephrased: float):
    return build_safety_data(seed, benign_ratio=benign_ratio, n_attack=n_attack, rephrased=rephrased,
                             benign_rephrased=benign_rephrased)


def rows_for(name: str, data: SafetySetOptions) -> list[Row]:
    """Rows of a built set (alignment | proxy | capability | attack), a registry name, or a local file."""
    if name in BUILT_SETS:
        return list(getattr(_safety_data(data.seed, data.n_attack, data.benign_ratio, data.rephrased,
                                         data.benign_rephrased), name))
    return load_dataset(name)


def held_out(rows, n: int, seed: int):
    """(train rows, n held-out rows): a stable hashed cut, so the same rows are held out on every run."""
    ordered = stable_order(rows, seed=f"heldout-{seed}")
    n = min(n, len(ordered) // 5)
    return ordered[n:], ordered[:n]
