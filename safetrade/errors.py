"""Errors raised by safetrade.

Every error the library raises on purpose derives from `SafetradeError`, so a script can catch the
library's own failures (a bad checksum, an unknown model name, a file that is not a GGUF) without
also catching programming errors. The messages name the file or name involved and what would fix it.
"""

from __future__ import annotations


class SafetradeError(Exception):
    """Base class of every error safetrade raises on purpose."""


class ChecksumError(SafetradeError):
    """A fetched file's sha256 differs from the pinned one."""


class UnknownModelError(SafetradeError):
    """A model name is neither a local path, a registered name, nor a hub id."""


class MissingPathError(SafetradeError, FileNotFoundError):
    """A path the user gave does not exist.

    Also a `FileNotFoundError`, so callers that already handle that keep working.
    """


class EvaluationError(SafetradeError):
    """Bad evaluation input: an empty prompt set, an unknown judge, a judge breaking its contract."""
