"""The row format every reader produces, and the helpers that keep rows comparable.

A row is a plain dict `{"prompt": str | None, "response": str | None, "category": str | None, "id": str}`.
Builders may add `"role"` and `"source"` tags. Readers never drop or repair rows: a missing field stays
`None` and an empty one `""`, so the bad-row policy in `formatting.encode_rows` can count and report them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from safetrade.errors import SafetradeError

__all__ = ["DataError", "Row", "content_id", "make_row", "normalise_prompt", "unique_ids", "write_rows"]

Row = dict[str, Any]

_SPACES = re.compile(r"\s+")


class DataError(SafetradeError):
    """A dataset cannot be read or a row breaks the configured policy (the message names file/row)."""


def normalise_prompt(text: str) -> str:
    """Case- and whitespace-insensitive form of a prompt, used to test that two sets are disjoint."""
    return _SPACES.sub(" ", text).strip().lower()


def content_id(prefix: str, text: str | None) -> str:
    """`prefix-<12 hex>` from the text, so ids survive rows being added or reordered upstream."""
    digest = hashlib.sha1((text or "").encode("utf-8")).hexdigest()[:12]
    return f"{prefix}-{digest}"


def make_row(prompt: Any, response: Any = None, category: Any = None, id: str = "") -> Row:
    """A row with string fields stripped. None stays None ("missing"); "" stays "" ("empty")."""
    return {"prompt": _text(prompt), "response": _text(response), "category": _text(category), "id": id}


def unique_ids(rows: list[Row]) -> list[Row]:
    """Suffix `-2`, `-3`, ... onto repeated ids (duplicate prompts inside one source)."""
    seen: dict[str, int] = {}
    for row in rows:
        count = seen.get(row["id"], 0) + 1
        seen[row["id"]] = count
        if count > 1:
            row["id"] = f"{row['id']}-{count}"
    return rows


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        value = str(value)
    return value.strip()


def write_rows(rows: list[Row], path: str | Path) -> Path:
    """Rows as JSONL with only the fields training reads (prompt, response, id), for a job's `data.train=FILE`.

    The file is rewritten only when its content changes, so a cached study that writes the same rows again leaves
    the file (and anything keyed on it) untouched."""
    path = Path(path)
    text = "".join(json.dumps({"prompt": r["prompt"], "response": r["response"], "id": r["id"]}) + "\n"
                   for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path
