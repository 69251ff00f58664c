"""docs/library.md is executed: the preamble, then each section's python blocks, in a fresh namespace per section.

A section without a python block fails the test, so a method's example cannot be dropped silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "library.md"
_SECTION = re.compile(r"^<!-- section: (\w+) -->$", re.M)
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)


def _sections() -> tuple[str, dict[str, str]]:
    text = DOC.read_text()
    parts = _SECTION.split(text)
    preamble = "\n".join(_BLOCK.findall(parts[0]))
    sections = {name: "\n".join(_BLOCK.findall(body)) for name, body in zip(parts[1::2], parts[2::2])}
    return preamble, sections


PREAMBLE, SECTIONS = _sections()


def test_every_section_has_code():
    assert PREAMBLE.strip(), "docs/library.md: the preamble has no python block"
    empty = [name for name, code in SECTIONS.items() if not code.strip()]
    assert not empty, f"docs/library.md: section(s) without a python block: {empty}"
    assert {"tradeoff", "safedelta", "sqsd", "defenses"} <= set(SECTIONS)


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_section_runs(name):
    if not SECTIONS[name].strip():
        pytest.fail(f"docs/library.md section {name!r} has no python block")
    namespace: dict = {"__name__": f"library_doc_{name}"}
    exec(compile(PREAMBLE, f"{DOC}:preamble", "exec"), namespace)
    exec(compile(SECTIONS[name], f"{DOC}:{name}", "exec"), namespace)
