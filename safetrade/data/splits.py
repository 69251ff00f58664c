"""Deterministic, stable splits and subsets.

Each row is placed by hashing `(seed, key(row))` alone, so adding or removing rows never moves the
others between parts, and the same seed gives the same split on every machine and Python version
(sha256, not Python's salted `hash`). The key defaults to the row id; the alignment builders key on
the normalised prompt instead, so duplicate prompts inside a source always land in the same part and
cannot leak from train into eval.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping

from safetrade.data.rows import DataError, Row

__all__ = ["DEFAULT_FRACTIONS", "split", "stable_order", "take", "unit_hash"]

DEFAULT_FRACTIONS = {"train": 0.8, "eval": 0.2}

Key = Callable[[Row], str]


def _by_id(row: Row) -> str:
    return row["id"]


def unit_hash(seed: int | str, key: str) -> float:
    """A number in [0, 1) that depends only on (seed, key)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split(rows: list[Row], fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int | str = 0,
          key: Key = _by_id) -> dict[str, list[Row]]:
    """Rows partitioned into named parts of (approximately) the given fractions, order kept.

    Fractions must be positive and sum to 1. Part sizes are binomial around fraction * len(rows)
    rather than exact: that is the price of stability under added rows.
    """
    if not fractions:
        raise DataError("split: no fractions given")
    if any(not (f > 0) for f in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0,
                                                                      abs_tol=1e-9):
        raise DataError(f"split: fractions must be positive and sum to 1, got {dict(fractions)}")
    names = list(fractions)
    bounds, total = [], 0.0
    for name in names:
        total += fractions[name]
        bounds.append(total)
    parts: dict[str, list[Row]] = {name: [] for name in names}
    for row in rows:
        u = unit_hash(seed, key(row))
        index = next((i for i, b in enumerate(bounds) if u < b), len(names) - 1)
        parts[names[index]].append(row)
    return parts


def stable_order(rows: list[Row], seed: int | str = 0, key: Key = _by_id) -> list[Row]:
    """Rows in a pseudo-random order fixed by (seed, key): a deterministic shuffle."""
    return sorted(rows, key=lambda row: (unit_hash(seed, key(row)), key(row)))


def take(rows: list[Row], n: int | None, seed: int | str = 0, key: Key = _by_id) -> list[Row]:
    """A deterministic subset of `n` rows (all when n is None), in stable_order."""
    ordered = stable_order(rows, seed, key)
    if n is None:
        return ordered
    if n > len(ordered):
        raise DataError(f"take: asked for {n} rows, only {len(ordered)} available")
    return ordered[:n]
