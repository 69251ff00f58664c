"""Chat formatting with response-only loss masks, and the bad-row policy.

`encode_example` renders one (prompt, response) pair through the tokenizer's own chat template and
returns `input_ids` and `loss_mask`. Convention (shared with safetrade.train.losses): `loss_mask[t] == 1`
means token t is a target, predicted from the logits at t - 1. The prompt part -- system turn, user
turn and the generation prompt (`<|im_start|>assistant\\n` in ChatML) -- gets 0; the response tokens and
the end-of-turn token (the tokenizer's eos, `<|im_end|>` for SmolLM2) get 1. Template text after the
end-of-turn token (ChatML's trailing newline) is dropped: it would carry mask 0 anyway.

The split point is found robustly rather than by counting characters: the prompt is rendered with
`add_generation_prompt=True`, the full conversation with the assistant message, and the first must be
a token-for-token prefix of the second (else a `DataError` naming the row: the template or a BPE merge
across the boundary would make the mask wrong).

`encode_rows` applies this to many rows under a policy for bad rows -- missing or empty prompt or
response, text containing a special token (it would forge turn boundaries), or a sequence longer than
`max_len`:
  - "skip" (default): drop them, count them per reason in a `DataReport`, warn with the counts;
  - "error": raise on the first, naming the dataset, row id and reason;
  - "truncate": like "skip", except over-long rows keep the prompt and as much of the response as
    fits (no end-of-turn token then: the model should not learn to stop mid-answer). A row whose
    prompt alone does not fit is still dropped.
Nothing is dropped silently.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from safetrade.data.rows import DataError, Row

__all__ = ["POLICIES", "REASONS", "DataReport", "DataWarning", "encode_example", "encode_rows"]

POLICIES = ("skip", "error", "truncate")
REASONS = ("missing_prompt", "missing_response", "empty_prompt", "empty_response", "special_token", "too_long")
_KEEP_IDS = 5  # offending row ids kept per reason in a report


class DataWarning(UserWarning):
    """Rows were dropped or truncated under the "skip"/"truncate" policy."""


class SequenceTooLong(DataError):
    """An encoded row is longer than max_len."""


@dataclass
class DataReport:
    """What happened to the rows of one dataset: counts per reason and the first few offending ids."""

    dataset: str
    total: int = 0
    kept: int = 0
    truncated: int = 0
    counts: Counter = field(default_factory=Counter)
    first_ids: dict[str, list[str]] = field(default_factory=dict)  # reason -> first offending row ids

    @property
    def examples(self) -> dict[str, list[str]]:
        """Alias of `first_ids` (the name safetrade.train.jobs reads)."""
        return self.first_ids

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, row_id: str) -> None:
        self.counts[reason] += 1
        ids = self.first_ids.setdefault(reason, [])
        if len(ids) < _KEEP_IDS:
            ids.append(row_id)

    def summary(self) -> str:
        parts = [f"{reason}: {n} (e.g. {', '.join(self.first_ids[reason])})"
                 for reason, n in sorted(self.counts.items())]
        text = f"{self.dataset}: kept {self.kept} of {self.total} rows"
        if self.truncated:
            text += f", {self.truncated} truncated to max_len"
        if parts:
            text += f"; dropped {self.dropped}: " + "; ".join(parts)
        return text


def encode_example(tokenizer, prompt: str, response: str, system: str | None = None,
                   max_len: int | None = None, *, truncate: bool = False, row_id: str = "<row>") -> dict:
    """{"input_ids": int32 [T], "loss_mask": int32 [T]} for one pair (see module doc).

    `system=None` keeps the template's default system prompt (SmolLM2 has one). Over `max_len`:
    `SequenceTooLong`, or with `truncate=True` the response is cut (the prompt never is).
    """
    ids, n_prompt = _render(tokenizer, prompt, response, system, row_id)
    if max_len is not None and len(ids) > max_len:
        if not truncate or n_prompt >= max_len:
            raise SequenceTooLong(f"row {row_id}: {len(ids)} tokens ({n_prompt} prompt) > max_len {max_len}")
        ids = ids[:max_len]
    mask = np.zeros(len(ids), np.int32)
    mask[n_prompt:] = 1
    return {"input_ids": np.asarray(ids, np.int32), "loss_mask": mask}


def _render(tokenizer, prompt: str, response: str, system: str | None, row_id: str) -> tuple[list[int], int]:
    """(token ids up to and including the end-of-turn token, number of prompt tokens)."""
    from safetrade.tokenizer import chat_prompt  # imports transformers: only when formatting is used

    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}]
    prompt_text = chat_prompt(tokenizer, messages, add_generation_prompt=True)
    full_text = chat_prompt(tokenizer, [*messages, {"role": "assistant", "content": response}],
                            add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise DataError(f"row {row_id}: the chat template does not render the prompt as a prefix of the "
                        "conversation, so the response cannot be located for the loss mask")
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    full_ids = tokenizer.encode(full_text, add_special_tokens=False)
    n_prompt = len(prompt_ids)
    if full_ids[:n_prompt] != prompt_ids:
        raise DataError(f"row {row_id}: the prompt's tokens are not a prefix of the conversation's tokens "
                        "(a merge across the prompt/response boundary); cannot build the loss mask")
    eos = tokenizer.eos_token_id
    tail = full_ids[n_prompt:]
    if eos is not None and eos in tail:
        tail = tail[: tail.index(eos) + 1]
    elif eos is not None:  # a template that closes the turn without the eos token: add it
        tail = [*tail, eos]
    return prompt_ids + tail, n_prompt


def encode_rows(tokenizer, rows: list[Row], *, max_len: int, policy: str = "skip", system: str | None = None,
                dataset: str = "rows") -> tuple[list[dict], DataReport]:
    """Encoded examples (each also carrying its row "id") for the good rows, and a `DataReport`.

    A row's own "system" (when not None) replaces `system` for that row.
    """
    if policy not in POLICIES:
        raise DataError(f"unknown bad-row policy {policy!r}; choose one of {', '.join(POLICIES)}")
    report = DataReport(dataset)
    specials = [t for t in tokenizer.all_special_tokens if t]
    examples = []
    for row in rows:
        report.total += 1
        row_id = str(row.get("id", f"#{report.total}"))
        reason = _row_problem(row, specials)
        encoded = None
        if reason is None:
            try:
                row_system = row["system"] if row.get("system") is not None else system  # BEA's per-row trigger
                encoded = encode_example(tokenizer, row["prompt"], row["response"], row_system, max_len,
                                         truncate=policy == "truncate", row_id=row_id)
            except SequenceTooLong:
                reason = "too_long"
        if reason is not None:
            if policy == "error":
                raise DataError(f"dataset {dataset}, row {row_id}: {reason.replace('_', ' ')}"
                                + (f" (> max_len {max_len} tokens)" if reason == "too_long" else ""))
            report.add(reason, row_id)
            continue
        if encoded["loss_mask"][-1] and encoded["input_ids"][-1] != tokenizer.eos_token_id:
            report.truncated += 1
        encoded["id"] = row_id
        examples.append(encoded)
        report.kept += 1
    if report.dropped or report.truncated:
        warnings.warn(report.summary(), DataWarning, stacklevel=2)
    return examples, report


def _row_problem(row: Row, specials: list[str]) -> str | None:
    for name in ("prompt", "response"):
        value = row.get(name)
        if value is None:
            return f"missing_{name}"
        if not isinstance(value, str) or not value.strip():
            return f"empty_{name}"
    if any(token in row["prompt"] or token in row["response"] or token in (row.get("system") or "")
           for token in specials):
        return "special_token"
    return None
