"""The README's quickstart runs as written, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quickstart_runs_as_written(capsys):
    (code,) = _blocks("python")
    assert len(code.strip().splitlines()) <= 14, "the quickstart should stay short"
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "trainable params:" in capsys.readouterr().out
    merged = namespace["merged"]
    assert not any("alore" in type(m).__module__ for m in merged.modules())
    assert isinstance(merged.vit.layers[0].attention.q_proj, nn.Linear)
    assert torch.isfinite(namespace["loss"])


def test_ci_runs_the_readme_test_command():
    test_command = next(b.strip() for b in _blocks("bash") if "pytest" in b)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci_lines[-1] == test_command


def _nav_pages() -> list[str]:
    """The docs pages in mkdocs.yml's nav, in order (``- Title: page.md`` lines)."""
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:\n", 1)[1]
    return re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", nav, flags=re.M)


def test_docs_index_links_every_page_of_the_nav_in_order():
    pages = _nav_pages()
    assert len(pages) >= 10 and pages[0] == "index.md"
    index = (ROOT / "docs" / "index.md").read_text()
    linked = [page for page in re.findall(r"\]\(([\w.-]+\.md)(?:#[\w-]*)?\)", index) if page != "index.md"]
    assert linked == pages[1:], "docs/index.md should link every page of mkdocs.yml's nav, in the nav's order"


def test_readme_links_existing_docs_in_reading_order():
    linked = re.findall(r"\]\((docs/[\w./-]+?)(?:#[\w-]*)?\)", README)
    assert linked, "the README should link the docs"
    missing = [path for path in linked if not (ROOT / path).is_file()]
    assert not missing, f"the README links docs pages that do not exist: {missing}"
    # Its Documentation section lists the nav's pages, docs/index.md first, in the nav's order.
    section = README.split("## Documentation", 1)[1]
    listed = [p.removeprefix("docs/") for p in re.findall(r"\]\((docs/[\w.-]+\.md)\)", section)]
    assert listed == _nav_pages(), "the README's Documentation section should list the nav's pages in order"
