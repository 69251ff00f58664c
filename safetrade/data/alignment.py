"""The data sets of a safety experiment, built from the registry with guaranteed disjointness.

Sets (each a list of rows with "role" and "source" tags):
  - alignment set: AdvBench "align" prompts paired with project-written refusals (`refusals.py`), mixed
    with benign instruction data -- GSM8K "align" questions with worked answers and filtered ShareGPT
    "align" pairs -- at `benign_ratio` benign rows per refusal row;
  - proxy safety set (Case I): AdvBench "proxy" prompts + refusals, never in the alignment set;
  - capability set: GSM8K "capability" questions with worked answers (benign fine-tuning);
  - attack set: N (default 100) harmful question + harmful answer pairs from pyrit's 400, those
    pyrit's judge labelled harmful, from the HarmBench "attack" part;
  - held-out harmful eval prompts: StrongREJECT and the HarmBench standard behaviours of the "eval"
    part (optionally DoNotAnswer), minus every prompt of AdvBench and of the attack pool;
  - held-out benign eval prompts (over-refusal, benign loss): GSM8K "eval" + ShareGPT "eval".

Partitions. Each source is cut once into named parts by `splits.split`, keyed by the normalised prompt
(so duplicate prompts never straddle parts) and seeded by the fixed `PARTITION_SEED`, not by the
experiment seed: every run evaluates on the same held-out prompts. The experiment `seed` only picks
refusal phrasings, subsets and order.
  AdvBench:  align 0.8 / proxy 0.2
  GSM8K:     align 0.3 / capability 0.5 / eval 0.2  (the 1319-row test file is the only GSM8K offline)
  ShareGPT:  align 0.8 / eval 0.2  (after filtering)
  HarmBench behaviours (= pyrit's Q+A questions): attack 0.6 / eval 0.4

Guarantees (tested; `check_disjoint` re-checks them on every `build_safety_data`): no prompt, compared
case- and whitespace-insensitively, is shared between
  - the alignment set and any eval set (harmful or benign), the proxy set, or the capability set;
  - the proxy set and the harmful eval set; the attack set and the harmful eval set;
  - the capability set and the benign eval set.
Train and eval harmful sources are disjoint by construction: align and proxy use AdvBench only, the
eval sets use other sources and drop the 25 StrongREJECT prompts that are also AdvBench prompts.
AdvBench contains many near-paraphrases, so proxy prompts are close to alignment prompts (as a proxy
safety set should be); only exact duplicates are excluded.

Benign data cleaning: GSM8K answers lose the `<<48/2=24>>` calculator annotations and end with
"The answer is N." instead of "#### N". ShareGPT rows are the first human->gpt exchange of a
conversation, kept when both sides look English (ASCII letters + common English words), the prompt
is at most 800 characters, the answer 20-1200 characters, and the answer contains no refusal or
"as an AI" phrasing (so benign data never teaches refusing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from safetrade.data.refusals import refusal_for
from safetrade.data.registry import HARMBENCH_CONTEXT_SEPARATOR as _CONTEXT_SEPARATOR, load_dataset
from safetrade.data.rephrase import as_request, rephrase
from safetrade.data.rows import DataError, Row, normalise_prompt
from safetrade.data.splits import length_matched_take, split, stable_order, take, unit_hash

__all__ = [
    "ADVBENCH_PARTS",
    "EVAL_HARMFUL_SOURCES",
    "GSM8K_PARTS",
    "HARMBENCH_PARTS",
    "PARTITION_SEED",
    "SHAREGPT_MAX_PROMPT_CHARS",
    "SHAREGPT_MAX_RESPONSE_CHARS",
    "SHAREGPT_PARTS",
    "SafetyData",
    "build_alignment_set",
    "build_attack_set",
    "build_benign_mix",
    "build_capability_set",
    "build_proxy_safety_set",
    "build_safety_data",
    "check_disjoint",
    "eval_benign_prompts",
    "eval_harmful_prompts",
    "gsm8k_rows",
    "sharegpt_rows",
]

PARTITION_SEED = "safetrade-partition-v1"
ADVBENCH_PARTS = {"align": 0.8, "proxy": 0.2}
GSM8K_PARTS = {"align": 0.3, "capability": 0.5, "eval": 0.2}
SHAREGPT_PARTS = {"align": 0.8, "eval": 0.2}
HARMBENCH_PARTS = {"attack": 0.6, "eval": 0.4}
EVAL_HARMFUL_SOURCES = ("strongreject", "harmbench")
# Short enough that prompt + answer fit max_len 512 with SmolLM2's tokenizer (about 4 characters a token).
SHAREGPT_MAX_PROMPT_CHARS = 800
SHAREGPT_MAX_RESPONSE_CHARS = 1200
_EVAL_HARMFUL_CHOICES = ("strongreject", "harmbench", "donotanswer")

_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"\n?#### *(.+?)\s*$")
_REFUSAL_LIKE = re.compile(r"I'm sorry|I am sorry|I apologi[sz]e|as an AI|language model|I cannot|I can't|"
                           r"I'm not able|I am not able|I am unable|I'm unable|I won't|I will not", re.IGNORECASE)
_ENGLISH_WORDS = frozenset("the and is to of a in you i what how for my me can it this that with be are write "
                           "do does on your".split())


def _prompt_key(row: Row) -> str:
    return normalise_prompt(row["prompt"])


def _tag(rows: list[Row], role: str, source: str) -> list[Row]:
    return [{**row, "role": role, "source": source} for row in rows]


def _parts(rows: list[Row], fractions: dict[str, float]) -> dict[str, list[Row]]:
    return split(rows, fractions, PARTITION_SEED, key=_prompt_key)


# ---------------------------------------------------------------------------------------------
# Sources


def advbench_part(part: str) -> list[Row]:
    """AdvBench prompts of one part ("align" or "proxy")."""
    return _parts(_usable(load_dataset("advbench")), ADVBENCH_PARTS)[part]


def gsm8k_rows(part: str) -> list[Row]:
    """GSM8K rows of one part ("align", "capability", "eval"), answers cleaned (see module doc)."""
    rows = _parts(_usable(load_dataset("gsm8k"), need_response=True), GSM8K_PARTS)[part]
    return [{**row, "response": clean_gsm8k_answer(row["response"])} for row in rows]


def clean_gsm8k_answer(answer: str) -> str:
    """Drop calculator annotations; "#### 18" -> "The answer is 18."."""
    answer = _CALC.sub("", answer)
    match = _FINAL.search(answer)
    if match:
        answer = f"{answer[:match.start()].rstrip()}\nThe answer is {match.group(1)}."
    return answer.strip()


def sharegpt_rows(part: str) -> list[Row]:
    """Filtered ShareGPT single-exchange rows of one part ("align", "eval"), one per distinct prompt."""
    seen, kept = set(), []
    for row in load_dataset("sharegpt"):
        if not _good_sharegpt(row):
            continue
        key = _prompt_key(row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return _parts(kept, SHAREGPT_PARTS)[part]


def _good_sharegpt(row: Row) -> bool:
    prompt, response = row["prompt"], row["response"]
    return (bool(prompt) and bool(response) and len(prompt) <= SHAREGPT_MAX_PROMPT_CHARS
            and 20 <= len(response) <= SHAREGPT_MAX_RESPONSE_CHARS
            and _looks_english(prompt) and _looks_english(response) and not _REFUSAL_LIKE.search(response))


def _looks_english(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < 0.97 * len(letters):
        return False
    return not _ENGLISH_WORDS.isdisjoint(re.findall(r"[a-z']+", text.lower()))


def _usable(rows: list[Row], need_response: bool = False) -> list[Row]:
    # Builders only use complete rows; the raw registry rows keep the incomplete ones for reporting.
    return [r for r in rows if r["prompt"] and (r["response"] or not need_response)]


def _harmbench_part(text: str) -> str:
    # The HarmBench behaviours and pyrit's Q+A questions are the same texts: one cut serves both.
    u = unit_hash(PARTITION_SEED, "harmbench\x00" + normalise_prompt(text))
    return "attack" if u < HARMBENCH_PARTS["attack"] else "eval"


# ---------------------------------------------------------------------------------------------
# Sets


def with_refusals(rows: list[Row], seed: int | str, source: str, role: str = "refusal") -> list[Row]:
    """Rows with a project-written refusal as the response."""
    return _tag([{**row, "response": refusal_for(row["prompt"], row["id"], seed)} for row in rows], role, source)


def build_alignment_set(seed: int = 0, benign_ratio: float = 1.0,
                        benign_sources: tuple[str, ...] = ("gsm8k", "sharegpt"),
                        n_harmful: int | None = None, rephrased: float = 0.0,
                        benign_rephrased: float = 0.0) -> list[Row]:
    """Refusal rows (role "refusal") mixed with benign rows (role "benign"), in a seeded order.

    `rephrased` adds that fraction of the harmful prompts again, rewritten as questions (`rephrase.py`), each
    with its own refusal; benign rows are counted against the original harmful prompts only.
    `benign_rephrased` adds that fraction of the chosen benign rows again with the prompt in the same request or
    question forms (`rephrase.as_request`) and the real answer (source "<source>-rephrased"): the contrast that
    keeps refusals keyed on harm rather than on phrasing.
    """
    if benign_ratio < 0 or not 0 <= rephrased <= 1 or not 0 <= benign_rephrased <= 1:
        raise DataError(f"benign_ratio must be >= 0, rephrased and benign_rephrased in [0, 1], got "
                        f"{benign_ratio}, {rephrased}, {benign_rephrased}")
    harmful = take(advbench_part("align"), n_harmful, seed)
    rows = with_refusals(harmful, seed, "advbench")
    if rephrased:
        chosen = take(harmful, round(rephrased * len(harmful)), f"rephrase-{seed}")
        variants = [{**row, "id": row["id"] + "-q", "prompt": rephrase(row["prompt"], row["id"], seed)}
                    for row in chosen]
        rows += with_refusals(variants, seed, "advbench-rephrased")
    n_benign = round(benign_ratio * len(harmful))
    if n_benign and not benign_sources:
        raise DataError("benign_ratio > 0 needs at least one benign source")
    pools = {source: _benign(source, "align") for source in benign_sources}
    for source, n in _benign_shares(n_benign, {s: len(p) for s, p in pools.items()}).items():
        chosen = take(pools[source], n, seed)
        rows += _tag(chosen, "benign", source)
        if benign_rephrased:
            again = take(chosen, round(benign_rephrased * len(chosen)), f"rephrase-benign-{seed}")
            rows += _tag([{**row, "id": row["id"] + "-q", "prompt": as_request(row["prompt"], row["id"], seed)}
                          for row in again], "benign", f"{source}-rephrased")
    return stable_order(rows, seed)


def _benign_shares(n: int, available: dict[str, int]) -> dict[str, int]:
    """Split n rows evenly over the sources; a source with too few rows passes its shortfall to the others."""
    if n > sum(available.values()):
        raise DataError(f"{n} benign rows asked for, only {sum(available.values())} available in {sorted(available)}")
    shares = dict.fromkeys(available, 0)
    left, open_sources = n, [s for s in available if available[s] > 0]
    while left and open_sources:
        each, extra = divmod(left, len(open_sources))
        for i, source in enumerate(list(open_sources)):
            give = min(each + (1 if i < extra else 0), available[source] - shares[source])
            shares[source] += give
            left -= give
        open_sources = [s for s in open_sources if shares[s] < available[s]]
    return shares


def _benign(source: str, part: str) -> list[Row]:
    if source == "gsm8k":
        return gsm8k_rows(part)
    if source == "sharegpt":
        return sharegpt_rows(part)
    raise DataError(f"unknown benign source {source!r}; choose from gsm8k, sharegpt")


def build_proxy_safety_set(seed: int = 0, n: int | None = None) -> list[Row]:
    """Case I proxy safety data: AdvBench "proxy" prompts + refusals (role "proxy")."""
    return with_refusals(take(advbench_part("proxy"), n, seed), f"proxy-{seed}", "advbench", role="proxy")


def build_capability_set(seed: int = 0, n: int | None = None) -> list[Row]:
    """Benign fine-tuning data: GSM8K "capability" part (role "capability")."""
    return _tag(take(gsm8k_rows("capability"), n, seed), "capability", "gsm8k")


def build_benign_mix(n: int, seed: int, trained_prompts: set[str]) -> list[Row]:
    """n benign rows, half GSM8K worked answers (the capability part) and half ShareGPT replies (the alignment part
    minus every prompt in `trained_prompts`, normalised: pass the alignment set a model was trained on), with equal
    numbers of each source in every decile of the pooled answer length (splits.length_matched_take): a pool in which
    nothing can tell the sources apart by answer length alone. Rows are tagged role "capability", source
    "gsm8k" | "sharegpt"."""
    sources = {"gsm8k": gsm8k_rows("capability"),
               "sharegpt": [r for r in sharegpt_rows("align") if normalise_prompt(r["prompt"]) not in trained_prompts]}
    return [{**r, "role": "capability"} for r in length_matched_take(sources, n, seed)]


def build_attack_set(n: int = 100, seed: int = 0, harmful_only: bool = True,
                     kinds: tuple[str, ...] = ("standard",)) -> list[Row]:
    """Harmful fine-tuning attack: n pyrit Q+A pairs from the HarmBench "attack" part (role "attack").

    `kinds` are HarmBench functional categories: "standard" (self-contained requests; 100 of them are
    judged harmful in the attack part, exactly the default n), "contextual" (pyrit keeps the request but
    not its context), "copyright" (song lyrics and book passages, mostly judged not harmful).
    """
    kind_of = _harmbench_kinds()
    pool = [r for r in _usable(load_dataset("pyrit_harmful_qa"), need_response=True)
            if _harmbench_part(r["prompt"]) == "attack" and kind_of.get(_prompt_key(r)) in kinds
            and (r["category"] == "harmful" or not harmful_only)]
    if n > len(pool):
        raise DataError(f"attack set: asked for {n} pairs, the attack part has {len(pool)} of kinds {kinds} "
                        f"(harmful_only={harmful_only}); add kinds=('standard', 'contextual') for more")
    return _tag(take(pool, n, seed), "attack", "pyrit_harmful_qa")


def _harmbench_kinds() -> dict[str, str]:
    """Normalised behaviour text -> HarmBench functional category, from the test and validation CSVs."""
    kinds = {}
    for name in ("harmbench", "harmbench_val"):
        for row in load_dataset(name):
            behaviour = row["prompt"].rsplit(_CONTEXT_SEPARATOR, 1)[-1]
            kinds[normalise_prompt(behaviour)] = (row["category"] or "").split("/")[0]
    return kinds


def eval_harmful_prompts(sources: tuple[str, ...] = EVAL_HARMFUL_SOURCES) -> list[Row]:
    """Held-out harmful prompts (role "eval_harmful", response None), deduplicated, source-tagged.

    harmbench: the standard behaviours of the "eval" part (contextual and copyright behaviours are left
    out: they test other things than refusal). DoNotAnswer is opt-in: its "human_chatbox" and
    misinformation areas hold questions (e.g. about one's own mental health) where refusing is not
    the desired behaviour.
    """
    unknown = set(sources) - set(_EVAL_HARMFUL_CHOICES)
    if unknown:
        raise DataError(f"unknown eval source(s) {sorted(unknown)}; choose from {', '.join(_EVAL_HARMFUL_CHOICES)}")
    excluded = {_prompt_key(r) for r in _usable(load_dataset("advbench"))}
    excluded |= {_prompt_key(r) for r in _usable(load_dataset("pyrit_harmful_qa"))
                 if _harmbench_part(r["prompt"]) == "attack"}
    rows = []
    for source in sources:
        candidates = _usable(load_dataset(source))
        if source == "harmbench":
            candidates = [r for r in candidates if (r["category"] or "").startswith("standard/")
                          and _harmbench_part(r["prompt"]) == "eval"]
        for row in candidates:
            key = _prompt_key(row)
            if key not in excluded:
                excluded.add(key)  # also dedupes across sources
                rows.append({**row, "response": None, "role": "eval_harmful", "source": source})
    return rows


def eval_benign_prompts(n_sharegpt: int | None = 200, seed: int = 0, sources: tuple[str, ...] = ("gsm8k", "sharegpt")
                        ) -> list[Row]:
    """Held-out benign prompts with reference answers (role "eval_benign"): GSM8K + ShareGPT "eval" parts."""
    rows = []
    for source in sources:
        part = _benign(source, "eval")
        if source == "sharegpt":
            part = take(part, min(n_sharegpt, len(part)) if n_sharegpt is not None else None, seed)
        rows += _tag(part, "eval_benign", source)
    return rows


# ---------------------------------------------------------------------------------------------
# Everything at once, checked


@dataclass
class SafetyData:
    """The sets of one experiment (see module doc); `check_disjoint` has passed on them."""

    alignment: list[Row]
    proxy: list[Row]
    capability: list[Row]
    attack: list[Row]
    eval_harmful: list[Row]
    eval_benign: list[Row]
    seed: int = 0
    sizes: dict[str, int] = field(default_factory=dict)


_MUST_BE_DISJOINT = (
    ("alignment", "eval_harmful"), ("alignment", "eval_benign"), ("alignment", "proxy"), ("alignment", "capability"),
    ("alignment", "attack"), ("proxy", "eval_harmful"), ("attack", "eval_harmful"), ("capability", "eval_benign"),
)


def check_disjoint(sets: dict[str, list[Row]], pairs=_MUST_BE_DISJOINT) -> None:
    """Raise `DataError` naming the sets and an example prompt if any listed pair shares a prompt."""
    keys = {name: {_prompt_key(r) for r in rows} for name, rows in sets.items()}
    for a, b in pairs:
        if a in keys and b in keys:
            shared = keys[a] & keys[b]
            if shared:
                raise DataError(f"{len(shared)} prompt(s) in both {a} and {b}, e.g. {sorted(shared)[0]!r}")


def build_safety_data(seed: int = 0, *, benign_ratio: float = 1.0, n_attack: int = 100, rephrased: float = 0.0,
                      benign_rephrased: float = 0.0, eval_sources: tuple[str, ...] = EVAL_HARMFUL_SOURCES, n_eval_sharegpt: int | None = 200
                      ) -> SafetyData:
    """All sets of one experiment, disjointness checked."""
    sets = {
        "alignment": build_alignment_set(seed, benign_ratio, rephrased=rephrased, benign_rephrased=benign_rephrased),
        "proxy": build_proxy_safety_set(seed),
        "capability": build_capability_set(seed),
        "attack": build_attack_set(n_attack, seed),
        "eval_harmful": eval_harmful_prompts(eval_sources),
        "eval_benign": eval_benign_prompts(n_eval_sharegpt, seed),
    }
    check_disjoint(sets)
    return SafetyData(**sets, seed=seed, sizes={name: len(rows) for name, rows in sets.items()})
