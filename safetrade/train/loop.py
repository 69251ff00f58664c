"""The training loop: steps, progress, metrics, periodic evaluation, checkpoints, resume, divergence stop.

The loop owns no randomness of its own: the batch for step k is `batches(k)`, a pure function of k, so a run
resumed from step k's checkpoint sees exactly the batches an uninterrupted run would have seen and ends with
bit-identical parameters (CPU, fp32).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
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
    log_every: int = 1
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


def _scalars(metrics) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


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

    `evaluate(state) -> dict` runs every eval_every steps and at the end; its numbers go to metrics.jsonl too.
    With out_dir, every logged record also goes to TensorBoard event files in out_dir/tensorboard when
    tensorboardX is installed (`tensorboard --logdir OUT_DIR/tensorboard`).
    """
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
    try:
        t0, tokens_since = time.perf_counter(), 0.0
        for k in range(start, cfg.steps):
            state, metrics = step_fn(state, batches(k), frozen)
            scalars = _scalars(metrics)  # one host sync per step: divergence is caught at the step it happens
            bad = [name for name, v in scalars.items() if not math.isfinite(v)]
            if bad:
                raise TrainingDiverged(
                    f"step {k + 1}: non-finite {', '.join(bad)} ({scalars}); stopped. The last good checkpoint "
                    f"is step {last_good}" + (f" in {ckpt.directory}" if ckpt else "")
                    + ". Lower the learning rate or enable clipping."
                )
            record = {"step": k + 1, **scalars}
            if "tokens" in scalars:  # real (non-padding) tokens, averaged since start or resume
                tokens_since += scalars["tokens"]
                record["tokens_per_s"] = tokens_since / max(time.perf_counter() - t0, 1e-9)
            is_last = k + 1 == cfg.steps
            if evaluate is not None and (is_last or (cfg.eval_every and (k + 1) % cfg.eval_every == 0)):
                record.update({f"eval/{name}": v for name, v in evaluate(state).items()})
            if metrics_file and ((k + 1) % cfg.log_every == 0 or is_last or any(n.startswith("eval/") for n in record)):
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if board is not None:
                    for name, value in record.items():
                        if name != "step":
                            board.add_scalar(name, value, k + 1)
            bar.set_postfix({n: f"{v:.4g}" for n, v in record.items() if n in ("loss_cap", "loss_proxy", "lam",
                                                                                "distance", "tokens_per_s")})
            bar.update(1)
            if ckpt and (is_last or (cfg.save_every and (k + 1) % cfg.save_every == 0)):
                ckpt.save(k + 1, state)
                last_good = k + 1
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
        if board is not None:
            board.close()
        if ckpt:
            ckpt.close()
    return state
