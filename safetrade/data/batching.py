"""Fixed-shape numpy batches from encoded examples, with per-epoch shuffling and per-host slicing.

A batch is `{"input_ids": int32 [B, T], "attention_mask": int32 [B, T], "loss_mask": float32 [B, T]}`,
right-padded. T is the smallest bucket length that holds the batch's longest example; buckets come
from a small fixed set (powers of two from 64, capped by max_len, plus max_len itself), so a jitted
step compiles at most once per bucket. Pad positions have attention_mask 0 and loss_mask 0.

Order: every epoch is a permutation drawn from `numpy.random.default_rng([seed, epoch])`, so runs with
the same seed see the same batches, and `iterate_batches(start_step=n)` resumes exactly where step n
left off without replaying the earlier batches. The last partial batch is dropped (`last="drop"`) or
filled with empty rows (`last="pad"`, all masks 0) so that B never changes either.

Multi-host: every process builds the same *global* batch (same examples, seed and epoch), then keeps
its contiguous rows with `host_slice(batch, jax.process_index(), jax.process_count())`. The bucket
length is chosen from the global batch, so every host has the same T. The trainer assembles the
global array with `jax.make_array_from_process_local_data(sharding, local_rows)`.

Packing several examples into one row is not implemented: bucketing keeps the padding waste modest for
the short chat examples used here, and packing would need per-example attention (segment ids).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from safetrade.data.rows import DataError

__all__ = ["LAST_POLICIES", "bucket_for", "bucket_lengths", "epoch_batches", "host_slice", "iterate_batches",
           "make_batch", "num_batches"]

Batch = dict[str, np.ndarray]
LAST_POLICIES = ("drop", "pad")


def bucket_lengths(max_len: int, min_len: int = 64) -> tuple[int, ...]:
    """Powers of two from `min_len` below `max_len`, then `max_len`: e.g. 300 -> (64, 128, 256, 300)."""
    if max_len < 1 or min_len < 1:
        raise DataError(f"bucket lengths need max_len >= 1 and min_len >= 1, got {max_len}, {min_len}")
    lengths, length = [], min_len
    while length < max_len:
        lengths.append(length)
        length *= 2
    return (*lengths, max_len)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= length."""
    for bucket in buckets:
        if bucket >= length:
            return bucket
    raise DataError(f"an example of {length} tokens is longer than the largest bucket {buckets[-1]}; "
                    "encode with that max_len so over-long rows are dropped or truncated first")


def make_batch(examples: list[dict], length: int, batch_size: int | None = None, pad_id: int = 0) -> Batch:
    """Right-pad `examples` to `length`; with `batch_size`, add empty rows up to it."""
    rows = batch_size if batch_size is not None else len(examples)
    if len(examples) > rows:
        raise DataError(f"{len(examples)} examples do not fit a batch of {rows}")
    input_ids = np.full((rows, length), pad_id, np.int32)
    attention = np.zeros((rows, length), np.int32)
    loss = np.zeros((rows, length), np.float32)
    for i, example in enumerate(examples):
        n = len(example["input_ids"])
        if n > length:
            raise DataError(f"example {example.get('id', i)} has {n} tokens, the batch length is {length}")
        input_ids[i, :n] = example["input_ids"]
        attention[i, :n] = 1
        loss[i, :n] = example["loss_mask"]
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss}


def num_batches(n_examples: int, batch_size: int, last: str = "drop") -> int:
    """Batches per epoch."""
    _check(batch_size, last)
    return n_examples // batch_size if last == "drop" else -(-n_examples // batch_size)


def epoch_batches(examples: list[dict], batch_size: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = True,
                  buckets: tuple[int, ...] | None = None, last: str = "drop", pad_id: int = 0,
                  start: int = 0, group_by_length: bool = False) -> Iterator[Batch]:
    """The batches of one epoch, from batch index `start` on (see module doc).

    `group_by_length`: rows of similar length share a batch (less padding; short refusals are not padded to a
    long worked answer's bucket), and the batches themselves come in shuffled order.
    """
    _check(batch_size, last)
    buckets = buckets or bucket_lengths(max(len(e["input_ids"]) for e in examples) if examples else 1)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(examples)) if shuffle else np.arange(len(examples))
    if group_by_length:
        order = _grouped_by_length(order, examples, batch_size, rng)
    for b in range(start, num_batches(len(examples), batch_size, last)):
        chosen = [examples[i] for i in order[b * batch_size:(b + 1) * batch_size]]
        length = bucket_for(max(len(e["input_ids"]) for e in chosen), buckets)
        yield make_batch(chosen, length, batch_size, pad_id)


def iterate_batches(examples: list[dict], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                    repeat: bool = False, buckets: tuple[int, ...] | None = None, last: str = "drop",
                    pad_id: int = 0, start_step: int = 0) -> Iterator[Batch]:
    """Batches over one epoch, or forever with `repeat=True` (a new order each epoch).

    `start_step` skips that many batches (across epochs) without building them: resume after step n
    with `start_step=n`.
    """
    per_epoch = num_batches(len(examples), batch_size, last)
    if per_epoch == 0:
        raise DataError(f"{len(examples)} examples make no full batch of {batch_size} (last={last!r}); "
                        "use last='pad' or a smaller batch")
    epoch, start = divmod(start_step, per_epoch)
    if not repeat and epoch > 0:  # one epoch only, and it is already past
        return
    while True:
        yield from epoch_batches(examples, batch_size, epoch=epoch, seed=seed, shuffle=shuffle, buckets=buckets,
                                 last=last, pad_id=pad_id, start=start)
        if not repeat:
            return
        epoch, start = epoch + 1, 0


def _grouped_by_length(order: np.ndarray, examples: list[dict], batch_size: int, rng, window: int = 32):
    """Sort the shuffled order by length inside windows of `window` batches, then shuffle whole batches."""
    chunk = batch_size * window
    lengths = np.asarray([len(e["input_ids"]) for e in examples])
    pieces = [seg[np.argsort(lengths[seg], kind="stable")] for seg in np.split(order, range(chunk, len(order), chunk))]
    grouped = np.concatenate(pieces) if pieces else order
    n_full = len(grouped) // batch_size
    batches = grouped[: n_full * batch_size].reshape(n_full, batch_size)[rng.permutation(n_full)]
    return np.concatenate([batches.reshape(-1), grouped[n_full * batch_size:]])


def host_slice(batch: Batch, process_index: int, process_count: int) -> Batch:
    """This host's contiguous block of rows of a global batch (rows i*B/P .. (i+1)*B/P)."""
    rows = len(next(iter(batch.values())))
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in range for process_count {process_count}")
    if rows % process_count:
        raise DataError(f"global batch of {rows} rows does not split evenly over {process_count} processes")
    per_host = rows // process_count
    return {name: value[process_index * per_host:(process_index + 1) * per_host] for name, value in batch.items()}


def _check(batch_size: int, last: str) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if last not in LAST_POLICIES:
        raise DataError(f"unknown last-batch policy {last!r}; choose one of {', '.join(LAST_POLICIES)}")
