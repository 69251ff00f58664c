"""One registry of strategies: name -> its config dataclass and how to build its optax pieces.

    cfg = strategy_config("case2_projection", radius=0.5)          # or from YAML: strategy: {name: ..., radius: ...}
    pieces = build(cfg)                                            # full fine-tuning (anchor with each update)
    pieces = build(cfg, displacement=llama_lora(lora_cfg))         # LoRA: the ball on the merged update
    tx = pieces.chain(optax.adamw(1e-3))       # optax.chain(pieces.gradient, adamw, pieces.constraint)
    loss = pieces.objective(cap_loss, proxy_loss, opt_state)      # what the optimiser descends this step

A config holds only its own strategy's knobs: `strategy_config("case1_penalty", radius=2)` is an error naming the
knob and the strategy, and so is the same in a YAML file or a dotted override (`strategy.radius=2`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from safetrade.errors import SafetradeError
from safetrade.tradeoff.case1 import case1_constrained, current_lambda, penalized
from safetrade.tradeoff.case2 import case2_penalty, case2_projection, penalty_value
from safetrade.tradeoff.displacement import Displacement

log = logging.getLogger(__name__)


class StrategyError(SafetradeError):
    """An unknown strategy, or a knob the chosen strategy does not have."""


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """Base of the strategies' configs. `name` is the registry key; the knobs are the subclass's other fields."""

    name: str
    uses_proxy: ClassVar[bool] = False  # its objective needs the proxy safety loss
    uses_anchor: ClassVar[bool] = False  # it needs θ_s (or a displacement hook)
    uses_proxy_reference: ClassVar[bool] = False  # its updates need L_proxy(θ_s)

    def __post_init__(self):
        if self.name not in REGISTRY:
            raise StrategyError(f"unknown strategy {self.name!r}; choose from {', '.join(REGISTRY)}")
        if REGISTRY[self.name].config is not type(self):
            raise StrategyError(f"{type(self).__name__} is the config of strategy "
                                f"{_name_of(type(self))!r}, not {self.name!r}")
        for knob in knobs(type(self)):
            value = getattr(self, knob)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= 0:
                raise StrategyError(f"strategy {self.name}: {knob} must be >= 0, got {value}")

    @classmethod
    def section_for(cls, data: Any, where: str) -> tuple[type, dict]:
        """The config class a mapping picks with its `name`, and the mapping (config.from_dict's hook)."""
        if not isinstance(data, Mapping):
            raise StrategyError(f"{where}: expected a mapping, got {type(data).__name__}")
        name = data.get("name", Sft.name)
        if name not in REGISTRY:
            raise StrategyError(f"{where}.name: unknown strategy {name!r}; choose from {', '.join(REGISTRY)}")
        config = REGISTRY[name].config
        foreign = sorted(set(data) - {"name", *knobs(config)})
        if foreign and set(data) == LEGACY_FIELDS:
            return config, _drop_legacy_knobs(data, foreign, name, where)
        if foreign:
            raise StrategyError(f"{where}.{foreign[0]}: not a knob of strategy {name} ({_knob_list(config)})"
                                + _belongs(foreign[0]))
        return config, dict(data)


def knobs(config: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(config) if f.name != "name")


def _name_of(config: type) -> str:
    return next(name for name, s in REGISTRY.items() if s.config is config)


def _knob_list(config: type) -> str:
    return f"its knobs: {', '.join(knobs(config))}" if knobs(config) else "it has no knobs"


def _belongs(knob: str) -> str:
    owners = [name for name, s in REGISTRY.items() if knob in knobs(s.config)]
    return f"; {knob} is a knob of {', '.join(owners)}" if owners else ""


# Before strategies had their own configs, a saved run's config.yaml listed every knob of every strategy (the old
# code ignored those of other strategies). Such a record still loads: the foreign knobs are dropped.
LEGACY_FIELDS = frozenset({"name", "lam", "epsilon", "dual_lr", "radius", "per_tensor", "mu"})
LEGACY_DEFAULTS = {"lam": 1.0, "epsilon": 0.0, "dual_lr": 0.1, "radius": 1.0, "per_tensor": False, "mu": 1.0}


def _drop_legacy_knobs(data: Mapping, foreign: list[str], name: str, where: str) -> dict:
    ignored = [k for k in foreign if data[k] != LEGACY_DEFAULTS[k]]
    if ignored:
        log.warning("%s: a config saved by an older safetrade; strategy %s never read %s", where, name,
                    ", ".join(f"{k}={data[k]}" for k in ignored))
    return {k: v for k, v in data.items() if k not in foreign}


@dataclasses.dataclass(frozen=True)
class Sft(StrategyConfig):
    """min L_cap: plain fine-tuning."""

    name: str = "sft"


@dataclasses.dataclass(frozen=True)
class Case1Penalty(StrategyConfig):
    """min L_cap + λ·L_proxy."""

    name: str = "case1_penalty"
    lam: float = 1.0
    uses_proxy: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class Case1Constrained(StrategyConfig):
    """min L_cap s.t. L_proxy ≤ L_proxy(θ_s) + ε, primal–dual."""

    name: str = "case1_constrained"
    lam: float = 1.0  # the initial multiplier
    epsilon: float = 0.0  # allowed rise of the proxy loss over the aligned model's
    dual_lr: float = 0.1  # step size η of the multiplier's projected ascent
    uses_proxy: ClassVar[bool] = True
    uses_proxy_reference: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class Case2Projection(StrategyConfig):
    """min L_cap s.t. ‖θ − θ_s‖₂ ≤ r, by projection after every update."""

    name: str = "case2_projection"
    radius: float = 1.0
    per_tensor: bool = False  # a ball of radius r per leaf (weight tensor) instead of one global ball
    uses_anchor: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class Case2Penalty(StrategyConfig):
    """min L_cap + (μ/2)‖θ − θ_s‖₂²."""

    name: str = "case2_penalty"
    mu: float = 1.0
    uses_anchor: ClassVar[bool] = True


@dataclasses.dataclass(frozen=True)
class Lisa(StrategyConfig):
    """Lisa (Huang et al., NeurIPS 2024): alternate alignment-data and user-data steps, each with a proximal term
    ρ/2 ‖θ − θ_other‖² towards the other state's checkpoint. safetrade/defenses/lisa.py has the rule, the library
    loop (`lisa_train`, which takes this config as `LisaConfig`) and the optax piece (`lisa_bistate`); defaults are
    the official fine-tuning script's.

    As a strategy, the job feeds the alignment set's batch on alignment steps (`lisa_schedule`) and the anchor lives
    in the optimiser state.
    """

    name: str = "lisa"
    rho: float = 1.0
    """Weight of the proximal term ρ/2 ‖θ − θ_other‖² (official script 1; its argparse default 0.1)."""
    alignment_steps: int = 100
    """Steps per cycle in the alignment state (K1; official script 100)."""
    finetune_steps: int = 900
    """Steps per cycle in the fine-tune state (K2; official script 900)."""
    proximal_off_fraction: float = 0.1
    """The proximal term is off while step <= this fraction of the total steps (official code 0.1; 0 = always on)."""
    skip_user_batches_on_alignment: bool = True
    """Draw and discard a user batch on alignment steps, as the official Trainer does."""
    alignment_set: str = "alignment"
    """D_a as a `sets.rows_for` name: the project's built alignment set (the paper uses its alignment data)."""
    total_steps: int = 0
    """The run's steps, behind proximal_off_fraction (`lisa_bistate`); 0: `safetrade finetune` fills in `steps`."""

    def __post_init__(self):
        super().__post_init__()  # also: every number >= 0
        if self.alignment_steps == 0 and self.finetune_steps == 0:
            raise StrategyError("strategy lisa: alignment_steps and finetune_steps are both 0: no state to be in")
        if not self.proximal_off_fraction <= 1:
            raise StrategyError(f"strategy lisa: proximal_off_fraction must be in [0, 1], got "
                                f"{self.proximal_off_fraction}")


def _capability_only(cap, proxy, opt_state):
    del proxy, opt_state
    return cap


def _no_metrics(params, opt_state, displacement):
    del params, opt_state, displacement
    return {}


@dataclasses.dataclass(frozen=True)
class Pieces:
    """What a strategy adds to a training step.

    gradient: first in the chain, on the loss gradient (Case II penalty). constraint: last in the chain, after the
    optimiser (Case II projection, the Case I multiplier). objective(cap, proxy, opt_state): the loss to
    differentiate this step. metrics(params, opt_state, displacement): scalars worth logging. Every transform reads
    its inputs from `update(..., anchor=, proxy_loss=, proxy_reference=)` and ignores the others.
    """

    gradient: optax.GradientTransformation = optax.identity()
    constraint: optax.GradientTransformation = optax.identity()
    objective: Callable[[jax.Array, jax.Array, Any], jax.Array] = _capability_only
    metrics: Callable[[Any, Any, Displacement | None], dict] = _no_metrics

    def chain(self, optimizer: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
        return optax.chain(self.gradient, optimizer, self.constraint)


def _sft(cfg: Sft, displacement) -> Pieces:
    return Pieces()


def _case1_penalty(cfg: Case1Penalty, displacement) -> Pieces:
    return Pieces(objective=lambda cap, proxy, _: penalized(cap, proxy, cfg.lam),
                  metrics=lambda *_: {"lam": jnp.asarray(cfg.lam, jnp.float32)})


def _case1_constrained(cfg: Case1Constrained, displacement) -> Pieces:
    # λ is a constant of each step's objective: the Lagrangian's θ-dependent part is λ·L_proxy.
    return Pieces(constraint=case1_constrained(cfg.epsilon, cfg.dual_lr, cfg.lam),
                  objective=lambda cap, proxy, state: penalized(cap, proxy,
                                                                jax.lax.stop_gradient(current_lambda(state))),
                  metrics=lambda params, state, _: {"lam": current_lambda(state)})


def _case2_projection(cfg: Case2Projection, displacement) -> Pieces:
    return Pieces(constraint=case2_projection(None, cfg.radius, per_tensor=cfg.per_tensor, displacement=displacement))


def _case2_penalty(cfg: Case2Penalty, displacement) -> Pieces:
    def metrics(params, opt_state, hook):
        return {} if hook is None else {"penalty": penalty_value(hook, params, cfg.mu)}

    return Pieces(gradient=case2_penalty(None, cfg.mu, displacement=displacement), metrics=metrics)


def _lisa(cfg: Lisa, displacement) -> Pieces:
    from safetrade.defenses.lisa import lisa_bistate

    if cfg.total_steps == 0 and cfg.proximal_off_fraction > 0:
        raise StrategyError("strategy lisa: total_steps is 0; set it to the run's steps (the proximal term is off "
                            "for the first proximal_off_fraction of them), or set proximal_off_fraction=0")
    cycle = cfg.alignment_steps + cfg.finetune_steps

    def metrics(params, opt_state, hook):
        count = opt_state[0].count  # the chain's first piece is this strategy's gradient piece
        return {"lisa_alignment": ((count % cycle) < cfg.alignment_steps).astype(jnp.float32)}

    return Pieces(gradient=lisa_bistate(cfg, cfg.total_steps), metrics=metrics)


@dataclasses.dataclass(frozen=True)
class Strategy:
    config: type[StrategyConfig]
    build: Callable[[Any, Displacement | None], Pieces]


REGISTRY: dict[str, Strategy] = {
    "sft": Strategy(Sft, _sft),
    "case1_penalty": Strategy(Case1Penalty, _case1_penalty),
    "case1_constrained": Strategy(Case1Constrained, _case1_constrained),
    "case2_projection": Strategy(Case2Projection, _case2_projection),
    "case2_penalty": Strategy(Case2Penalty, _case2_penalty),
    "lisa": Strategy(Lisa, _lisa),
}


def strategy_config(name: str = "sft", **knob_values) -> StrategyConfig:
    """The config of strategy `name` with the given knobs (the others at their defaults)."""
    config, data = StrategyConfig.section_for({"name": name, **knob_values}, "strategy")
    return config(**data)


def build(cfg: StrategyConfig, displacement: Displacement | None = None) -> Pieces:
    """The strategy's pieces. `displacement`: a hook for θ − θ_s (LoRA); None: params − the `anchor` update arg."""
    return REGISTRY[cfg.name].build(cfg, displacement)
