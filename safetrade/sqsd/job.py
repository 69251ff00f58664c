"""`safetrade sqsd` as a function: score a pool of rows with SQSD or a baseline, rank, window, write JSONL.

    job = config.load(SQSDJob, None, ["model=runs/align/hf", "initial=runs/sqsd/initial/adapter", "danger=...",
                                      "safety=...", "sqsd.metric=projection"])
    rows, scores, windows = run_sqsd_job(job)

The pool is any built set, registered dataset or file with responses (rows without a response are left out);
samples are encoded with the model's chat template, over-long ones truncated (and flagged by the scorer). The
baselines "representation" and "gradient" (He et al. 2024) anchor on 10 harmful Q+A pairs of the attack set (their
loss on the first 10 response tokens) and, for gradient matching, on the same 10 prompts answered with two
independently drawn project refusals.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from safetrade.config import DataSection
from safetrade.data import encode_rows, take
from safetrade.data.alignment import with_refusals
from safetrade.data.sets import rows_for
from safetrade.errors import SafetradeError
from safetrade.models import io, lora
from safetrade.sqsd.baselines import (gradient_matching_scores, random_scores, representation_scores,
                                      self_influence_scores)
from safetrade.sqsd.io import rank_windows, write_jsonl
from safetrade.sqsd.llama import LlamaFeatures, LlamaLoss, llama_probes
from safetrade.sqsd.samples import SampleScores, only_first_targets, token_samples
from safetrade.sqsd.scores import SQSDConfig, score_probes
from safetrade.tokenizer import load_tokenizer

__all__ = ["METHODS", "SQSDJob", "anchor_sets", "pool_rows", "run_sqsd_job"]

METHODS = ("sqsd", "random", "representation", "gradient", "self_inf")
ADAPTER_FIELDS = ("initial", "danger", "safety")
HARMFUL_PREFIX_TOKENS = 10  # He et al.: the harmful anchors' loss covers their first 10 response tokens
N_ANCHORS = 10


@dataclasses.dataclass(frozen=True)
class SQSDJob:
    model: str = "smollm2-135m-instruct"
    method: str = "sqsd"  # sqsd | random | representation | gradient | self_inf
    initial: str | None = None  # PEFT adapter dirs on `model` (sqsd only)
    danger: str | None = None
    safety: str | None = None
    safety_scale: float = 1.0  # the safety adapter's LoRA scaling override (official: 1.0 or 0.8)
    pool: str = "capability"  # a built set, a registered dataset or a file with prompt/response columns
    n: int | None = None  # score only this many rows of the pool (seeded subset)
    windows: int = 5
    seed: int = 0
    out: str | None = "runs/sqsd/scores.jsonl"
    sqsd: SQSDConfig = SQSDConfig()  # metric, batch_size, max_len (the baselines use the last two)

    def __post_init__(self):
        if self.method not in METHODS:
            raise SafetradeError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")


def pool_rows(pool: str, n: int | None, seed: int) -> list[dict]:
    rows = [r for r in rows_for(pool, DataSection(seed=seed)) if r.get("response")]
    return take(rows, n, seed) if n else rows


def anchor_sets(tokenizer, seed: int, max_len: int):
    """(10 harmful Q+A anchors, [two refusal anchor sets on the same prompts]) as encoded examples."""
    harmful = take(rows_for("attack", DataSection(seed=seed)), N_ANCHORS, seed)
    encode = functools.partial(encode_rows, tokenizer, max_len=max_len, policy="truncate")
    anchors = encode(harmful, dataset="harmful anchors")[0]
    refusals = [encode(with_refusals(harmful, f"anchor-{k}", "attack"), dataset=f"refusal anchors {k}")[0]
                for k in range(2)]
    return anchors, refusals


def _score(job: SQSDJob, cfg, base, tok, examples) -> SampleScores:
    scoring = job.sqsd
    common = dict(batch_size=scoring.batch_size, max_len=scoring.max_len)
    if job.method == "sqsd":
        missing = [n for n in ADAPTER_FIELDS if getattr(job, n) is None]
        if missing:
            raise SafetradeError(f"sqsd needs {', '.join(n + '=DIR' for n in missing)} (PEFT adapter directories)")
        states = [lora.load_peft(getattr(job, n), cfg, base) for n in ADAPTER_FIELDS]
        danger, safety = llama_probes(*states, safety_scale=job.safety_scale)
        return score_probes(token_samples(examples, scoring.max_len, tok.eos_token_id), danger, safety, scoring)
    if job.method == "random":
        return random_scores(examples, seed=job.seed, max_len=scoring.max_len)
    if job.method == "self_inf":
        return self_influence_scores(LlamaLoss(cfg), base, examples, **common)
    anchors, refusals = anchor_sets(tok, job.seed, scoring.max_len)
    if job.method == "representation":
        return representation_scores(LlamaFeatures(cfg), base, examples, anchors, **common)
    return gradient_matching_scores(LlamaLoss(cfg), base, examples, only_first_targets(anchors, HARMFUL_PREFIX_TOKENS),
                                    refusals, **common)


def run_sqsd_job(job: SQSDJob, *, model=None, rows: list[dict] | None = None):
    """(rows, SampleScores, windows); writes job.out when set. `model=(cfg, params, tokenizer)` skips loading."""
    if model is None:
        cfg, base = io.load_model(job.model)
        tok = load_tokenizer(job.model)
    else:
        cfg, base, tok = model
    rows = pool_rows(job.pool, job.n, job.seed) if rows is None else rows
    examples, _ = encode_rows(tok, rows, max_len=job.sqsd.max_len, policy="truncate", dataset=job.pool)
    scores = _score(job, cfg, base, tok, examples)
    windows = rank_windows(scores, n_windows=job.windows)
    if job.out:
        write_jsonl(Path(job.out), rows, scores, windows)  # rows encode_rows dropped appear as not_scored
    return rows, scores, windows
