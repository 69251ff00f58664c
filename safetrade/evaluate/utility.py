"""Utility metrics: GSM8K accuracy (generation), response-only loss / perplexity on any rows, ROUGE.

GSM8K answer extraction, in order: the text after the last "####"; after the last "The answer is"; else the
last number in the reply. Numbers are compared after dropping thousands separators, currency signs and a
trailing ".0"/"." (so "$1,200.00" == "1200"). The loss of a row set is the exact token-weighted mean NLL of the
responses (prompt tokens carry no loss) -- the trade-off paper's gaps G_s and G_f are differences of these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from safetrade.data.batching import bucket_for, bucket_lengths, make_batch
from safetrade.data.formatting import encode_rows
from safetrade.errors import EvaluationError
from safetrade.evaluate.generation import chat_replies
from safetrade.generate import SamplingConfig
from safetrade.train.jobs import mean_loss

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_MARKERS = (re.compile(r"####\s*(.*)"), re.compile(r"[Tt]he answer is[:\s]*(.*)"))


def normalise_number(text: str) -> str | None:
    """The first number in `text`, canonicalised ("$1,200.00" -> "1200", "-3.50" -> "-3.5"), or None."""
    match = _NUMBER.search(text)
    if not match:
        return None
    raw = match.group(0).replace(",", "").replace("$", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else f"{value:g}"


def extract_answer(reply: str) -> str | None:
    """The final numeric answer of a GSM8K-style reply (see module doc), canonicalised; None if there is none."""
    for marker in _MARKERS:
        found = list(marker.finditer(reply))
        if found:
            value = normalise_number(found[-1].group(1))
            if value is not None:
                return value
    numbers = _NUMBER.findall(reply)
    return normalise_number(numbers[-1]) if numbers else None


def gsm8k_accuracy(cfg, params, tokenizer, rows: Sequence[dict], *, max_new_tokens: int = 256, batch_size: int = 16,
                   sampling=None, progress: bool = True) -> dict:
    """Accuracy of generated answers against each row's reference ("response": a worked answer ending in
    "#### N" or "The answer is N."). Per-sample records keep the reply and both extracted answers."""

    if not rows:
        raise EvaluationError("GSM8K accuracy of an empty question set")
    sampling = sampling or SamplingConfig(max_new_tokens=max_new_tokens)
    out = chat_replies(cfg, params, tokenizer, [r["prompt"] for r in rows], sampling, batch_size=batch_size,
                       progress=progress, desc="gsm8k")
    samples = []
    for i, row in enumerate(rows):
        reference = extract_answer(row["response"] or "")
        if reference is None:
            raise EvaluationError(f"GSM8K row {row.get('id', i)}: no numeric answer in its reference response")
        reply = out.texts[i]
        predicted = extract_answer(reply) if reply is not None else None
        samples.append({"id": row.get("id", str(i)), "prompt": row["prompt"], "reply": reply, "reference": reference,
                        "predicted": predicted, "correct": predicted == reference, "error": out.errors.get(i)})
    scored = [s["correct"] for s in samples if s["error"] is None]
    return {"accuracy": float(np.mean(scored)) if scored else float("nan"), "n": len(scored),
            "n_errors": len(out.errors), "prompts_per_second": out.prompts_per_second,
            "tokens_per_second": out.tokens_per_second, "samples": samples}


def dataset_loss(cfg, params, tokenizer, rows: Sequence[dict], *, max_len: int = 512, batch_size: int = 8,
                 policy: str = "skip", name: str = "rows") -> dict:
    """Response-only token-mean NLL and perplexity of `rows`; rows dropped by `policy` are counted and named."""

    if not rows:
        raise EvaluationError(f"loss of an empty row set ({name})")
    examples, report = encode_rows(tokenizer, list(rows), max_len=max_len, policy=policy, dataset=name)
    if not examples:
        raise EvaluationError(f"{name}: no usable rows ({report.summary()})")
    buckets = bucket_lengths(max_len)
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))
    pad = tokenizer.pad_token_id or 0
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batches.append(make_batch(chunk, bucket_for(max(len(e["input_ids"]) for e in chunk), buckets), batch_size,
                                  pad_id=pad))
    loss = mean_loss(cfg, params, batches)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(examples),
            "dropped": dict(report.counts), "truncated": report.truncated}


def rouge(predictions: Sequence[str], references: Sequence[str], types=("rouge1", "rouge2", "rougeL")) -> dict:
    """Mean ROUGE F1 (Google's `rouge-score` package, with stemming) of predictions against references."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # pragma: no cover -- rouge-score is in the lock; this guards partial installs
        raise EvaluationError("ROUGE needs the rouge-score package (pip install rouge-score)") from e
    if len(predictions) != len(references) or not predictions:
        raise EvaluationError(f"ROUGE needs equally many predictions and references, got {len(predictions)} and "
                              f"{len(references)}")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {t: float(np.mean([s[t].fmeasure for s in scores])) for t in types}
