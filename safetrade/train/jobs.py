"""Training jobs from a `config.TrainJob`: model + data + strategy -> checkpoints, metrics, an exported model.

    safetrade align    --config experiments/configs/align.yaml      (refusal SFT of the unaligned base model)
    safetrade finetune --config experiments/configs/finetune.yaml strategy.name=case1_penalty strategy.lam=1

A run directory holds config.yaml (the resolved config: re-run it to reproduce), metrics.jsonl, data_report.json,
checkpoints/ (orbax, resumable), and at the end hf/ (merged HF safetensors + tokenizer) and, for LoRA, adapter/
(PEFT format).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import optax

from safetrade import config as config_lib, parallel
from safetrade.data import bucket_lengths, encode_rows, epoch_batches, host_slice, make_batch, num_batches
from safetrade.data.sets import held_out, rows_for
from safetrade.errors import SafetradeError
from safetrade.models import io, llama, lora as lora_lib
from safetrade.train import loop, step as step_lib
from safetrade.train.losses import lm_loss_sum

log = logging.getLogger(__name__)

def make_optimizer(opt: config_lib.OptimSection, steps: int) -> optax.GradientTransformation:
    if opt.schedule == "constant":
        schedule = optax.constant_schedule(opt.lr)
    elif opt.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, opt.lr, opt.warmup_steps,
                                                      max(steps, opt.warmup_steps + 1))
    elif opt.schedule == "linear":
        schedule = optax.linear_schedule(opt.lr, 0.0, max(steps, 1))
    else:
        raise SafetradeError(f"optim.schedule {opt.schedule!r}; choose constant, cosine or linear")
    if opt.warmup_steps and opt.schedule != "cosine":
        schedule = optax.join_schedules([optax.linear_schedule(0.0, opt.lr, opt.warmup_steps), schedule],
                                        [opt.warmup_steps])
    if opt.name == "adamw":
        core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    elif opt.name == "adam":
        core = optax.adam(schedule, b1=opt.b1, b2=opt.b2)
    elif opt.name == "sgd":
        core = optax.sgd(schedule)
    else:
        raise SafetradeError(f"optim.name {opt.name!r}; choose adamw, adam or sgd")
    return optax.chain(optax.clip_by_global_norm(opt.clip_norm), core) if opt.clip_norm > 0 else core


class Batches:
    """batch(k) for step k, a pure function of k: epoch k // per_epoch, shuffled from (seed, epoch)."""

    def __init__(self, examples, batch_size: int, seed: int, pad_id: int, max_len: int, group_by_length: bool):
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.group_by_length = group_by_length
        self.buckets = bucket_lengths(max_len)
        self.per_epoch = num_batches(len(examples), batch_size)
        if self.per_epoch == 0:
            raise SafetradeError(f"{len(examples)} usable examples make no batch of {batch_size}")
        self._epoch, self._cache = None, []

    def __call__(self, k: int):
        epoch, index = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._cache = list(epoch_batches(self.examples, self.batch_size, epoch=epoch, seed=self.seed,
                                             buckets=self.buckets, pad_id=self.pad_id,
                                             group_by_length=self.group_by_length))
            self._epoch = epoch
        return self._cache[index]


def _encode(tokenizer, rows, data: config_lib.DataSection, name: str, reports: dict):
    examples, report = encode_rows(tokenizer, rows, max_len=data.max_len, policy=data.bad_rows, dataset=name)
    reports[name] = {"total": report.total, "kept": report.kept, "truncated": report.truncated,
                     "dropped": {str(reason): n for reason, n in report.counts.items()},
                     "dropped_examples": {str(reason): ids for reason, ids in report.examples.items()}}
    log.info("%s", report.summary())
    return examples


# The model config is static (a frozen, hashable dataclass): one compile per (config, params layout, batch shape),
# shared by every call, where a jit built inside mean_loss compiled again at each evaluation.
_loss_sum = jax.jit(lm_loss_sum, static_argnums=0)


def mean_loss(cfg, params, batches) -> float:
    """Token-mean loss over a list of batches (exact: sums and counts are accumulated)."""
    sums = [_loss_sum(cfg, params, b) for b in batches]  # dispatched back to back, fetched in one host sync
    total = count = 0.0
    for s, c in jax.device_get(sums):  # summed in Python floats, in batch order
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def run_train_job(job: config_lib.TrainJob) -> dict:
    from safetrade.tokenizer import load_tokenizer  # transformers: 1.6 s at import, only when a job runs

    parallel.initialize_distributed()
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save(job, out / "config.yaml")
    mesh = parallel.make_mesh(job.mesh.data, job.mesh.fsdp, job.mesh.tensor)
    started = time.perf_counter()

    base_cfg, params = io.load_model(job.model.name, mesh=mesh, dtype=job.model.dtype,
                                     param_dtype=job.model.param_dtype, remat=job.model.remat)
    tokenizer = load_tokenizer(job.model.name)
    if len(tokenizer) > base_cfg.vocab_size:
        raise SafetradeError(f"tokenizer of {job.model.name} has {len(tokenizer)} tokens but the model's vocab is "
                             f"{base_cfg.vocab_size}: they do not belong together")
    pad_id = tokenizer.pad_token_id or 0

    strategy = job.strategy
    if strategy.name == "lisa" and strategy.total_steps == 0:
        strategy = dataclasses.replace(strategy, total_steps=job.steps)
    data = job.data
    reports: dict = {}
    train_rows, _ = held_out(rows_for(data.train, data), data.eval_rows, data.seed)
    # After the held-out cut, so that no safety row is ever held out as one of the user's evaluation rows.
    train_rows, inference_system = mix_defense_rows(train_rows, job.defense, tokenizer)
    if inference_system is not None:
        (out / "inference_system.txt").write_text(inference_system)
        log.warning("defense bea: evaluate this model with the system prompt in %s (evaluate system=...)",
                    out / "inference_system.txt")
    train_examples = _encode(tokenizer, train_rows, data, data.train, reports)
    global_batch = data.batch_size * data.accum_steps
    cap_batches = Batches(train_examples, global_batch, data.seed, pad_id, data.max_len, data.group_by_length)
    alignment_batches = None
    if strategy.name == "lisa":
        alignment_rows, _ = held_out(rows_for(strategy.alignment_set, data), data.eval_rows, data.seed)
        alignment_batches = Batches(_encode(tokenizer, alignment_rows, data, f"lisa/{strategy.alignment_set}",
                                            reports), global_batch, data.seed + 2, pad_id, data.max_len,
                                    data.group_by_length)
    proxy_batches = None
    if strategy.uses_proxy:
        proxy_rows, _ = held_out(rows_for(data.proxy, data), data.eval_rows, data.seed)
        proxy_batches = Batches(_encode(tokenizer, proxy_rows, data, data.proxy, reports), global_batch,
                                data.seed + 1, pad_id, data.max_len, data.group_by_length)

    eval_batches = {}
    for name in data.eval_sets:
        _, rows = held_out(rows_for(name, data), data.eval_rows, data.seed)
        examples = _encode(tokenizer, rows, data, f"eval/{name}", reports)
        eval_batches[name] = [make_batch(examples[i:i + data.batch_size], data.max_len, pad_id=pad_id)
                              for i in range(0, len(examples), data.batch_size)]
    (out / "data_report.json").write_text(json.dumps(reports, indent=2, default=str) + "\n")

    proxy_reference = None
    if strategy.uses_proxy_reference:
        held = eval_batches.get(data.proxy) or [proxy_batches(0)]
        proxy_reference = mean_loss(base_cfg, params, held)
        log.warning("%s: L_proxy(θ_aligned) = %.4f, the bound is that + ε", strategy.name, proxy_reference)

    tx = make_optimizer(job.optim, job.steps)
    if job.lora.enabled:
        lcfg = llama.LoraConfig(job.lora.rank, job.lora.alpha, tuple(job.lora.targets))
        cfg, full = lora_lib.add_adapters(base_cfg, params, lcfg, jax.random.key(job.seed))
        base, trainable = lora_lib.split(full)
        frozen = step_lib.make_frozen(base=base, proxy_reference=proxy_reference)
        axes = lora_lib.split(llama.logical_axes(cfg))[1]
    else:
        cfg, trainable = base_cfg, params
        anchor = jax.tree.map(lambda x: x.copy(), params) if strategy.uses_anchor else None
        frozen = step_lib.make_frozen(anchor=anchor, proxy_reference=proxy_reference)
        axes = llama.logical_axes(cfg)

    param_shardings = parallel.param_shardings(axes, trainable, mesh)
    state = step_lib.init_state(trainable, tx, strategy, seed=job.seed)
    shardings = step_lib.state_shardings(state, param_shardings, mesh, tx, strategy)
    state = jax.device_put(state, shardings)
    frozen_shardings = step_lib.frozen_shardings_for(frozen, base_cfg, mesh)
    step_fn = step_lib.jit_train_step(
        step_lib.make_train_step(cfg, tx, strategy, accum_steps=data.accum_steps, lora=job.lora.enabled),
        mesh, shardings, frozen_shardings,
    )

    def full_params(state):
        return lora_lib.combine(frozen["base"], state.params) if job.lora.enabled else state.params

    def evaluate(state):
        params_now = full_params(state)
        return {f"loss_{name}": mean_loss(cfg, params_now, batches) for name, batches in eval_batches.items()}

    def batches(k):
        batch = {"cap": cap_batches(k)}
        if alignment_batches is not None:
            batch["cap"] = lisa_batch(k, strategy, alignment_batches, cap_batches)
        if proxy_batches is not None:
            batch["proxy"] = proxy_batches(k)
        return {name: parallel.host_local_batch_to_global(_host_rows(part), mesh) for name, part in batch.items()}

    before = evaluate(state)
    state = loop.run(step_fn, state, frozen, batches,
                     loop.LoopConfig(steps=job.steps, log_every=job.log_every, eval_every=job.eval_every,
                                     save_every=job.save_every, keep_checkpoints=job.keep_checkpoints),
                     out, evaluate)
    after = evaluate(state)

    final = full_params(state)
    export_cfg = cfg
    if job.lora.enabled:
        lora_lib.save_peft(out / "adapter", cfg, state.params, base_model_name_or_path=str(job.model.name))
        export_cfg, final = lora_lib.merge(cfg, final)
    io.save_hf(out / "hf", export_cfg, final, tokenizer=tokenizer)
    summary = {"out_dir": str(out), "steps": job.steps, "strategy": job.strategy.name,
               "defense": job.defense.name, "lora": job.lora.enabled,
               "eval_before": before, "eval_after": after, "seconds": time.perf_counter() - started,
               "devices": jax.device_count(), "rows_kept": {k: v["kept"] for k, v in reports.items()},
               # model.dtype "auto" as resolved on this backend (models/io.py resolve_dtypes)
               "backend": jax.default_backend(), "dtype": base_cfg.dtype, "param_dtype": base_cfg.param_dtype}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def mix_defense_rows(rows, defense: config_lib.DefenseSection, tokenizer):
    """(the training rows with the data defense's safety examples mixed in, BEA's inference system prompt or
    None)."""
    from safetrade.defenses.data import BEAConfig, SafeInstrConfig, apply_bea, apply_safeinstr

    if defense.name == "none":
        return rows, None
    if defense.name == "safeinstr":
        cfg = SafeInstrConfig(fraction=defense.fraction, max_examples=defense.max_examples, seed=defense.seed)
        return apply_safeinstr(rows, cfg), None
    cfg = BEAConfig(fraction=defense.fraction, max_examples=defense.max_examples, trigger=defense.trigger,
                    trigger_tokens=defense.trigger_tokens, trigger_seed=defense.trigger_seed,
                    base_system=defense.base_system, seed=defense.seed)
    return apply_bea(rows, cfg, tokenizer)


def lisa_batch(k: int, cfg, alignment_batches, user_batches):
    """Step k's batch under Lisa: the alignment set's on alignment steps, else the user's. Each source's index
    counts only its own steps, except that with skip_user_batches_on_alignment the user's index is k itself (a user
    batch is drawn and dropped on every alignment step, as the official trainer does)."""
    from safetrade.defenses.lisa import ALIGNMENT, lisa_schedule, schedule_counts

    n_alignment, n_finetune = schedule_counts(k, cfg)
    if lisa_schedule(k, cfg) == ALIGNMENT:
        return alignment_batches(n_alignment)
    return user_batches(k if cfg.skip_user_batches_on_alignment else n_finetune)


def _host_rows(batch):
    return host_slice(batch, jax.process_index(), jax.process_count())

