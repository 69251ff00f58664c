"""Reading saved evaluation records: the printed table, `--compare` of several records, and the compare plot.

Everything here works from the JSON `suite.run_evaluation` writes, so a table can be re-rendered from old runs
without re-generating anything.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from safetrade.errors import EvaluationError


def headline(record: dict) -> dict[str, float]:
    """The scalar metrics of a record (the "detail/..." and "judge_check" entries left out)."""
    return {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float)) and not k.startswith("detail/")}


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(records: list[dict], labels: list[str] | None = None) -> str:
    """Metrics as rows, models as columns (plain text)."""
    labels = labels or [r["model"]["name"] for r in records]
    keys = list(dict.fromkeys(k for r in records for k in headline(r)))
    keys += [f"judge_check/{name}" for name in dict.fromkeys(n for r in records for n in r["metrics"]["judge_check"])]

    def value(r, k):
        if k.startswith("judge_check/"):
            return r["metrics"]["judge_check"].get(k.split("/", 1)[1], {}).get("accuracy")
        return headline(r).get(k)

    width = max(len(k) for k in keys) + 2
    cols = [max(10, len(label) + 2) for label in labels]
    lines = ["metric".ljust(width) + "".join(label.rjust(c) for label, c in zip(labels, cols))]
    for k in keys:
        lines.append(k.ljust(width) + "".join(_fmt(value(r, k)).rjust(c) for r, c in zip(records, cols)))
    return "\n".join(lines)


def compare(paths: list[str | os.PathLike], plot: str | os.PathLike | None = None) -> str:
    """Side-by-side table of evaluation JSONs; with `plot`, a PNG bar chart of the shared scalar metrics."""
    records, labels = [], []
    for p in paths:
        try:
            records.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise EvaluationError(f"{p}: not a readable evaluation JSON ({e})") from e
        if "metrics" not in records[-1]:
            raise EvaluationError(f"{p}: no 'metrics' key; is it a `safetrade evaluate` output?")
        labels.append(Path(p).stem)
    text = table(records, labels)
    if plot is not None:
        _bar_chart(records, labels, Path(plot))
    return text


def _bar_chart(records: list[dict], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in dict.fromkeys(k for r in records for k in headline(r))]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [headline(r).get(key, float("nan")) for r in records]
        ax.bar(range(len(records)), values, color=[f"C{i}" for i in range(len(records))])
        ax.set_xticks(range(len(records)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
        if key.startswith(("asr/", "over_refusal/", "gsm8k")):
            ax.set_ylim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
