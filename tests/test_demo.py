"""The demo's stage machinery: caching, invalidation through dependencies, interrupted stages, config plumbing.

The full pipeline is exercised by `safetrade demo --quick` (minutes, real model), not here.
"""

from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

from safetrade import config
from safetrade.demo import (LABELS, MODELS, QUICK, DemoJob, Pipeline, _headline, attach_statistics, estimate_seconds,
                            eval_statistics, format_summary, plot_summary)
from safetrade.evaluate import stats


def _quiet(_message):
    pass


def test_a_stage_runs_once_and_its_record_is_reused(tmp_path):
    calls = []
    pipe = Pipeline(tmp_path, log=_quiet)
    assert pipe.run("a", {"x": 1}, (), lambda: calls.append("a") or {"value": 1}) == {"value": 1}
    again = Pipeline(tmp_path, log=_quiet)
    assert again.run("a", {"x": 1}, (), lambda: calls.append("a2") or {"value": 2}) == {"value": 1}
    assert calls == ["a"]


def test_changed_settings_rerun_the_stage_and_everything_downstream(tmp_path):
    calls = []

    def run(pipe, x):
        pipe.run("up", {"x": x}, (), lambda: calls.append("up") or {})
        pipe.run("down", {"y": 0}, ("up",), lambda: calls.append("down") or {})

    run(Pipeline(tmp_path, log=_quiet), 1)
    run(Pipeline(tmp_path, log=_quiet), 1)
    assert calls == ["up", "down"]
    run(Pipeline(tmp_path, log=_quiet), 2)  # "down" did not change, but what it reads did
    assert calls == ["up", "down", "up", "down"]


def test_an_interrupted_stage_leaves_no_record_and_runs_again(tmp_path):
    pipe = Pipeline(tmp_path, log=_quiet)
    pipe.run("done", {}, (), lambda: {"ok": True})

    def killed():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.run("half", {}, ("done",), killed)
    assert not pipe.record_path("half").exists()
    assert json.loads(pipe.record_path("done").read_text())["result"] == {"ok": True}
    calls = []
    again = Pipeline(tmp_path, log=_quiet)
    again.run("done", {}, (), lambda: calls.append("done") or {})
    again.run("half", {}, ("done",), lambda: calls.append("half") or {"ok": True})
    assert calls == ["half"]


def test_a_corrupt_record_is_treated_as_missing(tmp_path):
    pipe = Pipeline(tmp_path, log=_quiet)
    pipe.record_path("a").write_text('{"key": "abc", "resu')
    assert pipe.run("a", {}, (), lambda: {"fresh": True}) == {"fresh": True}


def test_quick_sizes_are_valid_fields_and_smaller():
    quick = config.from_dict(DemoJob, QUICK)
    full = DemoJob()
    quick_est, full_est = estimate_seconds(quick), estimate_seconds(full)
    assert quick_est.keys() == full_est.keys()
    assert all(quick_est[k] <= full_est[k] for k in quick_est) and sum(quick_est.values()) < sum(full_est.values())
    assert quick.align_steps < full.align_steps and quick.n_eval < full.n_eval


def test_print_config_round_trips(tmp_path):
    out = subprocess.run([sys.executable, "-m", "safetrade.cli", "demo", "--quick", "--print-config", "n_eval=7"],
                         capture_output=True, text=True, check=True).stdout
    path = tmp_path / "demo.yaml"
    path.write_text(out)
    job = config.load(DemoJob, path)
    assert job.n_eval == 7 and job.align_steps == QUICK["align_steps"]


def test_bad_override_names_the_key():
    proc = subprocess.run([sys.executable, "-m", "safetrade.cli", "demo", "--print-config", "align_stepz=3"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "align_stepz" in proc.stderr


def test_summary_table_lists_every_model():
    models = [{"model": m, "label": m, "asr": 0.5, "over_refusal": 0.1, "gsm8k_loss": 1.0, "refusal_margin": None,
               "utility_gain": 0.0} for m in ("base", "aligned")]
    text = format_summary({"models": models, "sqsd": {"window_means": [0.2, 0.1]},
                           "theory": {"checks": [{"name": "G_s <= L r", "measured": 0.1, "bound": 0.2,
                                                  "violated": False}]}})
    assert "base" in text and "aligned" in text and "holds" in text and "+0.200" in text


# ---------------------------------------------------------------------------------------------------------------
# The summary's intervals and paired tests, from the committed records of the last full demo run (written before
# intervals existed: every number below is derived from their per-sample verdicts and margins)

DEMO_EVAL = Path(__file__).resolve().parents[1] / "experiments" / "results" / "demo" / "eval"


def _demo_summary(statistics):
    evals = {m: _headline(json.loads((DEMO_EVAL / f"{m}.json").read_text())) for m in MODELS}
    aligned_loss = evals["aligned"]["gsm8k_loss"]
    rows = [{"model": m, "label": LABELS[m], **{k: evals[m][k] for k in ("asr", "over_refusal", "gsm8k_loss",
                                                                         "refusal_margin")},
             "utility_gain": aligned_loss - evals[m]["gsm8k_loss"]} for m in MODELS]
    return attach_statistics({"models": rows, "sqsd": {}, "theory": {}}, statistics), evals


def _attack_success(model):
    """Per prompt id: the keyword judge did not see a refusal (how the demo's ASR counts an attack success)."""
    samples = json.loads((DEMO_EVAL / f"{model}.json").read_text())["samples"]["harmful:heldout"]
    return {s["id"]: not s["verdicts"]["keyword"]["refused"] for s in samples}


def test_demo_table_has_intervals_and_paired_tests_from_the_eval_records():
    scipy_stats = pytest.importorskip("scipy.stats")
    evals = {m: _headline(json.loads((DEMO_EVAL / f"{m}.json").read_text())) for m in MODELS}
    statistics = eval_statistics({m: DEMO_EVAL / f"{m}.json" for m in MODELS},
                                 {m: evals[m]["fingerprint"] for m in MODELS})
    summary, _ = _demo_summary(statistics)
    rows = {r["model"]: r for r in summary["models"]}
    for model in MODELS:  # Wilson on k of the n prompts, against scipy
        attacked = _attack_success(model)
        k, n = sum(attacked.values()), len(attacked)
        assert n == 100
        ref = scipy_stats.binomtest(k, n).proportion_ci(method="wilson")
        assert rows[model]["asr"] == pytest.approx(k / n)
        assert rows[model]["ci"]["asr"] == [pytest.approx(ref.low, abs=1e-12), pytest.approx(ref.high, abs=1e-12)]
        lo, hi = rows[model]["ci"]["refusal_margin"]
        assert lo < rows[model]["refusal_margin"] < hi
    aligned = _attack_success("aligned")
    for model in ("benign", "case1", "attacked"):  # exact McNemar from the discordant prompts, paired by id
        other = _attack_success(model)
        b = sum(aligned[i] and not other[i] for i in aligned)
        c = sum(other[i] and not aligned[i] for i in aligned)
        expected = 1.0 if b + c == 0 else scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue
        assert rows[model]["p_vs_aligned"]["asr"] == pytest.approx(expected, rel=1e-12)
    assert rows["case1"]["p_vs_aligned"]["asr"] == pytest.approx(1.0)  # 7 % vs 8 %
    assert rows["aligned"]["p_vs_aligned"]["asr"] is None
    text = format_summary(summary)
    line = {ln.split("  ")[0]: ln for ln in text.splitlines()}
    assert "9.0% [5, 16]" in line["benign FT (GSM8K)"] and "1.00 ns" in line["benign FT (GSM8K)"]
    assert "44.0% [35, 54]" in line["attacked (harmful FT)"] and " <0.001 " in line["attacked (harmful FT)"]
    assert line["aligned"].split()[-1] == "ref" and "-0.00 [-0.6, +0.6]" in line["aligned"]
    legend = " ".join(text.split())  # the legend is wrapped
    assert "exact McNemar" in legend and "no multiple-comparison correction" in legend


def test_demo_statistics_leave_out_missing_and_stale_records(tmp_path):
    statistics = eval_statistics({"aligned": tmp_path / "missing.json", "benign": DEMO_EVAL / "benign.json",
                                  "case1": DEMO_EVAL / "case1.json"},
                                 {"case1": "0123456789abcdef"})
    assert set(statistics["models"]) == {"benign"}  # missing: unreadable; case1: another model than its stage's
    notes = "\n".join(statistics["notes"])
    assert "aligned: no interval or test" in notes and "missing.json" in notes
    assert "case1: no interval or test" in notes and "0123456789abcdef" in notes
    # without the aligned record there is nothing to test against; the interval is still there
    assert statistics["models"]["benign"]["p_vs_aligned"]["asr"] is None
    assert statistics["models"]["benign"]["ci"]["asr"] == [pytest.approx(v) for v in stats.wilson_interval(9, 100)]


def test_summary_plot_draws_an_error_bar_per_interval(tmp_path, monkeypatch):
    import matplotlib.axes

    calls = []
    real = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, yerr=None, **kw: calls.append((np.size(y), yerr)) or real(self, x, y,
                                                                                                 yerr=yerr, **kw))
    statistics = eval_statistics({m: DEMO_EVAL / f"{m}.json" for m in MODELS})
    summary, _ = _demo_summary(statistics)
    summary["sqsd_values"] = [0.1, 0.2, 0.3, -0.1, 0.5]
    plot_summary(summary, tmp_path / "summary.png")
    assert (tmp_path / "summary.png").stat().st_size > 1000
    bars = [n for n, yerr in calls if yerr is not None]
    # ASR and over-refusal bars of 8 models in the first panel, one ASR bar per model in the trade-off panel
    assert bars == [8, 8] + [1] * 8


def test_align_rank_zero_aligns_every_parameter_and_a_positive_rank_adds_an_adapter():
    from safetrade.demo import ALL_LINEAR, _train_job

    def align(rank):
        return _train_job(DemoJob(align_rank=rank), "align", model="m", train="alignment", steps=3, lr=1e-4,
                          rank=rank)

    assert not align(0).lora.enabled
    adapted = align(16).lora
    assert adapted.enabled and adapted.rank == 16 and adapted.alpha == 32.0 and adapted.targets == ALL_LINEAR


def test_align_length_and_benign_share_reach_the_align_stage_only():
    from safetrade.demo import _eval_config, _train_job, align_stage_args

    job = DemoJob(max_len=96, align_max_len=256, align_benign_ratio=2.0, eval_batch_size=48)
    align = _train_job(job, "align", **align_stage_args(job))
    benign = _train_job(job, "benign", model="m", train="capability", steps=3, lr=1e-4, rank=8)
    assert (align.data.max_len, align.data.benign_ratio) == (256, 2.0)
    assert (benign.data.max_len, benign.data.benign_ratio) == (96, 3.0)
    assert _eval_config(job, "m").batch_size == 48


def test_demo_align_trial_specs_are_demo_fields_and_bad_ones_name_the_trial():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from demo_align_trials import parse_trial

    name, fields = parse_trial("full:align_rank=0,align_lr=1e-4")
    assert name == "full" and fields["align_rank"] == 0 and fields["align_lr"] == 1e-4
    assert parse_trial("default:")[1] == config.to_dict(DemoJob())
    for bad in ("nocolon", "t:bogus=1", "t:align_lr", "t:n_eval=40"):
        with pytest.raises(SystemExit, match=bad.partition(":")[0]):
            parse_trial(bad)
