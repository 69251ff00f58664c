"""Case I and Case II on a model that is not safetrade's, inside a plain optax loop.

The models are written here with plain flax.nnx: nnx.Linear ([in, out] kernels) beside a torch-style module that
stores its weight as [out, in], with LoRA adapters of the matching layouts (A·B for [in, out], B·A for [out, in]).
Params are `nnx.to_pure_dict` trees. The convex checks use a linear model read at x = I, whose squared error is
½‖θ − target‖² in parameter space, so every strategy's optimum has a closed form (the KKT point for Case I
constrained). The Case II checks train a nonlinear model with Adam and check the ball after every step.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from safetrade import config, tradeoff
from safetrade.errors import SafetradeError
from safetrade.tradeoff import LoraPaths

# ‖f·d‖ for f = r/‖d‖ is r up to the fp32 rounding of the products, of the norm and of apply_updates' p + (q − p):
# a few ulp (1.2e-7 each) relative; 1e-5 leaves a wide margin and still fails any real escape from the ball.
BALL_RTOL = 1e-5
D_IN, D_FLAX, D_TORCH = 3, 2, 2


class OutInDense(nnx.Module):
    """torch.nn.Linear's layout: `weight` [out, in], y = x · weightᵀ (no bias)."""

    def __init__(self, d_in, d_out, *, rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (d_out, d_in)) / np.sqrt(d_in))

    def __call__(self, x):
        return jnp.einsum("bi,oi->bo", x, self.weight[...])


class TwoHeads(nnx.Module):
    """A linear model with an [in, out] head and an [out, in] head side by side: at x = I it outputs its weights."""

    def __init__(self, *, rngs):
        self.flax_head = nnx.Linear(D_IN, D_FLAX, use_bias=False, rngs=rngs)
        self.torch_head = OutInDense(D_IN, D_TORCH, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([self.flax_head(x), self.torch_head(x)], axis=-1)


def pure(module):
    graphdef, state = nnx.split(module, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def convex_problem():
    """(apply, aligned θ_s, capability loss ½‖θ − a‖², proxy loss ½‖θ − θ_s‖², a) through TwoHeads' forward."""
    graphdef, aligned = pure(TwoHeads(rngs=nnx.Rngs(0)))
    eye = jnp.eye(D_IN)

    def apply(params, x):
        return nnx.merge(graphdef, nnx.State(params))(x)

    target = 2.0 * jax.random.normal(jax.random.key(7), (D_IN, D_FLAX + D_TORCH))
    cap = lambda p: 0.5 * jnp.sum((apply(p, eye) - target) ** 2)  # noqa: E731
    out_s = apply(aligned, eye)
    proxy = lambda p: 0.5 * jnp.sum((apply(p, eye) - out_s) ** 2)  # noqa: E731
    a = {"flax_head": {"kernel": target[:, :D_FLAX]}, "torch_head": {"weight": target[:, D_FLAX:].T}}
    return aligned, cap, proxy, a


def flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def descend(tx, loss_fn, params, steps, extra=lambda p, s: {}):
    """`steps` of optax.chain updates on loss_fn(params, opt_state), scanned under jit: (params, opt_state)."""

    def one(carry, _):
        p, s = carry
        grads = jax.grad(loss_fn)(p, s)
        updates, s = tx.update(grads, s, p, **extra(p, s))
        return (optax.apply_updates(p, updates), s), None

    (params, state), _ = jax.jit(lambda c: jax.lax.scan(one, c, None, length=steps))((params, tx.init(params)))
    return params, state


def test_case1_penalty_on_nnx_reaches_the_weighted_average():
    aligned, cap, proxy, a = convex_problem()
    lam = 3.0
    loss = tradeoff.case1_penalty(cap, proxy, lam)
    params, _ = descend(optax.sgd(0.05), lambda p, s: loss(p), aligned, 3000)
    expected = (flat(a) + lam * flat(aligned)) / (1 + lam)
    np.testing.assert_allclose(flat(params), expected, atol=1e-5)


def test_case1_constrained_on_nnx_matches_the_kkt_solution():
    """min ½‖θ−a‖² s.t. ½‖θ−θ_s‖² ≤ L_proxy(θ_s) + ε = ε: θ* = (a + λ*θ_s)/(1+λ*), λ* = ‖a−θ_s‖/√(2ε) − 1."""
    aligned, cap, proxy, a = convex_problem()
    epsilon = 0.5
    lam_star = float(jnp.linalg.norm(flat(a) - flat(aligned)) / np.sqrt(2 * epsilon) - 1)
    assert lam_star > 0  # the constraint is active
    tx = optax.chain(optax.sgd(0.05), tradeoff.case1_constrained(epsilon, dual_lr=0.05, lam0=0.0))

    def loss(p, state):
        return tradeoff.case1_penalty(cap, proxy, tradeoff.current_lambda(state))(p)

    params, state = descend(tx, loss, aligned, 6000,
                            extra=lambda p, s: {"proxy_loss": proxy(p), "proxy_reference": proxy(aligned)})
    lam = tradeoff.current_lambda(state)
    assert abs(float(lam) - lam_star) < 1e-3
    assert float(optax.tree_utils.tree_get(state, "lam")) == float(lam)  # the other documented way to read λ
    np.testing.assert_allclose(flat(params), (flat(a) + lam_star * flat(aligned)) / (1 + lam_star), atol=1e-4)
    assert abs(float(proxy(params)) - epsilon) < 1e-4  # on the boundary


@pytest.mark.parametrize("per_tensor", [False, True])
def test_case2_projection_on_nnx_matches_the_closed_form(per_tensor):
    """min ½‖θ−a‖² s.t. ‖θ−θ_s‖ ≤ r: θ* = θ_s + r(a−θ_s)/‖a−θ_s‖, per leaf with per_tensor."""
    aligned, cap, _, a = convex_problem()
    r = 0.7
    tx = optax.chain(optax.sgd(0.05), tradeoff.case2_projection(aligned, r, per_tensor=per_tensor))
    params, _ = descend(tx, lambda p, s: cap(p), aligned, 3000)
    groups = [a] if not per_tensor else [a["flax_head"], a["torch_head"]]
    anchors = [aligned] if not per_tensor else [aligned["flax_head"], aligned["torch_head"]]
    outs = [params] if not per_tensor else [params["flax_head"], params["torch_head"]]
    for target, anchor, got in zip(groups, anchors, outs):
        d = flat(target) - flat(anchor)
        np.testing.assert_allclose(flat(got), flat(anchor) + r * d / jnp.linalg.norm(d), atol=1e-5)


def test_case2_penalty_on_nnx_matches_the_closed_form():
    aligned, cap, _, a = convex_problem()
    mu = 4.0
    tx = optax.chain(tradeoff.case2_penalty(aligned, mu), optax.sgd(0.05))
    params, _ = descend(tx, lambda p, s: cap(p), aligned, 3000)
    np.testing.assert_allclose(flat(params), (flat(a) + mu * flat(aligned)) / (1 + mu), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# A nonlinear model, full fine-tuning and LoRA, trained with Adam: the ball after every step


class LoraInOut(nnx.Module):
    """nnx.Linear's layout with an adapter: y = x·kernel + bias + s·(x·A)·B, A [in, r], B [r, out]."""

    def __init__(self, d_in, d_out, rank, *, rngs):
        self.base = nnx.Linear(d_in, d_out, rngs=rngs)
        self.lora_a = nnx.Param(jax.random.normal(rngs.params(), (d_in, rank)) / np.sqrt(d_in))
        self.lora_b = nnx.Param(jnp.zeros((rank, d_out)))

    def __call__(self, x):
        return self.base(x) + 2.0 * (x @ self.lora_a[...]) @ self.lora_b[...]


class LoraOutIn(nnx.Module):
    """torch's layout with a PEFT-style adapter: y = x·weightᵀ + s·(x·Aᵀ)·Bᵀ, A [r, in], B [out, r]."""

    def __init__(self, d_in, d_out, rank, *, rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (d_out, d_in)) / np.sqrt(d_in))
        self.lora_a = nnx.Param(jax.random.normal(rngs.params(), (rank, d_in)) / np.sqrt(d_in))
        self.lora_b = nnx.Param(jnp.zeros((d_out, rank)))

    def __call__(self, x):
        return x @ self.weight[...].T + 2.0 * (x @ self.lora_a[...].T) @ self.lora_b[...].T


class LoraNet(nnx.Module):
    def __init__(self, *, rngs):
        self.encoder = LoraInOut(6, 8, 2, rngs=rngs)
        self.decoder = LoraOutIn(8, 3, 2, rngs=rngs)

    def __call__(self, x):
        return self.decoder(jnp.tanh(self.encoder(x)))


def regression():
    graphdef, params = pure(LoraNet(rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (32, 6))
    y = jnp.cos(x[:, :3] * 3.0)

    def loss(p):
        return jnp.mean((nnx.merge(graphdef, nnx.State(p))(x) - y) ** 2)

    return params, loss


def split_adapters(params):
    """(base, adapters): the lora_a / lora_b leaves and everything else, as two nested dicts."""
    def part(keep):
        return {layer: {k: v for k, v in leaves.items() if (k.startswith("lora_")) == keep}
                for layer, leaves in params.items()}

    return part(False), part(True)


def join(base, adapters):
    return {layer: {**base[layer], **adapters[layer]} for layer in base}


def adam_steps(tx, loss, params, steps=12, check=lambda p: None):
    step = jax.jit(lambda p, s: (lambda g: tx.update(g, s, p))(jax.grad(loss)(p)))
    state = tx.init(params)
    for _ in range(steps):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        check(params)
    return params


@pytest.mark.parametrize("per_tensor", [False, True])
def test_full_case2_projection_holds_after_every_step(per_tensor):
    aligned, loss = regression()
    r = 0.05
    distances = []

    def check(params):
        d = jax.tree.map(lambda p, a: np.asarray(p - a).ravel(), params, aligned)
        norms = [np.linalg.norm(x) for x in jax.tree.leaves(d)] if per_tensor else [np.linalg.norm(flat(d))]
        assert max(norms) <= r * (1 + BALL_RTOL)
        distances.append(max(norms))

    tx = optax.chain(optax.adam(0.05), tradeoff.case2_projection(aligned, r, per_tensor=per_tensor))
    adam_steps(tx, loss, aligned, check=check)
    assert distances[-1] > 0.9 * r  # the ball is active, not trivially satisfied


def merged_deltas_by_hand(adapters):
    """ΔW of each adapted weight, in its own layout, computed here in numpy (independently of the hooks)."""
    enc, dec = adapters["encoder"], adapters["decoder"]
    return {"encoder": 2.0 * np.asarray(enc["lora_a"]) @ np.asarray(enc["lora_b"]),
            "decoder": 2.0 * np.asarray(dec["lora_b"]) @ np.asarray(dec["lora_a"])}


def by_path_hook():
    return tradeoff.lora_by_path({"encoder": LoraPaths("encoder/lora_a", "encoder/lora_b", 2.0, "in_out"),
                                  "decoder": LoraPaths("decoder/lora_a", "decoder/lora_b", 2.0, "out_in")})


def function_hook():
    """The same adapters through a user's own merged-delta function and the paths of the B leaves."""
    def deltas(adapters):
        enc, dec = adapters["encoder"], adapters["decoder"]
        return {"encoder": 2.0 * enc["lora_a"] @ enc["lora_b"], "decoder": 2.0 * dec["lora_b"] @ dec["lora_a"]}

    return tradeoff.lora_displacement(deltas, {"encoder": "encoder/lora_b", "decoder": "decoder/lora_b"})


@pytest.mark.parametrize(("per_tensor", "hook"), [(False, by_path_hook), (True, by_path_hook),
                                                  (False, function_hook), (True, function_hook)])
def test_lora_case2_projection_bounds_the_merged_update_after_every_step(per_tensor, hook):
    params, loss = regression()
    base, adapters = split_adapters(params)
    r = 0.05
    distances = []

    def check(adapters_now):
        norms = [np.linalg.norm(d) for d in merged_deltas_by_hand(adapters_now).values()]
        total = max(norms) if per_tensor else float(np.sqrt(sum(n * n for n in norms)))
        assert total <= r * (1 + BALL_RTOL)
        distances.append(total)

    tx = optax.chain(optax.adam(0.05), tradeoff.case2_projection(None, r, per_tensor=per_tensor, displacement=hook()))
    trained = adam_steps(tx, lambda ad: loss(join(base, ad)), adapters, check=check)
    assert distances[-1] > 0.9 * r
    assert jax.tree.structure(trained) == jax.tree.structure(adapters)  # only the adapters were trained


def test_lora_case2_penalty_pulls_the_merged_update_to_zero():
    """With LoRA the penalty's gradient is that of (μ/2)‖ΔW‖² w.r.t. A and B: a strong μ keeps ΔW small."""
    params, loss = regression()
    base, adapters = split_adapters(params)

    def merged_norm(mu):
        tx = optax.chain(tradeoff.case2_penalty(None, mu, displacement=by_path_hook()), optax.sgd(0.05))
        trained = adam_steps(tx, lambda ad: loss(join(base, ad)), adapters, steps=40)
        return float(np.sqrt(sum(np.sum(d * d) for d in merged_deltas_by_hand(trained).values())))

    free, pulled = merged_norm(0.0), merged_norm(3.0)  # measured: 1.44 and 0.16
    assert free > 0.5 and pulled < 0.25 * free

    # what it adds to a gradient is ∇ (μ/2)‖ΔW‖², here differentiated through ΔW written out by hand
    moved = jax.tree.map(lambda x: x + 0.1, adapters)
    by_hand = jax.grad(lambda ad: 1.5 * (jnp.sum((2.0 * ad["encoder"]["lora_a"] @ ad["encoder"]["lora_b"]) ** 2)
                                         + jnp.sum((2.0 * ad["decoder"]["lora_b"] @ ad["decoder"]["lora_a"]) ** 2)))
    tx = tradeoff.case2_penalty(None, 3.0, displacement=by_path_hook())
    added, _ = tx.update(jax.tree.map(jnp.zeros_like, moved), tx.init(moved), moved)
    np.testing.assert_allclose(flat(added), flat(by_hand(moved)), rtol=1e-5)  # fp32, different summation order


def test_full_projection_is_optax_projection_l2_ball():
    """The ball's factor is optax.projections.projection_l2_ball's: the same bits, globally and per leaf."""
    aligned, _ = regression()
    moved = jax.tree.map(lambda x: x + 0.3 * jnp.sign(x + 0.01), aligned)
    zeros = jax.tree.map(jnp.zeros_like, moved)
    for per_tensor in (False, True):
        tx = tradeoff.case2_projection(aligned, 0.5, per_tensor=per_tensor)
        got = optax.apply_updates(moved, tx.update(zeros, tx.init(moved), moved)[0])
        d = jax.tree.map(jnp.subtract, moved, aligned)
        ball = (jax.tree.map(lambda x: optax.projections.projection_l2_ball(x, jnp.float32(0.5)), d) if per_tensor
                else optax.projections.projection_l2_ball(d, jnp.float32(0.5)))
        expected = jax.tree.map(jnp.add, aligned, ball)
        np.testing.assert_allclose(flat(got), flat(expected), rtol=0, atol=2e-7)  # ≤ 1 ulp of |θ| ≤ 2: p + (q − p)


def test_anchor_with_each_update_equals_anchor_at_construction():
    aligned, loss = regression()
    grads = jax.grad(loss)(aligned)
    for make in (lambda anchor: tradeoff.case2_projection(anchor, 0.01),
                 lambda anchor: tradeoff.case2_penalty(anchor, 2.0)):
        fixed, per_update = make(aligned), make(None)
        u1, _ = fixed.update(grads, fixed.init(aligned), aligned)
        u2, _ = per_update.update(grads, per_update.init(aligned), aligned, anchor=aligned)
        assert all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)))


# ---------------------------------------------------------------------------------------------------------------
# Clear errors


def test_bad_input_errors_name_the_problem():
    aligned, _ = regression()
    with pytest.raises(SafetradeError, match="no anchor"):
        tx = tradeoff.case2_projection(None, 1.0)
        tx.update(aligned, tx.init(aligned), aligned)
    with pytest.raises(SafetradeError, match="only in params: .*extra"):
        tx = tradeoff.case2_projection(aligned, 1.0)
        bigger = {**aligned, "extra": {"w": jnp.ones(2)}}
        tx.update(bigger, tx.init(bigger), bigger)
    with pytest.raises(SafetradeError, match="no leaf 'encoder/lora_x'"):
        hook = tradeoff.lora_by_path({"encoder": ("encoder/lora_x", "encoder/lora_b", 2.0)})
        hook.of(split_adapters(aligned)[1])
    with pytest.raises(SafetradeError, match="layout 'rows'"):
        LoraPaths("a", "b", 1.0, "rows")
    with pytest.raises(SafetradeError, match="proxy loss and its reference"):
        tx = tradeoff.case1_constrained(0.1, 0.1)
        tx.update(aligned, tx.init(aligned), aligned)


def test_registry_rejects_a_knob_of_another_strategy():
    message = (r"finetune.yaml: strategy.radius: not a knob of strategy case1_penalty \(its knobs: lam\); "
               r"radius is a knob of case2_projection")
    with pytest.raises(config.ConfigError, match=message):
        config.load(config.TrainJob, Path(__file__).resolve().parents[1] / "experiments/configs/finetune.yaml",
                    ["strategy.name=case1_penalty", "strategy.radius=2"])
    with pytest.raises(SafetradeError, match="mu: not a knob of strategy sft"):
        tradeoff.strategy_config("sft", mu=1.0)
    with pytest.raises(SafetradeError, match="unknown strategy 'case3'"):
        config.load(config.TrainJob, None, ["strategy.name=case3"])


def test_registry_configs_round_trip_and_old_saved_configs_still_load(tmp_path):
    for name, spec in tradeoff.REGISTRY.items():
        job = config.TrainJob(strategy=spec.config())
        back = config.load(config.TrainJob, config.save(job, tmp_path / f"{name}.yaml"))
        assert back == job and type(back.strategy) is spec.config
    # a config.yaml saved before strategies had their own configs lists every knob of every strategy
    old = {"name": "case2_projection", "lam": 1.0, "epsilon": 0.0, "dual_lr": 0.1, "radius": 0.5, "per_tensor": True,
           "mu": 1.0}
    (tmp_path / "old.yaml").write_text(f"strategy: {old}\n")
    assert config.load(config.TrainJob, tmp_path / "old.yaml").strategy == tradeoff.Case2Projection(radius=0.5,
                                                                                                     per_tensor=True)


def test_lora_by_path_reads_an_nnx_state_as_its_pure_dict():
    """The same path strings name the adapters in an nnx.State (Variables) and in its pure dict; same projection."""
    model = LoraNet(rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    moved = jax.tree.map(lambda x: x + 0.05, state)
    as_dict = nnx.to_pure_dict(moved)
    tx = tradeoff.case2_projection(None, 0.01, displacement=by_path_hook())
    zeros = jax.tree.map(jnp.zeros_like, moved)
    on_state = optax.apply_updates(moved, tx.update(zeros, tx.init(moved), moved)[0])
    on_dict = optax.apply_updates(as_dict, tx.update(jax.tree.map(jnp.zeros_like, as_dict), tx.init(as_dict),
                                                     as_dict)[0])
    np.testing.assert_array_equal(flat(nnx.to_pure_dict(on_state)), flat(on_dict))
    assert np.linalg.norm(np.concatenate([d.ravel() for d in merged_deltas_by_hand(on_dict).values()])) <= 0.01 * (
        1 + BALL_RTOL)
