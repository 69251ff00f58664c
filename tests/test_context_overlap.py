"""experiments/context_overlap.py: the level construction by hand, and the whole study on a tiny random Llama with
the real tokenizer (levels, measured overlap, Case I runs, the theory check, evaluations, resume)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("context_overlap_study", ROOT / "experiments" / "context_overlap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_levels_take_the_near_share_from_the_most_similar_rows_and_the_rest_from_the_far_half():
    study = _study()
    candidates = [{"id": f"c{i}"} for i in range(10)]
    similarity = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.5, 0.0])
    # far half (5 least similar): c9 (0.0), c1, c3, c5, c7; near order: c0, c2, c4, c6, c8
    ids = lambda q: [r["id"] for r in study.level_rows(candidates, similarity, q, 4)]  # noqa: E731
    assert ids(0.0) == ["c1", "c3", "c5", "c7"]
    assert ids(0.5) == ["c0", "c2", "c1", "c3"]
    assert ids(1.0) == ["c0", "c2", "c4", "c6"]
    with pytest.raises(SystemExit, match="pool of at least 12"):
        study.level_rows(candidates, similarity, 1.0, 6)


@pytest.mark.slow
def test_context_overlap_study_on_a_tiny_model_runs_and_resumes(tmp_path, smollm2_gguf, capsys):
    from safetrade import config
    from safetrade.models import io, llama
    from safetrade.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    cfg = llama.preset("tiny").replace(vocab_size=49152, max_position_embeddings=512)
    io.save_hf(tmp_path / "align" / "hf", cfg, llama.init(cfg, jax.random.key(0)), tokenizer=tok)
    config.save(config.TrainJob(data=config.DataSection(eval_rows=8)), tmp_path / "align" / "config.yaml")
    study = _study()
    argv = ["--aligned", str(tmp_path / "align" / "hf"), "--out", str(tmp_path / "out"), "--levels", "0", "1",
            "--rows", "24", "--pool", "48", "--cells", "2", "4", "--n-harmful", "4", "--n-benign", "4",
            "--max-len", "32", "steps=2", "data.eval_rows=8", "data.batch_size=8"]
    study.main(argv)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    far, near = result["levels"]
    assert far["rows"] == near["rows"] == 24 and near["mean_max_cosine"] >= far["mean_max_cosine"]
    for level in (far, near):
        assert set(level["overlap"]) == {"2", "4"} and all(0 <= v <= 1 for v in level["overlap"].values())
        assert level["safety_gap"] is not None and level["capability_gain"] is not None
        assert 0 <= level["asr"]["ci"][0] <= level["asr"]["rate"] <= level["asr"]["ci"][1] <= 1
    assert "p_value" in near["asr_mcnemar_vs_first"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| q (near share) | overlap, 2 cells | overlap, 4 cells |" in table and "Spearman over levels" in table
    assert (tmp_path / "out" / "overlap.png").stat().st_size > 1000
    assert (tmp_path / "out" / "theory" / "bounds.md").exists()
    capsys.readouterr()
    study.main(argv)  # cached: no training, no evaluation
    printed = capsys.readouterr().out
    assert f"training {tmp_path / 'out'}" not in printed and "reusing" in printed  # tradeoff_runs.launch's lines
