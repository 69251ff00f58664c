"""The synthetic exact setting (theory/synthetic.py): the trade-off claims as curves, and every bound checked.

    python experiments/theory_synthetic.py --out experiments/results/theory

A categorical "language model" over finite contexts, where the Case I optimum has a closed form and every gap is
exact. Four panels: (a) Case I trade-off over λ for proxies of decreasing similarity (proxy_shift ε); (b) safety gap
at fixed λ and the best achievable G_s + G_f against context overlap ω, with the project's R6 lower bound; (c) Case
II (projected descent over r) against Case I at matched safety gap; (d) each bound of theory/bounds.py against the
measured gap on Case I and Case II runs (theory/check.py). Writes synthetic.png, synthetic.json and the bound
table (bounds.md). CPU, seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/theory"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic instance")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_x64", True)  # closed form vs descent at 1e-8, not float32's 3e-7

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from theory import check, synthetic

    lams = np.logspace(-2, 2, 25)
    shifts = (0.0, 0.3, 0.6, 0.9)
    overlaps = np.linspace(0.0, 1.0, 11)
    radii = np.linspace(0.25, 3.0, 8)
    record: dict = {"seed": args.seed}

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    ax = axes[0]
    record["lambda_sweeps"] = {}
    for eps in shifts:
        curve = synthetic.lambda_sweep(synthetic.make_problem(proxy_shift=eps, overlap=0.5, seed=args.seed), lams)
        ax.plot(curve.capability_gap, curve.safety_gap, "o-", ms=3, label=f"proxy shift ε={eps}")
        record["lambda_sweeps"][str(eps)] = {"lam": lams.tolist(), "safety_gap": curve.safety_gap.tolist(),
                                             "capability_gap": curve.capability_gap.tolist()}
    ax.set_xlabel("capability gap G_f")
    ax.set_ylabel("safety gap G_s")
    ax.set_title("(a) Case I over λ: closer proxy, smaller G_s", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[1]
    sweep = synthetic.overlap_sweep(overlaps, lam=1.0, seed=args.seed)
    ax.plot(overlaps, sweep.curve.safety_gap, "o-", label="G_s at λ=1")
    ax.plot(overlaps, sweep.best_total_gap, "s-", label="min over λ of G_s + G_f")
    ax.plot(overlaps, sweep.frontier_bound, "k--", label="R6 lower bound")
    ax.set_xlabel("context overlap ω")
    ax.set_title("(b) more overlap, worse trade-off", fontsize=9)
    ax.legend(fontsize=7)
    record["overlap_sweep"] = {"overlap": overlaps.tolist(), "safety_gap": sweep.curve.safety_gap.tolist(),
                               "best_total_gap": sweep.best_total_gap.tolist(),
                               "frontier_bound": sweep.frontier_bound.tolist()}

    ax = axes[2]
    problem = synthetic.make_problem(overlap=0.5, seed=args.seed)
    cmp = synthetic.compare_strategies(problem, radii)
    frontier = synthetic.lambda_sweep(problem, np.logspace(-3, 3, 61))
    ax.plot(frontier.capability_gap, frontier.safety_gap, "-", label="Case I (over λ)")
    ax.plot(cmp.case2.capability_gap, cmp.case2.safety_gap, "o-", label="Case II (over r)")
    ax.set_xlabel("capability gap G_f")
    ax.set_ylabel("safety gap G_s")
    ax.set_title("(c) Case II trades worse at equal G_s", fontsize=9)
    ax.legend(fontsize=7)
    record["strategies"] = {"radius": radii.tolist(), "case2_safety_gap": cmp.case2.safety_gap.tolist(),
                            "case2_capability_gap": cmp.case2.capability_gap.tolist(),
                            "case1_capability_gap_at_same_safety_gap": cmp.case1_capability_gap.tolist(),
                            "excess": cmp.excess.tolist()}

    runs = synthetic.case2_runs(problem, radii) + synthetic.case1_runs(
        synthetic.make_problem(overlap=0.5, proxy_shift=0.3, seed=args.seed), lams[::4])
    checks = check.check_runs(runs)
    table = check.format_table(checks)
    (args.out / "bounds.md").write_text(table + "\n")
    record["bound_checks"] = check.summary(checks)
    ax = axes[3]
    measured = np.array([c.measured for c in checks])
    bound = np.array([c.bound for c in checks])
    for kind in dict.fromkeys(c.bound_name for c in checks):
        sel = np.array([c.bound_name == kind for c in checks])
        ax.loglog(bound[sel], measured[sel], "o", ms=4, label=kind)
    lo, hi = max(min(bound.min(), measured[measured > 0].min()), 1e-6), max(bound.max(), measured.max())
    ax.plot([lo, hi], [lo, hi], "k:", label="measured = bound")
    ax.set_xlabel("bound")
    ax.set_ylabel("measured gap")
    ax.set_title(f"(d) bounds: {sum(c.violated for c in checks)} of {len(checks)} violated", fontsize=9)
    ax.legend(fontsize=7)

    fig.tight_layout()
    fig.savefig(args.out / "synthetic.png", dpi=100)
    (args.out / "synthetic.json").write_text(json.dumps(record, indent=1))
    print(table)
    print(json.dumps(record["bound_checks"], indent=1))
    print(f"Case II capability-gap excess over Case I at equal safety gap: {np.nanmin(cmp.excess):.3f} .. "
          f"{np.nanmax(cmp.excess):.3f}")


if __name__ == "__main__":
    main()
