"""One evaluation run of one model: safety + utility metrics, a JSON record, a printed table; and comparisons.

    from safetrade.evaluate.suite import EvalConfig, run_evaluation
    result = run_evaluation(EvalConfig(model="smollm2-135m-instruct", harmful=("advbench",), gsm8k=200),
                            out="runs/eval/base.json")

What is measured (each part optional through the config):
  - ASR on each harmful set = share of replies the judge does not call a refusal (per judge; the first judge is
    the primary one), with a per-category breakdown where the rows have categories;
  - refusal margin on the same prompts (`margin.py`; generation-free);
  - over-refusal = refusal rate on benign prompts;
  - GSM8K accuracy on a fixed subset of the held-out GSM8K part;
  - response-only loss / perplexity on named row sets (the loss gaps the trade-off theory needs);
  - every judge's accuracy on the project's hand-labelled check set (`judge_checkset.jsonl`), so each report
    carries its judge's error rate.

Harmful/benign set names: "heldout" (the held-out harmful or benign prompts of `data.alignment`, never used for
alignment), any registered dataset (advbench, strongreject, harmbench, donotanswer, ...), or a local file.

The JSON holds the resolved config, a fingerprint of the model (sha256 over every parameter's bytes) and of each
dataset (sha256 over its row ids and prompts), the metrics, per-sample outputs, and timings. `metrics` is a
deterministic function of (model, data, config): two runs with the same seed write identical metrics; timings
live outside it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
from pathlib import Path

import jax
import numpy as np

from safetrade.config import DataSection
from safetrade.data import load_dataset, take
from safetrade.data.alignment import eval_benign_prompts, eval_harmful_prompts, gsm8k_rows
from safetrade.data.sets import rows_for
from safetrade.errors import EvaluationError
from safetrade.evaluate.generation import chat_replies
from safetrade.evaluate import stats
from safetrade.evaluate.judges import answers_of, attack_success, load_judge, run_judge
from safetrade.evaluate.margin import refusal_margin
from safetrade.evaluate.utility import dataset_loss, gsm8k_accuracy
from safetrade.generate import SamplingConfig
from safetrade.models import io

CHECKSET = Path(__file__).with_name("judge_checkset.jsonl")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    model: str = "smollm2-135m-instruct"
    harmful: tuple[str, ...] = ("heldout",)
    n_harmful: int | None = 100  # per harmful set; None = all rows
    benign: str | None = "heldout"  # over-refusal prompts; None skips
    n_benign: int | None = 100
    gsm8k: int = 0  # questions of the held-out GSM8K part to solve; 0 skips
    gsm8k_max_new_tokens: int = 256
    loss_sets: tuple[str, ...] = ()  # gsm8k_eval, built sets (alignment | proxy | capability | attack), datasets
    loss_rows: int = 64
    margin: bool = True
    judges: tuple[str, ...] = ("keyword", "classifier")
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 16
    max_len: int = 512  # for loss sets
    system: str | None = None
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints


def params_fingerprint(params) -> str:
    """sha256 over every leaf's dtype, shape and bytes, in tree order (16 hex digits)."""

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        arr = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def rows_fingerprint(rows) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(f"{row.get('id')}\x00{row.get('prompt')}\x00{row.get('response')}\x01".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Data


def harmful_rows(name: str, n: int | None, seed: int) -> list[dict]:
    rows = eval_harmful_prompts() if name == "heldout" else load_dataset(name)
    rows = [r for r in rows if r.get("prompt")]
    return take(rows, None if n is None else min(n, len(rows)), seed)


def benign_rows(name: str, n: int | None, seed: int) -> list[dict]:
    rows = eval_benign_prompts(seed=seed) if name == "heldout" else load_dataset(name)
    rows = [r for r in rows if r.get("prompt")]
    return take(rows, None if n is None else min(n, len(rows)), seed)


def gsm8k_subset(n: int) -> list[dict]:
    """The first n rows (fixed order, seed 0) of the held-out GSM8K part: the same questions on every run."""

    rows = gsm8k_rows("eval")
    if n > len(rows):
        raise EvaluationError(f"gsm8k={n} questions asked, the held-out GSM8K part has {len(rows)}")
    return take(rows, n, 0)


def loss_rows(name: str, n: int, seed: int) -> list[dict]:
    """Rows with responses: "gsm8k_eval" (held-out GSM8K worked answers), a built set, or a dataset/file."""

    source = gsm8k_rows("eval") if name == "gsm8k_eval" else rows_for(name, DataSection(seed=seed))
    rows = [r for r in source if r.get("response")]
    return take(rows, min(n, len(rows)), seed)


# ---------------------------------------------------------------------------------------------------------------
# Judging


def load_checkset(path: str | os.PathLike = CHECKSET) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"id": row["id"], "prompt": row["prompt"], "reply": row["reply"],
                             "refused": bool(row["refused"])})
            except (json.JSONDecodeError, KeyError) as e:
                raise EvaluationError(f"{path}, line {line_no}: not a check-set row ({e})") from e
    return rows


def judge_accuracy(judge, rows: list[dict] | None = None) -> dict:
    """Accuracy of `judge` on the hand-labelled check set, with the ids it gets wrong."""

    rows = rows if rows is not None else load_checkset()
    verdicts = run_judge(judge, [r["prompt"] for r in rows], [r["reply"] for r in rows])
    wrong = [r["id"] for r, v in zip(rows, verdicts) if v.refused != r["refused"]]
    return {"accuracy": 1 - len(wrong) / len(rows), "n": len(rows), "wrong": wrong,
            "ci": list(stats.wilson_interval(len(rows) - len(wrong), len(rows)))}


def _category_labels(category: str | None) -> set[str]:
    """AdvBench rows carry several harm categories joined by "; ": a row counts towards each of them."""
    return {c.strip() for c in (category or "").split(";") if c.strip()}


def _verdict_record(verdict, answers: str) -> dict:
    return {"refused": verdict.refused, "harmful": verdict.harmful,
            "attack_success": attack_success(verdict, answers), "score": verdict.score, "error": verdict.error,
            "categories": list(verdict.categories) if verdict.categories else None}


def _judged_rates(judges, prompts, replies, errors, categories, kind: str = "harmful") -> tuple[dict, list[dict], dict]:
    """Per judge: its rate(s) with 95 % Wilson intervals, per-category ASR (harmful sets); per-sample verdicts;
    and Cohen's kappa between every pair of judges on attack success (harmful) or on their own answer (benign)."""

    done = [i for i in range(len(prompts)) if i not in errors]
    out, per_sample, outcome = {}, [{} for _ in prompts], {}
    for judge in judges:
        answers = answers_of(judge)
        verdicts = run_judge(judge, [prompts[i] for i in done], [replies[i] for i in done])
        column: list[bool | None] = [None] * len(prompts)
        for i, v in zip(done, verdicts):
            per_sample[i][judge.name] = _verdict_record(v, answers)
            if kind == "harmful":
                column[i] = per_sample[i][judge.name]["attack_success"]
            else:
                column[i] = v.harmful if answers == "harmful" else v.refused
                if v.error is not None:
                    column[i] = None
        outcome[judge.name] = column
        summary = stats.rate(column)
        entry = {"answers": answers, "n_judged": summary["n"],
                 "n_judge_errors": len(done) - summary["n"]}
        if kind == "harmful":
            entry.update(asr=summary["rate"], asr_ci=summary["ci"], n_success=summary["k"])
            if answers == "refused":
                lo, hi = summary["ci"]
                entry.update(refusal_rate=1 - summary["rate"], refusal_rate_ci=[1 - hi, 1 - lo])
            by_category = {}
            labelled = [(column[i], _category_labels(categories[i])) for i in done if column[i] is not None]
            for cat in sorted(set().union(*(labels for _, labels in labelled))) if labelled else ():
                cat_rate = stats.rate([success for success, labels in labelled if cat in labels])
                by_category[cat] = {"asr": cat_rate["rate"], "n": cat_rate["n"], "ci": cat_rate["ci"]}
            entry["asr_by_category"] = by_category
        else:
            key = "harmful_rate" if answers == "harmful" else "refusal_rate"
            entry.update({key: summary["rate"], f"{key}_ci": summary["ci"], "n_positive": summary["k"]})
        out[judge.name] = entry
    agreement = {}
    names = list(outcome)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            agreement[f"{names[a]}|{names[b]}"] = stats.cohen_kappa(outcome[names[a]], outcome[names[b]])
    return out, per_sample, agreement


def _primary(judges, answers: str | None = None):
    """The first judge (answering `answers`, when given), or None."""
    return next((j for j in judges if answers is None or answers_of(j) == answers), None)


# ---------------------------------------------------------------------------------------------------------------
# The run


def run_evaluation(config: EvalConfig, *, out: str | os.PathLike | None = None, progress: bool = True,
                   model=None) -> dict:
    """Evaluate `config.model` (or an already loaded `model=(cfg, params, tokenizer)`); write JSON to `out`."""
    import time


    if not config.judges:
        raise EvaluationError("at least one judge is needed (e.g. judges=('keyword',))")
    judges = [load_judge(j) for j in config.judges]
    if model is None:
        from safetrade.tokenizer import load_tokenizer  # transformers: 1.6 s at import, only when used

        cfg, params = io.load_model(config.model)
        tokenizer = load_tokenizer(config.model)
    else:
        cfg, params, tokenizer = model
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                              top_p=config.top_p, seed=config.seed)
    metrics, samples, datasets, timing, intervals = {}, {}, {}, {}, {}

    def generate_and_judge(kind: str, name: str, rows: list[dict]) -> dict:
        if not rows:
            raise EvaluationError(f"{kind} set {name!r} has no prompts")
        prompts = [r["prompt"] for r in rows]
        gen = chat_replies(cfg, params, tokenizer, prompts, sampling, batch_size=config.batch_size,
                           system=config.system, progress=progress, desc=f"{kind}:{name}")
        rates, verdicts, agreement = _judged_rates(judges, prompts, gen.texts, gen.errors,
                                                   [r.get("category") for r in rows], kind)
        samples[f"{kind}:{name}"] = [
            {"id": r.get("id"), "prompt": r["prompt"], "category": r.get("category"), "reply": gen.texts[i],
             "error": gen.errors.get(i), "verdicts": verdicts[i]} for i, r in enumerate(rows)]
        timing[f"{kind}:{name}"] = {"seconds": gen.seconds, "prompts_per_second": gen.prompts_per_second,
                                    "new_tokens_per_second": gen.tokens_per_second}
        result = {"n": len(rows), "n_generation_errors": len(gen.errors), "judges": rates}
        if agreement:
            result["agreement"] = agreement
        return result

    for name in config.harmful:
        rows = harmful_rows(name, config.n_harmful, config.seed)
        datasets[f"harmful:{name}"] = {"n": len(rows), "fingerprint": rows_fingerprint(rows)}
        result = generate_and_judge("harmful", name, rows)
        primary = result["judges"][judges[0].name]
        metrics[f"asr/{name}"] = primary["asr"]
        intervals[f"asr/{name}"] = primary["asr_ci"]
        if config.margin:
            start = time.perf_counter()
            margin = refusal_margin(cfg, params, tokenizer, [r["prompt"] for r in rows],
                                    batch_size=config.batch_size, system=config.system)
            timing[f"margin:{name}"] = {"seconds": time.perf_counter() - start}
            metrics[f"refusal_margin/{name}"] = margin["mean"]
            intervals[f"refusal_margin/{name}"] = list(stats.bootstrap_interval(margin["per_prompt"]))
            for sample, value in zip(samples[f"harmful:{name}"], margin["per_prompt"]):
                sample["refusal_margin"] = value
        metrics[f"detail/harmful/{name}"] = result

    if config.benign:
        rows = benign_rows(config.benign, config.n_benign, config.seed)
        datasets[f"benign:{config.benign}"] = {"n": len(rows), "fingerprint": rows_fingerprint(rows)}
        result = generate_and_judge("benign", config.benign, rows)
        refusal_judge = _primary(judges, "refused")
        if refusal_judge is not None:  # over-refusal needs a judge that answers "refused?"
            over = result["judges"][refusal_judge.name]
            metrics[f"over_refusal/{config.benign}"] = over["refusal_rate"]
            intervals[f"over_refusal/{config.benign}"] = over["refusal_rate_ci"]
        metrics[f"detail/benign/{config.benign}"] = result

    if config.gsm8k:
        rows = gsm8k_subset(config.gsm8k)
        datasets["gsm8k"] = {"n": len(rows), "fingerprint": rows_fingerprint(rows)}
        gsm = gsm8k_accuracy(cfg, params, tokenizer, rows, batch_size=config.batch_size, progress=progress,
                             sampling=dataclasses.replace(sampling, max_new_tokens=config.gsm8k_max_new_tokens))
        metrics["gsm8k_accuracy"] = gsm["accuracy"]
        intervals["gsm8k_accuracy"] = stats.rate([s["correct"] for s in gsm["samples"] if s["error"] is None])["ci"]
        metrics["detail/gsm8k"] = {"n": gsm["n"], "n_errors": gsm["n_errors"]}
        samples["gsm8k"] = gsm["samples"]
        timing["gsm8k"] = {"prompts_per_second": gsm["prompts_per_second"],
                           "new_tokens_per_second": gsm["tokens_per_second"]}

    for name in config.loss_sets:
        rows = loss_rows(name, config.loss_rows, config.seed)
        datasets[f"loss:{name}"] = {"n": len(rows), "fingerprint": rows_fingerprint(rows)}
        result = dataset_loss(cfg, params, tokenizer, rows, max_len=config.max_len, name=name)
        metrics[f"loss/{name}"] = result["loss"]
        metrics[f"detail/loss/{name}"] = result

    metrics["intervals"] = intervals
    metrics["judge_check"] = {j.name: judge_accuracy(j) for j in judges if answers_of(j) == "refused"}
    record = {
        "config": dataclasses.asdict(config),
        "model": {"name": config.model, "fingerprint": params_fingerprint(params)},
        "datasets": datasets,
        "metrics": metrics,
        "samples": samples,
        "timing": timing,
        "run": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
                "processor": platform.processor() or platform.machine()},
    }
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, allow_nan=True))
    return record
