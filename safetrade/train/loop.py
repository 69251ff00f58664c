"""The training loop: steps, progress, metrics, periodic evaluation, checkpoints, resume, divergence stop.

The loop owns no randomness of its own: the batch for step k is `batches(k)`, a pure function of k, so a run
resumed from step k's checkpoint sees exactly the batches an uninterrupted run would have seen and ends with
bit-identical parameters (CPU, fp32).

Host syncs: the loop dispatches steps without waiting for them. Each step's metrics are added on the device to a
small window (their sums, the real-token count, and the first step whose metrics were not all finite); the host
reads that window through `fetch_to_host` only at log steps (every `log_every`), eval and save steps and the last
step. A non-finite metric is therefore reported with the exact step it first appeared at, at the next of those
syncs, and a save step checks it before writing, so no checkpoint at or after a diverged step is ever written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from safetrade.errors import SafetradeError
from safetrade.train.checkpoint import Checkpoints, abstract_like

log = logging.getLogger(__name__)


class TrainingDiverged(SafetradeError):
    pass


@dataclasses.dataclass
class LoopConfig:
    steps: int
    log_every: int = 1  # also how often the host waits for the device: each log step is one sync
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    progress: bool = True


def _tensorboard(out: Path | None):
    """A tensorboardX writer under out/tensorboard when the package is installed (it is in the dev extra)."""
    if out is None:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        log.info("tensorboardX is not installed: metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def one_ahead(make: Callable[[int], Any], ks: Iterable[int]) -> Iterator[Any]:
    """Yield make(k) for each k in ks, having already called make(k + 1) when make(k) is handed out.

    JAX dispatches a step without waiting for it, so the next batch is assembled on the host and its transfer to
    the device started while the current step runs, and a step never waits for its batch after a host sync. `make`
    must be a pure function of k (it is called in order, one call ahead of its use).
    """
    it = iter(ks)
    try:
        current = make(next(it))
    except StopIteration:
        return
    for k in it:
        upcoming = make(k)
        yield current
        current = upcoming
    yield current


@functools.partial(jax.tree_util.register_dataclass, data_fields=["counters", "values"], meta_fields=["names"])
@dataclasses.dataclass(frozen=True)
class Tracker:
    """The loop's running account of the metrics, kept on the device between host syncs, in two small arrays
    (so a sync is two transfers, whatever the number of metrics):

    counters int32[3]: steps done, steps in the current window, first step whose metrics were not all finite (0:
        none yet); values float32[2, n]: the window's sums of each metric in `names`, and that first non-finite
        step's metrics (for the error message).

    The properties read a host copy (`fetch_to_host(tracker)`).
    """

    counters: Any
    values: Any
    names: tuple[str, ...]

    @property
    def step(self) -> int:
        return int(self.counters[0])

    @property
    def count(self) -> int:
        return int(self.counters[1])

    @property
    def first_bad(self) -> int:
        return int(self.counters[2])

    @property
    def sums(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.names, np.asarray(self.values[0]), strict=True)}

    @property
    def bad_values(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(self.names, np.asarray(self.values[1]), strict=True)}


def fetch_to_host(tracker: Tracker) -> Tracker:
    """The loop's only device -> host copy of training metrics (one call = one sync; tests wrap it to count)."""
    return jax.device_get(tracker)


def _stacked(metrics, names: tuple[str, ...]) -> jax.Array:
    for name in names:
        if jnp.shape(metrics[name]) != ():
            raise SafetradeError(f"train step metric {name!r} has shape {jnp.shape(metrics[name])}: the loop logs "
                                 "scalars only (reduce it in the step)")
    return jnp.stack([jnp.asarray(metrics[name], jnp.float32) for name in names])


def _add_step(tracker: Tracker, values: jax.Array, new_window: bool) -> Tracker:
    step = tracker.counters[0] + 1
    count = 1 if new_window else tracker.counters[1] + 1
    sums = values if new_window else tracker.values[0] + values  # a window of one holds the value itself
    newly_bad = (tracker.counters[2] == 0) & ~jnp.all(jnp.isfinite(values))
    first_bad = jnp.where(newly_bad, step, tracker.counters[2])
    bad_values = jnp.where(newly_bad, values, tracker.values[1])
    return Tracker(jnp.stack([step, jnp.asarray(count, jnp.int32), first_bad]), jnp.stack([sums, bad_values]),
                   tracker.names)


@jax.jit
def _track_first(metrics, steps_before) -> Tracker:
    """The tracker after the first step of a run (or a resume) that starts after `steps_before` steps."""
    names = tuple(sorted(metrics))
    empty = Tracker(jnp.stack([jnp.asarray(steps_before, jnp.int32), jnp.int32(0), jnp.int32(0)]),
                    jnp.zeros((2, len(names)), jnp.float32), names)
    return _add_step(empty, _stacked(metrics, names), new_window=True)


@functools.partial(jax.jit, static_argnames="new_window")
def _track(tracker: Tracker, metrics, new_window: bool) -> Tracker:
    """Add one step's metrics (starting a new window after a record was written); remember the first step at
    which any metric was not finite. Two compiles per metrics structure (new_window True / False)."""
    return _add_step(tracker, _stacked(metrics, tracker.names), new_window)


def _raise_if_diverged(host: Tracker, synced_at: int, last_good: int, ckpt: Checkpoints | None) -> None:
    if not host.first_bad:
        return
    values = host.bad_values
    bad = [name for name, v in values.items() if not math.isfinite(v)]
    raise TrainingDiverged(
        f"step {host.first_bad}: non-finite {', '.join(bad)} ({values}); stopped (seen at step {synced_at}: the "
        f"host checks metrics at log, eval and save steps). The last good checkpoint is step {last_good}"
        + (f" in {ckpt.directory}" if ckpt else "") + ". Lower the learning rate or enable clipping."
    )


def run(
    step_fn: Callable,
    state,
    frozen,
    batches: Callable[[int], Any],
    cfg: LoopConfig,
    out_dir: str | os.PathLike | None = None,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
):
    """Train from `state` (or the newest checkpoint in out_dir/checkpoints) to cfg.steps; return the final state.

    Every log_every steps (and at eval steps and the last step) a record goes to out_dir/metrics.jsonl: each
    metric is its mean over the steps since the previous record (the step's own value when log_every is 1), and
    tokens_per_s is real tokens per second since the start or resume. `evaluate(state) -> dict` runs every
    eval_every steps and at the end; its numbers join that step's record. With out_dir, every record also goes to
    TensorBoard event files in out_dir/tensorboard when tensorboardX is installed
    (`tensorboard --logdir OUT_DIR/tensorboard`). Checkpoints are written in the background (safetrade/train/
    checkpoint.py); a non-finite metric raises TrainingDiverged naming its step and the last good checkpoint.
    """
    if cfg.log_every < 1:
        raise SafetradeError(f"LoopConfig.log_every={cfg.log_every}: must be >= 1 (steps between records)")
    out = Path(out_dir) if out_dir is not None else None
    ckpt = None
    start = 0
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpoints(out / "checkpoints", keep=cfg.keep_checkpoints)
        restored_step, restored = ckpt.restore_latest(abstract_like(state))
        if restored is not None:
            state, start = restored, restored_step
            log.warning("resumed from %s at step %d", ckpt.directory, start)
    metrics_file = open(out / "metrics.jsonl", "a") if out is not None else None  # noqa: SIM115
    board = _tensorboard(out)
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, dynamic_ncols=True, desc="train")
    last_good = start
    tracker, new_window = None, True
    try:
        t0, tokens_since = time.perf_counter(), 0.0
        for k, batch in zip(range(start, cfg.steps), one_ahead(batches, range(start, cfg.steps))):
            state, metrics = step_fn(state, batch, frozen)
            if tracker is None:
                tracker = _track_first(metrics, start)
            else:
                tracker = _track(tracker, metrics, new_window=new_window)
            new_window = False
            bar.update(1)  # counts dispatched steps; needs nothing from the device
            step = k + 1
            is_last = step == cfg.steps
            log_now = is_last or step % cfg.log_every == 0
            eval_now = evaluate is not None and (is_last or bool(cfg.eval_every and step % cfg.eval_every == 0))
            save_now = ckpt is not None and (is_last or bool(cfg.save_every and step % cfg.save_every == 0))
            if not (log_now or eval_now or save_now):
                continue
            host = fetch_to_host(tracker)  # waits for this step: the window's sums and the first bad step
            _raise_if_diverged(host, step, last_good, ckpt)  # before evaluating or saving a diverged state
            if log_now or eval_now:
                sums, count = host.sums, host.count
                record = {"step": step, **{name: total / count for name, total in sums.items()}}
                if "tokens" in sums:  # real (non-padding) tokens, averaged since start or resume
                    tokens_since += sums["tokens"]
                    record["tokens_per_s"] = tokens_since / max(time.perf_counter() - t0, 1e-9)
                if eval_now:
                    record.update({f"eval/{name}": v for name, v in evaluate(state).items()})
                new_window = True
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if board is not None:
                        for name, value in record.items():
                            if name != "step":
                                board.add_scalar(name, value, step)
                bar.set_postfix({n: f"{v:.4g}" for n, v in record.items() if n in ("loss_cap", "loss_proxy", "lam",
                                                                                    "distance", "tokens_per_s")})
            if save_now:
                ckpt.save(step, state)
                last_good = step
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
        if board is not None:
            board.close()
        if ckpt:
            ckpt.close()  # waits for a checkpoint still being written
    return state
