"""experiments/readme_intervals.py: the README's intervals and tests are what the committed records give."""

import importlib.util
import sys
from pathlib import Path

import pytest

from safetrade.evaluate import stats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("readme_intervals", ROOT / "experiments" / "readme_intervals.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _code_block_after(text: str, marker: str) -> list[str]:
    start = text.index("```\n", text.index(marker)) + 4
    return text[start:text.index("```", start)].rstrip("\n").splitlines()


def test_the_readme_demo_table_is_the_rendering_of_the_committed_records(script):
    from safetrade import demo

    rendered = demo.format_summary(script.demo_summary()).splitlines()
    readme = _code_block_after((ROOT / "README.md").read_text(), "Its table for the last full run")
    # the README shows the table and its legend, not the SQSD / bound lines under it
    assert readme == [line for line in rendered if not line.startswith(("SQSD risk", "bound "))]
    results_readme = _code_block_after((ROOT / "experiments/results/demo/README.md").read_text(), "What it printed")
    assert results_readme == rendered


def test_unpaired_comparisons_use_wilson_on_the_counts_and_newcombe(script):
    title, rates, comparisons = script.strategies_study()
    by = {r.label: r for r in rates}
    sft, case1 = by["harmful refused, sft"], by["harmful refused, Case I λ = 1"]
    assert (sft.k, sft.n, case1.k, case1.n) == (22, 100, 83, 100)
    assert sft.ci == stats.wilson_interval(22, 100)
    c = next(c for c in comparisons if c["label"] == "harmful refused: Case I vs sft")
    assert c["ci"] == stats.newcombe_difference_interval(83, 100, 22, 100) and c["verdict"].startswith("significant")
    assert "unpaired" in c["test"] and c["p"] is None


def test_paired_comparisons_come_from_the_samples(script):
    import json

    def attacked(model):  # prompt id -> keyword attack success, read here independently of the script
        record = json.loads((ROOT / "experiments/results/demo/eval" / f"{model}.json").read_text())
        return {x["id"]: x["verdicts"]["keyword"]["attack_success"] for x in record["samples"]["harmful:heldout"]}

    aligned, benign = attacked("aligned"), attacked("benign")
    ids = sorted(aligned)
    expected = stats.mcnemar_exact([aligned[i] for i in ids], [benign[i] for i in ids])["p_value"]
    _, rates, comparisons = script.demo_study()
    c = next(c for c in comparisons if c["label"] == "ASR: benign vs aligned")
    assert c["test"] == "exact McNemar (paired)" and c["p"] == pytest.approx(expected)
    assert expected == pytest.approx(1.0) and c["verdict"] == "n.s., p = 1.00"  # 9 % vs 8 % on the same prompts
    judged = [v for v in benign.values() if v is not None]
    assert next(r for r in rates if r.label == "ASR, benign").ci == pytest.approx(
        stats.wilson_interval(sum(judged), len(judged)))


def test_a_rate_that_is_not_a_count_of_n_names_its_source(script):
    with pytest.raises(SystemExit, match="x.json: key"):
        script.from_rate("r", 0.333, 100, "x.json: key")
