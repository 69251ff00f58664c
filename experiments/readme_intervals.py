"""Every rate the README quotes, with its 95 % interval, and every comparison it draws, with its test.

    .venv/bin/python experiments/readme_intervals.py                    # markdown, one section per study
    .venv/bin/python experiments/readme_intervals.py --demo-out experiments/results/demo   # + summary.json/.png

Reads only the committed records under experiments/results/ (no model is loaded, nothing is trained or generated),
so the README's numbers can be regenerated and checked. Where a record kept every prompt's verdict (the demo's
eval/*.json, evaluation/base_smollm2.json) the intervals come from the samples and two models judged on the same
prompts get a paired test: exact McNemar, through `safetrade.evaluate.report` (what `safetrade evaluate --compare`
prints). The other studies kept rates only (alignment and strategies kept 20 of their 100 samples, Safe Delta
and SQSD none): their intervals are Wilson on k = rate · n, and a comparison is Newcombe's unpaired interval of
the difference (`stats.newcombe_difference_interval`). Both rates of such a pair come from the same prompts, so
the unpaired interval is conservative: one that excludes 0 is a significant difference; one that includes 0
shows none, which is weaker than a paired n.s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from safetrade.evaluate import report, stats

RESULTS = Path(__file__).resolve().parent / "results"
DEMO_MODELS = ("base", "aligned", "attacked", "sd_attacked", "benign", "sd_benign", "case1", "case2")


@dataclasses.dataclass(frozen=True)
class Rate:
    label: str
    value: float
    n: int
    ci: tuple[float, float]
    source: str  # file under experiments/results and the key the rate is read from
    derived: str  # "per-sample records" or "rate × n"
    samples: dict | None = None  # for paired tests: {"records": [...], "labels": [...], "index": i, "metric": key}

    @property
    def k(self) -> int:
        return round(self.value * self.n)


def _load(path: str) -> dict:
    try:
        return json.loads((RESULTS / path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{RESULTS / path}: cannot read it ({e})") from e


def from_rate(label: str, value: float, n: int, source: str) -> Rate:
    """A rate kept without its samples: Wilson on k = round(rate · n) of n (k must be a whole count)."""
    k = round(value * n)
    if abs(k / n - value) > 1e-9:
        raise SystemExit(f"{source}: {value!r} is not a count out of n = {n}; is n right?")
    return Rate(label, k / n, n, stats.wilson_interval(k, n), source, "rate × n")


def demo_rates(metric: str, label: str) -> dict[str, Rate]:
    """One demo rate per model, from its eval record's samples (report's intervals, the same as --compare)."""
    paths = [RESULTS / "demo" / "eval" / f"{m}.json" for m in DEMO_MODELS]
    records, _ = report.load_records(paths)
    cells = report.metric_cells(records, list(DEMO_MODELS), reference=None)["metrics"][metric]
    out = {}
    for i, model in enumerate(DEMO_MODELS):
        kind, _, name = metric.partition("/")
        detail = records[i]["metrics"][f"detail/{'harmful' if kind == 'asr' else 'benign'}/{name}"]
        n = next(iter(detail["judges"].values()))["n_judged"]
        out[model] = Rate(f"{label}, {model}", cells[i]["value"], n, tuple(cells[i]["ci"]),
                          f"demo/eval/{model}.json: {metric}", "per-sample records",
                          {"records": records, "labels": list(DEMO_MODELS), "index": i, "metric": metric})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Comparisons


def compare(label: str, a: Rate, b: Rate, why_unpaired: str | None = None, paired: tuple | None = None) -> dict:
    """b against a: a paired exact McNemar when both carry their samples (same prompts) or `paired` gives the two
    outcome lists in the same prompt order; else Newcombe's unpaired interval of the difference."""
    diff = b.value - a.value
    if paired is not None:
        p = stats.mcnemar_exact(*paired)["p_value"]
        verdict = f"n.s., p = {_p(p)}" if p >= report.ALPHA else f"significant, p {_p(p, '= ')}"
        return {"label": label, "a": a, "b": b, "difference": diff, "ci": None, "test": "exact McNemar (paired)",
                "p": p, "verdict": verdict}
    if a.samples is not None and b.samples is not None and a.samples["records"] is b.samples["records"]:
        cells = report.metric_cells(a.samples["records"], a.samples["labels"], reference=a.samples["index"])
        p = cells["metrics"][a.samples["metric"]][b.samples["index"]]["p"]
        if p is None:
            raise SystemExit(f"{label}: no paired test possible ({'; '.join(cells['notes'])})")
        verdict = f"n.s., p = {_p(p)}" if p >= report.ALPHA else f"significant, p {_p(p, '= ')}"
        return {"label": label, "a": a, "b": b, "difference": diff, "ci": None, "test": "exact McNemar (paired)",
                "p": p, "verdict": verdict}
    lo, hi = stats.newcombe_difference_interval(b.k, b.n, a.k, a.n)
    if lo > 0 or hi < 0:
        # an interval that misses 0 by less than a point is a call on the last digit: say so
        verdict = "significant (interval excludes 0" + (", barely)" if min(abs(lo), abs(hi)) < 0.01 else ")")
    else:
        verdict = "n.s. (interval includes 0)"
    return {"label": label, "a": a, "b": b, "difference": diff, "ci": (lo, hi),
            "test": f"Newcombe, unpaired ({why_unpaired or 'per-sample outputs not kept'})", "p": None,
            "verdict": verdict}


def _p(p: float, equals: str = "") -> str:
    return "< 0.001" if p < 0.001 else equals + (f"{p:.3f}" if p < 0.1 else f"{p:.2f}")


def _points(x: float) -> str:
    """A difference in percentage points; bounds within a point of 0 keep two decimals (they decide a verdict)."""
    return f"{100 * x:+.2f}" if abs(x) < 0.01 else f"{100 * x:+.1f}"


# ---------------------------------------------------------------------------------------------------------------
# The studies, as the README and the results READMEs quote them


def evaluation_study():
    rec = _load("evaluation/base_smollm2.json")
    cells = report.metric_cells([rec], ["base"])["metrics"]
    src = "evaluation/base_smollm2.json"

    def headline(key, label):
        n = rec["datasets"][{"asr/advbench": "harmful:advbench", "over_refusal/heldout": "benign:heldout",
                             "gsm8k_accuracy": "gsm8k"}[key]]["n"]
        return Rate(label, cells[key][0]["value"], n, tuple(cells[key][0]["ci"]), f"{src}: {key}",
                    "per-sample records")

    classifier = stats.rate([not s["verdicts"]["classifier"]["refused"] for s in rec["samples"]["harmful:advbench"]])
    check = rec["metrics"]["judge_check"]
    rates = [headline("asr/advbench", "AdvBench ASR, keyword judge"),
             Rate("AdvBench ASR, classifier judge", classifier["rate"], classifier["n"], tuple(classifier["ci"]),
                  f"{src}: samples[harmful:advbench] classifier verdicts", "per-sample records"),
             headline("over_refusal/heldout", "over-refusal, 100 held-out benign prompts (keyword)"),
             headline("gsm8k_accuracy", "GSM8K accuracy (200 questions)")]
    rates += [from_rate(f"{name} judge accuracy on the check set", check[name]["accuracy"], check[name]["n"],
                        f"{src}: judge_check.{name}") for name in ("keyword", "classifier")]
    keyword = [not s["verdicts"]["keyword"]["refused"] for s in rec["samples"]["harmful:advbench"]]
    comparisons = [compare("classifier vs keyword judge, AdvBench ASR (the same 100 replies)", rates[0], rates[1],
                           paired=(keyword, [not s["verdicts"]["classifier"]["refused"]
                                             for s in rec["samples"]["harmful:advbench"]]))]
    return "evaluation (unaligned SmolLM2-135M-Instruct)", rates, comparisons


def alignment_study():
    kept = "20 of 100 per-sample outputs kept"
    rates = {}
    for name, file in (("base", "alignment/base.json"), ("align v1", "alignment/align_v1.json"),
                       ("align v2", "alignment/align_v2.json"), ("align v3", "alignment/align_v3.json")):
        r = _load(file)["results"][0]
        rates[name, "refused"] = from_rate(f"harmful refused, {name}", r["harmful_refusal_rate"], r["n_harmful"],
                                           f"{file}: harmful_refusal_rate")
        rates[name, "answered"] = from_rate(f"benign answered, {name}", r["benign_answer_rate"], r["n_benign"],
                                            f"{file}: benign_answer_rate")
    comparisons = [compare("harmful refused: align v3 vs base", rates["base", "refused"], rates["align v3", "refused"],
                           kept),
                   compare("benign answered: align v3 vs base", rates["base", "answered"],
                           rates["align v3", "answered"], kept),
                   compare("benign answered: align v3 vs align v2", rates["align v2", "answered"],
                           rates["align v3", "answered"], kept)]
    return "alignment (100 held-out harmful + 100 benign prompts)", list(rates.values()), comparisons


def strategies_study():
    res = {r["label"]: r for r in _load("strategies/result.json")["results"]}
    names = {"aligned": "aligned", "sft": "sft", "case1_penalty-lam1.0": "Case I λ = 1",
             "case2_projection-radius1.0": "Case II r = 1"}
    kept = "20 of 100 per-sample outputs kept"
    refused = {short: from_rate(f"harmful refused, {short}", res[key]["harmful_refusal_rate"], res[key]["n_harmful"],
                                f"strategies/result.json: results[{key}].harmful_refusal_rate")
               for key, short in names.items()}
    answered = {short: from_rate(f"benign answered, {short}", res[key]["benign_answer_rate"], res[key]["n_benign"],
                                 f"strategies/result.json: results[{key}].benign_answer_rate")
                for key, short in names.items()}
    comparisons = [compare("harmful refused: sft vs aligned", refused["aligned"], refused["sft"], kept),
                   compare("harmful refused: Case I vs sft", refused["sft"], refused["Case I λ = 1"], kept),
                   compare("harmful refused: Case II vs sft", refused["sft"], refused["Case II r = 1"], kept),
                   compare("harmful refused: Case I vs aligned", refused["aligned"], refused["Case I λ = 1"], kept),
                   compare("harmful refused: Case II vs aligned", refused["aligned"], refused["Case II r = 1"], kept),
                   compare("harmful refused: Case I vs Case II", refused["Case II r = 1"], refused["Case I λ = 1"],
                           kept),
                   compare("benign answered: Case I vs aligned", answered["aligned"], answered["Case I λ = 1"], kept)]
    # the earlier short run (align v2, 12 steps, 40 + 40 prompts)
    short = {r["label"]: r for r in _load("strategies/short_run_v2/result.json")["results"]}
    short_rates = []
    for key, name in names.items():
        for column, what in (("harmful_refusal_rate", "harmful refused"), ("benign_answer_rate", "benign answered")):
            short_rates.append(from_rate(f"short run: {what}, {name}", short[key][column],
                                         short[key]["n_harmful" if column.startswith("harmful") else "n_benign"],
                                         f"strategies/short_run_v2/result.json: results[{key}].{column}"))
    by = {r.label: r for r in short_rates}
    comparisons += [compare(f"short run: harmful refused: {name} vs sft", by["short run: harmful refused, sft"],
                            by[f"short run: harmful refused, {name}"], kept.replace("100", "40"))
                    for name in ("Case I λ = 1", "Case II r = 1")]
    return ("strategies (harmful fine-tuning, 100 held-out harmful + 100 benign prompts; short run: 40 + 40)",
            [*refused.values(), *answered.values(), *short_rates], comparisons)


def safedelta_study():
    res, paper = _load("safedelta/result.json"), _load("safedelta/result_paper.json")
    n = int(res["args"]["n_eval"])
    src = "safedelta/result.json"
    rates = {"aligned": from_rate("ASR, aligned", res["aligned"]["asr"], n, f"{src}: aligned.asr")}
    for ft in ("attacked", "benign"):
        entry = res["finetunes"][ft]
        rates[ft] = from_rate(f"ASR, {ft} fine-tune", entry["finetuned"]["asr"], n,
                              f"{src}: finetunes.{ft}.finetuned.asr")
        rates[f"{ft} over-refusal"] = from_rate(f"over-refusal, {ft} fine-tune", entry["finetuned"]["over_refusal"],
                                                n, f"{src}: finetunes.{ft}.finetuned.over_refusal")
        for i, sd in enumerate(entry["safedelta"]):
            rates[f"{ft} s={sd['s']}"] = from_rate(f"ASR, {ft} + Safe Delta s = {sd['s']}", sd["asr"], n,
                                                   f"{src}: finetunes.{ft}.safedelta[{i}].asr")
            rates[f"{ft} s={sd['s']} over-refusal"] = from_rate(
                f"over-refusal, {ft} + Safe Delta s = {sd['s']}", sd["over_refusal"], n,
                f"{src}: finetunes.{ft}.safedelta[{i}].over_refusal")
        for i, ab in enumerate(entry["ablations"]):
            rates[f"{ft} s={ab['s']} {ab['ablation']}"] = from_rate(
                f"ASR, {ft} + Safe Delta s = {ab['s']}, {ab['ablation']}", ab["asr"], n,
                f"{src}: finetunes.{ft}.ablations[{i}].asr")
        sd = paper["finetunes"][ft]["safedelta"][0]
        rates[f"{ft} paper"] = from_rate(f"ASR, {ft} + Safe Delta s = {sd['s']}, paper mode", sd["asr"], n,
                                         f"safedelta/result_paper.json: finetunes.{ft}.safedelta[0].asr")
    c = [compare("ASR: attacked + Safe Delta (s = 0.1) vs attacked", rates["attacked"], rates["attacked s=0.1"]),
         compare("ASR: attacked + Safe Delta (s = 0.1) vs aligned", rates["aligned"], rates["attacked s=0.1"]),
         compare("ASR: no compensation vs with (attacked, s = 0.1)", rates["attacked s=0.1"],
                 rates["attacked s=0.1 no_compensation"]),
         compare("ASR: paper mode vs official (attacked, s = 0.1)", rates["attacked s=0.1"], rates["attacked paper"]),
         compare("ASR: benign GSM8K fine-tune vs aligned", rates["aligned"], rates["benign"]),
         compare("ASR: benign + Safe Delta (s = 0.5) vs benign", rates["benign"], rates["benign s=0.5"]),
         compare("ASR: benign + Safe Delta (s = 0.1) vs benign", rates["benign"], rates["benign s=0.1"]),
         compare("ASR: paper mode vs official (benign, s = 0.1)", rates["benign s=0.1"], rates["benign paper"])]
    return "Safe Delta (100 held-out harmful + 100 benign prompts)", list(rates.values()), c


def sqsd_study():
    rates, comparisons = [], []
    for setting in ("strong", "strong_seed1", "light"):
        res = _load(f"sqsd/{setting}/result.json")
        n = int(res["args"]["n_eval"])
        src = f"sqsd/{setting}/result.json"
        for method, entry in res["methods"].items():
            if setting != "strong" and method != "sqsd":
                continue  # the README quotes the other methods' windows in the strong setting only
            win = [from_rate(f"ASR, {setting}, {method} S{w['window']}", w["asr"], n,
                             f"{src}: methods.{method}.windows[{i}].asr") for i, w in enumerate(entry["windows"])]
            rates += win
            comparisons.append(compare(f"ASR: {setting}, {method} S1 vs S5", win[4], win[0]))
            if method == "sqsd":  # the README's point that S4, not S1, is SQSD's highest-ASR window
                comparisons += [compare(f"ASR: {setting}, sqsd S4 vs S5", win[4], win[3]),
                                compare(f"ASR: {setting}, sqsd S4 vs S1", win[0], win[3])]
        if res.get("filtering"):
            f = res["filtering"]
            top = from_rate(f"ASR, {setting}, pool minus top-{f['k']} SQSD", f["minus_top_sqsd"]["asr"], n,
                            f"{src}: filtering.minus_top_sqsd.asr")
            rnd = from_rate(f"ASR, {setting}, pool minus {f['k']} random", f["minus_random"]["asr"], n,
                            f"{src}: filtering.minus_random.asr")
            rates += [top, rnd]
            comparisons.append(compare(f"ASR: {setting}, minus top-{f['k']} SQSD vs minus {f['k']} random", rnd,
                                       top))
    return "SQSD windows and filtering (held-out harmful prompts per fine-tune)", rates, comparisons


def demo_study():
    asr = demo_rates("asr/heldout", "ASR")
    over = demo_rates("over_refusal/heldout", "over-refusal")
    rates = [*asr.values(), *over.values()]
    pairs = [("aligned", "base"), ("aligned", "attacked"), ("aligned", "sd_attacked"), ("attacked", "sd_attacked"),
             ("aligned", "benign"), ("aligned", "sd_benign"), ("benign", "sd_benign"), ("aligned", "case1"),
             ("benign", "case1"), ("aligned", "case2"), ("benign", "case2")]
    comparisons = [compare(f"ASR: {b} vs {a}", asr[a], asr[b]) for a, b in pairs]
    comparisons += [compare(f"over-refusal: {b} vs {a}", over[a], over[b]) for a, b in pairs]
    n_harmful, n_benign = asr["aligned"].n, over["aligned"].n
    return f"demo ({n_harmful} held-out harmful + {n_benign} benign prompts, keyword judge)", rates, comparisons


STUDIES = {"demo": demo_study, "evaluation": evaluation_study, "alignment": alignment_study,
           "strategies": strategies_study, "safedelta": safedelta_study, "sqsd": sqsd_study}


# ---------------------------------------------------------------------------------------------------------------
# Output


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(title: str, rates: list[Rate], comparisons: list[dict]) -> str:
    lines = [f"### {title}", "", "| rate | value | 95 % Wilson | k / n | from |", "|---|---:|---:|---:|---|"]
    for r in rates:
        lines.append(f"| {r.label} | {_pct(r.value)} % | [{_pct(r.ci[0])}, {_pct(r.ci[1])}] | {r.k} / {r.n} | "
                     f"`{r.source}` ({r.derived}) |")
    lines += ["", "| comparison | values | difference | 95 % interval of the difference | test | verdict |",
              "|---|---:|---:|---:|---|---|"]
    for c in comparisons:
        ci = "-" if c["ci"] is None else f"[{_points(c['ci'][0])}, {_points(c['ci'][1])}]"
        lines.append(f"| {c['label']} | {_pct(c['b'].value)} vs {_pct(c['a'].value)} % | "
                     f"{100 * c['difference']:+.1f} pts | {ci} | {c['test']} | {c['verdict']} |")
    return "\n".join(lines)


def demo_summary() -> dict:
    """The committed demo summary.json with the intervals and tests of its eval records attached."""
    from safetrade import demo  # imports jax and the training stack: only when the demo table is asked for

    summary = _load("demo/summary.json")
    statistics = demo.eval_statistics({m: RESULTS / "demo" / "eval" / f"{m}.json" for m in demo.MODELS})
    return demo.attach_statistics(summary, statistics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=sorted(STUDIES), action="append",
                        help="only these studies (default: all, and the demo table)")
    parser.add_argument("--demo-out", type=Path, help="also write summary.json and summary.png (with intervals and "
                        "error bars) of the committed demo run to this folder")
    args = parser.parse_args(argv)
    chosen = args.study or list(STUDIES)
    blocks = []
    if "demo" in chosen or args.demo_out:
        from safetrade import demo

        summary = demo_summary()
        blocks.append("### the demo's table, re-rendered from experiments/results/demo/eval/*.json\n\n```\n"
                      + demo.format_summary(summary) + "\n```")
        if args.demo_out:
            args.demo_out.mkdir(parents=True, exist_ok=True)
            (args.demo_out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            demo.plot_summary(summary, args.demo_out / "summary.png")
    for name in chosen:
        blocks.append(markdown(*STUDIES[name]()))
    print("\n\n".join(blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
