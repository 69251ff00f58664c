"""Reading saved evaluation records: the printed table, `--compare` of several records, the compare plot, markdown.

Everything here works from the JSON `suite.run_evaluation` writes, so a table can be re-rendered from old runs
without re-generating anything. Every rate is printed with its 95 % interval (`30.0% [18.1, 45.1]`), the refusal
margin with its bootstrap interval (`+1.96 [+1.20, +2.70]`). An interval is taken from, in this order:

  1. `metrics["intervals"]` (headline keys) or the judge's `*_ci` entry in `metrics["detail/..."]`;
  2. the per-sample records (`samples[...]`: verdicts, `correct`, `refusal_margin`), recomputed with `stats`;
  3. rate × n of the detail entry (Wilson on round(rate · n) of n) when a record kept no samples.

Records written before verdicts said which question a judge answers (no "answers", "attack_success", "harmful")
are read as refusal judges: attack success = not refused.

With a reference record (`compare`: the first one unless `reference` names another), each other record that
evaluated the same prompts (the same dataset fingerprint for that set) gets a paired test against it, samples
paired by "id": exact McNemar on attack success (harmful sets), on refusal (benign sets) and on correct answers
(GSM8K); a paired bootstrap on the refusal margin. A difference with p >= ALPHA is marked "n.s.". Records on
different prompts are not tested, and a footer line says why. Judge agreement (Cohen's κ on attack success) is
printed under the table for every harmful set where two or more judges ran.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from safetrade.errors import EvaluationError
from safetrade.evaluate import stats

ALPHA = 0.05  # significance level of the paired tests
CONFIDENCE = 0.95  # of every interval
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 10_000, 0  # as suite.run_evaluation, so derived intervals equal stored ones


def headline(record: dict) -> dict[str, float]:
    """The scalar metrics of a record (the "detail/...", "intervals" and "judge_check" entries left out)."""
    return {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float)) and not k.startswith("detail/")}


# ---------------------------------------------------------------------------------------------------------------
# What a row measures, and reading it out of one record


@dataclasses.dataclass(frozen=True)
class _Row:
    label: str  # printed in the metric column
    kind: str  # "rate" (proportion, Wilson), "mean" (bootstrap), "plain" (no interval), "check" (judge check set)
    metric: str | None = None  # headline key, when the row is one
    sample_set: str | None = None  # "harmful:<set>", "benign:<set>", "gsm8k"
    judge: str | None = None  # None on headline rows: each record's own primary judge
    question: str | None = None  # "attack_success" | "refused" | "harmful" | "correct" | "refusal_margin"
    detail_rate: str | None = None  # key of the rate in the judge's detail entry ("asr", "refusal_rate", ...)


def _detail(record: dict, sample_set: str) -> dict:
    if sample_set == "gsm8k":
        return record["metrics"].get("detail/gsm8k", {})
    kind, name = sample_set.split(":", 1)
    return record["metrics"].get(f"detail/{kind}/{name}", {})


def _judges(record: dict, sample_set: str) -> dict[str, dict]:
    """The judges' detail entries of one set, in the order they ran (the first is the primary one)."""
    return _detail(record, sample_set).get("judges", {})


def _answers(judge_detail: dict) -> str:
    return judge_detail.get("answers", "refused")  # records before harm judges existed: refusal judges only


def _primary(record: dict, row: _Row) -> str | None:
    """The judge behind a headline rate: the first judge (asr), the first refusal judge (over_refusal)."""
    judges = _judges(record, row.sample_set)
    if row.question == "refused":
        return next((name for name, d in judges.items() if _answers(d) == "refused"), None)
    return next(iter(judges), None)


def _row_judge(record: dict, row: _Row) -> str | None:
    return row.judge if row.judge is not None else _primary(record, row)


def _outcome(sample: dict, row: _Row, judge: str | None, answers: str):
    """One sample's value for a row: a bool (None when it failed) or a float (the refusal margin)."""
    if row.question == "correct":
        return None if sample.get("error") else sample.get("correct")
    if row.question == "refusal_margin":
        value = sample.get("refusal_margin")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    verdict = (sample.get("verdicts") or {}).get(judge)
    if not verdict or verdict.get("error") is not None:
        return None
    if row.question == "attack_success":
        if verdict.get("attack_success") is not None:
            return bool(verdict["attack_success"])
        value = verdict.get("harmful") if answers == "harmful" else verdict.get("refused")
        if value is None:
            return None
        return bool(value) if answers == "harmful" else not value
    value = verdict.get(row.question)
    return None if value is None else bool(value)


def _sample_outcomes(record: dict, row: _Row) -> dict | None:
    """{"judge", "values" (per sample, in record order), "ids"} for a row, or None when the record has no samples."""
    samples = (record.get("samples") or {}).get(row.sample_set)
    if not samples:
        return None
    if row.question in ("correct", "refusal_margin"):
        judge, answers = None, "refused"  # no judge involved
    else:
        judge, judges = _row_judge(record, row), _judges(record, row.sample_set)
        if judge not in judges:
            return None
        answers = _answers(judges[judge])
    return {"judge": judge, "ids": [s.get("id") for s in samples],
            "values": [_outcome(s, row, judge, answers) for s in samples]}


QUESTIONS = ("attack_success", "refused", "harmful", "correct", "refusal_margin")


def sample_values(record: dict, sample_set: str, question: str, judge: str | None = None) -> dict:
    """Per-prompt outcomes of one evaluation record, for a study's own statistics (paired tests, bootstraps over
    prompts): {"judge", "ids", "values"}, values in record order, None where a sample failed.

    sample_set: "harmful:<set>", "benign:<set>" or "gsm8k"; question: one of QUESTIONS (attack_success and refused
    read the judge's verdicts, with the set's primary judge when `judge` is None; correct and refusal_margin need
    no judge). Raises EvaluationError naming what the record lacks.
    """
    if question not in QUESTIONS:
        raise EvaluationError(f"question must be one of {QUESTIONS}, got {question!r}")
    row = _Row(label=question, kind="rate", sample_set=sample_set, judge=judge, question=question)
    out = _sample_outcomes(record, row)
    if out is None:
        have = sorted((record.get("samples") or {}))
        judges = sorted(_judges(record, sample_set)) if sample_set in have else []
        raise EvaluationError(f"record of {record.get('config', {}).get('model', '?')}: no per-sample "
                              f"{question!r} for {sample_set!r}" + (f" with judge {judge!r} (judges: {judges})"
                                                                     if judge and sample_set in have else "")
                              + f" (sample sets: {have})")
    return out


def _value(record: dict, row: _Row):
    if row.kind == "check":
        return (record["metrics"].get("judge_check") or {}).get(row.judge, {}).get("accuracy")
    if row.metric is not None:
        return headline(record).get(row.metric)
    entry = _judges(record, row.sample_set).get(row.judge)
    return None if entry is None else entry.get(row.detail_rate)


def _interval(record: dict, row: _Row, value) -> tuple[float, float] | None:
    """The row's 95 % interval in this record (stored, else from samples, else from rate × n); None if none."""
    if value is None or row.kind == "plain" or (isinstance(value, float) and math.isnan(value)):
        return None
    if row.kind == "check":  # accuracy on the check set: k of n labelled replies
        entry = record["metrics"]["judge_check"][row.judge]
        if entry.get("ci") is not None:
            return (float(entry["ci"][0]), float(entry["ci"][1]))
        n = int(entry.get("n", 0))
        return stats.wilson_interval(round(value * n), n, CONFIDENCE) if n else None
    stored = (record["metrics"].get("intervals") or {}).get(row.metric) if row.metric else None
    if stored is None and row.judge is not None:
        stored = _judges(record, row.sample_set).get(row.judge, {}).get(f"{row.detail_rate}_ci")
    if stored is not None:
        return (float(stored[0]), float(stored[1]))
    outcomes = _sample_outcomes(record, row)
    if outcomes is not None:
        values = [v for v in outcomes["values"] if v is not None]
        if row.kind == "mean" and values:
            return stats.bootstrap_interval(values, CONFIDENCE, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
        if row.kind == "rate":
            r = stats.rate(values, CONFIDENCE)
            # the samples must reproduce the stored rate; if not (a record edited by hand, a judge renamed),
            # the rate × n fallback below is the honest one
            if r["n"] and abs(r["rate"] - value) < 1e-9:
                return (r["ci"][0], r["ci"][1])
    if row.kind == "rate":
        n = _count(record, row)
        if n:
            return stats.wilson_interval(round(value * n), n, CONFIDENCE)
    return None


def _count(record: dict, row: _Row) -> int | None:
    """The denominator of a rate: the judge's n_judged, or GSM8K's n."""
    if row.sample_set == "gsm8k":
        return _detail(record, "gsm8k").get("n")
    judge = _row_judge(record, row)
    return _judges(record, row.sample_set).get(judge, {}).get("n_judged") if judge else None


# ---------------------------------------------------------------------------------------------------------------
# Rows of a table


def _rows(records: list[dict]) -> list[_Row]:
    """Headline metrics in first-seen order, each followed by its per-judge rows when several judges ran."""
    rows = []
    for key in dict.fromkeys(k for r in records for k in headline(r)):
        kind_name, _, set_name = key.partition("/")
        if kind_name == "asr":
            sample_set = f"harmful:{set_name}"
            rows.append(_Row(key, "rate", key, sample_set, question="attack_success"))
            rows += _judge_rows(records, sample_set, set_name)
        elif kind_name == "over_refusal":
            sample_set = f"benign:{set_name}"
            rows.append(_Row(key, "rate", key, sample_set, question="refused"))
            rows += _judge_rows(records, sample_set, set_name)
        elif key == "gsm8k_accuracy":
            rows.append(_Row(key, "rate", key, "gsm8k", question="correct"))
        elif kind_name == "refusal_margin":
            rows.append(_Row(key, "mean", key, f"harmful:{set_name}", question="refusal_margin"))
        else:
            rows.append(_Row(key, "plain", key))
    # benign sets whose judges are all harm judges have no over_refusal headline, only per-judge rates
    for sample_set in dict.fromkeys(f"benign:{k.split('/', 2)[2]}" for r in records for k in r["metrics"]
                                    if k.startswith("detail/benign/")):
        name = sample_set.split(":", 1)[1]
        if not any(row.sample_set == sample_set for row in rows):
            rows += _judge_rows(records, sample_set, name, even_one=True)
    for name in dict.fromkeys(n for r in records for n in (r["metrics"].get("judge_check") or {})):
        rows.append(_Row(f"judge_check/{name}", "check", judge=name))
    return rows


def _judge_rows(records: list[dict], sample_set: str, set_name: str, even_one: bool = False) -> list[_Row]:
    names = dict.fromkeys(n for r in records for n in _judges(r, sample_set))
    if len(names) < 2 and not even_one:
        return []  # one judge: the headline row is that judge's
    rows = []
    for name in names:
        answers = next(_answers(_judges(r, sample_set)[name]) for r in records if name in _judges(r, sample_set))
        if sample_set.startswith("harmful:"):
            rows.append(_Row(f"asr/{set_name} [{name}]", "rate", None, sample_set, name, "attack_success", "asr"))
        elif answers == "refused":
            rows.append(_Row(f"over_refusal/{set_name} [{name}]", "rate", None, sample_set, name, "refused",
                             "refusal_rate"))
        else:
            rows.append(_Row(f"harmful_rate/{set_name} [{name}]", "rate", None, sample_set, name, "harmful",
                             "harmful_rate"))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Paired tests against a reference record


def _same_prompts(ref: dict, other: dict, sample_set: str) -> str | None:
    """None when the two records evaluated the same prompts for this set, else why not (one line)."""
    a, b = ref["datasets"][sample_set], other["datasets"][sample_set]
    if a.get("fingerprint") is None or a.get("fingerprint") != b.get("fingerprint"):
        return (f"different prompts (dataset fingerprint {a.get('fingerprint')} vs {b.get('fingerprint')}, "
                f"n {a.get('n')} vs {b.get('n')})")
    for record in (ref, other):
        samples = (record.get("samples") or {}).get(sample_set)
        if not samples:
            return "no per-sample outputs in one record"
        ids = [s.get("id") for s in samples]
        if None in ids or len(set(ids)) != len(ids):
            return "samples lack unique ids to pair them by"
    return None


def _paired_test(ref: dict, other: dict, row: _Row) -> tuple[dict | None, tuple[str, str] | None]:
    """(test result with "p_value" and "test", None), or (None, (what, why)) when there is a reason for none."""
    if row.kind not in ("rate", "mean"):
        return None, None
    if any(row.sample_set not in (r.get("datasets") or {}) for r in (ref, other)):
        return None, None  # one of them did not evaluate this set: its cell is "-", nothing to explain
    why = _same_prompts(ref, other, row.sample_set)
    if why:
        return None, (row.sample_set, why)
    a, b = _sample_outcomes(ref, row), _sample_outcomes(other, row)
    if a is None or b is None:
        return None, None  # the row's judge did not run in one of them: nothing to pair, nothing to explain
    if row.judge is None and a["judge"] != b["judge"]:
        return None, (row.label, f"primary judges differ ({a['judge']} vs {b['judge']})")
    by_id = dict(zip(b["ids"], b["values"]))
    pairs = [(x, by_id[i]) for i, x in zip(a["ids"], a["values"]) if i in by_id]
    if row.kind == "mean":
        kept = [(x, y) for x, y in pairs if x is not None and y is not None]
        if not kept:
            return None, None
        result = stats.paired_bootstrap([x for x, _ in kept], [y for _, y in kept], CONFIDENCE,
                                        BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED)
        return {**result, "test": "paired bootstrap"}, None
    result = stats.mcnemar_exact([x for x, _ in pairs], [y for _, y in pairs])
    return {**result, "test": "McNemar"}, None


# ---------------------------------------------------------------------------------------------------------------
# The table as cells, rendered as text or markdown


def _fmt_value(row: _Row, value, ci) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if row.kind in ("rate", "check"):
        text = f"{100 * value:.1f}%"
        return text + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else " [no interval]")
    if row.kind == "mean":
        return f"{value:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " [no interval]")
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _fmt_p(p: float) -> str:
    text = "p<0.001" if p < 0.001 else f"p={p:.3f}"
    return f"n.s. ({text})" if p >= ALPHA else text


def _resolve_reference(reference, labels: list[str], paths: list | None = None) -> int | None:
    if reference is None:
        return None
    if isinstance(reference, int):
        if not 0 <= reference < len(labels):
            raise EvaluationError(f"reference={reference}: there are {len(labels)} records")
        return reference
    ref = str(reference)
    if ref in labels:
        return labels.index(ref)
    for i, p in enumerate(paths or []):
        if str(p) == ref or Path(p).resolve() == Path(ref).resolve():
            return i
    raise EvaluationError(f"reference {ref!r} is neither a label ({', '.join(labels)}) nor one of the compared files")


def _grid(records: list[dict], labels: list[str], reference: int | None) -> dict:
    """Header, rows of cell strings, plot data and footer lines: the one place a table's content is decided."""
    rows = _rows(records)
    body, plot, reasons, tests_used = [], {}, {}, set()
    for row in rows:
        cells = []
        for i, record in enumerate(records):
            value = _value(record, row)
            ci = _interval(record, row, value)
            text = _fmt_value(row, value, ci)
            test = None
            if reference is not None and i != reference and value is not None:
                test, why = _paired_test(records[reference], record, row)
                if why:
                    reasons.setdefault((labels[i], why[0]), why[1])
                if test is not None:
                    tests_used.add((test["test"], row.question))
                    text += " " + _fmt_p(test["p_value"])
            cells.append(text)
            if row.metric is not None:
                plot.setdefault(row.metric, []).append(
                    {"value": value, "ci": ci, "p": None if test is None else test["p_value"]})
        body.append((row.label, cells))

    footer = []
    if reference is not None and len(records) > 1:
        used = _describe_tests(tests_used)
        footer.append(f"paired tests vs {labels[reference]} (samples paired by id): {used or 'none possible'}; "
                      f"alpha = {ALPHA}: n.s. = not significant (p >= {ALPHA}); no multiple-comparison correction.")
        footer += [f"{label}: no paired test on {what}: {why}" for (label, what), why in reasons.items()]
    footer.append(f"intervals: {int(CONFIDENCE * 100)}% Wilson for rates, percentile bootstrap "
                  f"({BOOTSTRAP_RESAMPLES} resamples) for refusal margins; losses are printed without one.")
    footer += _judge_legend(records, labels)
    agreement = _agreement_lines(records, labels)
    if agreement:
        footer.append("judge agreement (Cohen's kappa; harmful sets: on attack success, benign sets: on each "
                      "judge's own answer):")
        footer += ["  " + line for line in agreement]
    return {"header": ["metric", *labels], "body": body, "footer": footer, "plot": plot}


def _describe_tests(used: set) -> str:
    names = {"attack_success": "attack success", "refused": "refusal", "harmful": "harmful replies",
             "correct": "GSM8K correct", "refusal_margin": "refusal margin"}
    mcnemar = [names[q] for t, q in sorted(used) if t == "McNemar"]
    boot = [names[q] for t, q in sorted(used) if t == "paired bootstrap"]
    parts = []
    if mcnemar:
        parts.append(f"exact McNemar (two-sided) on {', '.join(dict.fromkeys(mcnemar))}")
    if boot:
        parts.append(f"paired bootstrap of the mean difference ({BOOTSTRAP_RESAMPLES} resamples) on "
                     f"{', '.join(dict.fromkeys(boot))}")
    return "; ".join(parts)


def _judge_legend(records: list[dict], labels: list[str]) -> list[str]:
    """Which question each judge answered, so "ASR" is never ambiguous (refusal judges vs harm judges), and where a
    judge failed on some replies."""
    answers, errors = {}, []
    for label, r in zip(labels, records):
        for key, entry in r["metrics"].items():
            if key.startswith(("detail/harmful/", "detail/benign/")) and isinstance(entry, dict):
                for name, d in entry.get("judges", {}).items():
                    answers.setdefault(name, _answers(d))
                    if d.get("n_judge_errors"):
                        errors.append(f"judge errors: {label} {key.split('/', 1)[1]} {name}: {d['n_judge_errors']} "
                                      f"of {d['n_judge_errors'] + d.get('n_judged', 0)} replies (left out of its "
                                      "rates; see the samples' verdicts[...].error)")
    if not answers:
        return []
    refused = [n for n, a in answers.items() if a == "refused"]
    harmful = [n for n, a in answers.items() if a == "harmful"]
    parts = []
    def verb(names):
        return f"{', '.join(names)} answer{'s' if len(names) == 1 else ''}"

    if refused:
        parts.append(f"{verb(refused)} \"refused?\" (ASR = share of replies not refused)")
    if harmful:
        parts.append(f"{verb(harmful)} \"harmful?\" (ASR = share of replies judged harmful)")
    return ["judges: " + "; ".join(parts) + "; an unbracketed asr/over_refusal row is the record's first judge."] + errors


def _agreement(record: dict, sample_set: str) -> dict[str, dict]:
    """Stored agreement, else Cohen's kappa from the samples for every pair of judges: on attack success (harmful
    sets), on each judge's own answer, refused or harmful (benign sets), as suite.run_evaluation computes it."""
    detail = _detail(record, sample_set)
    if detail.get("agreement"):
        return detail["agreement"]
    judges = _judges(record, sample_set)

    def outcomes(name):
        question = "attack_success" if sample_set.startswith("harmful:") else _answers(judges[name])
        found = _sample_outcomes(record, _Row("", "rate", None, sample_set, name, question))
        return None if found is None else found["values"]

    names, out = list(judges), {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            va, vb = outcomes(a), outcomes(b)
            if va is not None and vb is not None:
                out[f"{a}|{b}"] = stats.cohen_kappa(va, vb)
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _agreement_lines(records: list[dict], labels: list[str]) -> list[str]:
    lines = []
    for record, label in zip(records, labels):
        for key in record["metrics"]:
            if not key.startswith(("detail/harmful/", "detail/benign/")):
                continue
            sample_set = ":".join(key.split("/", 2)[1:])
            for pair, k in _agreement(record, sample_set).items():
                kappa, raw = k.get("kappa"), k.get("raw_agreement")
                text = (f"kappa = {kappa:.2f}" if _finite(kappa)
                        else "kappa undefined (no reply has a verdict from both judges)" if not k.get("n")
                        else "kappa undefined (both judges gave one answer to every reply)")
                raw_text = f", raw agreement {100 * raw:.1f}%" if _finite(raw) else ""
                lines.append(f"{label} {sample_set} {pair}: {text}{raw_text}, n = {k.get('n')}")
    return lines


def table(records: list[dict], labels: list[str] | None = None, reference: int | str | None = None) -> str:
    """Metrics as rows, models as columns (plain text), every rate with its 95 % interval.

    `reference` (an index or a label) adds paired tests of every other record against that one.
    """
    labels = labels or [r["model"]["name"] for r in records]
    return _text(_grid(records, labels, _resolve_reference(reference, labels)))


def markdown_table(records: list[dict], labels: list[str] | None = None, reference: int | str | None = 0) -> str:
    """The same table as GitHub markdown (for README / results READMEs), footer lines as a list below it."""
    labels = labels or [r["model"]["name"] for r in records]
    return _markdown(_grid(records, labels, _resolve_reference(reference, labels) if len(records) > 1 else None))


def metric_cells(records: list[dict], labels: list[str] | None = None,
                 reference: int | str | None = 0) -> dict:
    """The numbers behind the table, for callers that lay out their own (the demo's summary, the README script).

    {"metrics": {headline key: [{"value", "ci", "p"} per record]}, "notes": the table's footer lines}: `ci` is the
    95 % interval (None for losses), `p` the paired test's p-value against `reference` (None for the reference
    itself, for rows without a test, and for records on other prompts; `notes` says why).
    """
    labels = labels or [r["model"]["name"] for r in records]
    grid = _grid(records, labels, _resolve_reference(reference, labels) if len(records) > 1 else None)
    return {"metrics": grid["plot"], "notes": grid["footer"]}


def _text(grid: dict) -> str:
    columns = [grid["header"], *([label, *cells] for label, cells in grid["body"])]
    widths = [max(len(line[c]) for line in columns) + 2 for c in range(len(grid["header"]))]
    lines = [line[0].ljust(widths[0]) + "".join(cell.rjust(w) for cell, w in zip(line[1:], widths[1:]))
             for line in columns]
    return "\n".join(lines + [""] + grid["footer"])


def _markdown(grid: dict) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in grid["header"]) + " |",
             "|---|" + "---:|" * (len(grid["header"]) - 1)]
    for label, cells in grid["body"]:
        lines.append("| " + " | ".join(esc(c) for c in [f"`{label}`", *cells]) + " |")
    footer = [("  - " if line.startswith("  ") else "- ") + line.strip() for line in grid["footer"]]
    return "\n".join(lines + [""] + footer)


# ---------------------------------------------------------------------------------------------------------------
# Files


def load_records(paths: list[str | os.PathLike]) -> tuple[list[dict], list[str]]:
    """Evaluation records and their labels (file stem; parent/stem where two stems collide)."""
    records = []
    for p in paths:
        try:
            record = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EvaluationError(f"{p}: not a readable evaluation JSON ({e})") from e
        if not isinstance(record, dict) or "metrics" not in record:
            raise EvaluationError(f"{p}: no 'metrics' key; is it a `safetrade evaluate` output?")
        records.append(record)
    stems = [Path(p).stem for p in paths]
    labels = [f"{Path(p).parent.name}/{s}" if stems.count(s) > 1 else s for p, s in zip(paths, stems)]
    return records, labels


def compare(paths: list[str | os.PathLike], plot: str | os.PathLike | None = None,
            reference: int | str | None = None, markdown: bool = False) -> str:
    """Side-by-side table of evaluation JSONs with paired tests against `reference` (a label, a path or an index;
    default the first record); with `plot`, a PNG bar chart with 95 % error bars; `markdown` for a README."""
    records, labels = load_records(paths)
    ref = _resolve_reference(0 if reference is None else reference, labels, list(paths)) if len(records) > 1 else None
    grid = _grid(records, labels, ref)
    if plot is not None:
        _bar_chart(grid["plot"], labels, ref, Path(plot))
    return _markdown(grid) if markdown else _text(grid)


def _bar_chart(plot: dict[str, list[dict]], labels: list[str], reference: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(plot)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        bars = plot[key]
        values = np.array([np.nan if b["value"] is None else b["value"] for b in bars], float)
        lo = np.array([v - b["ci"][0] if b["ci"] else np.nan for v, b in zip(values, bars)])
        hi = np.array([b["ci"][1] - v if b["ci"] else np.nan for v, b in zip(values, bars)])
        x = np.arange(len(bars))
        ax.bar(x, values, color=[f"C{i}" for i in range(len(bars))])
        has_ci = np.isfinite(lo) & np.isfinite(hi)
        if has_ci.any():
            ax.errorbar(x[has_ci], values[has_ci], yerr=[lo[has_ci], hi[has_ci]], fmt="none", ecolor="black",
                        capsize=4, linewidth=1)
        for i, b in enumerate(bars):
            mark = "ref" if i == reference else ("n.s." if b["p"] is not None and b["p"] >= ALPHA else None)
            if mark and np.isfinite(values[i]):
                top = values[i] + (hi[i] if np.isfinite(hi[i]) else 0.0)
                ax.annotate(mark, (i, max(top, 0.0)), textcoords="offset points", xytext=(0, 3), ha="center",
                            fontsize=7)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
        if key.startswith(("asr/", "over_refusal/", "gsm8k")):
            ax.set_ylim(0, 1.08)
        if key.startswith("refusal_margin/"):
            ax.axhline(0, color="grey", linewidth=0.6)
    ref_note = f"; n.s.: not significantly different from {labels[reference]} (p >= {ALPHA})" \
        if reference is not None else ""
    fig.suptitle(f"error bars: {int(CONFIDENCE * 100)}% intervals{ref_note}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
