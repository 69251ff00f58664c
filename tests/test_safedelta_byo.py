"""Safe Delta on a model that is not safetrade's: written here with plain flax.nnx, a torch-style [out, in] module
beside nnx.Linear [in, out] kernels, two layers reading one input, and a stack of blocks run under jax.lax.scan.

Hessians come from the generic capture (the model object, an apply_fn, or an inputs_fn); the whole-tree result is
checked against the per-layer function applied by hand, layouts against each other, and bad input against errors
that name the path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from safetrade.safedelta import (
    KernelHessians,
    SafeDeltaConfig,
    SafeDeltaError,
    collect_hessians,
    official_layer,
    paper_layer,
    safe_delta,
)

D_IN, D, LAYERS, B, T = 8, 8, 3, 4, 5  # every kernel 8x8: two compiled programs per mode
# Budgets that keep 5-45 % of these kernels' entries after `finetune` (measured), so selection and compensation
# both have work to do; one config per mode, so that the tests share compiled programs.
SAMPLE_CFG = {"official": SafeDeltaConfig(s=100.0), "paper": SafeDeltaConfig(mode="paper", s=0.05)}


class TorchLinear(nnx.Module):
    """y = x Wᵀ with W [out, in], as torch.nn.Linear stores it."""

    def __init__(self, d_in, d_out, *, rngs):
        self.weight = nnx.Param(0.3 * jax.random.normal(rngs.params(), (d_out, d_in)))

    def __call__(self, x):
        return x @ self.weight[...].T


class Block(nnx.Module):
    def __init__(self, d, *, rngs):
        self.up = nnx.Linear(d, d, rngs=rngs)
        self.down = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, h):
        return h + self.down(jnp.tanh(self.up(h)))


class ByoNet(nnx.Module):
    def __init__(self, *, rngs, remat=False):
        self.encoder = TorchLinear(D_IN, D, rngs=rngs)
        self.gate = nnx.Linear(D, D, rngs=rngs)  # gate and value read the same array
        self.value = nnx.Linear(D, D, rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(D, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.head = nnx.Linear(D, D, rngs=rngs)
        self.remat = remat

    def __call__(self, x):
        h = jnp.tanh(self.encoder(x))
        h = jax.nn.sigmoid(self.gate(h)) * self.value(h)
        graph, state = nnx.split(self.blocks)

        def layer(h, s):
            return nnx.merge(graph, s)(h), None

        h, _ = jax.lax.scan(jax.checkpoint(layer) if self.remat else layer, h, state)
        return self.head(h)


def forward(model, batch):
    return model(batch["x"])


def reference_inputs(params, x):
    """Every kernel's input, computed step by step here (not through the capture): {path: [.., B, T, d]}."""
    p = params
    enc = jnp.tanh(x @ p["encoder"]["weight"].T)
    h = jax.nn.sigmoid(enc @ p["gate"]["kernel"] + p["gate"]["bias"]) * (enc @ p["value"]["kernel"] + p["value"]["bias"])
    ups, downs = [], []
    for layer in range(LAYERS):
        blk = jax.tree.map(lambda a: a[layer], p["blocks"])
        ups.append(h)
        hidden = jnp.tanh(h @ blk["up"]["kernel"] + blk["up"]["bias"])
        downs.append(hidden)
        h = h + hidden @ blk["down"]["kernel"] + blk["down"]["bias"]
    return {"encoder/weight": x, "gate/kernel": enc, "value/kernel": enc, "blocks/up/kernel": jnp.stack(ups),
            "blocks/down/kernel": jnp.stack(downs), "head/kernel": h}


def masked_gram(x, mask):
    """Σ over real tokens of x xᵀ, float64, keeping leading stacked axes."""
    x = np.asarray(x, np.float64) * np.asarray(mask, np.float64)[..., None]
    return np.einsum("...bti,...btj->...ij", x, np.asarray(x))


@pytest.fixture(scope="module")
def setup():
    model = ByoNet(rngs=nnx.Rngs(0))
    _, aligned = nnx.split(model, nnx.Param)
    aligned = nnx.to_pure_dict(aligned)
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        mask = np.ones((B, T), np.int32)
        mask[1, 3:] = 0
        mask[2, :] = 0  # an all-padding row: not counted in N
        batches.append({"x": rng.standard_normal((B, T, D_IN)).astype(np.float32), "attention_mask": mask})
    hessians = collect_hessians(model, aligned, batches, call=forward)
    return model, aligned, batches, hessians


def test_generic_capture_equals_grams_of_the_real_inputs(setup):
    """Every kernel gets (2/N) Σ XᵀX of its real input, padding excluded, N = 6 sequences with a real token;
    stacked blocks get [L, in, in]; gate and value share one array. float32 sums of ≤ 40 tokens vs float64:
    1e-5 relative (measured ≤ 3e-7)."""
    _, aligned, batches, hessians = setup
    assert set(hessians) == {"encoder/weight", "gate/kernel", "value/kernel", "blocks/up/kernel",
                             "blocks/down/kernel", "head/kernel"}
    assert hessians.name_of("value/kernel") == hessians.name_of("gate/kernel") == "gate/kernel"
    assert hessians["value/kernel"] is hessians["gate/kernel"] and len(hessians.arrays) == 5
    expected = {}
    for batch in batches:
        for path, x in reference_inputs(aligned, jnp.asarray(batch["x"])).items():
            expected[path] = expected.get(path, 0) + masked_gram(x, batch["attention_mask"])
    for path, gram in expected.items():
        want = 2 * gram / 6
        assert hessians[path].shape == want.shape, path
        np.testing.assert_allclose(hessians[path], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=path)


def test_apply_fn_and_inputs_fn_give_the_same_hessians(setup):
    """apply_fn(params, batch) with the module classes named, and inputs_fn's activations (one array object for
    gate and value, stacked [L, B, T, d] for the blocks), reproduce the model-object capture: same program, so
    1e-6 relative."""
    model, aligned, batches, hessians = setup
    graphdef = nnx.graphdef(model)

    def apply_fn(params, batch):
        return nnx.merge(graphdef, params)(batch["x"])

    via_apply = collect_hessians(apply_fn, aligned, batches, linear_types=(nnx.Linear, TorchLinear))
    via_inputs = collect_hessians(None, aligned, batches,
                                  inputs_fn=lambda params, batch: reference_inputs(params, batch["x"]))
    for other in (via_apply, via_inputs):
        assert set(other) == set(hessians) and other.name_of("value/kernel") == "gate/kernel"
        for path in hessians:
            np.testing.assert_allclose(other[path], hessians[path], rtol=1e-6,
                                       atol=1e-6 * float(jnp.abs(hessians[path]).max()), err_msg=path)
    only = collect_hessians(model, aligned, batches, call=forward, kernels=r"blocks/.*")
    assert set(only) == {"blocks/up/kernel", "blocks/down/kernel"}


def finetune(aligned, model, steps=6):
    """A few Adam steps in a plain optax.chain loop on a regression target: the fine-tune Safe Delta repairs."""
    graphdef = nnx.graphdef(model)
    x = jax.random.normal(jax.random.key(7), (16, T, D_IN))
    target = jax.random.normal(jax.random.key(8), (16, T, D))

    def loss(params):
        return jnp.mean((nnx.merge(graphdef, params)(x) - target) ** 2)

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-2))
    params, state = aligned, tx.init(aligned)
    for _ in range(steps):
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_whole_tree_equals_the_per_layer_function_by_hand(setup, mode):
    """Each kernel of the result is the per-layer rule on that kernel alone: [in, out] kernels directly, the
    [out, in] encoder through its transpose, the stacked blocks layer by layer; leaves that are not kernels keep
    the aligned values (or the fine-tuned ones with other_params="finetuned"). lax.map vs single calls of the same
    float32 rule: measured bit-identical; 1e-6 of the weights' scale allowed for a backend that fuses differently.
    """
    model, aligned, _, hessians = setup
    finetuned = finetune(aligned, model)
    # The official budget scales with rows/4096 (module docstring of layer.py), hence a large s on 8-row kernels.
    cfg = SAMPLE_CFG[mode]
    layouts = lambda path: "out_in" if path == "encoder/weight" else "in_out"  # noqa: E731
    out, report = safe_delta(aligned, finetuned, hessians, cfg, layout=layouts)
    layer_fn = official_layer if mode == "official" else paper_layer
    assert set(report["kernels"]) == set(hessians) and 0 < report["kept_fraction"] < 1

    def by_hand(path, w_a, w_f, h):
        w_a, w_f = (w_a.T, w_f.T) if path == "encoder/weight" else (w_a, w_f)
        kernel, _ = layer_fn(w_a, w_f, h, cfg)
        return np.asarray(kernel).T if path == "encoder/weight" else np.asarray(kernel)

    for path in hessians:
        keys = path.split("/")
        get = lambda tree: tree[keys[0]][keys[1]] if len(keys) == 2 else tree[keys[0]][keys[1]][keys[2]]  # noqa
        w_a, w_f, got = get(aligned), get(finetuned), np.asarray(get(out))
        if path.startswith("blocks/"):
            want = np.stack([by_hand(path, w_a[i], w_f[i], hessians[path][i]) for i in range(LAYERS)])
        else:
            want = by_hand(path, w_a, w_f, hessians[path])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(np.abs(w_a).max()), err_msg=path)
        assert not np.array_equal(got, np.asarray(w_a)), path
    assert np.array_equal(out["gate"]["bias"], aligned["gate"]["bias"])
    out_ft, _ = safe_delta(aligned, finetuned, hessians, dataclasses.replace(cfg, other_params="finetuned"),
                           layout=layouts, kernels=["gate/kernel"])
    assert np.array_equal(out_ft["gate"]["bias"], finetuned["gate"]["bias"])


def test_out_in_is_the_transposed_in_out(setup):
    """The same kernels stored [out, in] with layout="out_in" give, bit for bit, the transposes of the [in, out]
    result: the per-layer rule runs on the same [in, out] view either way."""
    model, aligned, _, hessians = setup
    finetuned = finetune(aligned, model, steps=3)
    paths = ["gate/kernel", "value/kernel", "head/kernel", "blocks/up/kernel"]
    transpose = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda p, x: jnp.swapaxes(x, -1, -2) if "/".join(k.key for k in p) in paths else x, tree)
    cfg = SAMPLE_CFG["official"]
    flax_out, flax_report = safe_delta(aligned, finetuned, hessians, cfg, kernels=paths)
    torch_out, torch_report = safe_delta(transpose(aligned), transpose(finetuned), hessians, cfg, kernels=paths,
                                         layout="out_in")
    for path in paths:
        keys = path.split("/")
        a, b = flax_out, torch_out
        for k in keys:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(np.swapaxes(np.asarray(b), -1, -2), np.asarray(a))
        assert torch_report["kernels"][path]["kept_fraction"] == flax_report["kernels"][path]["kept_fraction"]


def test_an_nnx_state_goes_in_and_comes_out(setup):
    """nnx.State trees (paths without the Variables' `.value`) work as they are; the result is an nnx.State."""
    model, aligned, _, hessians = setup
    finetuned = finetune(aligned, model, steps=2)
    state_a, state_f = nnx.state(model, nnx.Param), nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state_f, finetuned)
    out, _ = safe_delta(state_a, state_f, hessians, SAMPLE_CFG["official"], kernels=["head/kernel"])
    assert isinstance(out, nnx.State)
    plain, _ = safe_delta(aligned, finetuned, hessians, SAMPLE_CFG["official"], kernels=["head/kernel"])
    np.testing.assert_array_equal(nnx.to_pure_dict(out)["head"]["kernel"], plain["head"]["kernel"])


def test_bad_input_names_the_path(setup):
    model, aligned, batches, hessians = setup
    finetuned = jax.tree.map(lambda x: x + 0.01, aligned)

    with pytest.raises(SafeDeltaError, match="no Hessian for gate/bias"):
        safe_delta(aligned, finetuned, hessians, kernels=["gate/kernel", "gate/bias"])
    with pytest.raises(SafeDeltaError, match=r"Hessian 'head/kernel' for head/kernel has shape \(4, 4\); "
                                             r"expected \(8, 8\)"):
        safe_delta(aligned, finetuned, {"head/kernel": hessians["head/kernel"][:4, :4]})
    broken = jax.tree.map(lambda x: x, finetuned)
    broken["blocks"]["down"]["kernel"] = broken["blocks"]["down"]["kernel"].at[2, 0, 0].set(jnp.inf)
    with pytest.raises(SafeDeltaError, match=r"blocks/down/kernel: .*non-finite.*\[2\]"):
        safe_delta(aligned, broken, hessians, kernels=r"blocks/.*kernel")
    nan_h = KernelHessians({**hessians.arrays, "head/kernel": hessians["head/kernel"].at[0, 0].set(jnp.nan)},
                           hessians.names)
    with pytest.raises(SafeDeltaError, match=r"Hessian 'head/kernel' for head/kernel has non-finite"):
        safe_delta(aligned, finetuned, nan_h, kernels=["head/kernel"])
    with_lora = {**finetuned, "head": {**finetuned["head"], "lora_A": jnp.zeros((D, 2))}}
    with pytest.raises(SafeDeltaError, match=r"head/lora_A.*merge them first"):
        safe_delta(aligned, with_lora, hessians)
    with pytest.raises(SafeDeltaError, match=r"only in aligned: \['head/bias'\]"):
        safe_delta(aligned, {**finetuned, "head": {"kernel": finetuned["head"]["kernel"]}}, hessians)
    with pytest.raises(SafeDeltaError, match=r"Hessians given for \['decoder/kernel'\]"):
        safe_delta(aligned, finetuned, {**hessians, "decoder/kernel": hessians["head/kernel"]})
    with pytest.raises(SafeDeltaError, match="no kernel selected"):
        safe_delta(aligned, finetuned, hessians, kernels=r"decoder/.*")
    with pytest.raises(SafeDeltaError, match="head/kernel: layout 'torch'"):
        safe_delta(aligned, finetuned, hessians, kernels=["head/kernel"], layout="torch")

    with pytest.raises(SafeDeltaError, match="inputs_fn returned activations for 'decoder/kernel'"):
        collect_hessians(None, aligned, batches, inputs_fn=lambda p, b: {"decoder/kernel": b["x"]})
    with pytest.raises(SafeDeltaError, match=r"inputs_fn\['head/kernel'\]: activations of shape \(4, 3, 6\)"):
        collect_hessians(None, aligned, batches, inputs_fn=lambda p, b: {"head/kernel": b["x"][:, :3, :6]})
    with pytest.raises(SafeDeltaError, match="other than jax.lax.scan"):
        collect_hessians(ByoNet(rngs=nnx.Rngs(0), remat=True), None, batches, call=forward)
