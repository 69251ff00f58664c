"""SQSD: per-example gradients, rank-space alignment algebra, scores, windows, bad input, baselines.

Everything runs on the `tiny` preset (2 layers, hidden 64) with rank-4 adapters on all seven projections and a
random lora_b (a fresh B = 0 would hide every B-side term). Tolerances: the quantities compared are O(1) cosines
or gradients whose entries are at most ~1e-1, computed in fp32 (HIGHEST matmul precision) by two different
orders of operations, so differences sit near 1e-7; 1e-5 leaves ~100x margin.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safetrade import sqsd
from safetrade.data.batching import make_batch
from safetrade.models import llama, lora
from safetrade.models.llama import LORA_TARGETS, LoraConfig
from safetrade.train.losses import lm_loss

CFG = llama.preset("tiny")
MAX_LEN = 32  # one bucket: every batch here is [BATCH, 32], so each jitted function compiles once
BATCH = 4
N_TERMS = len(LORA_TARGETS) * CFG.num_layers  # (module, layer) pairs summed in P


def scoring(**overrides) -> sqsd.SQSDConfig:
    return sqsd.SQSDConfig(**{"batch_size": BATCH, "max_len": MAX_LEN, **overrides})


def stacked(per_module: dict) -> np.ndarray:
    """module_metric's {module: [S, L]} as [S, M, L], modules in sorted key order."""
    return np.stack([per_module[k] for k in sorted(per_module)], axis=1)


def make_examples(n: int, seed: int = 0) -> list[dict]:
    """Random token rows of 10..28 tokens: a 3..7-token 'prompt' (mask 0) and a 'response' (mask 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length, prompt = int(rng.integers(10, 29)), int(rng.integers(3, 8))
        mask = np.zeros(length, np.float32)
        mask[prompt:] = 1
        out.append({"input_ids": rng.integers(3, CFG.vocab_size, length).astype(np.int32), "loss_mask": mask,
                    "id": f"s{i}"})
    return out


def random_params(cfg, seed: int) -> dict:
    """Params drawn like llama.init (weights N(0, 0.02²), norm scales 1) plus, with cfg.lora, adapters with
    lora_a ~ N(0, 1/in) and a random lora_b ~ N(0, 0.05²) (a fresh B = 0 would hide every B-side term).

    Drawn with numpy from the abstract shapes: llama.init and add_adapters would each cost a few seconds of
    tracing and compiling that this file's 30 s budget cannot spare.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            value = np.ones(leaf.shape)
        elif name == "lora_a":
            value = rng.normal(0, 1 / np.sqrt(leaf.shape[-2]), leaf.shape)
        elif name == "lora_b":
            value = rng.normal(0, 0.05, leaf.shape)
        else:
            value = rng.normal(0, 0.02, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, llama.abstract_params(cfg))


def flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(k.key for k in path): np.asarray(leaf, np.float64)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def model():
    """(lora cfg, params with trained-looking adapters, a second 'danger' adapter tree) on the tiny preset.

    LoRA scale 1 (alpha = rank), so the safety side's official scaling override to 1 leaves the config equal and
    the jitted gradient function is compiled once for both sides.
    """
    lora_cfg = CFG.replace(lora=LoraConfig(4, 4.0, LORA_TARGETS))
    scored = random_params(lora_cfg, seed=0)
    danger = lora.split(random_params(lora_cfg, seed=1))[1]
    return lora_cfg, scored, danger


@pytest.fixture(scope="module")
def examples():
    return make_examples(8)


@pytest.fixture(scope="module")
def grads(model, examples):
    """Per-example adapter gradients of the first BATCH examples, padded to MAX_LEN."""
    lora_cfg, params, _ = model
    batch = make_batch(examples[:BATCH], MAX_LEN)
    losses, g = sqsd.per_example_grads(sqsd.LlamaLoss(lora_cfg), params, batch,
                                       wrt=sqsd.select_paths(params, sqsd.is_adapter_leaf))
    return batch, np.asarray(losses), {k: np.asarray(v, np.float64) for k, v in g.items()}


def test_vmapped_per_example_grads_equal_a_batch_of_one_loop(model, examples, grads):
    lora_cfg, params, _ = model
    _, losses, vmapped = grads
    base, adapters = lora.split(params)
    one_row = jax.jit(jax.value_and_grad(lambda a, b: lm_loss(lora_cfg, lora.combine(base, a), b)))
    worst_grad, worst_loss, scale = 0.0, 0.0, 0.0
    for i, example in enumerate(examples[:BATCH]):
        loss, g = one_row(adapters, make_batch([example], MAX_LEN))  # one compile for all rows
        worst_loss = max(worst_loss, abs(float(loss) - losses[i]))
        for key, value in flat(g).items():
            worst_grad = max(worst_grad, float(np.abs(vmapped[key][i] - value).max()))
            scale = max(scale, float(np.abs(value).max()))
    assert scale > 1e-3  # the comparison is not between zeros
    assert worst_grad <= 1e-5, worst_grad
    assert worst_loss <= 1e-5, worst_loss


def induced_updates(params, grads, lr=1.0):
    """Materialised δW = −lr·(G_A·B + A·G_B) per module, [S, L, in, out] in float64 (the reference)."""
    out = {}
    for target in LORA_TARGETS:
        key = sqsd.MODULE_KEYS[target]
        module = flat(params)
        a, b = module[f"{key}/lora_a"], module[f"{key}/lora_b"]
        ga, gb = grads[f"{key}/lora_a"], grads[f"{key}/lora_b"]
        out[key] = -lr * (np.einsum("slnr,lrk->slnk", ga, b) + np.einsum("lnr,slrk->slnk", a, gb))
    return out


def reference_metric(updates, dense_directions, metric):
    """[S, M, L] cosines / projections from materialised matrices, modules in sorted key order."""
    columns = []
    for key in sorted(updates):
        u, d = updates[key], np.asarray(dense_directions[key], np.float64)
        dot = np.einsum("slnk,lnk->sl", u, d)
        d_norm = np.sqrt(np.einsum("lnk,lnk->l", d, d))
        u_norm = np.sqrt(np.einsum("slnk,slnk->sl", u, u))
        columns.append(dot / d_norm if metric == "projection" else dot / (u_norm * d_norm))
    return np.stack(columns, axis=1)


def test_rank_space_cosines_equal_materialised_matrices(model, grads):
    lora_cfg, params, danger = model
    _, _, g = grads
    updates = induced_updates(params, g, lr=0.5)
    rng = np.random.default_rng(5)
    factored = sqsd.directions_from_adapters(lora_cfg, danger)
    dense = sqsd.Directions({k: sqsd.DenseDirection(jnp.asarray(rng.normal(size=v.shape), jnp.float32))
                             for k, v in factored.modules.items()})
    g_jax = {k: jnp.asarray(v, jnp.float32) for k, v in g.items()}
    sites = tuple(sorted(sqsd.llama_lora_sites(lora_cfg).items()))
    for directions in (factored, dense):
        terms = jax.device_get(sqsd.alignment_terms(params, g_jax, directions, 0.5, sites=sites))
        materialised = {k: np.asarray(v.dense()) for k, v in directions.modules.items()}
        for metric in sqsd.METRICS:
            got = stacked(sqsd.module_metric(terms, metric))
            want = reference_metric(updates, materialised, metric)
            assert got.shape == (BATCH, len(LORA_TARGETS), CFG.num_layers)
            # cosines are O(1): absolute 1e-5; projections scale with ‖δW‖, so relative to their largest value
            error = np.abs(got - want).max() / (1.0 if metric == "cosine" else np.abs(want).max())
            assert error <= 1e-5, (type(directions.modules[factored.keys[0]]).__name__, metric, error)
            assert np.abs(want).max() > 1e-3


def test_full_space_cosines_use_kernel_gradients(model, examples):
    lora_cfg, params, danger = model
    base = lora.split(params)[0]
    directions = sqsd.directions_from_adapters(lora_cfg, danger).dense()
    batch = make_batch(examples[:BATCH], MAX_LEN)
    sites = tuple(sorted(sqsd.kernel_sites(directions.keys).items()))
    _, g = sqsd.per_example_grads(sqsd.LlamaLoss(CFG), base, batch, wrt=tuple(s.path for _, s in sites))
    terms = jax.device_get(sqsd.alignment_terms(base, g, directions, 1.0, sites=sites))
    updates = {k.removesuffix("/kernel"): -np.asarray(v, np.float64) for k, v in g.items()}
    dense = {k: np.asarray(v.matrix) for k, v in directions.modules.items()}
    want = reference_metric(updates, dense, "cosine")
    error = np.abs(stacked(sqsd.module_metric(terms, "cosine")) - want).max()
    assert error <= 1e-5, error
    # end to end through score_probes, from the factored danger adapter (made dense inside)
    probe = sqsd.llama_probe(CFG, base, sqsd.directions_from_adapters(lora_cfg, danger), space="full")
    scores = sqsd.score_probes(examples[:BATCH], probe, cfg=scoring())
    np.testing.assert_allclose(scores.p_danger, want.sum(axis=(1, 2)), rtol=0, atol=1e-5)


def aligned_direction(params, grads, row: int) -> sqsd.Directions:
    """A rank-2r factored direction equal to row's induced update: δW = [−G_A, −A]·[B; G_B] (lr = 1)."""
    module = flat(params)
    modules = {}
    for target in LORA_TARGETS:
        key = sqsd.MODULE_KEYS[target]
        a, b = module[f"{key}/lora_a"], module[f"{key}/lora_b"]
        ga, gb = grads[f"{key}/lora_a"][row], grads[f"{key}/lora_b"][row]
        left = np.concatenate([-ga, -a], axis=-1)  # [L, in, 2r]
        right = np.concatenate([b, gb], axis=-2)  # [L, 2r, out]
        modules[key] = sqsd.FactoredDirection(jnp.asarray(left, jnp.float32), jnp.asarray(right, jnp.float32))
    return sqsd.Directions(modules)


def test_sample_aligned_with_danger_direction_ranks_first(model, examples, grads):
    lora_cfg, params, danger = model
    _, _, g = grads
    row = 2
    probe = sqsd.llama_probe(lora_cfg, params, aligned_direction(params, g, row))
    scores = sqsd.score_probes(examples, probe, cfg=scoring(metric="cosine"))
    # cos(δW, δW) = 1 in every (module, layer): P_danger = number of terms, the maximum possible
    assert abs(scores.p_danger[row] - N_TERMS) <= 1e-4, scores.p_danger[row]
    assert np.argmax(scores.score) == row
    assert np.all(np.delete(scores.p_danger, row) < N_TERMS - 0.5)
    windows = sqsd.rank_windows(scores, n_windows=4)
    assert windows[0][0] == row

    # The official pair: danger at an initial adapter against the danger adapter, safety at the safety adapter
    # with its scaling overridden to 1 (the fixture's scale is already 1, so nothing recompiles).
    assert sqsd.with_lora_scale(lora_cfg, 0.8).lora.scale == pytest.approx(0.8)
    safe_params = lora.combine(lora.split(params)[0], danger)
    danger_probe, safety_probe = sqsd.llama_probes(initial=(lora_cfg, params), danger=(lora_cfg, danger),
                                                   safety=(lora_cfg, safe_params), safety_scale=1.0)
    assert safety_probe.loss_fn.cfg.lora.scale == 1.0 and safety_probe.params is safe_params
    both = sqsd.score_probes(examples, danger_probe, safety_probe, scoring())
    danger_only = sqsd.score_probes(examples, danger_probe, cfg=scoring())
    np.testing.assert_allclose(both.p_danger, danger_only.score, rtol=0, atol=1e-12)
    np.testing.assert_allclose(both.score, both.p_danger - both.p_safe, rtol=0, atol=1e-12)
    assert np.all(np.abs(both.p_safe) <= N_TERMS) and np.std(both.p_safe) > 0
    # The projection variant of the aligned sample: Σ ⟨δW, δW⟩/‖δW‖ = Σ_m ‖δW_m‖ (relative error; fp32 sums)
    projection = sqsd.score_probes(examples, probe, cfg=scoring(metric="projection"))
    norms = sum(np.sqrt((u[row] ** 2).sum(axis=(-2, -1))).sum() for u in induced_updates(params, g).values())
    assert projection.method == "sqsd-projection"
    assert abs(projection.p_danger[row] / norms - 1) <= 1e-5, (projection.p_danger[row], norms)


def test_windows_follow_the_official_linspace_starts():
    rng = np.random.default_rng(0)
    values = rng.normal(size=23)
    values[[3, 7, 11]] = np.nan  # unscored samples are not ranked: 20 remain
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")[:20]

    windows = sqsd.rank_windows(values, n_windows=5)  # default size 20 // 5 = 4: a partition
    assert [len(w) for w in windows] == [4] * 5
    np.testing.assert_array_equal(np.concatenate(windows), order)

    windows = sqsd.rank_windows(values, n_windows=5, window_size=3)
    # np.linspace(0, 20 - 3, 5, dtype=int) = [0, 4, 8, 12, 17]: 0, 4.25, 8.5, 12.75, 17 truncated
    for start, window in zip([0, 4, 8, 12, 17], windows):
        np.testing.assert_array_equal(window, order[start:start + 3])
    assert all(np.all(np.diff(values[w]) <= 0) for w in windows)  # each window in descending score order
    with pytest.raises(sqsd.SQSDError, match="window size"):
        sqsd.rank_windows(values, n_windows=5, window_size=21)


def test_unscorable_samples_are_nan_and_flagged_and_truncation_is_counted(model, examples):
    lora_cfg, params, danger = model
    bad = [
        {"input_ids": np.arange(3, 15, dtype=np.int32), "loss_mask": np.zeros(12, np.float32), "id": "all-masked"},
        {"input_ids": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.float32), "id": "empty"},
        # a target at position 0 has no preceding token, so it is not a target (as in train.losses)
        {"input_ids": np.arange(3, 9, dtype=np.int32), "loss_mask": np.eye(1, 6, 0, np.float32)[0], "id": "first"},
        {"input_ids": np.arange(3, 3 + 40, dtype=np.int32), "loss_mask": np.r_[np.zeros(5), np.ones(35)],
         "id": "long"},
    ]
    mixed = examples[:3] + bad
    probe = sqsd.llama_probe(lora_cfg, params, sqsd.directions_from_adapters(lora_cfg, danger))
    scores = sqsd.score_probes(mixed, probe, cfg=scoring())
    by_id = dict(zip(scores.ids, range(len(mixed))))
    for sample_id, flag in (("all-masked", "no_targets"), ("empty", "empty"), ("first", "no_targets")):
        i = by_id[sample_id]
        assert np.isnan(scores.score[i]) and np.isnan(scores.p_danger[i]) and flag in scores.flags[i]
    assert scores.n_truncated == 1 and scores.flags[by_id["long"]] == ("truncated",)
    assert np.isfinite(scores.score[by_id["long"]])  # scored on its first MAX_LEN tokens
    assert np.all(np.isfinite(scores.score[:3]))
    assert "4 of 7 samples scored" in scores.summary()
    ranked = np.concatenate(sqsd.rank_windows(scores, n_windows=4))
    assert set(ranked) == {0, 1, 2, by_id["long"]}
    # baselines flag the same samples
    assert np.array_equal(sqsd.random_scores(mixed, max_len=MAX_LEN).valid, scores.valid)


def test_directions_that_do_not_fit_the_model_raise_naming_the_module(model):
    lora_cfg, params, danger = model
    partial_cfg = lora_cfg.replace(lora=LoraConfig(4, 4.0, ("q_proj", "v_proj")))
    directions = sqsd.directions_from_adapters(partial_cfg, danger)  # reads q_proj and v_proj only
    with pytest.raises(sqsd.DirectionsMismatch, match="blocks/attn/k_proj"):
        sqsd.score_probes(make_examples(2), sqsd.llama_probe(lora_cfg, params, directions), cfg=scoring())

    wrong = dict(sqsd.directions_from_adapters(lora_cfg, danger).modules)
    wrong["blocks/mlp/up_proj"] = sqsd.DenseDirection(jnp.zeros((2, 64, 64)))
    with pytest.raises(sqsd.DirectionsMismatch, match=r"blocks/mlp/up_proj.*\(2, 64, 128\)"):
        sqsd.Directions(wrong).check(params, sqsd.llama_lora_sites(lora_cfg))

    base = lora.split(params)[0]
    pruned = jax.tree.map(lambda x: x, base)
    del pruned["blocks"]["mlp"]["down_proj"]
    with pytest.raises(sqsd.DirectionsMismatch, match="blocks/mlp/down_proj"):
        sqsd.directions_from_checkpoints(base, pruned)
    with pytest.raises(sqsd.DirectionsMismatch, match="merge"):
        sqsd.directions_from_checkpoints(base, params)
    moved = jax.tree.map(lambda x: x + 1.0, base)
    diff = sqsd.directions_from_checkpoints(base, moved, targets=("q_proj",))
    assert diff.keys == ["blocks/attn/q_proj"] and np.allclose(diff.modules["blocks/attn/q_proj"].matrix, 1.0)
    with pytest.raises(sqsd.DirectionsMismatch, match="no direction for adapted module"):
        diff.check(params, sqsd.llama_lora_sites(lora_cfg))
    diff.check(base, sqsd.kernel_sites(diff.keys))
    with pytest.raises(sqsd.DirectionsMismatch, match="cfg.lora is None"):
        sqsd.llama_probe(CFG, base, diff, space="lora")


def test_write_jsonl_keeps_text_and_marks_unscored_rows(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"question {i}", "response": f"answer {i}"} for i in range(4)]
    scores = sqsd.SampleScores("sqsd", ["r0", "r1", "r3"], np.array([0.5, np.nan, 2.0]),
                               {"p_danger": np.array([1.0, np.nan, 2.5]), "p_safe": np.array([0.5, np.nan, 0.5])},
                               [(), ("no_targets",), ()])
    path = sqsd.write_jsonl(tmp_path / "out" / "scores.jsonl", rows, scores, windows=[np.array([2]), np.array([0])])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["r0", "r1", "r2", "r3"]
    assert lines[0]["prompt"] == "question 0" and lines[0]["rank"] == 2 and lines[0]["window"] == 2
    assert lines[1]["score"] is None and lines[1]["flags"] == ["no_targets"] and lines[1]["rank"] is None
    assert lines[2]["flags"] == ["not_scored"] and lines[2]["p_danger"] is None
    assert lines[3]["rank"] == 1 and lines[3]["window"] == 1 and lines[3]["p_safe"] == 0.5
    with pytest.raises(sqsd.SQSDError, match="no row"):
        sqsd.write_jsonl(tmp_path / "x.jsonl", rows[:2], scores)


def test_baselines(model, examples, grads):
    lora_cfg, params, _ = model
    _, _, g = grads
    head = examples[:BATCH]

    # Self-Inf-N from the same per-example gradients
    loss = sqsd.LlamaLoss(lora_cfg)
    scores = sqsd.self_influence_scores(loss, params, head, wrt=sqsd.is_adapter_leaf, batch_size=BATCH,
                                        max_len=MAX_LEN)
    squared = sum((v.reshape(BATCH, -1) ** 2).sum(1) for v in g.values())
    lengths = np.array([e["loss_mask"][1:].sum() for e in head])
    np.testing.assert_allclose(scores.score, np.log(squared + 1) + np.log(lengths + 1), rtol=1e-5, atol=0)

    # Gradient matching: with one harmful anchor equal to sample 1 (its whole response kept) and no refusal set,
    # sample 1's harmful term is cos(g, g) = 1, the largest
    anchor = dict(head[1])
    matching = sqsd.gradient_matching_scores(loss, params, head, sqsd.only_first_targets([anchor], MAX_LEN), [],
                                             wrt=sqsd.is_adapter_leaf, batch_size=BATCH, max_len=MAX_LEN)
    assert abs(matching.components["harmful"][1] - 1.0) <= 1e-5 and np.argmax(matching.score) == 1
    # bidirectional: the refusal set's term is subtracted
    two_sided = sqsd.gradient_matching_scores(loss, params, head, sqsd.only_first_targets([anchor], 3), [[head[2]]],
                                              wrt=sqsd.is_adapter_leaf, batch_size=BATCH, max_len=MAX_LEN)
    np.testing.assert_allclose(two_sided.score, two_sided.components["harmful"] - two_sided.components["refusal_1"],
                               atol=1e-12)
    assert abs(two_sided.components["refusal_1"][2] - 1.0) <= 1e-5

    # Representation matching: a sample identical to a harmful anchor has top-1 cosine 1
    anchors = [head[3], make_examples(1, seed=9)[0]]
    rep = sqsd.representation_scores(sqsd.LlamaFeatures(lora_cfg), params, head, anchors, batch_size=BATCH,
                                     max_len=MAX_LEN)
    assert abs(rep.score[3] - 1.0) <= 1e-5 and np.argmax(rep.score) == 3

    # Random: seeded
    assert np.array_equal(sqsd.random_scores(head, seed=1).score, sqsd.random_scores(head, seed=1).score)
    assert not np.array_equal(sqsd.random_scores(head, seed=1).score, sqsd.random_scores(head, seed=2).score)


def test_more_bad_input_cut_rows_non_finite_updates_and_foreign_directions(model, examples):
    lora_cfg, params, danger = model
    probe = sqsd.llama_probe(lora_cfg, params, sqsd.directions_from_adapters(lora_cfg, danger))
    eos = 2
    # encode_rows(policy="truncate") leaves a cut row ending on a target token that is not eos: with eos_id the
    # scorer counts it as truncated (it fits max_len, so only the missing eos tells); a row ending on eos is whole.
    cut, whole = dict(examples[0], id="cut"), dict(examples[1], id="whole")
    cut["input_ids"] = np.r_[cut["input_ids"][:-1], 7].astype(np.int32)
    whole["input_ids"] = np.r_[whole["input_ids"][:-1], eos].astype(np.int32)
    scores = sqsd.score_probes(sqsd.token_samples([cut, whole], MAX_LEN, eos_id=eos), probe, cfg=scoring())
    assert scores.flags == [("truncated",), ()] and scores.n_truncated == 1 and np.all(scores.valid)

    # A non-finite update (here: a NaN in one adapter of the scoring state) gives NaN + "non_finite", never 0.
    broken = jax.tree.map(lambda x: x, params)
    broken["blocks"]["attn"]["q_proj"]["lora_b"] = broken["blocks"]["attn"]["q_proj"]["lora_b"].at[0, 0, 0].set(
        jnp.nan)
    bad = sqsd.score_probes(examples[:2], sqsd.llama_probe(lora_cfg, broken, probe.directions), cfg=scoring())
    assert np.all(np.isnan(bad.score)) and all("non_finite" in f for f in bad.flags)
    assert "0 of 2 samples scored (2 non_finite)" in bad.summary()

    # Directions from a model with another depth (3 layers instead of 2): the shape error names the module.
    deeper = lora_cfg.replace(num_layers=CFG.num_layers + 1)
    foreign = sqsd.directions_from_adapters(deeper, lora.split(random_params(deeper, seed=3))[1])
    with pytest.raises(sqsd.DirectionsMismatch, match=r"blocks/attn/k_proj.*\(3, 64,"):
        sqsd.score_probes(examples[:1], sqsd.llama_probe(lora_cfg, params, foreign), cfg=scoring())

    # Scoring params without adapters at a direction's module (e.g. base weights passed by mistake).
    with pytest.raises(sqsd.DirectionsMismatch, match="no leaf 'blocks/attn/k_proj/lora_a'"):
        sqsd.llama_probe(lora_cfg, lora.split(params)[0], probe.directions).check()


def _sqsd_windows_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "sqsd_windows.py"
    spec = importlib.util.spec_from_file_location("sqsd_windows", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_window_trend_reports_rank_correlations_and_s1_minus_s5():
    trend = _sqsd_windows_script().window_trend
    windows = [{"asr": a, "refusal_margin": m} for a, m in
               ((0.30, 0.1), (0.20, 0.5), (0.25, 0.4), (0.10, 0.9), (0.05, 1.2))]
    out = trend(windows)
    # ASR ranks 5,3,4,2,1 against windows 1..5: Spearman = 1 - 6*sum(d^2)/(n(n^2-1)) = 1 - 6*38/120 = -0.9;
    # margin ranks 1,3,2,4,5: 1 - 6*2/120 = 0.9
    assert out["spearman_window_vs_asr"] == pytest.approx(-0.9)
    assert out["spearman_window_vs_margin"] == pytest.approx(0.9)
    assert out["s1_minus_s5_asr"] == pytest.approx(0.25)
    assert out["s1_minus_s5_margin"] == pytest.approx(-1.1)
    # a constant column has no rank correlation: None, not NaN and not 0
    flat = trend([{"asr": 0.1, "refusal_margin": float(i)} for i in range(5)])
    assert flat["spearman_window_vs_asr"] is None and flat["spearman_window_vs_margin"] == pytest.approx(1.0)


def test_paired_margin_difference_pairs_prompts_by_id(tmp_path):
    paired = _sqsd_windows_script().paired_margin_difference

    def write(name, margins):
        samples = [{"id": i, "refusal_margin": m} for i, m in margins.items()]
        path = tmp_path / name
        path.write_text(json.dumps({"samples": {"harmful:heldout": samples}}))
        return path

    # b lists the prompts in another order and has one extra prompt; only the shared ids are paired
    a = write("a.json", {"p1": 1.0, "p2": 2.0, "p3": 0.5})
    b = write("b.json", {"p3": 0.0, "p9": 100.0, "p1": 0.5, "p2": 1.5})
    out = paired(a, b)
    assert out["n_prompts"] == 3
    assert out["mean"] == pytest.approx(0.5)
    # every paired difference is 0.5, so every bootstrap mean is too
    assert out["ci95"] == pytest.approx([0.5, 0.5])
    spread = paired(write("c.json", {"p1": 2.0, "p2": 0.0, "p3": 1.0}), write("d.json", {"p1": 0, "p2": 0, "p3": 0}))
    assert spread["mean"] == pytest.approx(1.0)
    assert 0.0 <= spread["ci95"][0] < 1.0 < spread["ci95"][1] <= 2.0


def test_window_table_lists_every_method_window_and_the_filtering_rows():
    table = _sqsd_windows_script().markdown_table
    window = {"asr": 0.1, "refusal_margin": 0.5}
    paired = {"mean": -0.8, "ci95": [-0.9, -0.7], "n_prompts": 50}
    method = {"windows": [window] * 3, "spearman_window_vs_asr": None, "s1_minus_s5_asr": 0.0,
              "spearman_window_vs_margin": 0.5, "s1_minus_s5_margin": 0.0, "s1_minus_s5_margin_paired": paired}
    result = {"aligned": {"asr": 0.08, "refusal_margin": 1.2}, "methods": {"sqsd": method, "random": method},
              "filtering": {"k": 2, "pool": 10, "minus_top_sqsd": window, "minus_random": window,
                            "margin_difference_paired": paired}}
    text = table(result)
    assert "| S1 | S2 | S3 |" in text and "S4" not in text
    assert "| sqsd | 10 % / +0.50 |" in text and "| random |" in text
    assert "| n/a | +0 pts | +0.50 | -0.80 [-0.90, -0.70] |" in text  # constant ASR: no rank correlation
    assert "filtering (k = 2 of 10)" in text and "pool minus its top-k SQSD | 10 %" in text


def _window_eval(path, success, margins):
    samples = [{"id": f"p{i}", "refusal_margin": m,
                "verdicts": {"keyword": {"refused": not s, "attack_success": s, "error": None}}}
               for i, (s, m) in enumerate(zip(success, margins))]
    path.write_text(json.dumps({"samples": {"harmful:heldout": samples}, "metrics": {
        "detail/harmful/heldout": {"judges": {"keyword": {"answers": "refused"}}}}}))
    return path


def test_window_bootstrap_gives_hand_checked_point_estimates_and_intervals_over_prompts(tmp_path):
    module = _sqsd_windows_script()
    n = 40
    # three windows x two seeds; ASR falls 0.5 -> 0.25 -> 0.0 (seed means), margins rise
    paths = []
    for w, k in enumerate((20, 10, 0)):
        paths.append([_window_eval(tmp_path / f"w{w}s{s}.json", [i < k + (4 if s else -4) * (k > 0) for i in range(n)],
                                   [w + 0.1 * s] * n) for s in range(2)])
    out = module.window_bootstrap(paths, n_boot=300, seed=0)
    assert out["seeds"] == 2 and out["asr"]["n_prompts"] == n
    assert out["asr"]["spearman"] == pytest.approx(-1.0) and out["asr"]["s1_minus_s5"] == pytest.approx(0.5)
    low, high = out["asr"]["s1_minus_s5_ci95"]
    assert low < 0.5 < high and low > 0.2  # 40 prompts: roughly ±0.15 around +0.5
    # constant margins within each window: every resample has the same means, a zero-width interval
    assert out["margin"]["s1_minus_s5"] == pytest.approx(-2.0)
    assert out["margin"]["s1_minus_s5_ci95"] == pytest.approx([-2.0, -2.0])
    assert [x["spearman"] for x in out["asr"]["per_seed"]] == pytest.approx([-1.0, -1.0])
    window = {"asr": 0.1, "refusal_margin": 0.5}
    paired = {"mean": -0.8, "ci95": [-0.9, -0.7], "n_prompts": n}
    method = {"windows": [window] * 3, "spearman_window_vs_asr": -1.0, "s1_minus_s5_asr": 0.5,
              "spearman_window_vs_margin": 1.0, "s1_minus_s5_margin": -2.0, "s1_minus_s5_margin_paired": paired,
              "bootstrap": out, "spearman_score_vs_length": 0.12}
    text = module.markdown_table({"aligned": {"asr": 0.08, "refusal_margin": 1.2}, "methods": {"sqsd": method}})
    assert "bootstrap over the 40 evaluation prompts, 300 resamples; windows averaged over 2 training seed(s)" in text
    assert f"| sqsd | -1.00 [{out['asr']['spearman_ci95'][0]:+.2f}, " in text and "| -1.00, -1.00 | +0.12 |" in text
    # identical windows: no rank correlation, said as None rather than a number
    same = [[_window_eval(tmp_path / f"same{w}.json", [i < 5 for i in range(n)], [0.0] * n)] for w in range(3)]
    flat = module.window_bootstrap(same, n_boot=50)
    assert flat["asr"]["spearman"] is None and flat["asr"]["spearman_undefined_share"] == 1.0


def test_filter_tests_pair_prompts_per_seed_and_pooled(tmp_path):
    module = _sqsd_windows_script()
    n = 30
    top = [_window_eval(tmp_path / f"top{s}.json", [i < 3 for i in range(n)], [1.0] * n) for s in range(2)]
    rand = [_window_eval(tmp_path / f"rand{s}.json", [i < 9 for i in range(n)], [0.5] * n) for s in range(2)]
    out = module.filter_tests(top, rand)
    first = out["per_seed"][0]
    assert first["asr_minus_top_sqsd"] == pytest.approx(0.1) and first["asr_minus_random"] == pytest.approx(0.3)
    # 6 discordant prompts, all on the random side: p = 2 · 0.5^6 = 0.03125
    assert first["mcnemar"]["n_a_only"] == 0 and first["mcnemar"]["n_b_only"] == 6
    assert first["mcnemar"]["p_value"] == pytest.approx(2 * 0.5 ** 6)
    assert out["pooled_mcnemar"]["n"] == 2 * n and out["pooled_mcnemar"]["p_value"] == pytest.approx(2 * 0.5 ** 12)
    assert first["margin_difference_paired"]["mean"] == pytest.approx(0.5)


def test_mixed_pool_is_half_each_source_length_matched_and_disjoint_from_the_alignment_rows(tmp_path):
    from safetrade import config
    from safetrade.data import normalise_prompt
    from safetrade.data.sets import rows_for

    module = _sqsd_windows_script()
    data = config.DataSection(benign_ratio=3.0, rephrased=1.0, benign_rephrased=0.5)
    config.save(config.TrainJob(data=data), tmp_path / "config.yaml")
    rows, record = module.mixed_pool(60, 0, tmp_path / "config.yaml")
    assert len(rows) == 60 and sum(r["source"] == "gsm8k" for r in rows) == 30
    trained = {normalise_prompt(r["prompt"]) for r in rows_for("alignment", data) if r.get("prompt")}
    assert not any(normalise_prompt(r["prompt"]) in trained for r in rows)
    medians = [record["response_chars_p10_p50_p90"][s][1] for s in ("gsm8k", "sharegpt")]
    assert abs(medians[0] - medians[1]) < 0.25 * max(medians)  # unmatched: ~241 vs ~682 characters
    with pytest.raises(SystemExit, match="pass --align-config"):
        module.mixed_pool(60, 0, tmp_path / "missing.yaml")
