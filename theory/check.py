"""Bound vs measurement for fine-tuning runs: a table and a figure, with violations flagged.

Input: a list of plain dicts, one per run (from a real-model experiment, or from theory/synthetic.py). Keys:

  common    name (str, optional), strategy ("case1" or "case2"), safety_gap (measured L_s(θ) − L_s(θ_s))
  case2     distance: ‖θ − θ_s‖₂ as measured (≤ the constraint radius; the bounds hold with the actual distance)
            lipschitz_s        → the Lipschitz bound  L_s·r                      (bounds.case2_lipschitz_bound)
            smoothness_s, grad_norm_s (‖∇L_s(θ_s)‖)
                               → the smoothness bound ‖∇L_s(θ_s)‖·r + β_s r²/2  (bounds.case2_smoothness_bound)
            capability_gain (L_f(θ_s) − L_f(θ)), lipschitz_f
                               → the gain cap L_f·r                            (bounds.case2_capability_gain_bounds)
  case1     lam, capability_excess_at_anchor (L_f(θ_s) − min L_f; in practice L_f(θ_s) minus the best capability loss
            seen), similarity (δ, e.g. bounds.similarity_term at θ_s and θ)
                               → the penalty bound excess/λ + 2δ                (bounds.case1_penalty_bound)

Every bound whose ingredients are present is evaluated; missing ingredients skip that bound. The constants of a real
model are estimates (landscape.local_lipschitz and smoothness_along are maxima over sampled points, i.e. lower
estimates of the true local constants), so a flagged "violation" means the estimate or the assumptions failed, not
that mathematics did: the table says which bound and by how much.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from theory import bounds


@dataclasses.dataclass(frozen=True)
class BoundCheck:
    run: str
    strategy: str
    bound_name: str  # "lipschitz", "smoothness", "capability_gain", "penalty"
    x: float  # the dial: distance r (case2) or λ (case1)
    measured: float
    bound: float
    violated: bool

    @property
    def slack(self) -> float:
        """bound − measured (negative when violated)."""
        return self.bound - self.measured


def _violated(measured: float, bound: float, tolerance: float) -> bool:
    # A relative tolerance absorbs measurement noise (e.g. a loss evaluated on a finite batch); 0 = exact check.
    return measured > bound + tolerance * max(1.0, abs(bound))


def check_runs(runs: Sequence[Mapping], tolerance: float = 0.0) -> list[BoundCheck]:
    """One BoundCheck per (run, bound whose ingredients the run provides)."""
    checks = []
    for i, run in enumerate(runs):
        name = str(run.get("name", f"run{i}"))
        strategy = run.get("strategy")
        if strategy == "case2":
            r = float(run["distance"])
            candidates = []
            if "lipschitz_s" in run:
                candidates.append(("lipschitz", run["safety_gap"],
                                   bounds.case2_lipschitz_bound(run["lipschitz_s"], r).bound))
            if "smoothness_s" in run and "grad_norm_s" in run:
                candidates.append(("smoothness", run["safety_gap"],
                                   bounds.case2_smoothness_bound(run["grad_norm_s"], run["smoothness_s"], r).bound))
            if "capability_gain" in run and "lipschitz_f" in run:
                candidates.append(("capability_gain", run["capability_gain"],
                                   bounds.case2_capability_gain_bounds(run["lipschitz_f"], r).upper))
            x = r
        elif strategy == "case1":
            x = float(run["lam"])
            candidates = [("penalty", run["safety_gap"],
                           bounds.case1_penalty_bound(x, run["capability_excess_at_anchor"], 0.0,
                                                      run["similarity"]).bound)]
        else:
            raise ValueError(f"run {name!r}: strategy must be 'case1' or 'case2', got {strategy!r}")
        for bound_name, measured, bound in candidates:
            measured, bound = float(measured), float(bound)
            checks.append(BoundCheck(name, strategy, bound_name, x, measured, bound,
                                     _violated(measured, bound, tolerance)))
    return checks


def format_table(checks: Sequence[BoundCheck]) -> str:
    """A markdown table: run, strategy, bound, dial, measured, bound, slack, status."""
    lines = ["| run | strategy | bound | r or λ | measured | bound | slack | status |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for c in checks:
        status = "**VIOLATED**" if c.violated else "ok"
        lines.append(f"| {c.run} | {c.strategy} | {c.bound_name} | {c.x:.4g} | {c.measured:.4g} | {c.bound:.4g} | "
                     f"{c.slack:.3g} | {status} |")
    n_bad = sum(c.violated for c in checks)
    lines.append("")
    lines.append(f"{len(checks)} checks, {n_bad} violated.")
    return "\n".join(lines)


def plot(checks: Sequence[BoundCheck], path) -> None:
    """PNG: one panel per bound kind, measured (dots) and bound (crosses) against the dial; violations in red."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe inside the training process as well
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(c.bound_name for c in checks))
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.2 * max(1, len(kinds)), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = sorted((c for c in checks if c.bound_name == kind), key=lambda c: c.x)
        xs = [c.x for c in rows]
        ax.plot(xs, [c.bound for c in rows], "x--", color="tab:blue", label="bound")
        ax.scatter(xs, [c.measured for c in rows], c=["tab:red" if c.violated else "tab:green" for c in rows],
                   zorder=3, label="measured")
        strategy = rows[0].strategy
        ax.set_xlabel("λ" if strategy == "case1" else "‖θ − θ_s‖")
        if strategy == "case1" and all(x > 0 for x in xs):
            ax.set_xscale("log")
        ax.set_ylabel("capability gain" if kind == "capability_gain" else "safety gap G_s")
        ax.set_title(f"{strategy}: {kind} ({sum(c.violated for c in rows)} violated)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(checks: Sequence[BoundCheck]) -> dict:
    """Counts and the worst relative slack per bound kind (for a JSON record)."""
    out = {}
    for kind in dict.fromkeys(c.bound_name for c in checks):
        rows = [c for c in checks if c.bound_name == kind]
        worst = min(rows, key=lambda c: c.slack / max(abs(c.bound), 1e-30))
        out[kind] = {"checks": len(rows), "violated": sum(c.violated for c in rows),
                     "worst_run": worst.run, "worst_slack": worst.slack,
                     "worst_ratio": worst.measured / worst.bound if worst.bound else math.inf}
    return out
