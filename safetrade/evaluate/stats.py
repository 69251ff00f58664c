"""Uncertainty for evaluation rates: intervals, paired tests between two models, agreement between two judges.

Every rate `safetrade evaluate` reports is a proportion over a few dozen to a few hundred prompts, so two models'
rates differ by chance alone. The functions here are the small, standard tools a reviewer expects:

  - `wilson_interval` / `rate`: Wilson score interval of a proportion (good coverage at small n and at rates near
    0 or 1, where the normal "p ± 1.96·se" interval collapses to a point);
  - `bootstrap_interval`: percentile bootstrap interval of a mean (the refusal margin is a mean of per-prompt
    log-probability gaps, not a proportion);
  - `mcnemar_exact`: exact McNemar test of two models judged on the same prompts (only prompts where they
    disagree carry information);
  - `paired_bootstrap`: paired bootstrap of the mean difference of a per-prompt quantity (the refusal margin);
  - `cohen_kappa`: chance-corrected agreement of two judges on the same replies;
  - `newcombe_difference_interval`: interval of the difference of two proportions from their Wilson intervals, for
    rates whose per-sample outcomes were not kept (no pairing possible; conservative when they share prompts).

Pure functions of their inputs (NumPy and the standard library only); the bootstrap ones take a `seed`, so a
record's intervals are a deterministic function of its samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

# Resamples are drawn in blocks of at most this many indices, so memory stays bounded (32 MiB of int64) whatever
# the sample size; each block is one vectorised draw, never a Python loop over single resamples.
_MAX_INDICES_PER_BLOCK = 1 << 22


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r}: expected a level strictly between 0 and 1, e.g. 0.95")


def _normal_quantile(confidence: float) -> float:
    """z such that a standard normal lies in [-z, z] with probability `confidence` (1.95996... at 0.95)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _booleans(values: Sequence, name: str) -> list[bool | None]:
    """`values` as a list of bool / None; anything else (a string, 2, nan) is an error naming the sequence."""
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
        elif isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)):
            out.append(bool(v))
        else:
            raise ValueError(f"{name}[{i}] = {v!r}: expected True, False or None")
    return out


def _paired_booleans(a: Sequence, b: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of two equally long boolean sequences where neither side is None (an error or a missing sample)."""
    a, b = _booleans(a, "a"), _booleans(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired sequences differ in length: {len(a)} vs {len(b)}")
    kept = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return np.array([x for x, _ in kept], bool), np.array([y for _, y in kept], bool)


def _finite_floats(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name}[{bad}] = {arr[bad]!r}: every value must be finite (drop failed samples first)")
    return arr


def _bootstrap_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement, same size) of `values`."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples}: expected at least 1")
    n = len(values)
    rng = np.random.Generator(np.random.PCG64(seed))
    per_block = max(1, _MAX_INDICES_PER_BLOCK // n)
    means = np.empty(n_resamples, np.float64)
    for start in range(0, n_resamples, per_block):
        stop = min(n_resamples, start + per_block)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    return means


# ---------------------------------------------------------------------------------------------------------------
# Intervals


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n: the p whose score test |k/n - p| / sqrt(p(1-p)/n) <= z.

    centre = (p̂ + z²/2n) / (1 + z²/n),  half = z·sqrt(p̂(1-p̂)/n + z²/4n²) / (1 + z²/n),  p̂ = k/n.
    n == 0 gives (nan, nan): no data, no interval.
    """
    _check_confidence(confidence)
    if not (isinstance(k, (int, np.integer)) and isinstance(n, (int, np.integer))) or n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval(k={k!r}, n={n!r}): expected integers with 0 <= k <= n")
    if n == 0:
        return (math.nan, math.nan)
    z = _normal_quantile(confidence)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1) in exact arithmetic; set it so, not to a rounding residue.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def bootstrap_interval(values, confidence: float = 0.95, n_resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (finite numbers); empty -> (nan, nan)."""
    _check_confidence(confidence)
    arr = _finite_floats(values, "values")
    if len(arr) == 0:
        return (math.nan, math.nan)
    means = _bootstrap_means(arr, n_resamples, seed)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def rate(successes: Sequence[bool | None], confidence: float = 0.95) -> dict:
    """Share of True among the non-None entries (None = a judge error, left out), with its Wilson interval."""
    flags = [v for v in _booleans(successes, "successes") if v is not None]
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n, confidence)
    return {"rate": k / n if n else math.nan, "k": k, "n": n, "ci": [lo, hi]}


def newcombe_difference_interval(k1: int, n1: int, k2: int, n2: int,
                                 confidence: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p1 - p2 (k1/n1 minus k2/n2), built from the two Wilson intervals.

    lower = d - sqrt((p1 - l1)² + (u2 - p2)²),  upper = d + sqrt((u1 - p1)² + (p2 - l2)²),  d = p1 - p2
    (Newcombe 1998, Statistics in Medicine 17:873, method 10). It treats the samples as independent. Two models
    judged on the same prompts are positively correlated, so for them the interval is wider than a paired one:
    use it only when the per-sample outcomes are gone; an interval that excludes 0 is then a significant
    difference, one that includes 0 is "not shown", weaker than a paired test's n.s.
    """
    l1, u1 = wilson_interval(k1, n1, confidence)
    l2, u2 = wilson_interval(k2, n2, confidence)
    if n1 == 0 or n2 == 0:
        return (math.nan, math.nan)
    p1, p2 = k1 / n1, k2 / n2
    d = p1 - p2
    return (max(-1.0, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)),
            min(1.0, d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)))


# ---------------------------------------------------------------------------------------------------------------
# Paired tests (two models, the same prompts in the same order)


def _binomial_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), in exact integer arithmetic (one rounding, at the final division)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)


def mcnemar_exact(a: Sequence[bool | None], b: Sequence[bool | None]) -> dict:
    """Exact (binomial) McNemar test that paired outcomes a and b have the same success probability.

    Pairs where either side is None are dropped. Under the null each discordant pair is a's success (n_a_only) or
    b's (n_b_only) with probability 1/2, so p = min(1, 2·P(X <= min(n_a_only, n_b_only))), X ~ Bin(n_a_only +
    n_b_only, 1/2), two-sided; p = 1 when there is no discordant pair.
    """
    x, y = _paired_booleans(a, b)
    a_only, b_only = int(np.sum(x & ~y)), int(np.sum(~x & y))
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else min(1.0, 2.0 * _binomial_cdf_half(min(a_only, b_only), discordant))
    return {"n_a_only": a_only, "n_b_only": b_only, "n": len(x), "p_value": p}


def paired_bootstrap(x, y, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Paired bootstrap of mean(y - x) over prompts: the difference, its percentile interval, a two-sided p-value.

    Prompts (pairs) are resampled, so the correlation between the two models' per-prompt values is kept. The
    p-value is the bootstrap sign test that matches the percentile interval:
        p = min(1, 2 · (min(#{d* <= 0}, #{d* >= 0}) + 1) / (n_resamples + 1))
    over the resampled mean differences d*; the +1 counts the observed sample as one of the resamples, so p is
    never reported as exactly 0 (its resolution is about 2 / n_resamples). p < 1 - confidence roughly when the
    interval excludes 0.
    """
    _check_confidence(confidence)
    x, y = _finite_floats(x, "x"), _finite_floats(y, "y")
    if len(x) != len(y):
        raise ValueError(f"paired sequences differ in length: {len(x)} vs {len(y)}")
    if len(x) == 0:
        return {"difference": math.nan, "ci": [math.nan, math.nan], "p_value": math.nan, "n": 0}
    d = y - x
    means = _bootstrap_means(d, n_resamples, seed)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    tail = min(int(np.sum(means <= 0)), int(np.sum(means >= 0)))
    p = min(1.0, 2.0 * (tail + 1) / (n_resamples + 1))
    return {"difference": float(d.mean()), "ci": [float(lo), float(hi)], "p_value": p, "n": len(d)}


# ---------------------------------------------------------------------------------------------------------------
# Agreement (two judges, the same replies)


def cohen_kappa(a: Sequence[bool | None], b: Sequence[bool | None]) -> dict:
    """Cohen's κ = (p_o - p_e) / (1 - p_e) of two boolean raters; pairs where either is None are dropped.

    p_o is the share of pairs where they agree, p_e the agreement expected from their marginal rates alone. κ is
    undefined (nan) when p_e = 1, i.e. both raters gave the same single answer to every item: there is no
    disagreement left for chance to explain. `raw_agreement` (p_o) is reported beside it either way.
    """
    x, y = _paired_booleans(a, b)
    n = len(x)
    if n == 0:
        return {"kappa": math.nan, "n": 0, "raw_agreement": math.nan}
    agree = int(np.sum(x == y))
    x1, y1 = int(x.sum()), int(y.sum())
    # p_e · n² in integers, so "p_e == 1" is an exact test and not a float comparison.
    expected_times_n2 = x1 * y1 + (n - x1) * (n - y1)
    if expected_times_n2 == n * n:
        kappa = math.nan
    else:
        kappa = (agree * n - expected_times_n2) / (n * n - expected_times_n2)
    return {"kappa": kappa, "n": n, "raw_agreement": agree / n}
