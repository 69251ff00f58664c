"""safetrade.evaluate.report: intervals on every rate, paired tests on the same prompts, judge agreement, plot."""

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest

from safetrade import cli
from safetrade.errors import EvaluationError
from safetrade.evaluate import report

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"
N = 30


def line_of(text: str, label: str) -> str:
    """The table line of a row (labels are padded with at least two spaces)."""
    hits = [line for line in text.splitlines() if line.startswith(label + "  ")]
    assert len(hits) == 1, f"row {label!r} not found once in:\n{text}"
    return hits[0]


def make_record(name, keyword_success, guard_harmful, margins, benign_refused, correct, *,
                fingerprint="fp-x", shuffle_seed=None):
    """A record in the new JSON layout: set "x" judged by a refusal judge (keyword) and a harm judge (guard)."""
    ids = [f"s{i}" for i in range(N)]
    harmful = [{"id": i, "verdicts": {"keyword": {"refused": not s, "attack_success": s, "error": None},
                                      "guard": {"harmful": h, "attack_success": h, "error": None}},
                "refusal_margin": m} for i, s, h, m in zip(ids, keyword_success, guard_harmful, margins)]
    benign = [{"id": i, "verdicts": {"keyword": {"refused": r, "error": None}}} for i, r in zip(ids, benign_refused)]
    gsm8k = [{"id": i, "correct": c, "error": None} for i, c in zip(ids, correct)]
    if shuffle_seed is not None:  # pairing must go by id, not by position
        for part in (harmful, benign, gsm8k):
            random.Random(shuffle_seed).shuffle(part)
    asr, guard_asr = float(np.mean(keyword_success)), float(np.mean(guard_harmful))
    return {
        "model": {"name": name},
        "datasets": {"harmful:x": {"n": N, "fingerprint": fingerprint}, "benign:y": {"n": N, "fingerprint": "fp-y"},
                     "gsm8k": {"n": N, "fingerprint": "fp-g"}},
        "metrics": {
            "asr/x": asr, "refusal_margin/x": float(np.mean(margins)),
            "detail/harmful/x": {"n": N, "judges": {
                "keyword": {"answers": "refused", "asr": asr, "refusal_rate": 1 - asr, "n_judged": N},
                "guard": {"answers": "harmful", "asr": guard_asr, "n_judged": N}}},
            "over_refusal/y": float(np.mean(benign_refused)),
            "detail/benign/y": {"n": N, "judges": {"keyword": {"refusal_rate": float(np.mean(benign_refused)),
                                                               "n_judged": N}}},
            "gsm8k_accuracy": float(np.mean(correct)), "detail/gsm8k": {"n": N, "n_errors": 0},
            "judge_check": {},
        },
        "samples": {"harmful:x": harmful, "benign:y": benign, "gsm8k": gsm8k},
    }


def flags(true_ids):
    return [i in set(true_ids) for i in range(N)]


@pytest.fixture
def pair(tmp_path):
    margins = list(np.linspace(-2.0, 3.0, N))
    # reference: keyword attack success on s0..s11; guard harmful on s0..s7 and s12, s13
    ref = make_record("ref", flags(range(12)), flags([*range(8), 12, 13]), margins, flags([]), flags(range(3)))
    # other: success on s0..s9 and s12..s20 -> discordant pairs 2 (ref only: s10, s11) vs 9 (other only)
    other = make_record("other", flags([*range(10), *range(12, 21)]), flags([*range(8), 12, 13]),
                        [m + 1.0 for m in margins], flags(range(7)), flags(range(3, 6)), shuffle_seed=1)
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    (tmp_path / "other.json").write_text(json.dumps(other))
    return tmp_path / "ref.json", tmp_path / "other.json"


# ---------------------------------------------------------------------------------------------------------------
# Old records


# the demo's aligned-model record of 2026-12-02, written before records carried intervals
OLD_RECORD = Path(__file__).parent / "data" / "old_demo_eval_aligned.json"


def test_an_old_record_renders_with_intervals_from_its_samples():
    text = report.compare([OLD_RECORD])
    # 12 of 40 attacks succeed: Wilson 95 % = [0.1807, 0.4543] (k = 12, n = 40 in tests/test_stats.py)
    assert line_of(text, "asr/heldout").endswith("30.0% [18.1, 45.4]")
    assert line_of(text, "over_refusal/heldout").endswith("20.0% [10.5, 34.8]")  # 8 of 40
    margin = line_of(text, "refusal_margin/heldout").split()[-3:]
    lo, hi = float(margin[1].strip("[,")), float(margin[2].strip("]"))
    assert margin[0] == "+1.96" and lo < 1.96 < hi and hi - lo < 2.0
    assert line_of(text, "judge_check/keyword").endswith("95.0% [86.3, 98.3]")  # 57 of 60


def test_an_old_record_without_samples_falls_back_to_rate_times_n():
    record = json.loads(OLD_RECORD.read_text())
    record.pop("samples")
    text = report.table([record], ["aligned"])
    assert line_of(text, "asr/heldout").endswith("30.0% [18.1, 45.4]")
    assert line_of(text, "refusal_margin/heldout").endswith("+1.96 [no interval]")


def test_every_committed_evaluation_record_renders_with_an_interval_on_every_rate():
    paths = sorted(RESULTS.glob("**/*.json"))
    evaluations = [p for p in paths if "metrics" in json.loads(p.read_text())]
    assert len(evaluations) >= 9  # the eight demo models and the SmolLM2 baseline
    text = report.compare(evaluations)
    assert "[no interval]" not in text and "-12.38 [" in text  # the unaligned demo model's margin
    for p in set(paths) - set(evaluations):
        with pytest.raises(EvaluationError, match=p.name):
            report.compare([p])


def test_stored_intervals_win_over_derived_ones(pair):
    record = json.loads(pair[0].read_text())
    record["metrics"]["intervals"] = {"asr/x": [0.111, 0.999]}
    assert line_of(report.table([record]), "asr/x").endswith("40.0% [11.1, 99.9]")


# ---------------------------------------------------------------------------------------------------------------
# Paired tests


def test_paired_tests_on_the_same_prompts_have_the_hand_computed_p_values(pair):
    text = report.compare(list(pair))
    # McNemar, discordant 2 vs 9: p = 2 · P(X <= 2), X ~ Bin(11, 1/2) = 2 · (1 + 11 + 55) / 2048 = 0.0654
    assert line_of(text, "asr/x").endswith("63.3% [45.5, 78.1] n.s. (p=0.065)")
    assert line_of(text, "asr/x [keyword]").endswith("n.s. (p=0.065)")
    assert line_of(text, "asr/x [guard]").endswith("33.3% [19.2, 51.2] n.s. (p=1.000)")  # identical verdicts
    # benign refusals: discordant 0 vs 7: p = 2 / 2^7 = 0.0156 (significant)
    assert line_of(text, "over_refusal/y").endswith("23.3% [11.8, 40.9] p=0.016")
    # GSM8K: 3 vs 3 discordant: p = 1
    assert line_of(text, "gsm8k_accuracy").endswith("n.s. (p=1.000)")
    # margins: mean of linspace(-2, 3, 30) = 0.5, sd 1.52, so ± 1.96 · 1.52/√30 = ± 0.54 around the mean; shifted
    # by exactly +1 on every prompt in the other record: every resample's difference is +1, p = 2/10001
    assert line_of(text, "refusal_margin/x").endswith("+0.50 [-0.03, +1.03]       +1.50 [+0.97, +2.03] p<0.001")
    assert "paired tests vs ref" in text and "exact McNemar" in text and "paired bootstrap" in text
    assert "alpha = 0.05" in text and "no paired test" not in text
    assert line_of(text, "asr/x").count("p=") == 1  # the reference column carries no test


def test_the_reference_can_be_named_and_swapped(pair):
    swapped = report.compare(list(pair), reference="other")
    assert "paired tests vs other" in swapped
    reference_cell = line_of(swapped, "asr/x").split("63.3% [45.5, 78.1]")[0].rstrip()
    assert reference_cell.endswith("40.0% [24.6, 57.7] n.s. (p=0.065)")
    assert report.compare(list(pair), reference=str(pair[1])) == swapped
    with pytest.raises(EvaluationError, match="neither a label"):
        report.compare(list(pair), reference="nobody")


def test_records_on_different_prompts_get_no_paired_test_and_a_reason(pair, tmp_path):
    other = json.loads(pair[1].read_text())
    other["datasets"]["harmful:x"]["fingerprint"] = "fp-other"
    (tmp_path / "elsewhere.json").write_text(json.dumps(other))
    text = report.compare([pair[0], tmp_path / "elsewhere.json"])
    assert line_of(text, "asr/x").endswith("63.3% [45.5, 78.1]")
    assert line_of(text, "refusal_margin/x").endswith("+1.50 [+0.97, +2.03]")
    assert "elsewhere: no paired test on harmful:x: different prompts (dataset fingerprint fp-x vs fp-other" in text
    assert line_of(text, "over_refusal/y").endswith("p=0.016")  # the benign set is still the same prompts


def test_different_primary_judges_are_not_tested_against_each_other(pair, tmp_path):
    other = json.loads(pair[1].read_text())
    judges = other["metrics"]["detail/harmful/x"]["judges"]
    other["metrics"]["detail/harmful/x"]["judges"] = {"guard": judges["guard"], "keyword": judges["keyword"]}
    (tmp_path / "guard_first.json").write_text(json.dumps(other))
    text = report.compare([pair[0], tmp_path / "guard_first.json"])
    assert "guard_first: no paired test on asr/x: primary judges differ (keyword vs guard)" in text
    assert line_of(text, "asr/x [keyword]").endswith("n.s. (p=0.065)")  # the per-judge rows still pair


# ---------------------------------------------------------------------------------------------------------------
# Agreement, plot, markdown, CLI


def test_judge_agreement_is_printed(pair):
    text = report.compare([pair[0]])
    # keyword vs guard on attack success: both 8, keyword only 4, guard only 2, neither 16 (n = 30)
    # p_o = 0.8, p_e = 0.4·(1/3) + 0.6·(2/3) = 0.5333, kappa = 0.2667 / 0.4667 = 4/7
    assert "ref harmful:x keyword|guard: kappa = 0.57, raw agreement 80.0%, n = 30" in text
    assert 'keyword answers "refused?"' in text and 'guard answers "harmful?"' in text
    record = json.loads(pair[0].read_text())  # a stored agreement entry is printed as stored
    record["metrics"]["detail/harmful/x"]["agreement"] = {"keyword|guard": {"kappa": 0.25, "n": 29,
                                                                             "raw_agreement": 0.5}}
    assert "ref harmful:x keyword|guard: kappa = 0.25, raw agreement 50.0%, n = 29" in report.table([record])


def test_old_records_get_agreement_on_benign_refusals_and_stored_check_intervals_win():
    record = json.loads((RESULTS / "evaluation" / "base_smollm2.json").read_text())
    text = report.table([record], ["base"])
    # benign set, keyword vs classifier on refusal: counted here from the samples, kappa by the closed form
    pairs = [(s["verdicts"]["keyword"]["refused"], s["verdicts"]["classifier"]["refused"])
             for s in record["samples"]["benign:heldout"]]
    n, both = len(pairs), sum(a and b for a, b in pairs)
    k_a, k_b = sum(a for a, _ in pairs), sum(b for _, b in pairs)
    observed = (both + sum(not a and not b for a, b in pairs)) / n
    expected = (k_a * k_b + (n - k_a) * (n - k_b)) / n**2
    kappa = (observed - expected) / (1 - expected)
    assert f"base benign:heldout keyword|classifier: kappa = {kappa:.2f}, raw agreement {100 * observed:.1f}%" in text
    assert "base harmful:advbench keyword|classifier: kappa = " in text
    record["metrics"]["judge_check"]["keyword"]["ci"] = [0.5, 0.75]
    assert line_of(report.table([record]), "judge_check/keyword").endswith("95.0% [50.0, 75.0]")


def test_the_compare_plot_has_error_bars_on_every_rate_and_margin(pair, tmp_path):
    png = tmp_path / "plots" / "cmp.png"
    report.compare(list(pair), plot=png)
    assert png.stat().st_size > 1000
    records, labels = report.load_records(list(pair))
    bars = report._grid(records, labels, 0)["plot"]
    assert set(bars) == {"asr/x", "refusal_margin/x", "over_refusal/y", "gsm8k_accuracy"}
    assert all(b["ci"] is not None and b["ci"][0] <= b["value"] <= b["ci"][1] for v in bars.values() for b in v)


def test_metric_cells_are_the_numbers_the_table_prints(pair):
    records, labels = report.load_records(list(pair))
    cells = report.metric_cells(records, labels, reference="ref")
    asr = cells["metrics"]["asr/x"]
    assert [c["value"] for c in asr] == [pytest.approx(12 / N), pytest.approx(19 / N)]
    assert asr[0]["p"] is None and asr[1]["p"] == pytest.approx(2 * (1 + 11 + 55) / 2**11)  # 2 vs 9 discordant
    assert list(asr[1]["ci"]) == [pytest.approx(v) for v in report.stats.wilson_interval(19, N)]
    assert cells["notes"][0].startswith("paired tests vs ref")
    alone = report.metric_cells(records[:1], labels[:1])  # one record: intervals, no tests
    assert alone["metrics"]["asr/x"][0]["p"] is None and alone["metrics"]["asr/x"][0]["ci"] == asr[0]["ci"]


def test_markdown_table(pair):
    md = report.compare(list(pair), markdown=True)
    lines = md.splitlines()
    assert lines[0] == "| metric | ref | other |" and lines[1] == "|---|---:|---:|"
    assert "| `asr/x` | 40.0% [24.6, 57.7] | 63.3% [45.5, 78.1] n.s. (p=0.065) |" in md
    assert "  - ref harmful:x keyword|guard: kappa = 0.57" in md and "- paired tests vs ref" in md


def test_cli_compare_with_reference_and_markdown(pair, capsys):
    assert cli.main(["evaluate", "--compare", str(pair[0]), str(pair[1]), "--reference", "other",
                     "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| metric | ref | other |") and "paired tests vs other" in out


def test_sample_values_reads_per_prompt_outcomes_by_judge_and_names_what_is_missing():
    margins = list(np.linspace(-2.0, 3.0, N))
    rec = make_record("m", flags(range(12)), flags([0, 5]), margins, flags([1, 2]), flags([4]), shuffle_seed=3)
    by_id = {s["id"]: s for s in rec["samples"]["harmful:x"]}
    keyword = report.sample_values(rec, "harmful:x", "attack_success")  # primary judge = keyword
    assert keyword["judge"] == "keyword" and len(keyword["ids"]) == N
    assert keyword["values"] == [int(i[1:]) < 12 for i in keyword["ids"]]
    guard = report.sample_values(rec, "harmful:x", "attack_success", judge="guard")
    assert guard["values"] == [i in ("s0", "s5") for i in guard["ids"]]
    refused = report.sample_values(rec, "benign:y", "refused")
    assert refused["values"] == [i in ("s1", "s2") for i in refused["ids"]]
    margin = report.sample_values(rec, "harmful:x", "refusal_margin")
    assert margin["judge"] is None and margin["values"] == [by_id[i]["refusal_margin"] for i in margin["ids"]]
    assert report.sample_values(rec, "gsm8k", "correct")["values"].count(True) == 1
    by_id["s3"]["verdicts"]["keyword"]["error"] = "timeout"  # a failed judgement is None, not False
    assert report.sample_values(rec, "harmful:x", "attack_success")["values"][keyword["ids"].index("s3")] is None
    with pytest.raises(EvaluationError, match="judge 'llama_guard'"):
        report.sample_values(rec, "harmful:x", "attack_success", judge="llama_guard")
    with pytest.raises(EvaluationError, match="'harmful:z'.*sample sets"):
        report.sample_values(rec, "harmful:z", "attack_success")
    with pytest.raises(EvaluationError, match="question must be one of"):
        report.sample_values(rec, "harmful:x", "asr")
