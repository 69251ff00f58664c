"""`safetrade sqsd` as a function: score a pool of rows with SQSD or a baseline, rank, window, write JSONL.

    job = SQSDJob(model="runs/align/hf", initial="runs/sqsd/initial/adapter", danger=..., safety=..., pool="capability")
    rows, scores, windows = run_sqsd_job(job)

The pool is any built set, registered dataset or file with responses (rows without a response are left out);
samples are encoded with the model's chat template, over-long ones truncated (and flagged by the scorer). The
baselines "representation" and "gradient" (He et al. 2024) anchor on 10 harmful Q+A pairs of the attack set and,
for gradient matching, on the same 10 prompts answered with two independently drawn project refusals.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from safetrade.errors import SafetradeError

METHODS = ("sqsd", "random", "representation", "gradient", "self_inf")


@dataclasses.dataclass(frozen=True)
class SQSDJob:
    model: str = "smollm2-135m-instruct"
    method: str = "sqsd"
    initial: str | None = None  # PEFT adapter dirs on `model` (sqsd only)
    danger: str | None = None
    safety: str | None = None
    safety_scale: float = 1.0
    metric: str = "cosine"
    pool: str = "capability"
    n: int | None = None
    max_len: int = 1024
    batch_size: int = 8
    windows: int = 5
    seed: int = 0
    out: str | None = "runs/sqsd/scores.jsonl"


def pool_rows(pool: str, n: int | None, seed: int) -> list[dict]:
    from safetrade.config import DataSection
    from safetrade.data import take
    from safetrade.data.sets import rows_for

    rows = [r for r in rows_for(pool, DataSection(seed=seed)) if r.get("response")]
    return take(rows, n, seed) if n else rows


def anchor_sets(tokenizer, seed: int, max_len: int):
    """(10 harmful Q+A anchors, [two refusal anchor sets on the same prompts]) as encoded examples."""
    from safetrade.config import DataSection
    from safetrade.data import encode_rows, take
    from safetrade.data.alignment import with_refusals
    from safetrade.data.sets import rows_for

    harmful = take(rows_for("attack", DataSection(seed=seed)), 10, seed)
    encode = functools.partial(encode_rows, tokenizer, max_len=max_len, policy="truncate")
    anchors = encode(harmful, dataset="harmful anchors")[0]
    refusals = [encode(with_refusals(harmful, f"anchor-{k}", "attack"), dataset=f"refusal anchors {k}")[0]
                for k in range(2)]
    return anchors, refusals


def run_sqsd_job(job: SQSDJob, *, model=None, rows: list[dict] | None = None):
    """(rows, SampleScores, windows); writes job.out when set. `model=(cfg, params, tokenizer)` skips loading."""
    from safetrade import sqsd
    from safetrade.data import encode_rows
    from safetrade.models import io, lora
    from safetrade.tokenizer import load_tokenizer

    if job.method not in METHODS:
        raise SafetradeError(f"unknown method {job.method!r}; choose from {', '.join(METHODS)}")
    if model is None:
        cfg, base = io.load_model(job.model)
        tok = load_tokenizer(job.model)
    else:
        cfg, base, tok = model
    rows = pool_rows(job.pool, job.n, job.seed) if rows is None else rows
    examples, _ = encode_rows(tok, rows, max_len=job.max_len, policy="truncate", dataset=job.pool)
    common = dict(batch_size=job.batch_size, max_len=job.max_len)
    if job.method == "sqsd":
        missing = [n for n in ("initial", "danger", "safety") if getattr(job, n) is None]
        if missing:
            raise SafetradeError(f"sqsd needs {', '.join('--' + n for n in missing)} (PEFT adapter directories)")
        states = [lora.load_peft(getattr(job, n), cfg, base) for n in ("initial", "danger", "safety")]
        danger, safety = sqsd.sqsd_probes(*states, safety_scale=job.safety_scale)
        scores = sqsd.score_samples(examples, danger, safety, metric=job.metric, eos_id=tok.eos_token_id, **common)
    elif job.method == "random":
        scores = sqsd.random_scores(examples, seed=job.seed, max_len=job.max_len)
    else:
        anchors, refusals = anchor_sets(tok, job.seed, job.max_len)
        scorer = {"representation": functools.partial(sqsd.representation_scores, harmful_anchors=anchors),
                  "gradient": functools.partial(sqsd.gradient_matching_scores, harmful_anchors=anchors,
                                                refusal_anchor_sets=refusals),
                  "self_inf": sqsd.self_influence_scores}[job.method]
        scores = scorer(examples, cfg=cfg, params=base, **common)
    windows = sqsd.rank_windows(scores, n_windows=job.windows)
    if job.out:
        sqsd.write_jsonl(Path(job.out), rows, scores, windows)  # rows encode_rows dropped appear as not_scored
    return rows, scores, windows
