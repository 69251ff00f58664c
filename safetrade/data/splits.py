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

__all__ = ["DEFAULT_FRACTIONS", "length_matched_take", "split", "stable_order", "take", "unit_hash"]

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


def _response_chars(row: Row) -> int:
    return len(row.get("response") or "")


def length_matched_take(sources: Mapping[str, list[Row]], n: int, seed: int | str = 0, n_bins: int = 10,
                        length: Callable[[Row], int] = _response_chars) -> list[Row]:
    """n rows drawn equally from every source with the same length distribution in each: a mixed pool in which a
    per-row score cannot tell the sources apart by length alone.

    Bins: `n_bins` quantile bins of the pooled lengths. Each round takes, from every bin that still has a row in
    *every* source, one row per source (in each source's stable_order), so every bin holds the same number of rows
    of each source and the sources' length histograms agree bin by bin. Rows keep their fields and gain
    "source" (the sources' key) when they have none. Raises DataError when fewer than n rows can be matched, or
    when n is not a multiple of the number of sources.
    """
    names = list(sources)
    if not names or n < 1 or n % len(names):
        raise DataError(f"length_matched_take: n={n} must be a positive multiple of the {len(names)} sources")
    lengths = sorted(length(r) for rows in sources.values() for r in rows)
    if not lengths:
        raise DataError("length_matched_take: the sources hold no rows")
    edges = sorted({lengths[min(len(lengths) - 1, (len(lengths) * k) // n_bins)] for k in range(1, n_bins)})

    def bin_of(row: Row) -> int:
        return sum(length(row) >= e for e in edges)

    queues = {name: {} for name in names}
    for name in names:
        for row in stable_order(sources[name], seed=f"{seed}-{name}"):
            queues[name].setdefault(bin_of(row), []).append(row)
    chosen: list[Row] = []
    bins = range(len(edges) + 1)
    while len(chosen) < n:
        progressed = False
        for b in bins:
            if len(chosen) >= n:
                break
            if all(queues[name].get(b) for name in names):
                for name in names:
                    row = queues[name][b].pop(0)
                    chosen.append(row if "source" in row else {**row, "source": name})
                progressed = True
        if not progressed:
            counts = {name: len(rows) for name, rows in sources.items()}
            raise DataError(f"length_matched_take: only {len(chosen)} of {n} rows can be length-matched across "
                            f"{counts} ({n_bins} bins); lower n or add rows")
    return chosen
