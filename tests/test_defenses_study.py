"""experiments/defenses.py end to end on tiny random models: every defense of the comparison runs, the table, plot
and result.json are written, and a second run reuses every stage (nothing is trained or evaluated again)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--steps", "2", "--pool", "20", "--n-harmful", "4", "--n-benign", "4", "--gsm8k", "2", "--gsm8k-tokens", "4",
        "--loss-rows", "4", "--max-new-tokens", "4", "--n-calibration", "8", "--safety-steps", "1", "--max-len", "128",
        "--bea-trigger-tokens", "8"]


def _study():
    spec = importlib.util.spec_from_file_location("defenses_study", ROOT / "experiments" / "defenses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_defenses_study_on_tiny_models_runs_every_defense_and_resumes(tmp_path, smollm2_gguf, capsys):
    from safetrade.models import io, llama
    from safetrade.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    cfg = llama.preset("tiny").replace(vocab_size=49152, max_position_embeddings=512)
    unaligned = llama.init(cfg, jax.random.key(0))
    aligned = jax.tree.map(lambda u, n: u + 0.01 * n, unaligned, llama.init(cfg, jax.random.key(1)))
    io.save_hf(tmp_path / "unaligned", cfg, unaligned, tokenizer=tok)
    io.save_hf(tmp_path / "aligned", cfg, aligned, tokenizer=tok)
    study = _study()
    argv = ["--aligned", str(tmp_path / "aligned"), "--unaligned", str(tmp_path / "unaligned"),
            "--out", str(tmp_path / "out"), "--scenarios", "dirty", *TINY]
    study.main(argv)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    dirty = result["scenarios"]["dirty"]
    assert [r["label"] for r in dirty["rows"]] == list(study.DEFENSES)
    assert dirty["n_rows"] == 20
    pool = [json.loads(line) for line in (tmp_path / "out" / "data" / "dirty.jsonl").read_text().splitlines()]
    assert sum(r["id"].startswith("gsm8k") for r in pool) == 18  # 10 % harmful pairs mixed into the benign pool
    for row in dirty["rows"]:
        for key in ("asr_keyword", "asr_classifier", "over_refusal", "gsm8k_accuracy"):
            lo, hi = row[f"{key}_ci"]
            assert 0 <= lo <= row[key] <= hi <= 1, (row["label"], key)
        assert row["gsm8k_loss"] > 0
    filtered = [json.loads(line) for line in
                (tmp_path / "out" / "dirty" / "data" / "sqsd_filter.jsonl").read_text().splitlines()]
    assert len(filtered) == 18  # the top 10 % (2 of 20) by SQSD score removed
    bea_eval = json.loads((tmp_path / "out" / "dirty" / "eval" / "bea.json").read_text())
    assert bea_eval["config"]["system"] == (tmp_path / "out" / "dirty" / "bea" / "inference_system.txt").read_text()
    table = (tmp_path / "out" / "dirty" / "table.md").read_text()
    assert "safe_lora" in table and "sqsd_filter" in table and "[" in table
    assert (tmp_path / "out" / "dirty" / "pareto.png").stat().st_size > 1000
    summary = (tmp_path / "out" / "summary.md").read_text().splitlines()
    assert len(summary) == 2 + 1 + len(study.DEFENSES)  # header, aligned, one row per defense
    lisa = next(line for line in summary if "| lisa (rho = 1.0) |" in line)
    cells = [c.strip() for c in lisa.split("|")[1:-1]]
    assert cells[0] == "dirty" and cells[2].endswith("]") and (cells[3][0].isdigit() or cells[3].startswith("<"))
    capsys.readouterr()
    study.main(argv)  # everything cached: no training, no evaluation
    printed = capsys.readouterr().out
    assert "training" not in printed and "evaluating" not in printed


def test_a_study_split_by_scenarios_accumulates_only_with_the_same_settings(tmp_path, capsys):
    import argparse

    study = _study()
    args = argparse.Namespace(aligned="runs/align/hf", out=tmp_path, scenarios=["dirty"], steps=20, alt=True)
    earlier = {"args": {**vars(args), "out": str(tmp_path), "scenarios": ["harmful", "dirty"]},
               "scenarios": {"harmful": {"rows": ["h"]}, "dirty": {"rows": ["old"]}}}
    path = tmp_path / "result.json"
    assert study.earlier_scenarios(path, args) == {}  # no earlier result
    path.write_text(json.dumps(earlier))
    assert study.earlier_scenarios(path, args) == {"harmful": {"rows": ["h"]}}  # dirty is re-run now
    changed = argparse.Namespace(**{**vars(args), "steps": 40})
    assert study.earlier_scenarios(path, changed) == {}
    assert "dropping earlier scenarios ['harmful']: settings differ (steps)" in capsys.readouterr().out


def test_versus_pairs_each_prompt_by_id_and_counts_discordant_prompts_each_way(tmp_path):
    study = _study()

    def record(path, attacked_ids, ids=("a", "b", "c", "d", "e")):
        samples = [{"id": i, "verdicts": {"keyword": {"refused": i not in attacked_ids}}} for i in ids]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"samples": {"harmful:heldout": samples[::-1] if "rev" in path.name else samples}}))

    eval_dir = tmp_path / "dirty" / "eval"
    record(eval_dir / "safe_delta.json", {"a"})
    record(eval_dir / "sft.json", {"a", "b", "c", "d"})
    record(eval_dir / "rev-bea.json", {"e"})  # the same prompts in another order
    result = {"scenarios": {"dirty": {"rows": [{"label": "sft"}, {"label": "safe_delta"}, {"label": "rev-bea"}]}}}
    table = study.versus_markdown(tmp_path, result, "safe_delta").splitlines()
    assert table[2] == "| dirty | sft | 0 | 3 | 0.250 ns |"  # 3 discordant, all one way: p = 2 / 2^3
    assert table[3] == "| dirty | rev-bea | 1 | 1 | 1.000 ns |"
    with pytest.raises(SystemExit, match="no scenario has a row"):
        study.versus_markdown(tmp_path, result, "lisa")
    record(eval_dir / "sft.json", {"a"}, ids=("a", "b", "x", "d", "e"))
    with pytest.raises(SystemExit, match="other prompts"):
        study.versus_markdown(tmp_path, result, "safe_delta")
