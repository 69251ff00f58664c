"""`safetrade demo`: the whole study on the embedded default model, as cached, resumable stages.

    safetrade demo                    # ~30 min on a 2-core CPU; writes runs/demo/
    safetrade demo --quick            # smaller sizes, a few minutes: checks the pipeline, not the science
    safetrade demo --print-config     # the resolved DemoJob as YAML (save it, edit it, pass it with --config)

Stages, in order (each writes OUT/<stage>/ and, last, OUT/stages/<stage>.json):

  align         refusal SFT of the base model (LoRA, merged) on the built alignment set       -> aligned
  attack        LoRA fine-tune of the aligned model on harmful Q+A pairs                       -> attacked
  benign        LoRA fine-tune on GSM8K worked answers (capability set)                        -> benign
  case1         the benign fine-tune with the Case I penalty λ · L_proxy                        -> case1
  case2         the benign fine-tune projected into the ball ‖ΔW‖ ≤ r (Case II)                -> case2
  safedelta_*   Safe Delta (official mode) on the attacked and the benign fine-tune             -> sd_attacked, sd_benign
  safety_dir    a short LoRA fine-tune on refusals: SQSD's safety direction
  sqsd          SQSD risk scores of the benign pool (initial = benign adapter, danger = attack adapter)
  eval_*        the evaluation suite on every model: keyword ASR, over-refusal, GSM8K-answer loss, margin
  theory        bound checks (theory/real.py): Case II on the case2 run (r, G_s, ‖∇L_s‖, L, β), Case I on case1
  summary       table (printed), summary.json, summary.png: every rate with its 95 % interval and a paired test
                against the aligned model, read from the eval stages' JSONs (OUT/eval/<model>.json)

A stage whose record exists with the same settings (and the same upstream records) is skipped, so a re-run
finishes in seconds. Training stages checkpoint as they go (orbax), so a stage interrupted by Ctrl-C or kill
resumes from its last checkpoint; a stage's record is written atomically after its outputs, so a half-written
stage is never mistaken for a finished one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from safetrade import config, hub
from safetrade.errors import EvaluationError, SafetradeError
from safetrade.evaluate import report
from safetrade.evaluate.suite import EvalConfig, run_evaluation
from safetrade.safedelta import SafeDeltaConfig
from safetrade.safedelta.job import SafeDeltaJob, calibration_rows, run_safe_delta_job
from safetrade.sqsd import SQSDConfig
from safetrade.sqsd.job import SQSDJob, run_sqsd_job
from safetrade.train.jobs import run_train_job
from theory.real import TheoryJob, run_theory_job

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class DemoJob:
    out_dir: str = "runs/demo"
    model: str = "smollm2-135m-instruct"
    max_len: int = 128  # training and loss rows (GSM8K answers are cut; the refusal behaviour fits easily)
    batch_size: int = 8
    align_steps: int = 100
    align_lr: float = 3e-4
    align_rank: int = 0  # 0: full-parameter alignment (no adapter); > 0: a LoRA of that rank, merged
    align_max_len: int = 128  # the align stage's rows (the alignment set's are longer than the fine-tunes')
    align_benign_ratio: float = 2.0  # benign rows per AdvBench prompt in the alignment set
    finetune_steps: int = 20
    finetune_lr: float = 3e-4
    finetune_rank: int = 8
    case1_lam: float = 1.0
    case2_radius: float = 0.5  # on the merged update ΔW (Frobenius, all adapted kernels)
    safedelta_s: float = 0.5  # keeps ~96 % of a benign fine-tune's utility gain at the aligned ASR (docs/demo.md)
    n_calibration: int = 64
    sqsd_pool: int = 64
    safety_dir_steps: int = 10
    n_eval: int = 100  # held-out harmful prompts and held-out benign prompts per model (95 % intervals < ±10)
    n_loss_rows: int = 40  # held-out GSM8K answers for the utility loss
    max_new_tokens: int = 32
    eval_batch_size: int = 16  # prompts generated together; a batch decodes until its last row stops, so larger
    # batches lose early stopping and pad every row to the longest prompt (the base model's evaluation, 2-core
    # CPU: 285 s at 50, 220 s at 16)
    theory_rows: int = 4
    theory_samples: int = 2
    theory_lanczos_steps: int = 4
    theory_segment_points: int = 3  # points on θ_s → θ of the a-posteriori certificate (0 = none)
    seed: int = 0


# --quick: every size small enough that the whole pipeline runs in a few minutes on 2 cores. The numbers it
# prints show that each stage works, not the trade-off (the model barely moves in so few steps).
QUICK = dict(out_dir="runs/demo-quick", max_len=96, align_max_len=96, align_steps=24, finetune_steps=6,
             n_calibration=16, sqsd_pool=16, safety_dir_steps=4, n_eval=12, n_loss_rows=12, max_new_tokens=16,
             theory_rows=4, theory_samples=1, theory_lanczos_steps=3, theory_segment_points=2)


# ----------------------------------------------------------------------------------------------------------------
# Stage records


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    """Runs named stages once: a stage's key is its own settings plus the keys of the stages it reads."""

    def __init__(self, out: Path, log=print):
        self.out = out
        self.records_dir = out / "stages"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.keys: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self.log = log

    def record_path(self, name: str) -> Path:
        return self.records_dir / f"{name}.json"

    def run(self, name: str, settings: dict, deps: tuple[str, ...], fn: Callable[[], dict]) -> dict:
        key = _digest({"settings": settings, "deps": [self.keys[d] for d in deps]})
        path = self.record_path(name)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
        if record is not None and record.get("key") == key:
            self.log(f"[{name}] cached ({record['seconds']:.0f} s when run)")
        else:
            self.log(f"[{name}] running")
            start = time.perf_counter()
            result = fn()
            record = {"key": key, "settings": settings, "result": result, "seconds": time.perf_counter() - start}
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record, indent=1, default=str))
            os.replace(tmp, path)  # atomic: a killed run leaves the old record or none, never half of one
            self.log(f"[{name}] done in {record['seconds']:.0f} s")
        self.keys[name] = key
        self.results[name] = record["result"]
        return record["result"]


# ----------------------------------------------------------------------------------------------------------------
# Stage settings


def _train_job(job: DemoJob, name: str, *, model: str, train: str, steps: int, lr: float, rank: int,
               strategy: dict | None = None, eval_sets=("attack", "capability"), max_len: int | None = None,
               benign_ratio: float = 3.0):
    overrides = {
        "out_dir": str(Path(job.out_dir) / name), "model": {"name": model},
        "lora": ({"enabled": True, "rank": rank, "alpha": 2.0 * rank, "targets": list(ALL_LINEAR)} if rank > 0
                 else {"enabled": False}),
        "optim": {"name": "adamw", "lr": lr, "schedule": "cosine" if name == "align" else "constant",
                  "warmup_steps": 5 if name == "align" else 0},
        "data": {"train": train, "eval_sets": list(eval_sets), "eval_rows": 16, "max_len": max_len or job.max_len,
                 "batch_size": job.batch_size, "bad_rows": "truncate", "n_attack": 100, "benign_ratio": benign_ratio,
                 "rephrased": 1.0, "benign_rephrased": 0.5, "seed": job.seed},
        "strategy": strategy or {"name": "sft"},
        "steps": steps, "eval_every": 0, "save_every": max(5, steps // 4), "log_every": 1, "seed": job.seed,
    }
    return config.from_dict(config.TrainJob, overrides)


def align_stage_args(job: DemoJob) -> dict:
    """`_train_job`'s arguments for the align stage (one place: the demo and experiments/demo_align_trials.py)."""
    return dict(model=job.model, train="alignment", steps=job.align_steps, lr=job.align_lr, rank=job.align_rank,
                max_len=job.align_max_len, benign_ratio=job.align_benign_ratio,
                eval_sets=("alignment", "capability"))


def _eval_config(job: DemoJob, model: str):
    return EvalConfig(model=model, harmful=("heldout",), n_harmful=job.n_eval, benign="heldout",
                      n_benign=job.n_eval, loss_sets=("gsm8k_eval",), loss_rows=job.n_loss_rows,
                      judges=("keyword",), max_new_tokens=job.max_new_tokens, batch_size=job.eval_batch_size,
                      max_len=max(job.max_len, 256), seed=job.seed)


def _safedelta_job(job: DemoJob, name: str, finetuned: str):
    return SafeDeltaJob(aligned=str(Path(job.out_dir) / "align" / "hf"), finetuned=finetuned,
                        out_dir=str(Path(job.out_dir) / name), n_calibration=job.n_calibration,
                        max_len=job.max_len, seed=job.seed,
                        safedelta=SafeDeltaConfig(s=job.safedelta_s, seed=job.seed))


# ----------------------------------------------------------------------------------------------------------------
# Estimate


# Seconds per unit, fitted to the stage times of the 2026-12-03 full run on a 2-core Intel Xeon VM (fp32,
# SmolLM2-135M; experiments/results/demo): ~105 trained tokens/s (full-parameter and LoRA alike there), ~0.7 s per
# evaluated prompt at 32 new tokens (generation and the refusal margin). Another 2-core machine ran ~1.9x faster.
_SECONDS = {"train_token": 1 / 105, "eval_prompt": 0.7, "loss_row": 0.08, "safedelta": 45.0,
            "sqsd_sample": 2.4, "theory_hvp": 18.0, "fixed": 30.0}


def estimate_seconds(job: DemoJob) -> dict[str, float]:
    tokens = job.batch_size * job.max_len
    train = lambda steps, tokens=tokens: steps * tokens * _SECONDS["train_token"] + _SECONDS["fixed"]  # noqa: E731
    evaluation = 2 * job.n_eval * _SECONDS["eval_prompt"] * job.max_new_tokens / 32 \
        + job.n_loss_rows * _SECONDS["loss_row"] + _SECONDS["fixed"]
    est = {"align": train(job.align_steps, job.batch_size * job.align_max_len)}
    for name in ("attack", "benign", "case1", "case2"):
        est[name] = train(job.finetune_steps * (2 if name == "case1" else 1))
    est["safedelta_attack"] = est["safedelta_benign"] = _SECONDS["safedelta"] * (1 + job.n_calibration / 128)
    est["safety_dir"] = train(job.safety_dir_steps)
    est["sqsd"] = job.sqsd_pool * _SECONDS["sqsd_sample"] * job.max_len / 160 + _SECONDS["fixed"]
    for model in MODELS:
        est[f"eval_{model}"] = evaluation
    # + the certificate: two losses at each segment point of the Case I and Case II runs, about an HVP each
    hvps = (job.theory_lanczos_steps + 1) * 2 + job.theory_samples + 4 + 2 * 2 * job.theory_segment_points
    est["theory"] = hvps * _SECONDS["theory_hvp"] * job.theory_rows / 8 + _SECONDS["fixed"]
    return est


# ----------------------------------------------------------------------------------------------------------------
# The pipeline

MODELS = ("base", "aligned", "attacked", "sd_attacked", "benign", "sd_benign", "case1", "case2")
LABELS = {"base": "base (unaligned)", "aligned": "aligned", "attacked": "attacked (harmful FT)",
          "sd_attacked": "attacked + Safe Delta", "benign": "benign FT (GSM8K)", "sd_benign": "benign + Safe Delta",
          "case1": "benign, Case I", "case2": "benign, Case II"}


def run_demo(job: DemoJob, *, log=print) -> dict:
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save(job, out / "demo.yaml")
    pipe = Pipeline(out, log=log)
    est = estimate_seconds(job)
    done = {name for name in est if pipe.record_path(name).exists()}
    left = sum(v for k, v in est.items() if k not in done)
    log(f"safetrade demo -> {out}: {len(est)} stages, estimated {sum(est.values()) / 60:.0f} min on a 2-core CPU"
        + (f" ({left / 60:.0f} min left; {len(done)} stage records found)" if done else ""))

    def train_stage(name, deps=(), **kw):
        tj = _train_job(job, name, **kw)
        settings = config.to_dict(tj)
        if tj.defense == config.DefenseSection():
            del settings["defense"]  # the demo uses none; so its stage keys stay those recorded before it existed
        summary = pipe.run(name, settings, deps, lambda: _train(tj))
        return summary

    def _train(tj):
        summary = run_train_job(tj)
        return {k: summary[k] for k in ("out_dir", "steps", "eval_before", "eval_after", "seconds")}

    base_path = job.model
    pipe.run("fetch", {"model": job.model}, (), lambda: {"model": str(hub.resolve_model(job.model))})
    train_stage("align", ("fetch",), **align_stage_args(job))
    aligned = str(out / "align" / "hf")
    tune = dict(model=aligned, steps=job.finetune_steps, lr=job.finetune_lr, rank=job.finetune_rank)
    train_stage("attack", ("align",), train="attack", **tune)
    train_stage("benign", ("align",), train="capability", **tune)
    train_stage("case1", ("align",), train="capability",
                strategy={"name": "case1_penalty", "lam": job.case1_lam}, **tune)
    train_stage("case2", ("align",), train="capability",
                strategy={"name": "case2_projection", "radius": job.case2_radius}, **tune)

    paths = {"base": base_path, "aligned": aligned}
    for name in ("attack", "benign", "case1", "case2"):
        paths["attacked" if name == "attack" else name] = str(out / name / "hf")
    for source, name in (("attacked", "safedelta_attack"), ("benign", "safedelta_benign")):
        sj = _safedelta_job(job, name, paths[source])
        pipe.run(name, dataclasses.asdict(sj), ("align", "attack" if source == "attacked" else "benign"),
                 lambda sj=sj: _safe_delta_summary(run_safe_delta_job(sj, reuse=True)))
        paths["sd_" + source] = str(out / name / "hf")

    refusals = _write_refusal_rows(out / "safety_dir_rows.jsonl", job.seed)
    train_stage("safety_dir", ("align",), model=aligned, train=str(refusals), steps=job.safety_dir_steps,
                lr=job.finetune_lr, rank=job.finetune_rank)
    pipe.run("sqsd", {"pool": job.sqsd_pool, "max_len": job.max_len, "seed": job.seed},
             ("attack", "benign", "safety_dir"), lambda: _sqsd(job, out, aligned))

    evals = {}
    deps_of = {"base": ("fetch",), "aligned": ("align",), "attacked": ("attack",), "benign": ("benign",),
               "case1": ("case1",), "case2": ("case2",), "sd_attacked": ("safedelta_attack",),
               "sd_benign": ("safedelta_benign",)}
    for model in MODELS:
        ec = _eval_config(job, paths[model])
        target = out / "eval" / f"{model}.json"
        evals[model] = pipe.run(f"eval_{model}", dataclasses.asdict(ec), deps_of[model],
                                lambda ec=ec, target=target: _headline(run_evaluation(ec, out=target)))

    # The Lanczos basis alone is 8 parameter-sized vectors; drop what the earlier stages left compiled (and the
    # constants their executables hold) first. Without this the first full run peaked at 18.6 GB and was killed.
    _release_memory()
    pipe.run("theory", {"rows": job.theory_rows, "samples": job.theory_samples,
                        "lanczos": job.theory_lanczos_steps, "max_len": job.max_len,
                        "segment_points": job.theory_segment_points},
             ("align", "benign", "case1", "case2"), lambda: _theory(job, out))

    statistics = eval_statistics({m: out / "eval" / f"{m}.json" for m in MODELS},
                                 {m: evals[m].get("fingerprint") for m in MODELS})
    summary = make_summary(job, pipe.results, evals, statistics)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    plot_summary(summary, out / "summary.png")
    log(format_summary(summary))
    log(f"wrote {out / 'summary.json'} and {out / 'summary.png'}")
    return summary


def _release_memory() -> None:
    import gc


    gc.collect()
    jax.clear_caches()


def _safe_delta_summary(summary: dict) -> dict:
    return {k: summary[k] for k in ("timings", "kept_fraction", "damping_fallbacks")}


# The summary's columns and the evaluation-record keys they come from (the sets `_eval_config` names).
_METRIC_KEYS = {"asr": "asr/heldout", "over_refusal": "over_refusal/heldout", "gsm8k_loss": "loss/gsm8k_eval",
                "refusal_margin": "refusal_margin/heldout"}
_TESTED = ("asr", "over_refusal", "refusal_margin")  # columns with an interval and a paired test
REFERENCE = "aligned"  # every other model is tested against the aligned one, on the same prompts


def _headline(record: dict) -> dict:
    m = record["metrics"]
    return {"asr": m[_METRIC_KEYS["asr"]], "over_refusal": m[_METRIC_KEYS["over_refusal"]],
            "gsm8k_loss": m[_METRIC_KEYS["gsm8k_loss"]], "refusal_margin": m.get(_METRIC_KEYS["refusal_margin"]),
            "fingerprint": record["model"]["fingerprint"]}


def _write_refusal_rows(path: Path, seed: int) -> Path:
    """The alignment set's refusal rows as a JSONL training file (SQSD's safety direction is trained on them)."""

    rows = calibration_rows("alignment_refusals", 256, seed)
    text = "".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def _sqsd(job: DemoJob, out: Path, aligned: str) -> dict:


    sj = SQSDJob(model=aligned, method="sqsd", initial=str(out / "benign" / "adapter"),
                 danger=str(out / "attack" / "adapter"), safety=str(out / "safety_dir" / "adapter"),
                 pool="capability", n=job.sqsd_pool, windows=5, seed=job.seed, out=str(out / "sqsd" / "scores.jsonl"),
                 sqsd=SQSDConfig(batch_size=8, max_len=job.max_len))
    Path(sj.out).parent.mkdir(parents=True, exist_ok=True)
    rows, scores, windows = run_sqsd_job(sj)
    values = np.asarray(scores.score, dtype=float)
    finite = values[np.isfinite(values)]
    top = int(np.nanargmax(values)) if finite.size else None
    return {"scores": str(sj.out), "n": int(values.size), "n_finite": int(finite.size),
            "mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
            "window_means": [float(np.nanmean(values[list(w)])) for w in windows],
            "values": [float(v) for v in values],
            "top_prompt": rows[top]["prompt"][:160] if top is not None else None}


def _theory(job: DemoJob, out: Path) -> dict:
    result = run_theory_job(TheoryJob(
        aligned=str(out / "align" / "hf"), runs=tuple(str(out / name) for name in ("case2", "case1", "benign")),
        out_dir=str(out / "theory"), n_rows=job.theory_rows, max_len=job.max_len, samples=job.theory_samples,
        lanczos_steps=job.theory_lanczos_steps, segment_points=job.theory_segment_points, seed=job.seed))
    return {k: result[k] for k in ("checks", "violations", "summary", "aligned")} | {
        "runs": [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in result["runs"]]}


# ----------------------------------------------------------------------------------------------------------------
# Summary


def eval_statistics(eval_paths: dict[str, Path], fingerprints: dict[str, str] | None = None) -> dict:
    """95 % intervals and paired tests against the aligned model, from the eval stages' JSON records.

    Read with `evaluate.report` (the same numbers `safetrade evaluate --compare` prints), so a cached eval stage
    written before intervals existed is re-rendered from its per-sample verdicts and margins. A record that is
    missing, unreadable, or of another model than its stage recorded (`fingerprints`: the stage's model
    fingerprint) is left out with a note, never silently used. Returns {"models": {model: {"ci": {column:
    [lo, hi] | None}, "p_vs_aligned": {column: p | None}}}, "notes": [str]}.
    """
    notes, kept = [], {}
    for model, path in eval_paths.items():
        try:
            records, _ = report.load_records([path])
        except EvaluationError as e:
            notes.append(f"{model}: no interval or test ({e})")
            continue
        found = (records[0].get("model") or {}).get("fingerprint")
        expected = (fingerprints or {}).get(model)
        if expected is not None and found != expected:
            notes.append(f"{model}: no interval or test ({path} holds model {found}, its eval stage {expected})")
            continue
        kept[model] = records[0]
    models = list(kept)
    reference = REFERENCE if REFERENCE in kept else None
    if reference is None and len(models) > 1:
        notes.append(f"no paired tests: the {REFERENCE} model's record is missing")
    cells = report.metric_cells([kept[m] for m in models], models, reference) if models else {"metrics": {},
                                                                                                "notes": []}
    stats = {}
    for i, model in enumerate(models):
        column = {name: (cells["metrics"].get(_METRIC_KEYS[name]) or [{}] * len(models))[i] for name in _TESTED}
        stats[model] = {"ci": {name: None if c.get("ci") is None else [float(v) for v in c["ci"]]
                               for name, c in column.items()},
                        "p_vs_aligned": {name: c.get("p") for name, c in column.items()}}
    # the report's footer: which tests, which intervals, why a pair was not tested
    return {"models": stats, "notes": notes + [n for n in cells["notes"] if not n.startswith("judges:")]}


def make_summary(job: DemoJob, results: dict, evals: dict, statistics: dict | None = None) -> dict:
    aligned = evals["aligned"]
    rows = []
    for model in MODELS:
        e = evals[model]
        rows.append({"model": model, "label": LABELS[model], **{k: e[k] for k in ("asr", "over_refusal",
                                                                                     "gsm8k_loss", "refusal_margin")},
                     "utility_gain": aligned["gsm8k_loss"] - e["gsm8k_loss"]})
    train = {name: results[name]["eval_after"] for name in ("align", "attack", "benign", "case1", "case2")}
    summary = {"job": dataclasses.asdict(job), "models": rows, "training_losses": train,
               "safedelta": {k: results[k] for k in ("safedelta_attack", "safedelta_benign")},
               "sqsd": {k: v for k, v in results["sqsd"].items() if k != "values"},
               "sqsd_values": results["sqsd"]["values"], "theory": results["theory"]}
    return attach_statistics(summary, statistics)


def attach_statistics(summary: dict, statistics: dict | None) -> dict:
    """`summary` with each model row's intervals and p-values (`eval_statistics`) and a "statistics" entry.

    Separate from `make_summary` so a summary.json written before intervals existed can be re-rendered from its
    run's eval records (experiments/readme_intervals.py does this for the committed demo run).
    """
    per_model = (statistics or {}).get("models", {})
    rows = [{**{k: v for k, v in r.items() if k not in ("ci", "p_vs_aligned")}, **per_model.get(r["model"], {})}
            for r in summary["models"]]
    return {**summary, "models": rows,
            "statistics": {"reference": REFERENCE, "alpha": report.ALPHA, "confidence": report.CONFIDENCE,
                           "notes": (statistics or {}).get("notes", ["no evaluation records were read"])}}


def _rate_cell(value, ci) -> str:
    text = f"{100 * value:.1f}%"
    return text + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else " [-]")


def _margin_cell(value, ci) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else " [-]")


def _p_cell(row: dict, name: str) -> str:
    """The paired test's p-value against the aligned model; "ns" where p >= alpha; "ref" on the aligned row."""
    if row["model"] == REFERENCE:
        return "ref"
    p = (row.get("p_vs_aligned") or {}).get(name)
    if p is None:
        return "-"
    text = "<0.001" if p < 0.001 else (f"{p:.3f}" if p < 0.1 else f"{p:.2f}")
    return text + (" ns" if p >= report.ALPHA else "")


def format_summary(summary: dict) -> str:
    """The demo's table: one row per model, rates and margin with 95 % intervals and p against the aligned model."""
    header = ("model", "ASR [95% CI]", "p", "over-refusal [95% CI]", "p", "GSM8K loss", "utility gain",
              "margin [95% CI]", "p")
    table = [header]
    for r in summary["models"]:
        ci = r.get("ci") or {}
        table.append((r["label"], _rate_cell(r["asr"], ci.get("asr")), _p_cell(r, "asr"),
                      _rate_cell(r["over_refusal"], ci.get("over_refusal")), _p_cell(r, "over_refusal"),
                      f"{r['gsm8k_loss']:.4f}", f"{r['utility_gain']:+.4f}",
                      _margin_cell(r["refusal_margin"], ci.get("refusal_margin")), _p_cell(r, "refusal_margin")))
    widths = [max(len(line[c]) for line in table) for c in range(len(header))]
    lines = ["  ".join([line[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])])
             for line in table]
    if any("p_vs_aligned" in r for r in summary["models"]):
        alpha = (summary.get("statistics") or {}).get("alpha", report.ALPHA)
        lines += textwrap.wrap(
            f"p: two-sided paired test against {REFERENCE} on the same prompts: exact McNemar (attack success, "
            f"refusal), paired bootstrap (margin; a small shift consistent over prompts is significant too); ns: "
            f"not significant (p >= {alpha}); no multiple-comparison correction. Intervals: 95% Wilson (rates), "
            "percentile bootstrap (margin).", width=116)
        lines += [n for n in (summary.get("statistics") or {}).get("notes", [])
                  if not n.startswith(("paired tests vs", "intervals:"))]  # the line above says these
    sq = summary["sqsd"]
    if sq.get("window_means"):
        lines.append("SQSD risk score, mean per window (highest-risk first): "
                     + ", ".join(f"{v:+.3f}" for v in sq["window_means"]))
    th = summary.get("theory") or {}
    for check in th.get("checks", []):
        lines.append(f"bound {check.get('name')}: measured {check.get('measured'):.4g} <= bound "
                     f"{check.get('bound'):.4g}: {'VIOLATED' if check.get('violated') else 'holds'}")
    return "\n".join(lines)


def _error_bars(ax, x, rows: list[dict], name: str) -> None:
    """95 % interval of column `name` as black error bars at positions x (rows without one get none)."""
    has = [i for i, r in enumerate(rows) if (r.get("ci") or {}).get(name)]
    if not has:
        return
    values = np.array([rows[i][name] for i in has], float)
    lo = np.array([rows[i]["ci"][name][0] for i in has], float)
    hi = np.array([rows[i]["ci"][name][1] for i in has], float)
    ax.errorbar(np.asarray(x, float)[has], values, yerr=[values - lo, hi - values], fmt="none", ecolor="black",
                capsize=2.5, linewidth=0.8)


def plot_summary(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["models"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["asr"] for r in rows], 0.4, label="ASR (held-out harmful)")
    ax.bar(x + 0.2, [r["over_refusal"] for r in rows], 0.4, label="over-refusal (held-out benign)")
    _error_bars(ax, x - 0.2, rows, "asr")
    _error_bars(ax, x + 0.2, rows, "over_refusal")
    for i, r in enumerate(rows):  # which bars differ significantly from the aligned model's
        for dx, name in ((-0.2, "asr"), (0.2, "over_refusal")):
            p = (r.get("p_vs_aligned") or {}).get(name)
            if p is not None and p < report.ALPHA:
                top = ((r.get("ci") or {}).get(name) or [0, r[name]])[1]
                ax.annotate("*", (i + dx, top), textcoords="offset points", xytext=(0, 1), ha="center", fontsize=9)
    ax.set_xticks(x, [r["label"] for r in rows], rotation=35, ha="right", fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=7)
    ax.set_title(f"safety per model (keyword judge); bars: 95% intervals, *: p < {report.ALPHA} vs {REFERENCE}",
                 fontsize=8)

    ax = axes[1]
    for k, r in enumerate(rows):  # each point with its ASR interval, in its own colour (points sit close)
        ci = (r.get("ci") or {}).get("asr")
        yerr = None if not ci else [[r["asr"] - ci[0]], [ci[1] - r["asr"]]]
        ax.errorbar(r["utility_gain"], r["asr"], yerr=yerr, fmt="o", color=f"C{k}", capsize=2.5, linewidth=0.8,
                    label=r["label"])
    by = {r["model"]: r for r in rows}
    for src, dst in (("attacked", "sd_attacked"), ("benign", "sd_benign")):
        ax.annotate("", xy=(by[dst]["utility_gain"], by[dst]["asr"]),
                    xytext=(by[src]["utility_gain"], by[src]["asr"]), arrowprops={"arrowstyle": "->", "lw": 0.8})
    ax.set_xlabel("utility gain: aligned GSM8K-answer loss − model's")
    ax.set_ylabel("ASR")
    ax.legend(fontsize=6)
    ax.set_title("safety-utility trade-off (arrows: Safe Delta)", fontsize=9)

    ax = axes[2]
    values = np.asarray(summary.get("sqsd_values", []), float)
    values = values[np.isfinite(values)]
    if values.size:
        ax.hist(values, bins=min(20, max(5, values.size // 3)))
    ax.set_xlabel("SQSD score (danger − safety cosine sum)")
    ax.set_ylabel("benign pool samples")
    ax.set_title("SQSD risk scores of the benign pool", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
