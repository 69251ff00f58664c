"""experiments/tradeoff_runs.py: the Case I sweep's "train until the penalised objective descends" loop, with the
fine-tune and the loss measurement replaced by fakes (both are tested on their own: the training engine in
test_train.py, the held-out losses in test_theory_real.py), so the doubling, resume and record logic is checked
exactly and fast."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def runs_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("tradeoff_runs_under_test", ROOT / "experiments" / "tradeoff_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("tradeoff_runs_under_test", None)


def fake_training(module, monkeypatch, descends_at: int):
    trained = []

    def launch(aligned, run_dir, base_config, overrides):
        steps = int([o for o in ["steps=10", *overrides] if o.startswith("steps=")][-1].split("=")[1])
        if not (run_dir / "hf" / "config.json").exists():
            trained.append(steps)
            (run_dir / "hf").mkdir(parents=True, exist_ok=True)
            (run_dir / "hf" / "config.json").write_text("{}")
            (run_dir / "steps").write_text(str(steps))
        return run_dir

    def objective(aligned, run_dir, n_rows, max_len):
        steps = int((run_dir / "steps").read_text())
        at_run = 2.0 - (0.6 if steps >= descends_at else 0.0)
        return {"steps": steps, "objective_at_run": at_run, "objective_at_aligned": 1.5, "decreased": at_run <= 1.5}

    monkeypatch.setattr(module, "launch", launch)
    monkeypatch.setattr(module, "held_out_objective", objective)
    return trained


def test_steps_double_until_the_held_out_objective_descends_and_a_rerun_trains_nothing(runs_module, monkeypatch,
                                                                                        tmp_path):
    trained = fake_training(runs_module, monkeypatch, descends_at=40)
    run = tmp_path / "lam1"
    runs_module.launch_until_descent("aligned", run, "cfg.yaml", ["steps=10"], max_steps=160)
    assert trained == [10, 20, 40]
    history = json.loads((run / "descent.json").read_text())["history"]
    assert [h["steps"] for h in history] == [10, 20, 40] and [h["decreased"] for h in history] == [False, False, True]
    runs_module.launch_until_descent("aligned", run, "cfg.yaml", ["steps=10"], max_steps=160)
    assert trained == [10, 20, 40]  # resumed from descent.json: the finished run is reused
    assert len(json.loads((run / "descent.json").read_text())["history"]) == 3


def test_a_run_that_never_descends_stops_at_max_steps_and_says_so(runs_module, monkeypatch, tmp_path, capsys):
    trained = fake_training(runs_module, monkeypatch, descends_at=10_000)
    run = tmp_path / "lam30"
    runs_module.launch_until_descent("aligned", run, "cfg.yaml", ["steps=10"], max_steps=50)
    assert trained == [10, 20, 40]  # 80 would pass max_steps 50
    assert json.loads((run / "descent.json").read_text())["history"][-1]["decreased"] is False
    assert "did NOT decrease by 40 steps (max 50)" in capsys.readouterr().out
