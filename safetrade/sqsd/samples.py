"""Examples to score: ids, flags and fixed-shape batches; and the per-sample result, `SampleScores`.

Two kinds of examples, one interface (`Samples.batches(batch_size)` yields (indices, batch)):

  * `array_samples(tree)`: any pytree whose leaves share a leading axis of N rows (e.g. `(x, y)`); the batch is
    the same pytree with batch_size rows (the last batch repeats a row to keep one shape; its extra results are
    dropped), so a loss_fn sees one row at a time under vmap.
  * `token_samples(rows)`: token rows of varying length (dicts with input_ids and loss_mask, as
    data.formatting.encode_rows makes): rows over max_len are cut (flag "truncated"), rows without tokens or without
    response tokens are flagged ("empty", "no_targets") and score NaN, and batches are right-padded dicts
    {input_ids, attention_mask, loss_mask} of a bucket length, similar lengths together, so a jitted step compiles
    once per bucket.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from safetrade.data.batching import bucket_for, bucket_lengths, make_batch
from safetrade.sqsd.directions import SQSDError

__all__ = ["DEFAULT_MAX_LEN", "FLAGS", "INVALID_FLAGS", "SampleScores", "Samples", "array_samples", "as_samples",
           "only_first_targets", "token_samples"]

# Per-sample flags. The invalid ones make the score NaN; "truncated" is informational (the sample is scored on
# its first max_len tokens).
FLAGS = ("empty", "no_targets", "non_finite", "truncated")
INVALID_FLAGS = ("empty", "no_targets", "non_finite")
DEFAULT_MAX_LEN = 1024  # the official scripts' cutoff


@dataclasses.dataclass
class SampleScores:
    """Scores of N samples in input order. `score` is NaN exactly where a flag in INVALID_FLAGS is set.

    `components` holds the method's parts (SQSD: p_danger, p_safe); `flags[i]` the sample's flags (FLAGS);
    `n_truncated` how many samples were scored on their first max_len tokens only.
    """

    method: str
    ids: list[str]
    score: np.ndarray
    components: dict[str, np.ndarray]
    flags: list[tuple[str, ...]]
    n_truncated: int = 0

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.score)

    @property
    def p_danger(self) -> np.ndarray:
        return self.components["p_danger"]

    @property
    def p_safe(self) -> np.ndarray:
        return self.components["p_safe"]

    def summary(self) -> str:
        counts = {f: sum(f in fl for fl in self.flags) for f in FLAGS}
        parts = [f"{n} {f}" for f, n in counts.items() if n]
        return (f"{self.method}: {int(self.valid.sum())} of {len(self.ids)} samples scored"
                + (f" ({', '.join(parts)})" if parts else ""))


@dataclasses.dataclass
class Samples(abc.ABC):
    """Examples ready to batch. `lengths`: response tokens per sample (token rows), None for array rows."""

    ids: list[str]
    flags: list[list[str]]
    lengths: np.ndarray | None
    n_truncated: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def invalid(self) -> np.ndarray:
        return np.array([any(f in INVALID_FLAGS for f in fl) for fl in self.flags], bool)

    @abc.abstractmethod
    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, Any]]:
        """(indices into the samples, batch) pairs covering every sample once; every batch has batch_size rows."""

    def finish(self, method: str, score, components: Mapping[str, np.ndarray]) -> SampleScores:
        """NaN out invalid samples (never a silent 0) and flag non-finite results."""
        score = np.asarray(score, np.float64).copy()
        components = {k: np.asarray(v, np.float64).copy() for k, v in components.items()}
        invalid = self.invalid
        flags = [list(f) for f in self.flags]
        for i in np.flatnonzero(~invalid & ~np.isfinite(score)):
            flags[i].append("non_finite")
        invalid = invalid | ~np.isfinite(score)
        score[invalid] = np.nan
        for value in components.values():
            value[invalid] = np.nan
        return SampleScores(method, self.ids, score, components, [tuple(f) for f in flags], self.n_truncated)

    def require_valid(self, what: str) -> None:
        """SQSDError unless there are samples and all can be scored (anchors of a baseline)."""
        if not len(self):
            raise SQSDError(f"{what}: no anchor samples")
        bad = [sample_id for sample_id, invalid in zip(self.ids, self.invalid) if invalid]
        if bad:
            raise SQSDError(f"{what}: anchor(s) without response tokens: {', '.join(bad[:5])}")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise SQSDError(f"batch_size must be >= 1, got {batch_size}")


@dataclasses.dataclass
class ArraySamples(Samples):
    rows: Any = None  # the pytree, leaves as numpy [N, ...]

    def batches(self, batch_size: int):
        _check_batch_size(batch_size)
        n = len(self)
        for start in range(0, n, batch_size):
            chosen = np.arange(start, min(start + batch_size, n))
            index = np.r_[chosen, np.full(batch_size - len(chosen), chosen[-1])]
            yield chosen, jax.tree.map(lambda x: x[index], self.rows)


def array_samples(tree, ids: Sequence[str] | None = None) -> ArraySamples:
    """Rows of a pytree with a common leading axis (N samples); ids default to "#0", "#1", ..."""
    rows = jax.tree.map(np.asarray, tree)
    leaves = jax.tree.leaves(rows)
    if not leaves:
        raise SQSDError("array examples hold no arrays")
    sizes = {x.shape[0] if x.ndim else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise SQSDError(f"array examples need one leading row axis shared by every leaf, got leading sizes "
                        f"{sorted(sizes, key=str)}")
    n = sizes.pop()
    ids = [f"#{i}" for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise SQSDError(f"{len(ids)} ids for {n} examples")
    return ArraySamples(ids, [[] for _ in range(n)], None, 0, rows)


@dataclasses.dataclass
class TokenSamples(Samples):
    rows: list[dict] = dataclasses.field(default_factory=list)  # input_ids / loss_mask, cut to max_len
    max_len: int | None = DEFAULT_MAX_LEN

    def batches(self, batch_size: int):
        _check_batch_size(batch_size)
        lengths = np.array([len(e["input_ids"]) for e in self.rows], np.int64)
        longest = int(lengths.max(initial=1))
        cap = max(self.max_len or longest, 2)
        buckets = bucket_lengths(cap, min_len=min(64, cap))
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            length = bucket_for(max(int(lengths[chosen].max()), 1), buckets)
            yield chosen, make_batch([self.rows[i] for i in chosen], length, batch_size)


def token_samples(examples: Sequence[Mapping], max_len: int | None = DEFAULT_MAX_LEN,
                  eos_id: int | None = None) -> TokenSamples:
    """Token rows cut to max_len (as the official tokenizer call does), with what cannot be scored flagged.

    With `eos_id`, a sample whose last target token is not eos also counts as truncated: that is how
    formatting.encode_rows(policy="truncate") leaves the rows it cut.
    """
    if max_len is not None and max_len < 2:
        raise SQSDError(f"max_len must be >= 2 (a target needs a preceding token), got {max_len}")
    out = TokenSamples([], [], np.zeros(len(examples), np.int64), 0, [], max_len)
    for i, example in enumerate(examples):
        ids = np.asarray(example["input_ids"], np.int32).reshape(-1)
        mask = np.asarray(example["loss_mask"], np.float32).reshape(-1)
        if ids.shape != mask.shape:
            raise SQSDError(f"sample {example.get('id', i)}: input_ids and loss_mask lengths differ "
                            f"({ids.size} vs {mask.size})")
        flags = []
        if max_len is not None and ids.size > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
            flags.append("truncated")
        elif eos_id is not None and mask.size and mask[-1] > 0 and ids[-1] != eos_id:
            flags.append("truncated")
        targets = int(np.count_nonzero(mask[1:]))
        if ids.size == 0:
            flags.append("empty")
        elif targets == 0:
            flags.append("no_targets")
        out.rows.append({"input_ids": ids, "loss_mask": mask})
        out.ids.append(str(example.get("id", f"#{i}")))
        out.flags.append(flags)
        out.lengths[i] = targets
        out.n_truncated += "truncated" in flags
    return out


def as_samples(examples, max_len: int | None = DEFAULT_MAX_LEN) -> Samples:
    """`examples` as Samples: Samples pass through; a sequence of dicts with input_ids are token rows; anything
    else is a pytree of arrays with a leading row axis."""
    if isinstance(examples, Samples):
        return examples
    if isinstance(examples, Sequence) and all(
            isinstance(e, Mapping) and "input_ids" in e for e in examples):
        return token_samples(examples, max_len)
    return array_samples(examples)


def only_first_targets(examples: Sequence[Mapping], n: int) -> list[dict]:
    """Token rows with only their first n target tokens kept in the loss (He et al.'s harmful-anchor loss)."""
    if n < 1:
        raise SQSDError(f"the number of kept target tokens must be >= 1, got {n}")
    out = []
    for example in examples:
        mask = np.asarray(example["loss_mask"], np.float32).copy()
        targets = np.flatnonzero(mask[1:]) + 1
        mask[targets[n:]] = 0
        out.append({**example, "loss_mask": mask})
    return out
