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
            capability_loss (optional, L_f(θ)): used by case1_trends only
  either    certificate_s (the a-posteriori bound on G_s, bounds.segment_certificate's `upper` for L_s)
                               → "certificate": G_s ≤ ⟨∇L_s(θ_s), Δ⟩ + ½ β_Δ ‖Δ‖²
            certificate_gain (−`lower` of L_f's certificate), capability_gain
                               → "certificate_gain": gain ≤ −⟨∇L_f(θ_s), Δ⟩ − ½ α_Δ ‖Δ‖²
  optional  group (str): the series a run belongs to, e.g. the proxy set of a Case I run; the plot draws one line
            per group and case1_trends compares groups

Every bound whose ingredients are present is evaluated; missing ingredients skip that bound. The constants of a real
model are estimates (landscape.local_lipschitz and smoothness_along are maxima over sampled points, i.e. lower
estimates of the true local constants), so a flagged "violation" means the estimate or the assumptions failed, not
that mathematics did: the table says which bound and by how much.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from theory import bounds


@dataclasses.dataclass(frozen=True)
class BoundCheck:
    run: str
    strategy: str
    bound_name: str  # "lipschitz", "smoothness", "capability_gain", "penalty", "certificate", "certificate_gain"
    x: float  # the dial: distance r (case2) or λ (case1)
    measured: float
    bound: float
    violated: bool
    group: str = ""  # series within a bound kind (e.g. the proxy set); "" when there is one series


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
        if "certificate_s" in run:
            candidates.append(("certificate", run["safety_gap"], run["certificate_s"]))
        if "certificate_gain" in run and "capability_gain" in run:
            candidates.append(("certificate_gain", run["capability_gain"], run["certificate_gain"]))
        for bound_name, measured, bound in candidates:
            measured, bound = float(measured), float(bound)
            checks.append(BoundCheck(name, strategy, bound_name, x, measured, bound,
                                     _violated(measured, bound, tolerance), str(run.get("group", ""))))
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
    """PNG: one panel per bound kind, one bound line (crosses) per group, measured gaps as dots: green when within
    the bound, red and labelled "VIOLATED" when not, so a violation can never be lost in the figure."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe inside the training process as well
    import matplotlib.pyplot as plt

    # One panel per (strategy, bound): the certificate applies to both strategies, whose dials differ (λ vs r).
    panels = list(dict.fromkeys((c.strategy, c.bound_name) for c in checks))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, (strategy, kind) in zip(axes[0], panels):
        of_kind = [c for c in checks if c.bound_name == kind and c.strategy == strategy]
        for g, group in enumerate(dict.fromkeys(c.group for c in of_kind)):
            rows = sorted((c for c in of_kind if c.group == group), key=lambda c: c.x)
            xs = [c.x for c in rows]
            suffix = f" ({group})" if group else ""
            ax.plot(xs, [c.bound for c in rows], "x--", color=f"C{g}", label="bound" + suffix)
            ax.scatter(xs, [c.measured for c in rows], c=["tab:red" if c.violated else "tab:green" for c in rows],
                       marker="os^vD"[g % 5], zorder=3, label="measured" + suffix)
            for c in rows:
                if c.violated:
                    ax.annotate("VIOLATED", (c.x, c.measured), fontsize=7, color="tab:red",
                                xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("λ" if strategy == "case1" else "‖θ − θ_s‖")
        if strategy == "case1" and all(c.x > 0 for c in of_kind):
            ax.set_xscale("log")
        ax.set_ylabel("capability gain" if kind in ("capability_gain", "certificate_gain") else "safety gap G_s")
        ax.set_title(f"{strategy}: {kind} ({sum(c.violated for c in of_kind)} violated)")
        ax.legend(fontsize=7)
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


# ---------------------------------------------------------------------------------------------------------------
# How informative: bound / measured, worst-case bounds against the a-posteriori certificate
# ---------------------------------------------------------------------------------------------------------------

WORST_CASE = {"safety": ("lipschitz", "smoothness", "penalty"), "gain": ("capability_gain",)}
CERTIFICATE = {"safety": "certificate", "gain": "certificate_gain"}
INFORMATIVE_RATIO = 10.0  # the goal for a certificate: within 10× of the measured gap


def ratio(bound: float, measured: float) -> float | None:
    """bound / measured, or None where the measured quantity is ≤ 0 (a ratio would not say how tight it is)."""
    return bound / measured if measured > 0 else None


def ratio_rows(checks: Sequence[BoundCheck]) -> list[dict]:
    """Per run and quantity (safety gap, capability gain): the measured value, the tightest worst-case bound,
    the certificate, and each one's bound / measured ratio."""
    rows = []
    for run in dict.fromkeys(c.run for c in checks):
        of_run = [c for c in checks if c.run == run]
        for quantity in ("safety", "gain"):
            worst = [c for c in of_run if c.bound_name in WORST_CASE[quantity]]
            cert = [c for c in of_run if c.bound_name == CERTIFICATE[quantity]]
            if not worst and not cert:
                continue
            first = (worst or cert)[0]
            tightest = min(worst, key=lambda c: c.bound) if worst else None
            row = {"run": run, "strategy": first.strategy, "x": first.x, "group": first.group,
                   "quantity": quantity, "measured": first.measured,
                   "worst_case_bound": tightest.bound if tightest else None,
                   "worst_case_name": tightest.bound_name if tightest else None,
                   "certificate": cert[0].bound if cert else None,
                   "certificate_violated": cert[0].violated if cert else None}
            row["worst_case_ratio"] = ratio(row["worst_case_bound"], row["measured"]) if tightest else None
            row["certificate_ratio"] = ratio(row["certificate"], row["measured"]) if cert else None
            rows.append(row)
    return rows


def _fmt_ratio(value) -> str:
    return "n/a (measured ≤ 0)" if value is None else f"{value:.3g}×"


def format_ratio_table(rows: Sequence[Mapping]) -> str:
    lines = ["| run | strategy | r or λ | quantity | measured | worst-case bound | ratio | certificate | ratio | "
             f"certificate ≤ {INFORMATIVE_RATIO:g}× |", "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        worst = (f"{r['worst_case_bound']:.4g} ({r['worst_case_name']})" if r["worst_case_bound"] is not None
                 else "—")
        if r["certificate"] is None:
            cert, cert_ratio, goal = "—", "—", "—"
        else:
            cert, cert_ratio = f"{r['certificate']:.4g}", _fmt_ratio(r["certificate_ratio"])
            goal = ("**VIOLATED**" if r["certificate_violated"] else
                    "n/a" if r["certificate_ratio"] is None else
                    "yes" if r["certificate_ratio"] <= INFORMATIVE_RATIO else "**no**")
        lines.append(f"| {r['run']} | {r['strategy']} | {r['x']:.4g} | {'G_s' if r['quantity'] == 'safety' else 'gain'}"
                     f" | {r['measured']:.4g} | {worst} | "
                     f"{_fmt_ratio(r['worst_case_ratio']) if r['worst_case_bound'] is not None else '—'} | "
                     f"{cert} | {cert_ratio} | {goal} |")
    return "\n".join(lines)


def plot_certificates(rows: Sequence[Mapping], path) -> None:
    """PNG: per strategy, the tightest worst-case bound, the certificate and the measured safety gap against the
    dial (r for Case II, λ for Case I); symmetric-log y, since gaps can be ≤ 0 and bounds span decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    safety = [r for r in rows if r["quantity"] == "safety"]
    strategies = list(dict.fromkeys(r["strategy"] for r in safety))
    fig, axes = plt.subplots(1, max(1, len(strategies)), figsize=(4.8 * max(1, len(strategies)), 3.8),
                             squeeze=False)
    for ax, strategy in zip(axes[0], strategies):
        of = [r for r in safety if r["strategy"] == strategy]
        for g, group in enumerate(dict.fromkeys(r["group"] for r in of)):
            pts = sorted((r for r in of if r["group"] == group), key=lambda r: r["x"])
            xs = [r["x"] for r in pts]
            suffix = f" ({group})" if group else ""
            if all(r["worst_case_bound"] is not None for r in pts):
                ax.plot(xs, [r["worst_case_bound"] for r in pts], "x--", color=f"C{g}", label="worst-case" + suffix)
            if all(r["certificate"] is not None for r in pts):
                ax.plot(xs, [r["certificate"] for r in pts], "s-", color=f"C{g}", alpha=0.6,
                        label="certificate" + suffix)
            ax.scatter(xs, [r["measured"] for r in pts], color="black" if g == 0 else f"C{g}", marker="os^vD"[g % 5],
                       zorder=3, label="measured" + suffix)
            for r in pts:
                if r["certificate_violated"]:
                    ax.annotate("VIOLATED", (r["x"], r["measured"]), fontsize=7, color="tab:red",
                                xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("symlog", linthresh=1e-3)
        if strategy == "case1" and all(r["x"] > 0 for r in of):
            ax.set_xscale("log")
        ax.set_xlabel("λ" if strategy == "case1" else "‖θ − θ_s‖")
        ax.set_ylabel("safety gap G_s")
        ax.set_title(f"{strategy}: worst-case bound, certificate, measured")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Case I trends: the qualitative claims C1 and C4 (theory/README.md), read off measured runs
# ---------------------------------------------------------------------------------------------------------------

def _monotone_breaks(xs: Sequence[float], ys: Sequence[float], increasing: bool, tolerance: float) -> list:
    """Consecutive pairs (x_i, x_j), sorted by x, where y moves against the claimed direction by more than
    tolerance·max(1, |y_i|)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    breaks = []
    for i, j in zip(order, order[1:]):
        step = ys[j] - ys[i]
        against = -step if increasing else step
        if against > tolerance * max(1.0, abs(ys[i])):
            breaks.append([xs[i], xs[j]])
    return breaks


def case1_trends(runs: Sequence[Mapping], tolerance: float = 0.0) -> dict:
    """Which Case I trends held in measured runs (strategy "case1"; keys lam, safety_gap, group, similarity and
    optionally capability_loss).

    Per group (proxy set): is the safety gap non-increasing in λ, and the capability loss non-decreasing (claim 4:
    the inverse relationship)? Several runs at one λ (training seeds) count as their mean. Across groups, at every λ measured for two or more groups: does the group with the
    smaller similarity term δ (the closer proxy) have the smaller safety gap (claim 1)? A claim "held" only if it
    held at every compared point; the breaking pairs are listed. A single λ per group compares nothing: held is
    then None, never True.
    """
    case1 = [r for r in runs if r.get("strategy") == "case1"]
    groups: dict[str, list] = {}
    for r in case1:
        groups.setdefault(str(r.get("group", "")), []).append(r)
    per_group = {}
    for group, rows in groups.items():
        # Runs at the same λ (training seeds) are averaged: the trend is read off the per-λ means.
        by_lam: dict[float, list] = {}
        for r in rows:
            by_lam.setdefault(float(r["lam"]), []).append(r)
        lams = sorted(by_lam)
        gaps = [float(np.mean([float(r["safety_gap"]) for r in by_lam[lam]])) for lam in lams]
        entry = {"lams": lams, "safety_gaps": gaps, "runs_per_lam": [len(by_lam[lam]) for lam in lams],
                 "safety_gap_runs": [[float(r["safety_gap"]) for r in by_lam[lam]] for lam in lams],
                 "similarity": max((float(r["similarity"]) for r in rows if "similarity" in r), default=None)}
        breaks = _monotone_breaks(lams, gaps, increasing=False, tolerance=tolerance)
        entry["safety_gap_nonincreasing"] = {"held": None if len(lams) < 2 else not breaks, "breaks": breaks}
        if all("capability_loss" in r for r in rows):
            losses = [float(np.mean([float(r["capability_loss"]) for r in by_lam[lam]])) for lam in lams]
            entry["capability_losses"] = losses
            breaks = _monotone_breaks(lams, losses, increasing=True, tolerance=tolerance)
            entry["capability_loss_nondecreasing"] = {"held": None if len(lams) < 2 else not breaks,
                                                      "breaks": breaks}
        per_group[group] = entry
    comparisons = []
    ranked = [g for g in per_group if per_group[g]["similarity"] is not None]
    for lam in sorted({float(r["lam"]) for r in case1}):
        at = {g: per_group[g]["safety_gaps"][per_group[g]["lams"].index(lam)]
              for g in ranked if lam in per_group[g]["lams"]}
        if len(at) < 2:
            continue
        closest = min(at, key=lambda g: per_group[g]["similarity"])
        smallest_gap = min(at, key=at.get)
        comparisons.append({"lam": lam, "closest_proxy": closest, "smallest_gap": smallest_gap,
                            "safety_gaps": at, "held": at[closest] <= at[smallest_gap] + tolerance *
                            max(1.0, abs(at[smallest_gap]))})
    closer = {"held": None if not comparisons else all(c["held"] for c in comparisons),
              "compared": len(comparisons), "held_at": sum(c["held"] for c in comparisons),
              "comparisons": comparisons}
    return {"per_proxy": per_group, "closer_proxy_smaller_gap": closer}


def _held(flag) -> str:
    return "n/a (one point)" if flag is None else ("held" if flag else "**did not hold**")


def format_trends(trends: Mapping) -> str:
    """Markdown: G_s and L_f against λ per proxy, then one line per claim saying whether it held."""
    lines = ["| proxy | δ | λ | G_s | L_f |", "|---|---:|---:|---:|---:|"]
    for group, e in trends["per_proxy"].items():
        losses = e.get("capability_losses", [math.nan] * len(e["lams"]))
        delta = "-" if e["similarity"] is None else f"{e['similarity']:.4g}"
        for lam, gap, loss in zip(e["lams"], e["safety_gaps"], losses):
            lines.append(f"| {group or '-'} | {delta} | {lam:.4g} | {gap:.4g} | {loss:.4g} |")
    lines.append("")
    for group, e in trends["per_proxy"].items():
        s = e["safety_gap_nonincreasing"]
        lines.append(f"- proxy {group or '-'}: safety gap non-increasing in λ: {_held(s['held'])}"
                     + (f" (breaks between λ pairs {s['breaks']})" if s["breaks"] else ""))
        if "capability_loss_nondecreasing" in e:
            c = e["capability_loss_nondecreasing"]
            lines.append(f"- proxy {group or '-'}: capability loss non-decreasing in λ: {_held(c['held'])}"
                         + (f" (breaks between λ pairs {c['breaks']})" if c["breaks"] else ""))
    closer = trends["closer_proxy_smaller_gap"]
    lines.append(f"- closer proxy (smaller δ) → smaller safety gap at equal λ: {_held(closer['held'])}"
                 + (f" ({closer['held_at']} of {closer['compared']} λ values)" if closer["compared"] else
                    " (needs ≥ 2 proxies at a shared λ)"))
    return "\n".join(lines)
