"""Windows over a ranking, and scores written as JSON lines beside the rows they score.

    windows = rank_windows(scores, n_windows=5)          # S1 (highest risk) .. S5, index arrays
    write_jsonl("scores.jsonl", rows, scores, windows)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from safetrade.sqsd.directions import SQSDError
from safetrade.sqsd.samples import SampleScores

__all__ = ["rank_windows", "write_jsonl"]


def rank_windows(scores: SampleScores | np.ndarray, n_windows: int = 5,
                 window_size: int | None = None) -> list[np.ndarray]:
    """Sample indices (input order) of `n_windows` equal windows over the ranking, highest score first.

    As the official process_and_sample.py: sort descending, windows of `window_size` starting at
    `np.linspace(0, N − window_size, n_windows, dtype=int)`. N counts only finite scores (NaN samples are not
    ranked). With the default window_size N // n_windows the windows never overlap, and they partition the
    ranking when n_windows divides N (otherwise the N mod n_windows leftover ranks fall between windows); the
    official runs used 1000 of ~15,000.
    """
    values = np.asarray(scores.score if isinstance(scores, SampleScores) else scores, np.float64)
    valid = np.flatnonzero(np.isfinite(values))
    order = valid[np.argsort(-values[valid], kind="stable")]
    n = len(order)
    if n_windows < 1:
        raise SQSDError(f"n_windows must be >= 1, got {n_windows}")
    size = n // n_windows if window_size is None else window_size
    if not 1 <= size <= n:
        raise SQSDError(f"window size {size} does not fit {n} ranked samples ({len(values) - n} unscored)")
    starts = np.linspace(0, n - size, n_windows, dtype=int)
    return [order[start:start + size] for start in starts]


def _json_number(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict], scores: SampleScores,
                windows: Sequence[np.ndarray] | None = None) -> Path:
    """One JSON line per row, in `rows` order: the row's fields (prompt, response, ...), the score, its
    components, rank (1 = highest; null when unscored), window (1-based, if `windows` given) and flags.

    Rows are matched to scores by id; a row that was never scored (e.g. dropped by encode_rows) is written with
    null scores and the flag "not_scored", so nothing disappears silently. NaN is written as null.
    """
    index = {}
    for i, sample_id in enumerate(scores.ids):
        if sample_id in index:
            raise SQSDError(f"sample id {sample_id!r} occurs twice in the scores; ids must be unique")
        index[sample_id] = i
    row_ids = [str(row.get("id", "")) for row in rows]
    unknown = sorted(set(index) - set(row_ids))
    if unknown:
        raise SQSDError(f"{len(unknown)} scored sample id(s) have no row (e.g. {', '.join(unknown[:3])})")
    rank = np.full(len(scores.ids), -1, np.int64)
    valid = np.flatnonzero(scores.valid)
    rank[valid[np.argsort(-scores.score[valid], kind="stable")]] = np.arange(1, len(valid) + 1)
    window_of = {}
    for w, members in enumerate(windows or (), start=1):
        for i in members:
            window_of.setdefault(int(i), w)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row, row_id in zip(rows, row_ids):
            record: dict[str, Any] = dict(row)
            i = index.get(row_id)
            if i is None:
                record.update(method=scores.method, score=None, rank=None, flags=["not_scored"])
                record.update({k: None for k in scores.components})
            else:
                record.update(method=scores.method, score=_json_number(scores.score[i]),
                              rank=int(rank[i]) if rank[i] > 0 else None, flags=list(scores.flags[i]))
                record.update({k: _json_number(v[i]) for k, v in scores.components.items()})
                if windows is not None:
                    record["window"] = window_of.get(i)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
