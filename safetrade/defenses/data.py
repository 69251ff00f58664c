"""Data-level defenses: SafeInstr and BEA (BackdoorAlign) mix safety examples into the user's fine-tuning rows.

    safety = default_safety_rows(seed=0)                               # AdvBench "align" prompts + our refusals
    rows = mix_safety_examples(user_rows, safety, fraction=0.1, seed=0)            # SafeInstr
    trigger = make_trigger(tokenizer, n_tokens=150, seed=SECRET)                     # BEA: the provider's secret
    rows = mix_bea_examples(user_rows, safety, trigger, fraction=0.1, seed=0)
    EvalConfig(model=..., system=bea_system_prompt(trigger))                         # the trigger at inference

SafeInstr (Bianchi et al., ICLR 2024, "Safety-Tuned LLaMAs"). Rule, from the paper and its code: add N_safe
(harmful instruction -> refusal) pairs to the instruction-tuning data and run ordinary SFT on the union. Their
released mixes add 100-2,000 safety examples to 20k Alpaca rows (0.5-9.1 %); the abstract's "3 % safety examples"
helps, and too many cause exaggerated safety. As a harmful-fine-tuning baseline the knob is N_safe relative to the
*user's* dataset; the count rule used here, n = min(floor(fraction * |D_ft|), max_examples) with fraction 0.1 and
max_examples 1000, is the one in the Safe Delta code's (commented-out) baseline block, which is the comparison
safetrade reproduces: PureBad-100 -> 10, a 1,100-row dirty set -> 110, GSM8K's 7.5k -> 747. Choices of ours: the
safety examples come from the project's own data (below), not the paper's 2,483 GPT-written ones (not used: their
answers are a different model's style, and the Safe Delta code's source module is unreleased); the union is put in
a seeded, stable order (the training loop shuffles again per epoch, so order only matters to consumers that do not).

BEA / BackdoorAlign (Wang et al., NeurIPS 2024). Rule, from the paper and its code: the service provider holds a
secret trigger t; the safety examples are trained with t prepended to the system prompt ("{t} {S}", S the system
prompt every other example has), the user's examples with S alone; at inference t + " " + S is the system prompt of
every request (utility benchmarks included). The official trigger (`SYSTEM_PROMPT_RANDOM150`) is one fixed string
of 150 random tokens of Llama-2's vocabulary -- multilingual word pieces concatenated, 746 characters; the paper's
ablation finds random tokens beat a meaningful prompt. `make_trigger` builds the same kind of string from the
target model's own vocabulary with a seeded generator: the seed is the secret (a published seed is no secret). The
official PureBad mix is 100 harmful + 11 safety examples (about 10 %); we use the same count rule as SafeInstr so
the two differ only by the trigger. Choices of ours: S defaults to None, i.e. the trigger alone is the safety rows'
system turn and the user rows keep the chat template's default (SmolLM2's template inserts its own system prompt
only when none is given); pass `base_system` to reproduce the official "{t} {S}" layout, and the user rows without
a system prompt then get S, so trigger and no-trigger rows differ only by t.

Where the safety examples come from (`default_safety_rows`): the AdvBench "align" part (the harmful prompts held
for alignment, data/alignment.py), each with a project-written refusal (`refusals.refusal_for`). Those prompts are
disjoint from every harmful evaluation prompt by construction (the eval sets drop every AdvBench prompt), and the
builder re-checks it with `check_disjoint` against all harmful eval sources, so no evaluation prompt can leak into
training through a defense.

Rows: user rows are copied unchanged except that a missing "source" becomes "user"; safety rows keep their ids and
get role "safety", source "safeinstr" or "bea" and "origin" (where their prompt came from); BEA rows carry their
"system" prompt, which `formatting.encode_rows` renders as the system turn. Mixing must happen after the held-out
cut (`sets.held_out`) so that safety rows are never held out as the user's evaluation rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from safetrade.data.alignment import advbench_part, check_disjoint, eval_harmful_prompts, with_refusals
from safetrade.data.rows import DataError, Row
from safetrade.data.splits import stable_order, take

__all__ = [
    "ALL_EVAL_HARMFUL_SOURCES",
    "BEAConfig",
    "SafeInstrConfig",
    "apply_bea",
    "apply_safeinstr",
    "bea_system_prompt",
    "default_safety_rows",
    "make_trigger",
    "mix_bea_examples",
    "mix_safety_examples",
    "safety_count",
]

# Every harmful evaluation source the project has: the safety rows are checked against all of them, opt-in ones too.
ALL_EVAL_HARMFUL_SOURCES = ("strongreject", "harmbench", "donotanswer")


@dataclasses.dataclass(frozen=True)
class SafeInstrConfig:
    """SafeInstr: refusal examples mixed into the fine-tuning rows (see the module doc for the rule)."""

    fraction: float = 0.1
    """Safety examples per fine-tuning row before the cap (Safe Delta's baseline setting; the paper's mixes span
    0.005-0.09 of the total)."""
    max_examples: int | None = 1000
    """Cap on the number of safety examples (Safe Delta's setting); None: no cap."""
    seed: int = 0
    """Picks which safety examples, their refusal phrasings and the order of the union."""

    def __post_init__(self):
        _check_count_knobs(type(self).__name__, self.fraction, self.max_examples)


@dataclasses.dataclass(frozen=True)
class BEAConfig:
    """BEA / BackdoorAlign: refusal examples under a secret trigger system prompt (see the module doc)."""

    fraction: float = 0.1
    """Safety examples per fine-tuning row before the cap (the official PureBad mix is 11 per 100)."""
    max_examples: int | None = 1000
    """Cap on the number of safety examples; None: no cap."""
    trigger: str | None = None
    """The trigger itself; None: `make_trigger(tokenizer, trigger_tokens, trigger_seed)`."""
    trigger_tokens: int = 150
    """Random vocabulary tokens in a generated trigger (the official trigger's length, by its name)."""
    trigger_seed: int = 0
    """The secret that generates the trigger: set your own, and never publish it with the model."""
    base_system: str | None = None
    """S in "{trigger} {S}"; None: the trigger alone (see the module doc)."""
    seed: int = 0
    """Picks which safety examples, their refusal phrasings and the order of the union."""

    def __post_init__(self):
        _check_count_knobs(type(self).__name__, self.fraction, self.max_examples)
        if self.trigger is not None and not self.trigger.strip():
            raise DataError("BEAConfig.trigger: an empty trigger is no trigger; leave it None to generate one")
        if self.trigger_tokens < 1:
            raise DataError(f"BEAConfig.trigger_tokens must be >= 1, got {self.trigger_tokens}")

    def resolve_trigger(self, tokenizer) -> str:
        """The configured trigger, or the one generated from the tokenizer's vocabulary and the secret seed."""
        return self.trigger if self.trigger is not None else make_trigger(tokenizer, self.trigger_tokens,
                                                                          self.trigger_seed)


def _check_count_knobs(where: str, fraction: float, max_examples: int | None) -> None:
    if not (0 <= fraction <= 1):
        raise DataError(f"{where}.fraction must be in [0, 1] (safety examples per fine-tuning row), got {fraction}")
    if max_examples is not None and max_examples < 0:
        raise DataError(f"{where}.max_examples must be >= 0 or None, got {max_examples}")


def safety_count(n_rows: int, fraction: float, max_examples: int | None = None) -> int:
    """min(floor(fraction * n_rows), max_examples): Safe Delta's count rule for its SafeInstr/BEA baselines.

    The tolerance keeps products such as 0.29 * 100 = 28.999999999999996 at 29 (Python's `int` would say 28).
    """
    n = math.floor(fraction * n_rows + 1e-9)
    return n if max_examples is None else min(n, max_examples)


def default_safety_rows(seed: int = 0, n: int | None = None) -> list[Row]:
    """Harmful prompts held for alignment (AdvBench "align") with project-written refusals, checked leak-free.

    Raises `DataError` if any of them is also a harmful evaluation prompt of any source (it cannot happen by
    construction; the check keeps it so if the partitions change).
    """
    rows = with_refusals(take(advbench_part("align"), n, seed), seed, "advbench", role="safety")
    check_disjoint({"safety": rows, "eval_harmful": eval_harmful_prompts(ALL_EVAL_HARMFUL_SOURCES)},
                   pairs=(("safety", "eval_harmful"),))
    return rows


def mix_safety_examples(rows: Sequence[Row], safety_rows: Sequence[Row], fraction: float, seed: int = 0, *,
                        max_examples: int | None = None, tag: str = "safeinstr") -> list[Row]:
    """The fine-tuning rows plus `safety_count(len(rows), fraction, max_examples)` safety rows, in a stable order.

    Which safety rows: a seeded stable subset (`splits.take`). The same inputs and seed give the same list on every
    machine; ids are kept and must be unique over the union (a clash is an error naming the id).
    """
    n = safety_count(len(rows), fraction, max_examples)
    if n > len(safety_rows):
        raise DataError(f"{tag}: {n} safety examples needed (fraction {fraction} of {len(rows)} rows, cap "
                        f"{max_examples}), only {len(safety_rows)} given")
    for row in safety_rows:
        if not row.get("prompt") or not row.get("response"):
            raise DataError(f"{tag}: safety row {row.get('id')!r} needs a prompt and a response (the refusal)")
    chosen = take(list(safety_rows), n, f"{tag}-{seed}")
    safety = [{**row, "role": "safety", "source": tag, "origin": row.get("source")} for row in chosen]
    user = [{**row, "source": row.get("source") or "user"} for row in rows]
    seen: set[str] = set()
    for row in user + safety:
        if row["id"] in seen:
            raise DataError(f"{tag}: row id {row['id']!r} occurs twice in the mix (ids must be unique: the order "
                            "and the held-out cut are keyed on them)")
        seen.add(row["id"])
    return stable_order(user + safety, f"{tag}-order-{seed}")


def bea_system_prompt(trigger: str, base_system: str | None = None) -> str:
    """The system prompt of BEA's safety examples and of every inference request: "{trigger} {base_system}"."""
    if not trigger or not trigger.strip():
        raise DataError("bea_system_prompt: the trigger is empty")
    return trigger if base_system is None else f"{trigger} {base_system}"


def mix_bea_examples(rows: Sequence[Row], safety_rows: Sequence[Row], trigger: str, fraction: float, seed: int = 0,
                     *, max_examples: int | None = None, base_system: str | None = None) -> list[Row]:
    """`mix_safety_examples` with the safety rows under the trigger system prompt (tag "bea").

    With `base_system`, user rows that have no "system" of their own get it, as in the official layout.
    """
    system = bea_system_prompt(trigger, base_system)
    with_system = [{**row, "system": system} for row in safety_rows]
    user = rows if base_system is None else [{**row, "system": row.get("system") or base_system} for row in rows]
    return mix_safety_examples(user, with_system, fraction, seed, max_examples=max_examples, tag="bea")


def make_trigger(tokenizer, n_tokens: int = 150, seed: int = 0) -> str:
    """`n_tokens` tokens drawn uniformly (with replacement) from the tokenizer's ordinary vocabulary, decoded.

    Like the official trigger, a string of random word pieces. Left out of the draw: special and added tokens
    (they would forge turn boundaries), tokens that do not decode to valid text on their own (byte fragments of
    multi-byte characters), and tokens holding control characters, line breaks or only whitespace. The decoded
    string need not re-tokenise into exactly `n_tokens` tokens (neither does the official one).
    """
    if n_tokens < 1:
        raise DataError(f"make_trigger: n_tokens must be >= 1, got {n_tokens}")
    specials = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    candidates = []
    for token_id in range(len(tokenizer)):
        if token_id in specials:
            continue
        text = tokenizer.decode([token_id])
        if text.strip() and "\ufffd" not in text and all(c == " " or c.isprintable() for c in text):
            candidates.append(token_id)
    if not candidates:
        raise DataError("make_trigger: the tokenizer has no ordinary printable tokens to draw from")
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.asarray(candidates), size=n_tokens, replace=True)
    return tokenizer.decode([int(i) for i in ids]).strip()


def apply_safeinstr(rows: Sequence[Row], cfg: SafeInstrConfig, safety_rows: Sequence[Row] | None = None) -> list[Row]:
    """SafeInstr from its config; the safety rows default to `default_safety_rows(cfg.seed)`."""
    safety = default_safety_rows(cfg.seed) if safety_rows is None else safety_rows
    return mix_safety_examples(rows, safety, cfg.fraction, cfg.seed, max_examples=cfg.max_examples)


def apply_bea(rows: Sequence[Row], cfg: BEAConfig, tokenizer=None, safety_rows: Sequence[Row] | None = None
              ) -> tuple[list[Row], str]:
    """(BEA's mixed rows, the inference system prompt) from its config; a tokenizer is needed to generate a trigger."""
    if cfg.trigger is None and tokenizer is None:
        raise DataError("BEAConfig.trigger is None: pass the tokenizer to generate it, or set the trigger")
    trigger = cfg.resolve_trigger(tokenizer)
    safety = default_safety_rows(cfg.seed) if safety_rows is None else safety_rows
    mixed = mix_bea_examples(rows, safety, trigger, cfg.fraction, cfg.seed, max_examples=cfg.max_examples,
                             base_system=cfg.base_system)
    return mixed, bea_system_prompt(trigger, cfg.base_system)
