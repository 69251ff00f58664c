"""Case II sweep: fine-tune the aligned model projected onto the ball ‖θ − θ_s‖₂ ≤ r for several radii, then check
the project's Lipschitz, smoothness and capability-gain bounds with estimated constants (theory/real.py).

    python experiments/tradeoff_case2.py --aligned runs/align/hf --out runs/tradeoff_case2
    python experiments/tradeoff_case2.py --aligned runs/align/hf --out runs/tradeoff_case2 steps=40 --radii 0.25 1

Runs (experiments/configs/finetune.yaml: the harmful Q+A attack set, strategy case2_projection, plus the short-run
overrides of tradeoff_runs.SHORT_RUN) go to OUT/r<r>; a run whose hf/ exists is reused. Then `safetrade theory` on
every run: OUT/theory/{result.json,bounds.md,bounds.png}. The check costs, per run, 2 × (samples + 2) gradients and
2 × lanczos_steps HVPs (memory: lanczos_steps parameter-sized vectors). Trailing KEY=VALUE overrides go to every
fine-tune; --theory KEY=VALUE (repeatable) to the check,
e.g. --theory samples=8 --theory lanczos_steps=12.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tradeoff_runs  # noqa: E402

DEFAULT_RADII = (0.5, 1.0, 2.0, 4.0)


def main(argv=None) -> int:
    p = tradeoff_runs.sweep_parser(__doc__.split("\n")[0])
    p.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII), help="ball radii r")
    args = p.parse_intermixed_args(argv)  # overrides may sit before or after options
    align_config = args.align_config or str(Path(args.aligned).parent / "config.yaml")

    runs = [tradeoff_runs.launch(args.aligned, args.out / f"r{r:g}", args.config,
                                 ["strategy.name=case2_projection", f"strategy.radius={r}", *args.overrides])
            for r in args.radii]
    if not args.no_check:
        tradeoff_runs.check(args.aligned, runs, args.out, [f"align_config={align_config}", *args.theory])
    return 0


if __name__ == "__main__":
    sys.exit(main())
