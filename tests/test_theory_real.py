"""theory/real.py and `safetrade theory`: the Case I check and trends on synthetic numbers, the CLI's errors on bad
inputs, and the real-run pipeline end to end on a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import pytest

from safetrade import cli, config
from safetrade.models import io, llama
from safetrade.tradeoff import strategy_config
from theory import bounds, check

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------
# Case I check and trends on synthetic numbers
# ---------------------------------------------------------------------------------------------------------------


def case1_run(lam, gap, excess=0.4, delta=0.05, proxy="proxy", loss=1.0):
    return {"name": f"{proxy}-{lam}", "strategy": "case1", "lam": lam, "safety_gap": gap,
            "capability_excess_at_anchor": excess, "similarity": delta, "group": proxy, "capability_loss": loss}


def test_case1_check_passes_within_and_flags_above_the_penalty_bound():
    bound = bounds.case1_penalty_bound(2.0, 0.4, 0.0, 0.05).bound
    assert bound == pytest.approx(0.4 / 2 + 2 * 0.05)
    within, above = check.check_runs([case1_run(2.0, bound - 1e-6), case1_run(2.0, bound + 1e-3)])
    assert not within.violated and within.bound_name == "penalty" and within.group == "proxy"
    assert above.violated and above.slack < 0
    assert "**VIOLATED**" in check.format_table([within, above])


def test_case1_trends_report_which_claims_held():
    runs = [case1_run(lam, gap, delta=0.02, proxy="close", loss=loss)
            for lam, gap, loss in ((0.5, 0.30, 1.0), (1, 0.20, 1.1), (2, 0.10, 1.2), (4, 0.05, 1.3))]
    # the far proxy: larger δ, larger gaps, and one rise of G_s with λ (between λ=1 and λ=2)
    runs += [case1_run(lam, gap, delta=0.2, proxy="far", loss=loss)
             for lam, gap, loss in ((0.5, 0.40, 1.0), (1, 0.25, 1.05), (2, 0.35, 1.02), (4, 0.30, 1.4))]
    trends = check.case1_trends(runs)
    close, far = trends["per_proxy"]["close"], trends["per_proxy"]["far"]
    assert close["safety_gap_nonincreasing"] == {"held": True, "breaks": []}
    assert far["safety_gap_nonincreasing"] == {"held": False, "breaks": [[1.0, 2.0]]}
    assert close["capability_loss_nondecreasing"]["held"] is True
    assert far["capability_loss_nondecreasing"]["breaks"] == [[1.0, 2.0]]
    closer = trends["closer_proxy_smaller_gap"]
    assert closer["held"] is True and closer["compared"] == 4
    text = check.format_trends(trends)
    assert "**did not hold**" in text and "4 of 4" in text
    # the far proxy beating the close one at one λ breaks the cross-proxy claim
    runs[-1] = case1_run(4, 0.01, delta=0.2, proxy="far", loss=1.4)
    assert check.case1_trends(runs)["closer_proxy_smaller_gap"]["held_at"] == 3
    # one point per proxy: nothing was compared, so nothing "held"
    single = check.case1_trends([case1_run(1.0, 0.1)])
    assert single["per_proxy"]["proxy"]["safety_gap_nonincreasing"]["held"] is None
    # two seeds at each λ count as their mean: (0.30, 0.10) at λ=1 and (0.25, 0.05) at λ=2 fall on average
    seeds = [case1_run(1, 0.30), case1_run(1, 0.10), case1_run(2, 0.25), case1_run(2, 0.05)]
    entry = check.case1_trends(seeds)["per_proxy"]["proxy"]
    assert entry["lams"] == [1.0, 2.0] and entry["runs_per_lam"] == [2, 2]
    assert entry["safety_gaps"] == pytest.approx([0.20, 0.15])
    assert entry["safety_gap_nonincreasing"]["held"] is True


# ---------------------------------------------------------------------------------------------------------------
# Tiny random Llama + real tokenizer: two or three fake fine-tune runs
# ---------------------------------------------------------------------------------------------------------------

DATA = config.DataSection(train="attack", proxy="proxy", eval_rows=8)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, smollm2_gguf):
    from safetrade.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("theory_real")
    tok = load_tokenizer(smollm2_gguf)
    cfg = llama.preset("tiny").replace(vocab_size=49152, max_position_embeddings=512)
    aligned = llama.init(cfg, jax.random.key(0))
    io.save_hf(root / "align" / "hf", cfg, aligned, tokenizer=tok)
    config.save(config.TrainJob(data=config.DataSection(eval_rows=8)), root / "align" / "config.yaml")
    noise = llama.init(cfg, jax.random.key(1))
    runs = {"lam1": (strategy_config("case1_penalty", lam=1.0), 0.02),
            "lam4": (strategy_config("case1_penalty", lam=4.0), 0.01),
            "r": (strategy_config("case2_projection", radius=1.0), 0.005)}
    for name, (strategy, scale) in runs.items():
        params = jax.tree.map(lambda a, n, s=scale: a + s * n, aligned, noise)
        io.save_hf(root / name / "hf", cfg, params, tokenizer=tok)
        config.save(config.TrainJob(out_dir=str(root / name), data=DATA, strategy=strategy), root / name / "config.yaml")
    return root, cfg


def common(root):
    return [f"aligned={root / 'align' / 'hf'}", "n_rows=3", "max_len=128", "samples=1", "lanczos_steps=2",
            "segment_points=3"]


@pytest.mark.slow
def test_theory_command_end_to_end_on_tiny_runs(tiny_runs, tmp_path, capsys):
    root, _ = tiny_runs
    out = tmp_path / "out"
    runs = f"runs=[{root / 'lam1'},{root / 'lam4'},{root / 'r'}]"
    assert cli.main(["theory", *common(root), runs, f"out_dir={out}"]) == 0
    result = json.loads((out / "result.json").read_text())
    by_name = {r["name"]: r for r in result["runs"]}
    assert by_name["lam1"]["strategy"] == "case1" and by_name["r"]["strategy"] == "case2"
    assert by_name["lam1"]["distance"] > by_name["lam4"]["distance"] > by_name["r"]["distance"] > 0
    for r in result["runs"]:
        assert r["safety_gap"] == pytest.approx(r["loss_s"] - result["aligned"]["loss_s"])
        assert 1 <= r["rows_f"] <= 3 and 1 <= r["rows_proxy"] <= 3
    # Case I ingredients: min L_f is the smallest measured (θ_s included), δ the largest |L_s − L_proxy| seen
    lam1 = by_name["lam1"]
    measured_f = [lam1["loss_f_at_aligned"], *(r["loss_f"] for r in result["runs"])]
    assert lam1["capability_loss_min_estimate"] == pytest.approx(min(measured_f))
    assert lam1["similarity"] >= abs(result["aligned"]["loss_s"] - lam1["loss_proxy_at_aligned"]) - 1e-9
    assert isinstance(lam1["objective_decreased"], bool)
    # the Case I sweep's descent check (experiments/tradeoff_runs.py) measures the same F on the same rows
    import importlib.util
    spec = importlib.util.spec_from_file_location("tradeoff_runs_check", ROOT / "experiments" / "tradeoff_runs.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    descent = sweep.held_out_objective(str(root / "align" / "hf"), root / "lam1", n_rows=3, max_len=128)
    assert descent["objective_at_run"] == pytest.approx(lam1["objective_at_run"], rel=1e-5)
    assert descent["objective_at_aligned"] == pytest.approx(lam1["objective_at_aligned"], rel=1e-5)
    assert descent["decreased"] == lam1["objective_decreased"] and descent["steps"] == lam1["steps"]
    kinds = {(c["run"], c["bound_name"]) for c in result["checks"]}
    assert {("lam1", "penalty"), ("lam4", "penalty"), ("r", "lipschitz"), ("r", "smoothness"),
            ("r", "capability_gain")} <= kinds
    # a-posteriori certificate on every Case I and II run: its profile's ends are the measured losses
    assert {(n, k) for n in ("lam1", "lam4", "r") for k in ("certificate", "certificate_gain")} <= kinds
    for r in result["runs"]:
        seg_s, seg_f = r["segment_s"], r["segment_f"]
        assert seg_s["ts"] == [0.0, 0.5, 1.0] and seg_s["step_norm"] == pytest.approx(r["distance"], rel=1e-5)
        assert seg_s["values"][-1] - seg_s["values"][0] == pytest.approx(r["safety_gap"], rel=1e-4, abs=1e-6)
        assert seg_f["values"][0] - seg_f["values"][-1] == pytest.approx(r["capability_gain"], rel=1e-4, abs=1e-6)
        assert r["certificate_s"] == seg_s["upper"] and r["certificate_gain"] == -seg_f["lower"]
        assert r["certificate_gain_lower"] <= r["certificate_gain"]
    ratios = {(x["run"], x["quantity"]): x for x in result["ratios"]}
    assert ratios[("r", "safety")]["worst_case_name"] in ("lipschitz", "smoothness")
    assert ratios[("lam1", "safety")]["worst_case_name"] == "penalty"
    assert ratios[("r", "safety")]["certificate"] == by_name["r"]["certificate_s"]
    assert result["violations"] == sum(c["violated"] for c in result["checks"])
    assert result["trends"]["per_proxy"]["proxy"]["lams"] == [1.0, 4.0]
    report = (out / "bounds.md").read_text()
    assert "Case I trends" in report and "safety gap non-increasing in λ" in report and "lower estimate" in report
    assert "How informative: bound / measured" in report
    for png in ("bounds.png", "case1_trends.png", "certificates.png"):
        assert (out / png).stat().st_size > 1000
    assert config.load(config.TrainJob, root / "lam1" / "config.yaml").strategy.lam == 1.0
    assert (out / "config.yaml").exists()  # the resolved TheoryJob, beside its results


@pytest.mark.slow
def test_theory_command_names_the_bad_input(tiny_runs, tmp_path, capsys):
    root, cfg = tiny_runs
    bare = tmp_path / "no_hf"
    bare.mkdir()
    no_config = tmp_path / "no_config"
    io.save_hf(no_config / "hf", cfg, llama.init(cfg, jax.random.key(2)))
    other = tmp_path / "other"
    io.save_hf(other / "hf", cfg.replace(num_layers=3), llama.init(cfg.replace(num_layers=3), jax.random.key(3)))
    config.save(config.TrainJob(data=DATA), other / "config.yaml")
    cases = [("runs=[]", "runs is empty"),
             (f"runs=[{bare}]", f"no model at {bare / 'hf'}"),
             (f"runs=[{no_config}]", f"no {no_config / 'config.yaml'}"),
             (f"runs=[{tmp_path / 'missing'}]", f"run dir {tmp_path / 'missing'} not found"),
             (f"runs=[{other}]", "not the same architecture"),
             (f"runs=[{root / 'lam1'}] align_config={tmp_path / 'nope.yaml'}", f"{tmp_path / 'nope.yaml'} not found")]
    for overrides, message in cases:
        assert cli.main(["theory", *common(root), *overrides.split(), f"out_dir={tmp_path / 'out'}"]) == 2
        err = capsys.readouterr().err
        assert message in err, (overrides, err)
    assert cli.main(["theory", *common(root), f"runs=[{other}]"]) == 2
    assert "num_layers 3 vs 2" in capsys.readouterr().err
    assert cli.main(["theory", "n_rows=0", "--print-config"]) == 2
    assert "n_rows must be >= 1" in capsys.readouterr().err
    assert cli.main(["theory", "segment_points=1", "--print-config"]) == 2
    assert "segment_points must be 0 (no certificate) or >= 2" in capsys.readouterr().err
    assert cli.main(["theory", "segment_method=adjoint", "--print-config"]) == 2
    assert "segment_method must be one of" in capsys.readouterr().err
