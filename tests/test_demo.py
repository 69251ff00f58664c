"""The demo's stage machinery: caching, invalidation through dependencies, interrupted stages, config plumbing.

The full pipeline is exercised by `safetrade demo --quick` (minutes, real model), not here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from safetrade import config
from safetrade.demo import QUICK, DemoJob, Pipeline, estimate_seconds, format_summary


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
