"""Safe LoRA and Resta (safetrade/defenses) against hand-computed cases and independent NumPy float64 references.

Hand cases are written in the paper's torch layout W [out, in] (layout="out_in"): V = W_aligned − W_unaligned,
C = V Vᵀ / ‖V‖_F, ΔW ← C ΔW. Our [in, out] kernels are their transposes; a test checks both layouts agree.
Tolerances: float32 products of O(1) numbers over ≤ 100 terms, so 1e-5 relative unless stated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safetrade.defenses import DefenseError, RestaConfig, SafeLoraConfig, resta, safe_lora
from safetrade.models import llama, lora


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _projected(report):
    return [(p["kernel"], p["layer"]) for p in report["projected"]]


# ----------------------------------------------------------------------------------------------------------------
# Safe LoRA: hand cases


def _case_2x2():
    """V = [[3, 0], [4, 0]] (rank 1, ‖V‖_F = 5): C = VVᵀ/5 = [[1.8, 2.4], [2.4, 3.2]]; ΔW = I:
    C ΔW = C, cos = tr(C) / (‖C‖_F ‖I‖_F) = 5 / (5 √2) = 1/√2."""
    v = np.array([[3.0, 0.0], [4.0, 0.0]], np.float32)
    c = np.array([[1.8, 2.4], [2.4, 3.2]], np.float32)
    delta = np.eye(2, dtype=np.float32)
    return {"kernel": v}, {"kernel": np.zeros_like(v)}, {"kernel": v + delta}, c, delta, 1 / math.sqrt(2)


def test_projector_and_similarity_2x2_by_hand():
    aligned, unaligned, finetuned, c, delta, cos = _case_2x2()
    params, report = safe_lora(aligned, unaligned, finetuned, threshold=0.75, layout="out_in")
    assert report["kernels"]["kernel"]["similarity"] == pytest.approx(cos, rel=1e-6)
    assert report["kernels"]["kernel"]["projected"] is True and report["layers_projected"] == 1
    np.testing.assert_allclose(params["kernel"], aligned["kernel"] + c @ delta, rtol=1e-6)
    # τ just below the similarity: not projected, and the leaf is the fine-tuned one bit for bit
    params, report = safe_lora(aligned, unaligned, finetuned, threshold=0.70, layout="out_in")
    assert report["kernels"]["kernel"]["projected"] is False and report["projected"] == []
    np.testing.assert_array_equal(params["kernel"], finetuned["kernel"])


def test_projector_3x2_by_hand_and_not_idempotent():
    """V [out=3, in=2] = [[1, 0], [0, 1], [0, 0]]: ‖V‖_F = √2, C = diag(1, 1, 0)/√2 (σ = 1, 1: C² = C/√2, a scaled
    projector, not a projector). ΔW = [[2, 0], [0, 0], [0, 1]]: C ΔW = [[2, 0], [0, 0], [0, 0]]/√2,
    ⟨CΔW, ΔW⟩ = 4/√2, ‖CΔW‖ = √2, ‖ΔW‖ = √5, cos = 2/√5."""
    v = np.array([[1, 0], [0, 1], [0, 0]], np.float32)
    delta = np.array([[2, 0], [0, 0], [0, 1]], np.float32)
    projected_by_hand = np.array([[2, 0], [0, 0], [0, 0]], np.float32) / math.sqrt(2)
    aligned, unaligned = {"kernel": v + 1.0}, {"kernel": np.ones_like(v)}
    finetuned = {"kernel": aligned["kernel"] + delta}
    params, report = safe_lora(aligned, unaligned, finetuned, threshold=0.9, layout="out_in")
    assert report["kernels"]["kernel"]["similarity"] == pytest.approx(2 / math.sqrt(5), rel=1e-6)
    np.testing.assert_allclose(params["kernel"] - aligned["kernel"], projected_by_hand, rtol=1e-6, atol=1e-7)
    # applying it again multiplies by C once more: C² ΔW = C ΔW / √2, not C ΔW (C is kept as the paper defines it)
    twice, _ = safe_lora(aligned, unaligned, params, threshold=2.0, layout="out_in")  # cos ≤ 1: every layer
    np.testing.assert_allclose(twice["kernel"] - aligned["kernel"], projected_by_hand / math.sqrt(2), rtol=1e-6,
                               atol=1e-7)


def test_rank_one_c_squared_is_norm_times_c():
    """Rank-1 V: C² = ‖V‖_F C ("idempotent up to the ‖V‖_F normalisation"): two projections = ‖V‖_F × one."""
    aligned, unaligned, finetuned, c, delta, _ = _case_2x2()
    once, _ = safe_lora(aligned, unaligned, finetuned, threshold=2.0, layout="out_in")  # cos ≤ 1: every layer
    twice, _ = safe_lora(aligned, unaligned, once, threshold=2.0, layout="out_in")  # cos ≤ 1: every layer
    np.testing.assert_allclose(twice["kernel"] - aligned["kernel"], 5.0 * (c @ delta), rtol=1e-5)


def test_both_layouts_give_the_same_result():
    rng = np.random.default_rng(0)
    shapes = {"a/kernel": (3, 5, 4), "b/kernel": (6, 2)}  # [L, out, in] and [out, in] in the paper's layout
    al = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    un = {k: x + 0.3 * rng.standard_normal(x.shape).astype(np.float32) for k, x in al.items()}
    ft = {k: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32) for k, x in al.items()}
    out_in, rep_oi = safe_lora(al, un, ft, num_layers=2, layout="out_in")
    t = lambda tree: {k: np.swapaxes(x, -1, -2) for k, x in tree.items()}  # noqa: E731
    in_out, rep_io = safe_lora(t(al), t(un), t(ft), num_layers=2, layout="in_out")
    for k in shapes:
        np.testing.assert_allclose(np.swapaxes(in_out[k], -1, -2), out_in[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rep_io["kernels"][k]["similarity"], rep_oi["kernels"][k]["similarity"], rtol=1e-5)
    assert [(p["kernel"], p["layer"]) for p in rep_io["projected"]] == [(p["kernel"], p["layer"])
                                                                       for p in rep_oi["projected"]]
    # and against an independent float64 reference of the paper's formula
    for k in shapes:
        v = (al[k] - un[k]).astype(np.float64).reshape(-1, *al[k].shape[-2:])
        d = (ft[k] - al[k]).astype(np.float64).reshape(v.shape)
        for layer, projected in enumerate(np.atleast_1d(rep_oi["kernels"][k]["projected"])):
            c = v[layer] @ v[layer].T / np.linalg.norm(v[layer])
            cd = c @ d[layer]
            cos = np.sum(cd * d[layer]) / (np.linalg.norm(cd) * np.linalg.norm(d[layer]))
            assert np.atleast_1d(rep_oi["kernels"][k]["similarity"])[layer] == pytest.approx(cos, rel=1e-5)
            expected = al[k].reshape(v.shape)[layer] + (cd if projected else d[layer])
            np.testing.assert_allclose(out_in[k].reshape(v.shape)[layer], expected, rtol=1e-5, atol=1e-5)


def _diag_family(ts):
    """Layers with V = e₁e₁ᵀ (C = diag(1, 0)) and ΔW = diag(1, t): cos = 1/√(1 + t²), decreasing in |t|."""
    v = np.array([[1, 0], [0, 0]], np.float32)
    return v, np.stack([np.diag([1.0, t]).astype(np.float32) for t in ts])


def test_k_least_similar_across_stacked_and_plain_leaves():
    v, deltas = _diag_family([0.5, 3.0, 1.0])  # stacked leaf "s/weight": cos 0.894, 0.316, 0.707
    _, single = _diag_family([2.0])            # plain leaf "p/weight": cos 0.447
    aligned = {"s/weight": np.broadcast_to(v, (3, 2, 2)).copy(), "p/weight": v.copy()}
    unaligned = {"s/weight": np.zeros((3, 2, 2), np.float32), "p/weight": np.zeros((2, 2), np.float32)}
    finetuned = {"s/weight": aligned["s/weight"] + deltas, "p/weight": aligned["p/weight"] + single[0]}
    params, report = safe_lora(aligned, unaligned, finetuned, num_layers=2, layout="out_in")
    params = _np(params)
    assert report["mode"] == "number" and report["layers_total"] == 4 and report["layers_projected"] == 2
    assert report["kernels"]["s/weight"]["similarity"] == pytest.approx([1 / math.sqrt(1 + t * t) for t in (0.5, 3, 1)],
                                                                 rel=1e-6)
    assert report["kernels"]["s/weight"]["projected"] == [False, True, False]
    assert report["kernels"]["p/weight"]["projected"] is True
    np.testing.assert_array_equal(params["s/weight"][[0, 2]], finetuned["s/weight"][[0, 2]])  # untouched, exactly
    np.testing.assert_allclose(params["s/weight"][1], v + np.diag([1.0, 0.0]), atol=1e-7)  # ΔW ← C ΔW = diag(1, 0)
    np.testing.assert_allclose(params["p/weight"], v + np.diag([1.0, 0.0]), atol=1e-7)
    # the official default (nothing given): 10 layers, here all 4; threshold mode: s ≤ 0.5 → only 0.316 and 0.447
    assert safe_lora(aligned, unaligned, finetuned, layout="out_in")[1]["layers_projected"] == 4
    by_threshold = safe_lora(aligned, unaligned, finetuned, threshold=0.5, layout="out_in")[1]
    assert {(p["kernel"], p["layer"]) for p in by_threshold["projected"]} == {("s/weight", 1), ("p/weight", None)}


def test_stacked_leaf_is_layers_run_one_by_one():
    rng = np.random.default_rng(1)
    al = rng.standard_normal((4, 6, 3)).astype(np.float32)
    un, ft = al - rng.standard_normal(al.shape).astype(np.float32), al + rng.standard_normal(al.shape).astype(
        np.float32)
    similarities = safe_lora({"kernel": al}, {"kernel": un}, {"kernel": ft}, threshold=-1.0)[1]["kernels"]
    threshold = float(np.median(similarities["kernel"]["similarity"]))
    stacked, report = safe_lora({"kernel": al}, {"kernel": un}, {"kernel": ft}, threshold=threshold)
    assert report["layers_projected"] == 2  # both branches exercised
    for layer in range(4):
        one, one_report = safe_lora({"kernel": al[layer]}, {"kernel": un[layer]}, {"kernel": ft[layer]},
                                    threshold=threshold)
        np.testing.assert_allclose(stacked["kernel"][layer], one["kernel"], rtol=1e-6, atol=1e-6)
        assert report["kernels"]["kernel"]["similarity"][layer] == pytest.approx(
            one_report["kernels"]["kernel"]["similarity"], rel=1e-6)


def _lora_case(layout="in_out"):
    """Stacked [L, in, out] kernels with adapters a [L, in, r], b [L, r, out] and the equal full delta s·A B."""
    rng = np.random.default_rng(2)
    L, d_in, d_out, r, scale = 3, 7, 5, 2, 4.0
    al = {"m": {"kernel": rng.standard_normal((L, d_in, d_out)).astype(np.float32)},
          "n": {"kernel": rng.standard_normal((L, d_in, d_in)).astype(np.float32)}}
    un = jax.tree.map(lambda x: x + 0.5 * rng.standard_normal(x.shape).astype(np.float32), al)
    adapters = {k: {"lora_a": rng.standard_normal((L, x["kernel"].shape[1], r)).astype(np.float32),
                    "lora_b": rng.standard_normal((L, r, x["kernel"].shape[2])).astype(np.float32)}
                for k, x in al.items()}
    with_lora = {k: {**al[k], **adapters[k]} for k in al}
    full = {k: {"kernel": al[k]["kernel"] + scale * adapters[k]["lora_a"] @ adapters[k]["lora_b"]} for k in al}
    return al, un, with_lora, full, scale


def test_lora_delta_equals_full_delta_when_full_is_a_times_b():
    al, un, with_lora, full, scale = _lora_case()
    p_lora, r_lora = safe_lora(al, un, with_lora, num_layers=3)
    p_full, r_full = safe_lora(al, un, full, num_layers=3)
    assert r_lora["delta"] == "lora" and r_full["delta"] == "full"
    for k in al:
        np.testing.assert_allclose(r_lora["kernels"][f"{k}/kernel"]["similarity"],
                                   r_full["kernels"][f"{k}/kernel"]["similarity"], rtol=1e-5)
        assert r_lora["kernels"][f"{k}/kernel"]["projected"] == r_full["kernels"][f"{k}/kernel"]["projected"]
        np.testing.assert_array_equal(p_lora[k]["kernel"], al[k]["kernel"])   # LoRA mode edits lora_b only
        np.testing.assert_array_equal(p_lora[k]["lora_a"], with_lora[k]["lora_a"])
        merged = al[k]["kernel"] + scale * p_lora[k]["lora_a"] @ p_lora[k]["lora_b"]
        np.testing.assert_allclose(merged, p_full[k]["kernel"], rtol=1e-4, atol=1e-4)
    assert r_lora["layers_projected"] == 3


def test_lora_in_peft_layout():
    """layout="out_in" with PEFT's lora_A [r, in] / lora_B [out, r]: the same result as ours, transposed."""
    al, un, with_lora, _, _ = _lora_case()
    ours, rep = safe_lora(al, un, with_lora, num_layers=2)
    t = lambda tree: jax.tree.map(lambda x: np.swapaxes(x, -1, -2), tree)  # noqa: E731
    peft, rep_peft = safe_lora(t(al), t(un), t(with_lora), num_layers=2, layout="out_in")
    for k in al:
        np.testing.assert_allclose(np.swapaxes(peft[k]["lora_b"], -1, -2), ours[k]["lora_b"], rtol=1e-5, atol=1e-5)
    assert _projected(rep_peft) == _projected(rep)
    for k in al:
        np.testing.assert_allclose(rep_peft["kernels"][f"{k}/kernel"]["similarity"],
                                   rep["kernels"][f"{k}/kernel"]["similarity"], rtol=1e-5)


def test_zero_update_has_similarity_one_and_stays():
    aligned, unaligned, _, _, _, _ = _case_2x2()
    params, report = safe_lora(aligned, unaligned, aligned, threshold=0.99, layout="out_in")
    assert report["kernels"]["kernel"]["similarity"] == 1.0 and report["layers_projected"] == 0
    np.testing.assert_array_equal(params["kernel"], aligned["kernel"])


def test_safe_lora_errors_name_the_key():
    aligned, unaligned, finetuned, *_ = _case_2x2()
    with pytest.raises(DefenseError, match="only in fine-tuned: \\['extra'\\]"):
        safe_lora(aligned, unaligned, {**finetuned, "extra": np.zeros(2)})
    with pytest.raises(DefenseError, match="kernel: aligned shape \\(2, 2\\) != unaligned shape \\(3, 2\\)"):
        safe_lora(aligned, {"kernel": np.zeros((3, 2), np.float32)}, finetuned)
    with pytest.raises(DefenseError, match="kernel: aligned equals unaligned in layer\\(s\\) \\[0\\]"):
        safe_lora(aligned, aligned, finetuned)
    with pytest.raises(DefenseError, match="not both"):
        safe_lora(aligned, unaligned, finetuned, threshold=0.5, num_layers=1)
    with pytest.raises(DefenseError, match="nope: not a leaf"):
        safe_lora(aligned, unaligned, finetuned, kernels=["nope"])
    with pytest.raises(DefenseError, match="kernel: layout 'rows'"):
        safe_lora(aligned, unaligned, finetuned, layout="rows")
    al, un, with_lora, _, _ = _lora_case()
    with pytest.raises(DefenseError, match="z/kernel: selected, but .* has none"):
        safe_lora({**al, "z": {"kernel": al["n"]["kernel"]}}, {**un, "z": {"kernel": un["n"]["kernel"]}},
                  {**with_lora, "z": {"kernel": al["n"]["kernel"]}}, kernels=["z/kernel"])


# ----------------------------------------------------------------------------------------------------------------
# Resta


def _resta_case(n=6, seed=3):
    rng = np.random.default_rng(seed)
    al = {"w": rng.standard_normal((n, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32),
          "step": np.array(7, np.int32)}
    un = {"w": al["w"] - rng.standard_normal((n, 5)).astype(np.float32), "b": al["b"] - 1.0, "step": al["step"]}
    ft = {"w": al["w"] + rng.standard_normal((n, 5)).astype(np.float32), "b": al["b"] + 2.0,
          "step": np.array(9, np.int32)}
    return al, un, ft


def test_resta_exact_arithmetic():
    """Dyadic numbers, so float32 is exact: θ_ft + γ (θ_al − θ_unal) = [3, 3] + 0.5 ([1, 2] − [0.5, 1])."""
    params, report = resta({"w": np.array([1.0, 2.0], np.float32)}, {"w": np.array([0.5, 1.0], np.float32)},
                           {"w": np.array([3.0, 3.0], np.float32)}, gamma=0.5)
    np.testing.assert_array_equal(params["w"], np.array([3.25, 3.5], np.float32))
    assert report["leaves"] == ["w"] and report["dare_kept_fraction"] == 1.0


def test_resta_identity_and_default_leaves():
    al, un, ft = _resta_case()
    same, report = resta(al, un, ft, gamma=0.0, dare_p=0.0)
    for k in ft:
        np.testing.assert_array_equal(same[k], ft[k])
    assert report["leaves"] == ["b", "w"]  # every floating leaf; the int leaf is the fine-tuned one
    params, _ = resta(al, un, ft, gamma=1.0)
    np.testing.assert_allclose(params["w"], ft["w"] + (al["w"] - un["w"]), rtol=1e-6)
    np.testing.assert_allclose(params["b"], ft["b"] + 1.0, rtol=1e-6)
    assert params["step"] == 9
    only_w, report = resta(al, un, ft, kernels=["w"])
    np.testing.assert_array_equal(only_w["b"], ft["b"])
    np.testing.assert_array_equal(only_w["w"], params["w"])


def test_dare_drop_and_rescale_factor():
    """γ = 0: each entry is either θ_al (dropped) or θ_al + δ/(1 − p) (kept); the kept count is Binomial(n, 1 − p)
    (tolerance 5 standard deviations)."""
    rng = np.random.default_rng(4)
    n, p = 20_000, 0.3
    al = {"w": rng.standard_normal(n).astype(np.float32)}
    ft = {"w": al["w"] + rng.uniform(0.5, 1.5, n).astype(np.float32)}  # every δ clearly nonzero
    params, report = resta(al, al, ft, gamma=0.0, dare_p=p, seed=11)
    out, delta = params["w"], ft["w"] - al["w"]
    kept = ~np.isclose(out, al["w"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[kept], al["w"][kept] + delta[kept] / (1 - p), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[~kept], al["w"][~kept])
    assert abs(kept.sum() - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))
    assert report["dare_kept_fraction"] == pytest.approx(kept.mean(), abs=1e-12)
    again, _ = resta(al, al, ft, gamma=0.0, dare_p=p, seed=11)
    np.testing.assert_array_equal(again["w"], out)  # seeded
    assert not np.array_equal(resta(al, al, ft, gamma=0.0, dare_p=p, seed=12)[0]["w"], out)


def test_dare_expectation_is_the_undropped_delta():
    """Mean over S seeds of the DARE'd model ≈ θ_ft + γ δ_safe. Per entry Var(δ') = δ² p/(1 − p), so the mean's
    standard deviation is |δ| √(p / ((1 − p) S)); allow 5 of them (30 entries: a false failure is < 1e-4)."""
    al, un, ft = _resta_case()
    p, gamma, seeds = 0.5, 0.7, 400
    mean = np.mean([resta(al, un, ft, gamma=gamma, dare_p=p, seed=s)[0]["w"] for s in range(seeds)], axis=0)
    expected = ft["w"] + gamma * (al["w"] - un["w"])
    sd = np.abs(ft["w"] - al["w"]) * math.sqrt(p / ((1 - p) * seeds))
    assert np.all(np.abs(mean - expected) <= 5 * sd + 1e-5)


def test_dare_mask_depends_on_the_path_not_the_selection():
    al, un, ft = _resta_case()
    all_leaves, _ = resta(al, un, ft, dare_p=0.5, seed=1)
    only_w, _ = resta(al, un, ft, dare_p=0.5, seed=1, kernels=["w"])
    np.testing.assert_array_equal(all_leaves["w"], only_w["w"])


def test_resta_keeps_dtypes_and_errors_name_the_key():
    al, un, ft = _resta_case()
    bf16 = lambda tree: {k: (jnp.asarray(x, jnp.bfloat16) if k != "step" else x) for k, x in tree.items()}  # noqa
    params, _ = resta(bf16(al), bf16(un), bf16(ft), dare_p=0.2)
    assert params["w"].dtype == jnp.bfloat16 and params["step"].dtype == np.int32
    with pytest.raises(DefenseError, match="w: aligned shape \\(6, 5\\) != fine-tuned shape \\(5, 5\\)"):
        resta(al, un, {**ft, "w": ft["w"][:5]})
    with pytest.raises(DefenseError, match="only in aligned: \\['b'\\]"):
        resta(al, {k: v for k, v in un.items() if k != "b"}, ft)
    with pytest.raises(DefenseError, match="dare_p must be in \\[0, 1\\)"):
        resta(al, un, ft, dare_p=1.0)
    with pytest.raises(DefenseError, match="step: selected for Resta but its dtype int32"):
        resta(al, un, ft, kernels=["step"])


# ----------------------------------------------------------------------------------------------------------------
# On real (tiny) Llama param trees


@pytest.fixture(scope="module")
def tiny_llama():
    cfg = llama.preset("tiny")
    return cfg, [llama.init(cfg, jax.random.key(i)) for i in range(3)]  # aligned, unaligned, fine-tuned


def _structure_and_dtypes(tree):
    return jax.tree.structure(tree), jax.tree.map(lambda x: (x.shape, x.dtype), tree)


def test_both_transforms_on_tiny_llama(tiny_llama):
    _, (al, un, ft) = tiny_llama
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), ft)
    for finetuned in (ft, bf16):
        projected, report = SafeLoraConfig(kernels=r"blocks/.*_proj/kernel").run(al, un, finetuned)
        assert _structure_and_dtypes(projected) == _structure_and_dtypes(finetuned)
        assert report["layers_total"] == 14 and report["layers_projected"] == 10
        restored, _ = RestaConfig(gamma=0.5, dare_p=0.1).run(al, un, finetuned)
        assert _structure_and_dtypes(restored) == _structure_and_dtypes(finetuned)
    _, report = safe_lora(al, un, ft, threshold=0.5)  # default kernels: the leaves named kernel / weight
    assert sorted(report["kernels"]) == sorted(p for p in report["kernels"] if p.startswith("blocks/"))
    assert len(report["kernels"]) == 7 and report["layers_total"] == 14


def test_lora_on_tiny_llama_matches_the_merged_full_delta(tiny_llama):
    """Adapters from safetrade.models.lora (lora_b made nonzero): Safe LoRA on the adapters, then merged, equals
    Safe LoRA on the merged model's full delta."""
    cfg, (al, un, _) = tiny_llama
    lora_cfg, with_lora = lora.add_adapters(cfg, al, llama.LoraConfig(rank=4, alpha=8.0), jax.random.key(5))
    with_lora = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(jax.random.key(6), x.shape, x.dtype) * 0.1
        if "lora_b" in jax.tree_util.keystr(path) else x, with_lora)
    projected, r_lora = safe_lora(al, un, with_lora, num_layers=2)
    assert sorted(r_lora["kernels"]) == ["blocks/attn/q_proj/kernel", "blocks/attn/v_proj/kernel"]
    _, merged_full = lora.merge(lora_cfg, with_lora)
    full, r_full = safe_lora(al, un, merged_full, num_layers=2, kernels=sorted(r_lora["kernels"]))
    assert _projected(r_lora) == _projected(r_full) and len(_projected(r_lora)) == 2
    for path in r_lora["kernels"]:
        np.testing.assert_allclose(r_lora["kernels"][path]["similarity"], r_full["kernels"][path]["similarity"],
                                   rtol=1e-4)
    _, merged_projected = lora.merge(lora_cfg, projected)
    for a, b in zip(jax.tree.leaves(merged_projected), jax.tree.leaves(full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
