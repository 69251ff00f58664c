"""Job configs: frozen dataclasses, read from YAML, overridden with dotted `key=value` pairs, saved with the run.

    cfg = load(TrainJob, "experiments/configs/align.yaml", ["optim.lr=2e-5", "strategy.name=case1_penalty"])
    save(cfg, run_dir / "config.yaml")      # the resolved config: re-running it reproduces the run

Unknown keys are errors that name the key, the file and the valid keys, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from safetrade.errors import SafetradeError
from safetrade.tradeoff import Sft, StrategyConfig


class ConfigError(SafetradeError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelSection:
    name: str = "smollm2-135m-instruct"  # registered name, .gguf, HF dir, or hub id
    dtype: str = "auto"  # compute dtype; auto: bfloat16 on gpu/tpu, float32 on cpu (models/io.py resolve_dtypes)
    param_dtype: str = "float32"  # master weights (keep float32 for bf16 compute with fp32 masters; auto = float32)
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class LoraSection:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-5
    schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0  # 0 disables global-norm clipping


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: str = "alignment"  # a built set (alignment | capability | attack | proxy) or a registry name / file
    proxy: str = "proxy"  # Case I proxy safety set
    eval_sets: tuple[str, ...] = ("alignment", "proxy", "capability")  # held-out losses logged during training
    eval_rows: int = 32  # held-out rows per eval set
    max_len: int = 256
    batch_size: int = 8
    accum_steps: int = 1
    bad_rows: str = "skip"  # skip | error | truncate
    n_attack: int = 100  # rows of the harmful Q+A attack set
    benign_ratio: float = 1.0  # benign rows per refusal row in the alignment set
    rephrased: float = 0.0  # share of alignment prompts added again rewritten as questions (data/rephrase.py)
    benign_rephrased: float = 0.0  # share of benign alignment rows added again in the same request forms
    group_by_length: bool = True  # batch rows of similar length together (less padding)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DefenseSection:
    """A data-level defense mixed into the training rows (safetrade/defenses/data.py has each rule)."""

    name: str = "none"  # none | safeinstr (refusal examples mixed in) | bea (the same under a secret trigger)
    fraction: float = 0.1  # safety examples per training row, before the cap (Safe Delta's baseline setting)
    max_examples: int | None = 1000
    trigger: str | None = None  # bea: the trigger itself; None: generated from the vocabulary and trigger_seed
    trigger_tokens: int = 150
    trigger_seed: int = 0  # bea: the provider's secret
    base_system: str | None = None  # bea: S in "{trigger} {S}"; None: the trigger alone
    seed: int = 0

    def __post_init__(self):
        if self.name not in DEFENSES:
            raise ConfigError(f"defense.name {self.name!r}; choose {', '.join(DEFENSES)} "
                              "(Lisa is a strategy: strategy.name=lisa; weight defenses: safetrade defend)")


DEFENSES = ("none", "safeinstr", "bea")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainJob:
    out_dir: str = "runs/train"
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    optim: OptimSection = OptimSection()
    data: DataSection = DataSection()
    mesh: MeshSection = MeshSection()
    strategy: StrategyConfig = Sft()  # a strategy's own config, picked by its `name` (safetrade/tradeoff/registry.py)
    defense: DefenseSection = DefenseSection()
    steps: int = 100
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------


def to_dict(cfg) -> dict[str, Any]:
    out = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def _coerce(value: Any, annotation, where: str):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(annotation)[0]
        return tuple(_coerce(v, item, where) for v in value)
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation in (int, float):
        try:
            number = annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if annotation is int and isinstance(value, float) and value != number:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        return str(value)
    return value


def from_dict(cls, data: dict[str, Any], where: str = "config"):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where != "config" else name
        if hasattr(hint, "section_for"):  # a section whose data picks its class (the strategy, by name)
            try:
                hint, value = hint.section_for(value, key)
            except SafetradeError as err:
                raise ConfigError(str(err)) from None
        kwargs[name] = from_dict(hint, value, key) if dataclasses.is_dataclass(hint) else _coerce(value, hint, key)
    try:
        return cls(**kwargs)
    except SafetradeError as err:
        raise ConfigError(f"{where}: {err}") from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    data[keys[-1]] = value


def load(cls, path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """A `cls` from defaults < YAML file < `key.sub=value` overrides (values parsed as YAML scalars)."""
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        where = str(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where != "config" else str(err)) from None


def save(cfg, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
