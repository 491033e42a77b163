"""Python examples in the docs pages run as written (docs are written once and tested)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
# Pages whose ```python blocks are self-contained and executed here.
EXECUTED_PAGES = ["method.md", "inspect.md", "sharing.md"]


@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_python_blocks_run(page, capsys):
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{page} has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS / page), "exec"), namespace)
    out = capsys.readouterr().out
    if page == "method.md":
        assert out.strip().splitlines()[-1] == "32"
    if page == "sharing.md":
        assert out.strip().splitlines()[-1] == "the bytes of 1 tensor(s) differ from their saved SHA-256"
