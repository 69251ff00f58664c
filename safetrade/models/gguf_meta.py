"""GGUF metadata as plain Python values.

`gguf.GGUFReader` memory-maps the file and exposes each key/value field as numpy parts. This module
turns every field into str / int / float / bool / list so callers (the tokenizer builder, the weight
loader in `safetrade.models.io`) never touch the reader's internals. The reader itself is returned
too, because the tensors are read from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf

from safetrade.errors import MissingPathError, SafetradeError

_GGUF_MAGIC = b"GGUF"


def read_gguf(path: str | os.PathLike) -> tuple[gguf.GGUFReader, dict[str, Any]]:
    """Open a GGUF file; return the reader and its metadata as a dict of plain Python values."""
    path = Path(path)
    _check_is_gguf(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as err:
        # A truncated or corrupt file fails deep inside numpy; say which file it was.
        raise SafetradeError(f"{path}: cannot read as GGUF ({type(err).__name__}: {err})") from err
    meta = {name: field_value(field) for name, field in reader.fields.items()}
    return reader, meta


def field_value(field: gguf.ReaderField) -> Any:
    """One reader field as a plain Python value (lists for arrays, None for an empty field)."""
    if not field.types:
        return None
    if field.types[0] == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.STRING:
        return [_utf8(field.parts[i]) for i in field.data]
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [value for i in field.data for value in field.parts[i].tolist()]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return _utf8(field.parts[-1])
    return field.parts[-1].tolist()[0]


def _utf8(part) -> str:
    # GGUF strings should be UTF-8; a stray invalid byte must not make the whole file unreadable.
    return part.tobytes().decode("utf-8", errors="replace")


def _check_is_gguf(path: Path) -> None:
    if not path.exists():
        raise MissingPathError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise SafetradeError(f"{path} is not a file; expected a .gguf model file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise SafetradeError(f"{path} is not a GGUF file (first bytes {magic!r}, expected {_GGUF_MAGIC!r})")
