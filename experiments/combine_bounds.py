"""Merge the result.json of several `safetrade theory` runs into one bound table and plot.

    python experiments/combine_bounds.py OUT_DIR runs/case2/theory_r0.5 runs/case2/theory_r1 ...

For checks run one fine-tune per process (the Case II check of a 135M model holds ~20 GB per run on CPU, so a
2-core/24 GB machine checks one radius at a time). Writes OUT_DIR/bounds.md and OUT_DIR/bounds.png with
theory.check's table and plot over every run's record (and, where the records carry the a-posteriori certificate,
the bound / measured table and OUT_DIR/certificates.png); the records themselves are not re-measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from theory import check


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        raise SystemExit(__doc__)
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for folder in args[1:]:
        path = Path(folder) / "result.json"
        if not path.exists():
            raise SystemExit(f"{path}: not found (a `safetrade theory` out_dir is expected)")
        records += json.loads(path.read_text())["runs"]
    checks = check.check_runs(records)
    ratios = check.ratio_rows(checks)
    text = check.format_table(checks) + "\n"
    if any(r["certificate"] is not None for r in ratios):
        text += "\n## How informative: bound / measured\n\n" + check.format_ratio_table(ratios) + "\n"
        check.plot_certificates(ratios, out / "certificates.png")
    (out / "bounds.md").write_text(text)
    check.plot(checks, out / "bounds.png")
    print(text)


if __name__ == "__main__":
    main()
