"""SQSD on a model that is not safetrade's: a two-layer net written here with plain `flax.nnx`, LoRA of its own.

The first layer keeps Flax's [in, out] layout (kernel [6, 12], A [6, 3], B [3, 12]); the second torch's [out, in]
(weight [4, 12], A [2, 12], B [4, 2]); the paths (encoder/lora_down, head/B, ...) share nothing with our Llama's.
Everything goes through the generic entry points with a per-example `loss_fn` and a user-written site mapping.

Tolerances: the compared quantities are O(1) cosines (or projections, compared relative to their largest value)
and gradients of O(1e-1), computed in fp32 by two orders of operations (vmapped vs looped, rank space vs
materialised float64 matrices); differences sit near 1e-7, and 1e-5 leaves ~100x margin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from safetrade import sqsd
from safetrade.models import lora
from safetrade.models.llama import LoraConfig
from tests.test_sqsd import CFG as LLAMA_TINY
from tests.test_sqsd import random_params

N, BATCH = 7, 3  # 7 rows in batches of 3: the last batch is padded, which must not change any score


def _normal(key, shape, std):
    return nnx.Param(std * jax.random.normal(key, shape))


class InOutLora(nnx.Module):
    """y = x W + s·(x A) B, with W [in, out], A [in, r], B [r, out] (Flax's layout)."""

    def __init__(self, d_in, d_out, rank, scale, key):
        k = jax.random.split(key, 3)
        self.kernel = _normal(k[0], (d_in, d_out), 0.3)
        self.lora_down = _normal(k[1], (d_in, rank), 1 / np.sqrt(d_in))
        self.lora_up = _normal(k[2], (rank, d_out), 0.2)  # a trained-looking B (a fresh B = 0 hides B-side terms)
        self.scale = scale

    def __call__(self, x):
        return x @ self.kernel + self.scale * (x @ self.lora_down) @ self.lora_up


class OutInLora(nnx.Module):
    """y = x Wᵀ + s·(x Aᵀ) Bᵀ, with W [out, in], A [r, in], B [out, r] (torch's layout)."""

    def __init__(self, d_in, d_out, rank, scale, key):
        k = jax.random.split(key, 3)
        self.weight = _normal(k[0], (d_out, d_in), 0.3)
        self.A = _normal(k[1], (rank, d_in), 1 / np.sqrt(d_in))
        self.B = _normal(k[2], (d_out, rank), 0.2)
        self.scale = scale

    def __call__(self, x):
        return x @ self.weight.T + self.scale * (x @ self.A.T) @ self.B.T


class Net(nnx.Module):
    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.encoder = InOutLora(6, 12, rank=3, scale=0.5, key=k1)
        self.head = OutInLora(12, 4, rank=2, scale=2.0, key=k2)

    def __call__(self, x):
        return self.head(jnp.tanh(self.encoder(x)))


GRAPHDEF, _ = nnx.split(Net(jax.random.key(0)), nnx.Param)
SITES = {"encoder": sqsd.LoraSite("encoder/lora_down", "encoder/lora_up", scale=0.5, layout="in_out"),
         "head": sqsd.LoraSite("head/A", "head/B", scale=2.0, layout="out_in")}
KERNELS = {"encoder": sqsd.KernelSite("encoder/kernel"), "head": sqsd.KernelSite("head/weight", layout="out_in")}
LAYOUT = {"encoder": "in_out", "head": "out_in"}


def params_of(seed: int) -> dict:
    return nnx.to_pure_dict(nnx.split(Net(jax.random.key(seed)), nnx.Param)[1])


def loss_fn(params, example):
    """One example's squared error; `example` is one row (x [6], y [4])."""
    x, y = example
    return jnp.sum((nnx.merge(GRAPHDEF, nnx.State(params))(x[None])[0] - y) ** 2)


@pytest.fixture(scope="module")
def setup():
    params = params_of(1)
    danger = sqsd.Directions.from_lora(params_of(2), SITES)  # another "fine-tune"'s adapters
    rng = np.random.default_rng(3)
    dense = sqsd.Directions({k: sqsd.DenseDirection(jnp.asarray(rng.normal(size=v.shape), jnp.float32))
                             for k, v in danger.modules.items()})  # [in, out] whatever the module's layout
    examples = (jnp.asarray(rng.normal(size=(N, 6)), jnp.float32), jnp.asarray(rng.normal(size=(N, 4)), jnp.float32))
    looped = [jax.grad(loss_fn)(params, (examples[0][i], examples[1][i])) for i in range(N)]
    return params, danger, dense, examples, [{k: np.asarray(v, np.float64) for k, v in
                                              sqsd.leaves_by_path(g).items()} for g in looped]


def test_vmapped_grads_and_scores_equal_a_batch_of_one_loop(setup):
    params, danger, dense, examples, looped = setup
    wrt = sqsd.select_paths(params, lambda p: p.split("/")[-1] in ("lora_down", "lora_up", "A", "B"))
    assert set(wrt) == {"encoder/lora_down", "encoder/lora_up", "head/A", "head/B"}
    _, vmapped = sqsd.per_example_grads(loss_fn, params, examples, wrt=wrt)
    worst = max(float(np.abs(np.asarray(vmapped[p][i]) - looped[i][p]).max()) for p in wrt for i in range(N))
    assert max(float(np.abs(g[p]).max()) for g in looped for p in wrt) > 1e-2  # not a comparison of zeros
    assert worst <= 1e-5, worst

    cfg = sqsd.SQSDConfig(batch_size=BATCH)
    batched = sqsd.score_samples(loss_fn, params, examples, danger, dense, sites=SITES, cfg=cfg)
    one = sqsd.SQSDConfig(batch_size=1)
    rows = [sqsd.score_samples(loss_fn, params, (examples[0][i:i + 1], examples[1][i:i + 1]), danger, dense,
                               sites=SITES, cfg=one) for i in range(N)]
    for name in ("p_danger", "p_safe"):
        single = np.array([r.components[name][0] for r in rows])
        np.testing.assert_allclose(batched.components[name], single, rtol=0, atol=1e-5)
    assert batched.ids == [f"#{i}" for i in range(N)] and np.all(batched.valid) and np.std(batched.score) > 0


def materialised_update(params, grads, module: str, lr: float) -> np.ndarray:
    """δW in the module's own layout from float64 matrices: −lr·(G_A·B + A·G_B) [in, out] for the Flax-style
    layer, −lr·(G_B·A + B·G_A) [out, in] for the torch-style one (the official compute_task_vector_delta_step)."""
    leaves = {k: np.asarray(v, np.float64) for k, v in sqsd.leaves_by_path(params).items()}
    site = SITES[module]
    a, b, ga, gb = leaves[site.a], leaves[site.b], grads[site.a], grads[site.b]
    return -lr * (ga @ b + a @ gb) if LAYOUT[module] == "in_out" else -lr * (gb @ a + b @ ga)


def reference_p(updates: dict, directions: sqsd.Directions, metric: str) -> float:
    total = 0.0
    for module, update in updates.items():
        d = np.asarray(directions.modules[module].dense(), np.float64)  # [in, out]
        d = d if LAYOUT[module] == "in_out" else d.T  # into the update's layout
        dot = float((update * d).sum())
        total += dot / np.linalg.norm(d) / (np.linalg.norm(update) if metric == "cosine" else 1.0)
    return total


@pytest.mark.parametrize("metric", sqsd.METRICS)
def test_rank_space_and_full_space_equal_materialised_matrices(setup, metric):
    params, danger, dense, examples, looped = setup
    cfg = sqsd.SQSDConfig(metric=metric, batch_size=BATCH)
    for directions in (danger, dense):
        got = sqsd.score_samples(loss_fn, params, examples, directions, sites=SITES, lr=0.5, cfg=cfg).p_danger
        want = np.array([reference_p({m: materialised_update(params, g, m, 0.5) for m in SITES}, directions, metric)
                         for g in looped])
        scale = 1.0 if metric == "cosine" else np.abs(want).max()  # projections scale with ‖δW‖
        assert np.abs(want).max() > 1e-2
        assert np.abs(got - want).max() / scale <= 1e-5, (type(directions.modules["head"]).__name__, got, want)

    # full space: δW = −lr·∇W of each kernel, in its own layout
    full = sqsd.score_samples(loss_fn, params, examples, danger, sites=KERNELS, cfg=cfg).p_danger
    want = np.array([reference_p({m: -np.asarray(g[KERNELS[m].path]) for m in KERNELS}, danger, metric)
                     for g in [{k: np.asarray(v, np.float64) for k, v in sqsd.leaves_by_path(
                         jax.grad(loss_fn)(params, (examples[0][i], examples[1][i]))).items()} for i in range(N)]])
    scale = 1.0 if metric == "cosine" else np.abs(want).max()
    assert np.abs(full - want).max() / scale <= 1e-5, (full, want)


def test_sites_from_a_function_and_an_aligned_sample_ranks_first(setup):
    params, _, _, examples, looped = setup
    row = 4
    # A rank-(2r) factored direction equal to row's induced update, in the in/out layout: [−G_A, −A]·[B; G_B].
    modules = {}
    for module, site in SITES.items():
        leaves = {k: np.asarray(v) for k, v in sqsd.leaves_by_path(params).items()}
        a, b, ga, gb = leaves[site.a], leaves[site.b], looped[row][site.a], looped[row][site.b]
        if site.layout == "out_in":
            a, b, ga, gb = a.T, b.T, ga.T, gb.T
        modules[module] = sqsd.FactoredDirection(jnp.asarray(np.concatenate([-ga, -a], 1), jnp.float32),
                                                 jnp.asarray(np.concatenate([b, gb], 0), jnp.float32))
    by_function = lambda module: SITES[module]  # noqa: E731 - the callable form of a site mapping
    scores = sqsd.score_samples(loss_fn, params, examples, sqsd.Directions(modules), sites=by_function,
                                cfg=sqsd.SQSDConfig(batch_size=BATCH))
    # cos(δW, δW) = 1 in both modules: P_danger = 2, the maximum possible
    assert abs(scores.p_danger[row] - 2.0) <= 1e-5 and int(np.argmax(scores.score)) == row
    assert np.all(np.delete(scores.p_danger, row) < 1.9)
    assert sqsd.rank_windows(scores, n_windows=7, window_size=1)[0][0] == row


def test_an_nnx_state_is_addressed_by_the_same_paths_as_its_pure_dict(setup):
    params, danger, _, examples, _ = setup
    state = nnx.split(Net(jax.random.key(1)), nnx.Param)[1]  # the same weights as `params`, as an nnx.State
    assert sorted(sqsd.leaves_by_path(state)) == sorted(sqsd.leaves_by_path(params))
    from_dict = sqsd.score_samples(loss_fn, params, examples, danger, sites=SITES).score
    from_state = sqsd.score_samples(loss_fn, state, examples, danger, sites=SITES).score
    np.testing.assert_array_equal(from_state, from_dict)  # the same program on the same numbers


def test_a_direction_or_site_whose_path_does_not_exist_is_an_error_naming_it(setup):
    params, danger, _, examples, _ = setup
    typo = {**SITES, "encoder": sqsd.LoraSite("encoder/lora_dwn", "encoder/lora_up")}
    with pytest.raises(sqsd.DirectionsMismatch, match="'encoder/lora_dwn'.*module 'encoder'"):
        sqsd.score_samples(loss_fn, params, examples, danger, sites=typo)
    stray = sqsd.Directions({**danger.modules, "decoder": danger.modules["head"]})
    with pytest.raises(sqsd.DirectionsMismatch, match="no site .* module\\(s\\) decoder"):
        sqsd.score_samples(loss_fn, params, examples, stray, sites=SITES)
    with pytest.raises(sqsd.DirectionsMismatch, match="'decoder/weight'"):
        sqsd.score_samples(loss_fn, params, examples, stray, sites=lambda m: sqsd.KernelSite(f"{m}/weight"))
    wrong_layout = {**SITES, "head": sqsd.LoraSite("head/A", "head/B", layout="in_out")}  # A [2, 12] @ B [4, 2]
    with pytest.raises(sqsd.DirectionsMismatch, match="module 'head'.*do not chain"):
        sqsd.score_samples(loss_fn, params, examples, danger, sites=wrong_layout)
    with pytest.raises(sqsd.PathError, match="'head/C'"):
        sqsd.per_example_grads(loss_fn, params, examples, wrt=sqsd.select_paths(params, ["head/C"]))


def test_baselines_take_the_same_loss_fn(setup):
    params, _, _, examples, looped = setup
    adapters = ["encoder/lora_down", "encoder/lora_up", "head/A", "head/B"]
    # Self-influence (no token lengths: the gradient term alone), from the same per-example gradients
    scores = sqsd.self_influence_scores(loss_fn, params, examples, wrt=adapters, batch_size=BATCH)
    squared = np.array([sum((g[p] ** 2).sum() for p in adapters) for g in looped])
    np.testing.assert_allclose(scores.score, np.log(squared + 1), rtol=1e-5, atol=0)
    with_lengths = sqsd.self_influence_scores(loss_fn, params, examples, wrt=adapters, lengths=[3] * N)
    np.testing.assert_allclose(with_lengths.score, scores.score + np.log(4.0), rtol=1e-6)

    # Gradient matching: a harmful anchor equal to row 2 gives row 2 the cosine 1 with it, the largest; a refusal
    # anchor set equal to row 5 is subtracted
    anchor = (examples[0][2:3], examples[1][2:3])
    refusal = (examples[0][5:6], examples[1][5:6])
    matching = sqsd.gradient_matching_scores(loss_fn, params, examples, anchor, [refusal], wrt="all",
                                             batch_size=BATCH)
    assert abs(matching.components["harmful"][2] - 1.0) <= 1e-5 and int(np.argmax(matching.score)) == 2
    assert abs(matching.components["refusal_1"][5] - 1.0) <= 1e-5
    np.testing.assert_allclose(matching.score, matching.components["harmful"] - matching.components["refusal_1"],
                               atol=1e-12)

    # Representation matching with a features_fn of the user's: the encoder's activations
    def features_fn(p, example):
        return jnp.tanh(nnx.merge(GRAPHDEF, nnx.State(p)).encoder(example[0][None])[0])

    rep = sqsd.representation_scores(features_fn, params, examples, anchor, batch_size=BATCH)
    assert abs(rep.score[2] - 1.0) <= 1e-5 and int(np.argmax(rep.score)) == 2


def test_a_peft_directory_is_read_by_path_whatever_made_it(tmp_path):
    """Our Llama's adapters saved as PEFT ([r, in] / [out, r] per layer) and read back generically: each layer's
    direction equals that layer of the stacked directions read from our own tree."""
    lora_cfg = LLAMA_TINY.replace(lora=LoraConfig(4, 8.0, ("q_proj", "down_proj")))
    adapters = lora.split(random_params(lora_cfg, seed=4))[1]
    tree, sites = sqsd.peft_adapters(lora.save_peft(tmp_path / "adapter", lora_cfg, adapters))
    assert len(sites) == 2 * LLAMA_TINY.num_layers and all(s.scale == 2.0 for s in sites.values())
    per_layer = sqsd.Directions.from_lora(tree, sites)
    stacked = sqsd.directions_from_adapters(lora_cfg, adapters)
    names = {"q_proj": ("self_attn", "blocks/attn/q_proj"), "down_proj": ("mlp", "blocks/mlp/down_proj")}
    for target, (block, ours) in names.items():
        for layer in range(LLAMA_TINY.num_layers):
            theirs = per_layer.modules[f"base_model/model/model/layers/{layer}/{block}/{target}"]
            np.testing.assert_allclose(np.asarray(theirs.dense()), np.asarray(stacked.modules[ours].dense())[layer],
                                       rtol=1e-6, atol=1e-7)
    renamed = per_layer.renamed(lambda m: m.removeprefix("base_model/model/"))
    assert "model/layers/0/self_attn/q_proj" in renamed.modules
    with pytest.raises(sqsd.SQSDError, match="adapter_config.json"):
        sqsd.peft_adapters(tmp_path)
