"""Readers for local data files and Hugging Face `datasets`, mapped onto rows (see `rows.py`).

`read_rows(source, prompt_field=..., response_field=...)` reads
  - `.jsonl` (one object per line), `.json` (a list of objects), `.csv` (leading `#` comment lines
    skipped, as pyrit's CSVs have; `csv_columns=` names the columns of a CSV without a header row, such
    as HEx-PHI's), `.parquet` (pyarrow), `.txt` (one prompt per line);
  - a folder written by `datasets.Dataset.save_to_disk`;
  - `hf:org/name` -- a Hugging Face hub dataset, through `datasets.load_dataset` (needs the network or
    the local HF cache; `hf_config=` / `hf_revision=` pick a configuration and a pinned revision).
`where={"label": "safe"}` keeps the records whose column has that value (XSTest's 250 safe prompts).
The default response column is optional (a prompt-only file gives rows with no response); a column
the caller names must exist.
Errors name the file and the line or row that could not be read. A row that merely lacks a field is
kept with `None` there; the bad-row policy counts it later.

`iter_json_array(path)` streams the objects of a JSON array and stops cleanly where the file is cut
off -- the ShareGPT file in its wheel is truncated mid-object, so `json.load` fails on it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetrade.data.rows import DataError, Row, content_id, make_row, unique_ids

__all__ = [
    "iter_json_array",
    "read_csv",
    "read_hf",
    "read_json",
    "read_jsonl",
    "read_parquet",
    "read_records",
    "read_rows",
    "read_text_lines",
]

Record = dict[str, Any]
_CHUNK_CHARS = 1 << 23  # 8 Mi characters per read when streaming a JSON array


# ---------------------------------------------------------------------------------------------
# Files -> records (dicts), each with the location an error message should name


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, Record]]:
    """(\"line N\", object) for each non-blank line."""
    path = Path(path)
    out = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}, {where}: not UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, {where}: not valid JSON ({err.msg} at column {err.colno})") from None
            out.append((where, _as_record(value, path, where)))
    return out


def read_json(path: str | os.PathLike) -> list[tuple[str, Record]]:
    """(\"item N\", object) for each element of a top-level JSON list."""
    path = Path(path)
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno} column {err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of objects, found {type(value).__name__}")
    return [(f"item {i}", _as_record(v, path, f"item {i}")) for i, v in enumerate(value)]


def read_csv(path: str | os.PathLike, fieldnames: list[str] | tuple[str, ...] | None = None) -> list[tuple[str, Record]]:
    """(\"row N\", dict) for each data row (N counts data rows from 1).

    Only `#` lines *before the header* are comments. A `#` at the start of a line inside a quoted
    multi-line field is data (HarmBench's test CSV has one), so lines are not filtered one by one.
    `fieldnames`: the file has no header row and these are its columns (its first line is data).
    """
    path = Path(path)
    handle = io.StringIO(_read_text(path), newline="")
    start = handle.tell()
    line = handle.readline()
    while line.startswith("#") or (line.strip() == "" and line):
        start = handle.tell()
        line = handle.readline()
    handle.seek(start)
    reader = csv.DictReader(handle, fieldnames=list(fieldnames) if fieldnames else None)
    out = []
    try:
        for number, record in enumerate(reader, start=1):
            if None in record:  # more fields than the header has
                raise DataError(f"{path}, row {number} (line {reader.line_num}): {len(record) - 1 + len(record[None])} "
                                f"fields, the header has {len(reader.fieldnames or [])}"
                                + (f" ({', '.join(fieldnames)})" if fieldnames else ""))
            out.append((f"row {number}", record))
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({err})") from None
    if reader.fieldnames is None:
        raise DataError(f"{path}: no CSV header")
    return out


def read_parquet(path: str | os.PathLike) -> list[tuple[str, Record]]:
    """(\"row N\", dict) for each row of a parquet file (needs pyarrow, which `datasets` brings)."""
    path = Path(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...: all mean unreadable
        raise DataError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    return [(f"row {i}", record) for i, record in enumerate(table.to_pylist())]


def read_text_lines(path: str | os.PathLike, field: str = "prompt") -> list[tuple[str, Record]]:
    """(\"line N\", {field: line}) for each non-blank line."""
    path = Path(path)
    lines = _read_text(path).splitlines()
    return [(f"line {i}", {field: line}) for i, line in enumerate(lines, start=1) if line.strip()]


def read_hf(source: str | os.PathLike, split: str | None = None, config: str | None = None,
            revision: str | None = None) -> list[tuple[str, Record]]:
    """Rows of a `save_to_disk` folder or (`hf:org/name`) a hub dataset; `split` picks from a DatasetDict,
    `config` / `revision` (hub only) name the dataset's configuration and a pinned revision."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading Hugging Face datasets needs `datasets` (pip install datasets)") from None
    text = os.fspath(source)
    try:
        if text.startswith("hf:"):
            loaded = datasets.load_dataset(text[3:], config, split=split, revision=revision)
        elif config is not None or revision is not None:
            raise DataError(f"{text}: a configuration or revision applies to hf:org/name datasets only")
        else:
            loaded = datasets.load_from_disk(text)
    except Exception as err:  # datasets raises many types; all mean "not available here"
        raise DataError(f"{text}: cannot load with `datasets` ({type(err).__name__}: {err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise DataError(f"{text}: has splits {sorted(loaded)}; pass split=...")
        if split not in loaded:
            raise DataError(f"{text}: no split {split!r}; splits: {sorted(loaded)}")
        loaded = loaded[split]
    return [(f"row {i}", record) for i, record in enumerate(loaded)]


def iter_json_array(path: str | os.PathLike, stats: dict | None = None) -> Iterator[Record]:
    """The complete values of a top-level JSON array, read in chunks; a cut-off tail is dropped.

    Parsing stops at the first value that does not parse once the whole file is read. `stats`, if
    given, receives `complete` (values yielded) and `dropped_chars` (characters left unparsed), so a
    caller can tell a cut-off last object (a few kB) from a file that is broken early on.
    """
    path = Path(path)
    decoder = json.JSONDecoder()
    complete, dropped = 0, 0
    with open(path, encoding="utf-8") as f:
        buffer, eof = _read_chunk(f)
        buffer = buffer.lstrip()
        if not buffer.startswith("["):
            raise DataError(f"{path}: expected a JSON array (the file does not start with '[')")
        pos = 1
        while True:
            pos = _skip_separators(buffer, pos)
            if pos >= len(buffer) or not eof:
                # Near the end of what is read so far: a value may continue in the next chunk.
                if not eof and len(buffer) - pos < _CHUNK_CHARS // 2:
                    chunk, eof = _read_chunk(f)
                    buffer, pos = buffer[pos:] + chunk, 0
                    continue
                if pos >= len(buffer):
                    break
            if buffer[pos] == "]":
                break
            try:
                value, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                if not eof:
                    chunk, eof = _read_chunk(f)
                    buffer, pos = buffer[pos:] + chunk, 0
                    continue
                dropped = len(buffer) - pos
                break
            yield value
            complete += 1
            pos = end
    if stats is not None:
        stats.update(complete=complete, dropped_chars=dropped)


def _read_chunk(f) -> tuple[str, bool]:
    """(text, at_eof): a text-mode read returns fewer characters than asked only at the end."""
    chunk = f.read(_CHUNK_CHARS)
    return chunk, len(chunk) < _CHUNK_CHARS


def _skip_separators(buffer: str, pos: int) -> int:
    while pos < len(buffer) and buffer[pos] in " \t\r\n,":
        pos += 1
    return pos


# ---------------------------------------------------------------------------------------------
# Records -> rows


_READERS = {".jsonl": read_jsonl, ".json": read_json, ".csv": read_csv, ".parquet": read_parquet,
            ".txt": read_text_lines}


def read_records(source: str | os.PathLike, split: str | None = None, *, config: str | None = None,
                 revision: str | None = None, csv_columns: list[str] | tuple[str, ...] | None = None
                 ) -> list[tuple[str, Record]]:
    """Records of a local file (by suffix), a `save_to_disk` folder, or an `hf:` hub dataset."""
    text = os.fspath(source)
    if text.startswith("hf:"):
        return read_hf(text, split, config, revision)
    path = Path(text).expanduser()
    if path.is_dir():
        return read_hf(path, split, config, revision)
    if not path.is_file():
        raise DataError(f"no such data file: {text!r} ({path.absolute()})")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; known: {', '.join(sorted(_READERS))}, "
                        "a datasets save_to_disk folder, or hf:org/name")
    if csv_columns:
        if reader is not read_csv:
            raise DataError(f"{path}: csv_columns applies to .csv files (a CSV without a header row)")
        return read_csv(path, csv_columns)
    return reader(path)


_DEFAULT_RESPONSE = object()  # "response" when the source has that column, else no response


def read_rows(source: str | os.PathLike, *, prompt_field: str = "prompt", response_field=_DEFAULT_RESPONSE,
              category_field: str | None = None, id_field: str | None = None, split: str | None = None,
              config: str | None = None, revision: str | None = None, where: dict[str, str] | None = None,
              csv_columns: list[str] | tuple[str, ...] | None = None) -> list[Row]:
    """Rows from a local file or dataset, with the given column mapping (see module doc).

    Ids come from `id_field` when given, else from the prompt's content (stable under reordering).
    A mapping naming a column that no record has is an error (a typo, not a bad row); the default
    response column ("response") is used only where the source has it.
    """
    records = read_records(source, split, config=config, revision=revision, csv_columns=csv_columns)
    name = Path(os.fspath(source)).stem or "rows"
    if response_field is _DEFAULT_RESPONSE:
        response_field = "response" if any("response" in record for _, record in records) else None
    for column in (where or {}):
        if records and not any(column in record for _, record in records):
            columns = sorted({key for _, record in records[:100] for key in record})
            raise DataError(f"{source}: where names no column {column!r}; columns: {', '.join(map(str, columns))}")
    if where and records:
        # Values compare as text: a CSV holds "1" where a hub dataset holds 1.
        kept = [(location, record) for location, record in records
                if all(str(record.get(column)) == str(value) for column, value in where.items())]
        if not kept:
            seen = {column: sorted({str(record.get(column)) for _, record in records})[:10] for column in where}
            raise DataError(f"{source}: no record has {where}; values seen: {seen}")
        records = kept
    for field in (prompt_field, response_field, category_field, id_field):
        if field is not None and records and not any(field in record for _, record in records):
            columns = sorted({key for _, record in records[:100] for key in record})
            raise DataError(f"{source}: no column {field!r}; columns: {', '.join(map(str, columns))}")
    rows = []
    for where, record in records:
        prompt = record.get(prompt_field)
        row_id = str(record[id_field]) if id_field and record.get(id_field) is not None else content_id(name, prompt)
        rows.append(make_row(prompt, record.get(response_field) if response_field else None,
                             record.get(category_field) if category_field else None, row_id))
    return unique_ids(rows)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None


def _as_record(value: Any, path: Path, where: str) -> Record:
    if not isinstance(value, dict):
        raise DataError(f"{path}, {where}: expected a JSON object, found {type(value).__name__}")
    return value
