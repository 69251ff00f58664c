"""The project's bounds checked on real fine-tuning runs of an aligned model (Case I and Case II).

    safetrade theory aligned=runs/align/hf runs=[runs/case2/r0.5,runs/case2/r1] out_dir=runs/theory/case2
    python experiments/tradeoff_case1.py --aligned runs/align/hf --out runs/tradeoff_case1   (launches + checks)

Inputs: the aligned model (an HF dir; the job config of the alignment run -- by default `config.yaml` beside it,
as `safetrade align` writes it -- defines the original safety rows) and fine-tune run dirs written by
`safetrade finetune`, each holding `hf/` (the merged model) and `config.yaml` (its resolved config: strategy name,
strategy.lam / strategy.radius, data.train, data.proxy).

Measured per run, on fixed batches of held-out rows (never trained on: the same hashed cut `held_out` gives the
training jobs, first `n_rows` of it, response-only token-mean loss):
  r         ‖θ − θ_s‖₂ over every parameter (the Case II ball's norm)
  L_s       loss on the original safety rows (`safety_set` of the alignment run's data); G_s = L_s(θ) − L_s(θ_s)
  L_proxy   loss on the run's proxy set (data.proxy), at θ and θ_s
  L_f       loss on the run's fine-tuning set (data.train), at θ and θ_s; capability gain = L_f(θ_s) − L_f(θ)
Case II runs (case2_projection, case2_penalty), constants from theory/landscape.py:
  ‖∇L_s(θ_s)‖; L_s and L_f Lipschitz = max ‖∇L‖ over θ_s, `samples` points uniform in B(θ_s, r) and θ itself;
  β = largest |Hessian eigenvalue| of L_s by Lanczos (`lanczos_steps`) at θ_s and θ.
  Checks: G_s ≤ L_s·r, G_s ≤ ‖∇L_s(θ_s)‖·r + β r²/2, gain ≤ L_f·r (theory/README.md P1-P3).
Case I runs (case1_penalty with λ = strategy.lam):
  Check P4: G_s(θ_λ) ≤ [L_f(θ_s) − min L_f]/λ + 2δ.
  - min L_f is not known; it is *estimated* by the smallest L_f measured at θ_s or any run with the same fine-tuning
    set. P4 holds with the true minimum, which is ≤ that estimate, so the estimated bound is *smaller* than the
    proven one: it is valid only if the estimate is a lower estimate of min L_f, which the smallest measured loss
    is not guaranteed to be. A violation can therefore come from this estimate.
  - δ = max |L_s − L_proxy| over the measured points of that proxy (θ_s and every run with that proxy):
    `bounds.similarity_term`. P4 needs |L_s − L_proxy| ≤ δ only at θ_s and θ_λ, both measured.
  - P4 also needs F(θ_λ) ≤ F(θ_s), F = L_f + λ·L_proxy (a descent run from θ_s); it is measured on the held-out
    batches and reported per run (`objective_decreased`), since a failure there voids the check's hypothesis.
  Trends (check.case1_trends): G_s vs λ per proxy (non-increasing?), L_f vs λ (non-decreasing?), and whether the
  closer proxy (smaller δ) has the smaller G_s at equal λ.
Every Case I and Case II run, the a-posteriori certificate (`segment_points` > 0; bounds.segment_certificate):
  G_s ≤ ⟨∇L_s(θ_s), Δ⟩ + ½ β_Δ‖Δ‖² and gain ≤ −⟨∇L_f(θ_s), Δ⟩ − ½ α_Δ‖Δ‖², Δ = θ − θ_s, with β_Δ / α_Δ the
  max / min directional curvature uᵀ∇²L u at `segment_points` equally spaced points of θ_s → θ
  (landscape.segment_profile; one forward-over-forward pass per point and loss, ~1.5 gradients). bounds.md tables bound / measured for the
  worst-case bounds and the certificate (goal ≤ 10×); certificates.png draws both against r and λ.
All constants are maxima over sampled points, i.e. lower estimates of the true suprema: a bound built from them is
evidence, not a certificate. Violations are counted, tabled and drawn in red, never dropped.

Writes to out_dir: result.json (the job, the aligned model's losses, every run's measurements, checks, summary,
ratios, trends, notes), bounds.md (tables + notes), bounds.png (bound vs measured per setting), certificates.png
(worst-case bound, certificate and measured G_s against r / λ) and, with Case I runs, case1_trends.png (G_s and
L_f against λ per proxy).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax

from safetrade import config
from safetrade.data import encode_rows, make_batch
from safetrade.data.sets import held_out, rows_for
from safetrade.errors import SafetradeError
from safetrade.models import io, llama
from safetrade.train.losses import lm_loss
from theory import bounds, check, landscape

log = logging.getLogger(__name__)

# Training strategy -> the family of bounds that applies to its result. case2_penalty ends somewhere near θ_s
# without a hard radius; P1-P3 hold for any point at its measured distance, so it is checked like a projection run.
# sft and case1_constrained runs are measured (they still inform the min L_f estimate) but have no check.
CASE_OF_STRATEGY = {"case1_penalty": "case1", "case2_projection": "case2", "case2_penalty": "case2"}


@dataclasses.dataclass(frozen=True)
class TheoryJob:
    aligned: str = "runs/align/hf"  # the aligned model θ_s (HF dir)
    runs: tuple[str, ...] = ()  # fine-tune run dirs, each with hf/ and config.yaml
    out_dir: str = "runs/theory"
    align_config: str = ""  # job config of the alignment run ("" = config.yaml beside `aligned`)
    safety_set: str = "alignment"  # the original safety data, a set of the alignment run's data section
    n_rows: int = 16  # held-out rows per loss batch (at most each set's data.eval_rows: only those were held out)
    max_len: int = 256  # tokens per row (longer rows are truncated)
    samples: int = 4  # random points in each ball for the Lipschitz estimates (Case II)
    lanczos_steps: int = 8  # Lanczos steps per smoothness estimate (Case II)
    seed: int = 0  # seed of the ball samples and Lanczos start vectors
    segment_points: int = 5  # points on θ_s → θ for the a-posteriori certificate (0 = no certificate)
    segment_method: str = "forward"  # directional curvature: "forward" (forward-over-forward) or "jvp_of_grad"
    tolerance: float = 0.0  # relative slack before a measured gap counts as a violation (0 = exact comparison)

    def __post_init__(self):
        for name in ("n_rows", "max_len", "lanczos_steps"):
            if getattr(self, name) < 1:
                raise SafetradeError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("samples", "tolerance"):
            if getattr(self, name) < 0:
                raise SafetradeError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.segment_points == 1 or self.segment_points < 0:
            raise SafetradeError(f"segment_points must be 0 (no certificate) or >= 2, got {self.segment_points}")
        if self.segment_method not in landscape.SEGMENT_METHODS:
            raise SafetradeError(f"segment_method must be one of {landscape.SEGMENT_METHODS}, "
                                 f"got {self.segment_method!r}")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    path: Path
    name: str
    train_job: object  # safetrade.config.TrainJob
    case: str | None  # "case1", "case2" or None (measured only)


def _architecture(cfg):
    # Storage dtypes, rematerialisation and LoRA adapters (merged into hf/) do not change which function θ is.
    return dataclasses.replace(cfg, lora=None, dtype="float32", param_dtype="float32", remat=False)


def _differences(a, b) -> str:
    return ", ".join(f"{f.name} {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in dataclasses.fields(a)
                     if getattr(a, f.name) != getattr(b, f.name))


def read_runs(run_dirs, aligned_cfg, aligned: str) -> list[RunSpec]:
    """Validate every run dir before any model is loaded: hf/config.json, config.yaml, same architecture."""

    if not run_dirs:
        raise SafetradeError("runs is empty: give the fine-tune output dirs, e.g. runs=[runs/case2/r1,runs/case2/r2]")
    specs, names = [], set()
    for text in run_dirs:
        path = Path(text)
        if not path.is_dir():
            raise SafetradeError(f"run dir {path} not found")
        hf_config = path / "hf" / "config.json"
        if not hf_config.exists():
            raise SafetradeError(f"run dir {path}: no model at {path / 'hf'} (expected {hf_config}); "
                                 "has the fine-tune finished?")
        job_config = path / "config.yaml"
        if not job_config.exists():
            raise SafetradeError(f"run dir {path}: no {job_config} (the resolved fine-tune config, which records "
                                 "the strategy, λ or r, and data.proxy)")
        train_job = config.load(config.TrainJob, job_config)
        run_cfg = llama.config_from_hf(json.loads(hf_config.read_text()), where=str(hf_config))
        if _architecture(run_cfg) != _architecture(aligned_cfg):
            raise SafetradeError(f"{path / 'hf'} is not the same architecture as the aligned model {aligned} "
                                 f"({_differences(_architecture(run_cfg), _architecture(aligned_cfg))})")
        # The dir name, or parent/name where two runs share a name (e.g. <proxy>/lam1 for two proxies).
        name = path.name if path.name not in names else f"{path.parent.name}/{path.name}"
        names.add(name)
        specs.append(RunSpec(path, name, train_job, CASE_OF_STRATEGY.get(train_job.strategy.name)))
    return specs


def proxy_label(proxy: str) -> str:
    """A short name for tables and legends: the file stem of a proxy given as a path, else the set's name."""
    return Path(proxy).stem if ("/" in proxy or Path(proxy).suffix) else proxy


def _align_data(job: TheoryJob):
    """The alignment run's data section: it defines which rows are the original safety data and which were held out."""

    path = Path(job.align_config) if job.align_config else Path(job.aligned).parent / "config.yaml"
    if not path.exists():
        raise SafetradeError(f"{path} not found: the alignment run's job config defines the original safety rows; "
                             "set align_config=PATH (e.g. experiments/configs/align.yaml)")
    return config.load(config.TrainJob, path).data


class HeldOutLosses:
    """One fixed batch and one loss function per (set, data section): built once, so every jitted estimator
    compiles once per set (landscape functions take the loss as a static argument)."""

    def __init__(self, cfg, tokenizer, n_rows: int, max_len: int):
        self.cfg, self.tokenizer, self.n_rows, self.max_len = cfg, tokenizer, n_rows, max_len
        self._entries: dict = {}

    @staticmethod
    def _key(name: str, data):
        # Only the fields that change which rows a set holds and which of them were held out.
        return (name, data.seed, data.n_attack, data.benign_ratio, data.rephrased, data.benign_rephrased,
                data.eval_rows)

    def _entry(self, name: str, data):
        key = self._key(name, data)
        if key not in self._entries:
            # The rows `held_out` sets aside for this data section are exactly the rows the run never trained on;
            # more than data.eval_rows would reach into its training rows.
            _, rows = held_out(rows_for(name, data), data.eval_rows, seed=data.seed)
            rows = rows[:self.n_rows]
            if not rows:
                raise SafetradeError(f"set {name!r}: no held-out rows (data.eval_rows={data.eval_rows})")
            examples, _ = encode_rows(self.tokenizer, rows, max_len=self.max_len, policy="truncate", dataset=name)
            batch = make_batch(examples, max(len(e["input_ids"]) for e in examples),
                               pad_id=self.tokenizer.pad_token_id or 0)
            cfg = self.cfg

            def loss(params, batch=batch):
                return lm_loss(cfg, params, batch)

            self._entries[key] = {"loss": loss, "eval": jax.jit(loss), "rows": len(examples)}
        return self._entries[key]

    def loss_fn(self, name: str, data):
        return self._entry(name, data)["loss"]

    def value(self, name: str, data, params) -> float:
        return float(self._entry(name, data)["eval"](params))

    def rows(self, name: str, data) -> int:
        return self._entry(name, data)["rows"]


def measure_runs(job: TheoryJob, cfg, aligned, tokenizer, specs: list[RunSpec]) -> tuple[dict, list[dict]]:
    """(losses of the aligned model, one record per run) with every measured and estimated quantity."""

    align_data = _align_data(job)
    losses = HeldOutLosses(cfg, tokenizer, job.n_rows, job.max_len)
    base = {"safety_set": job.safety_set, "loss_s": losses.value(job.safety_set, align_data, aligned),
            "rows_s": losses.rows(job.safety_set, align_data)}
    loss_s = losses.loss_fn(job.safety_set, align_data)
    case2_constants = None
    records = []
    for k, spec in enumerate(specs):
        started = time.perf_counter()
        data, strategy = spec.train_job.data, spec.train_job.strategy
        _, params = io.load_hf(spec.path / "hf")
        record = {"name": spec.name, "dir": str(spec.path), "train_strategy": strategy.name, "strategy": spec.case,
                  "train": data.train, "proxy": data.proxy, "steps": spec.train_job.steps,
                  "distance": float(landscape.tree_norm(landscape.tree_sub(params, aligned))),
                  "loss_s": losses.value(job.safety_set, align_data, params),
                  "loss_f": losses.value(data.train, data, params),
                  "loss_f_at_aligned": losses.value(data.train, data, aligned),
                  "loss_proxy": losses.value(data.proxy, data, params),
                  "loss_proxy_at_aligned": losses.value(data.proxy, data, aligned),
                  "rows_f": losses.rows(data.train, data), "rows_proxy": losses.rows(data.proxy, data)}
        record["safety_gap"] = record["loss_s"] - base["loss_s"]
        record["capability_gain"] = record["loss_f_at_aligned"] - record["loss_f"]
        record["capability_loss"] = record["loss_f"]
        if spec.case == "case1":
            record["lam"] = float(strategy.lam)
            record["group"] = proxy_label(data.proxy)
        elif spec.case == "case2":
            record["radius"] = float(strategy.radius) if strategy.name == "case2_projection" else None
            key = jax.random.fold_in(jax.random.key(job.seed), k)
            lip_s = landscape.local_lipschitz(loss_s, aligned, record["distance"], job.samples, key,
                                              trajectory=[params])
            lip_f = landscape.local_lipschitz(losses.loss_fn(data.train, data), aligned, record["distance"],
                                              job.samples, key, trajectory=[params])
            if case2_constants is None:  # at θ_s: shared by every Case II run
                case2_constants = {
                    "grad_norm_s": float(lip_s.center),  # ‖∇L_s(θ_s)‖, already computed by the Lipschitz estimate
                    "smoothness_at_aligned": float(landscape.smoothness_along(
                        loss_s, [aligned], method="lanczos", num_steps=job.lanczos_steps,
                        key=jax.random.key(job.seed)).max)}
            beta_run = float(landscape.smoothness_along(loss_s, [params], method="lanczos",
                                                        num_steps=job.lanczos_steps, key=key).max)
            record.update(grad_norm_s=case2_constants["grad_norm_s"], lipschitz_s=float(lip_s.max),
                          lipschitz_f=float(lip_f.max), smoothness_at_run=beta_run,
                          smoothness_at_aligned=case2_constants["smoothness_at_aligned"],
                          smoothness_s=max(beta_run, case2_constants["smoothness_at_aligned"]),
                          lipschitz_s_sampled=[float(x) for x in lip_s.sampled],
                          lipschitz_f_sampled=[float(x) for x in lip_f.sampled],
                          sampling_rule=f"max ‖∇L‖ over θ_s, {job.samples} points uniform in B(θ_s, r) "
                                        "(landscape.sample_in_ball) and θ itself")
        if spec.case is not None and job.segment_points:
            record.update(certificate_terms(job, loss_s, losses.loss_fn(data.train, data), aligned, params))
        record["seconds"] = time.perf_counter() - started
        log.info("%s", json.dumps(record))
        records.append(record)
        del params
    return base, records


def certificate_terms(job: TheoryJob, loss_s, loss_f, aligned, params) -> dict:
    """The a-posteriori certificate of one run (bounds.segment_certificate) for G_s and for the capability gain,
    from `segment_points` equally spaced points of θ_s → θ (landscape.segment_profile)."""

    out = {"segment_rule": f"{job.segment_points} equally spaced t in [0, 1] (ends included), {job.segment_method}"}
    for name, loss in (("s", loss_s), ("f", loss_f)):
        profile = landscape.segment_profile(loss, aligned, params, job.segment_points, job.segment_method)
        cert = bounds.segment_certificate(profile.slopes[0], profile.curvatures, profile.step_norm, profile.ts)
        out[f"segment_{name}"] = {"ts": list(profile.ts), "values": list(profile.values),
                                  "slopes": list(profile.slopes), "curvatures": list(profile.curvatures),
                                  **dataclasses.asdict(cert)}
    # G_s ≤ upper of L_s; gain = −(change of L_f) ≤ −lower of L_f (and ≥ −upper)
    out["certificate_s"] = out["segment_s"]["upper"]
    out["certificate_gain"] = -out["segment_f"]["lower"]
    out["certificate_gain_lower"] = -out["segment_f"]["upper"]
    return out


def add_case1_terms(base: dict, records: list[dict]) -> dict:
    """Fill in the Case I bound's ingredients (min L_f estimate, δ, descent condition) from every measurement.

    Returns the per-fine-tuning-set min L_f estimates and per-proxy δ values, for the record.
    """

    by_train: dict[str, list[dict]] = {}
    for r in records:
        by_train.setdefault(r["train"], []).append(r)
    minima = {train: min([rs[0]["loss_f_at_aligned"], *(r["loss_f"] for r in rs)]) for train, rs in by_train.items()}
    by_proxy: dict[str, list[dict]] = {}
    for r in records:
        by_proxy.setdefault(r["proxy"], []).append(r)
    deltas = {}
    for proxy, rs in by_proxy.items():
        safety = [base["loss_s"], *(r["loss_s"] for r in rs)]
        proxy_losses = [rs[0]["loss_proxy_at_aligned"], *(r["loss_proxy"] for r in rs)]
        deltas[proxy] = bounds.similarity_term(safety, proxy_losses)
    for r in records:
        if r["strategy"] != "case1":
            continue
        lam = r["lam"]
        r["capability_loss_min_estimate"] = minima[r["train"]]
        r["capability_excess_at_anchor"] = r["loss_f_at_aligned"] - minima[r["train"]]
        r["similarity"] = deltas[r["proxy"]]
        r["objective_at_run"] = r["loss_f"] + lam * r["loss_proxy"]
        r["objective_at_aligned"] = r["loss_f_at_aligned"] + lam * r["loss_proxy_at_aligned"]
        r["objective_decreased"] = r["objective_at_run"] <= r["objective_at_aligned"]
    return {"capability_loss_min_estimate": minima, "similarity": deltas}


NOTES = [
    "Parameter-space gap: G_s(θ) = L_s(θ) − L_s(θ_s) on held-out original safety rows (theory/README.md).",
    "Lipschitz and smoothness constants are maxima over sampled points (lower estimates of the true local "
    "constants): a bound that holds with them is evidence, not a certificate.",
    "Case I: min L_f is estimated by the smallest L_f measured (θ_s or any run on the same fine-tuning set). The "
    "bound is proven with the true min L_f; it stays valid with an estimate only if that estimate is a lower one, "
    "which the smallest measured loss need not be — so a Case I violation may come from this estimate.",
    "Case I: δ = max |L_s − L_proxy| over θ_s and every run with that proxy (bounds.similarity_term).",
    "Case I: the bound assumes F(θ_λ) ≤ F(θ_s) with F = L_f + λ·L_proxy; runs where the held-out F rose are "
    "marked (objective_decreased = false).",
    "Certificate: β_Δ and α_Δ are the max and min of the directional curvature at the sampled points of θ_s → θ, "
    "a lower (upper) estimate of the true sup (inf) on the segment; a measured gap above the certificate means the "
    "curvature peaked between samples (or rounding), and is a finding.",
    "A violation means a wrong estimate or a failed assumption; it is reported, never dropped.",
]


def _case1_table(records: list[dict]) -> str:
    lines = ["| run | proxy | λ | G_s | L_f | L_f(θ_s) − min L_f (est.) | δ | F(θ_λ) ≤ F(θ_s) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted((r for r in records if r["strategy"] == "case1"), key=lambda r: (r["group"], r["lam"])):
        lines.append(f"| {r['name']} | {r['group']} | {r['lam']:.4g} | {r['safety_gap']:.4g} | {r['loss_f']:.4g} | "
                     f"{r['capability_excess_at_anchor']:.4g} | {r['similarity']:.4g} | "
                     f"{'yes' if r['objective_decreased'] else '**no**'} |")
    return "\n".join(lines)


def _case2_table(records: list[dict]) -> str:
    lines = ["| run | r | G_s | gain | ‖∇L_s(θ_s)‖ | L_s | β_s | L_f |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted((r for r in records if r["strategy"] == "case2"), key=lambda r: r["distance"]):
        lines.append(f"| {r['name']} | {r['distance']:.4g} | {r['safety_gap']:.4g} | {r['capability_gain']:.4g} | "
                     f"{r['grad_norm_s']:.4g} | {r['lipschitz_s']:.4g} | {r['smoothness_s']:.4g} | "
                     f"{r['lipschitz_f']:.4g} |")
    return "\n".join(lines)


def plot_case1_trends(records: list[dict], path) -> None:
    """G_s and L_f against λ, one line per proxy set (log-x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case1 = [r for r in records if r["strategy"] == "case1"]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
    for g, proxy in enumerate(dict.fromkeys(r["proxy"] for r in case1)):
        rows = sorted((r for r in case1 if r["proxy"] == proxy), key=lambda r: r["lam"])
        label = f"{rows[0]['group']} (δ={rows[0]['similarity']:.3g})"
        lams = sorted({r["lam"] for r in rows})
        for ax, key in ((axes[0], "safety_gap"), (axes[1], "loss_f")):
            # one point per run (training seeds), the line through the per-λ means
            ax.scatter([r["lam"] for r in rows], [r[key] for r in rows], color=f"C{g}", s=12, alpha=0.6)
            ax.plot(lams, [sum(r[key] for r in rows if r["lam"] == lam) / sum(r["lam"] == lam for r in rows)
                           for lam in lams], "-", color=f"C{g}", label=label)
    for ax, ylabel in zip(axes, ("safety gap G_s", "capability loss L_f")):
        ax.set_xlabel("λ")
        ax.set_ylabel(ylabel)
        if all(r["lam"] > 0 for r in case1):
            ax.set_xscale("log")
        ax.legend(fontsize=7)
    axes[0].set_title("Case I: G_s vs λ per proxy")
    axes[1].set_title("Case I: L_f vs λ per proxy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(job: TheoryJob, base: dict, records: list[dict], case1_terms: dict, out_dir: Path) -> dict:
    """result.json, bounds.md, bounds.png (+ case1_trends.png); returns the result dict."""

    out_dir.mkdir(parents=True, exist_ok=True)
    checked = [r for r in records if r["strategy"] in ("case1", "case2")]
    checks = check.check_runs(checked, tolerance=job.tolerance)
    trends = check.case1_trends(checked) if any(r["strategy"] == "case1" for r in checked) else None
    sections = ["# Bounds vs measured gaps", "", check.format_table(checks) if checks else "no Case I or II runs.", ""]
    ratios = check.ratio_rows(checks)
    if any(r["certificate"] is not None for r in ratios):
        sections += ["## How informative: bound / measured", "",
                     "Worst-case bound: the tightest of the a-priori bounds above; certificate: the a-posteriori "
                     "bound along the run's own segment (theory/README.md). A ratio needs a measured value > 0.", "",
                     check.format_ratio_table(ratios), ""]
    if any(r["strategy"] == "case2" for r in records):
        sections += ["## Case II constants", "", _case2_table(records), ""]
    if trends is not None:
        sections += ["## Case I ingredients", "", _case1_table(records), "", "## Case I trends", "",
                     check.format_trends(trends), ""]
    unchecked = [r["name"] for r in records if r["strategy"] is None]
    if unchecked:
        sections += [f"Measured without a check (strategy has no bound here): {', '.join(unchecked)}", ""]
    sections += ["## Notes", "", *(f"- {n}" for n in NOTES), ""]
    (out_dir / "bounds.md").write_text("\n".join(sections))
    if checks:
        check.plot(checks, out_dir / "bounds.png")
    if trends is not None:
        plot_case1_trends(records, out_dir / "case1_trends.png")
    if any(r["certificate"] is not None for r in ratios):
        check.plot_certificates(ratios, out_dir / "certificates.png")
    result = {"job": config.to_dict(job), "aligned": base, "runs": records,
              "checks": [{"name": f"{c.run}: {c.bound_name}", **dataclasses.asdict(c)} for c in checks], "summary": check.summary(checks),
              "violations": sum(c.violated for c in checks), "ratios": ratios, "case1": case1_terms, "trends": trends, "notes": NOTES}
    (out_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_theory_job(job: TheoryJob) -> dict:
    """Validate the inputs, measure every run, check the bounds, write the report; returns result.json's dict."""
    from safetrade.tokenizer import load_tokenizer  # transformers: 1.6 s at import, only when used

    aligned_dir = Path(job.aligned)
    if not (aligned_dir / "config.json").exists():
        raise SafetradeError(f"aligned model {aligned_dir}: no {aligned_dir / 'config.json'} (an HF dir, e.g. "
                             "runs/align/hf, is expected)")
    aligned_cfg = llama.config_from_hf(json.loads((aligned_dir / "config.json").read_text()),
                                       where=str(aligned_dir / "config.json"))
    specs = read_runs(job.runs, aligned_cfg, job.aligned)
    _align_data(job)  # fail on a missing alignment config before loading any weights
    cfg, aligned = io.load_hf(aligned_dir)
    tokenizer = load_tokenizer(job.aligned)
    base, records = measure_runs(job, cfg, aligned, tokenizer, specs)
    case1_terms = add_case1_terms(base, records)
    return write_report(job, base, records, case1_terms, Path(job.out_dir))

