"""mkdocs hook: write the generated tables of ``docs/training.md`` from the code.

``<!-- generated: train-flags -->`` becomes the table of ``alore-train`` flags
(names, defaults and help from :class:`alore_peft.training.TrainArgs`), and
``<!-- generated: recipes -->`` the values of every shipped recipe, so the page
cannot drift from what the code does.
"""

from __future__ import annotations

import sys
from pathlib import Path

TRAINING = Path(__file__).resolve().parents[2] / "src" / "alore_peft" / "training"

FLAGS_MARKER = "<!-- generated: train-flags -->"
RECIPES_MARKER = "<!-- generated: recipes -->"


def _cell(value) -> str:
    text = "" if value is None else repr(value) if isinstance(value, str) else str(value)
    return f"`{text}`" if text else "(unset)"


def flags_table() -> str:
    """Markdown table of every ``alore-train`` flag (``alore_peft.training.args.flag_table``)."""
    src = str(TRAINING.parents[1])
    if src not in sys.path:
        sys.path.insert(0, src)  # this checkout's package, also when another copy is installed
    from alore_peft.training.args import flag_table

    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for flags, default, text in flag_table():
        flag = " / ".join(f"`{f}`" for f in flags.split(" / "))
        rows.append(f"| {flag} | {_cell(default)} | {text.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def recipes_table() -> str:
    """Markdown table of the values set by each shipped recipe."""
    import yaml

    paths = sorted((TRAINING / "recipes").glob("*.yaml"))
    names = [path.stem for path in paths]
    recipes = {path.stem: yaml.safe_load(path.read_text()) for path in paths}
    keys = list(dict.fromkeys(key for name in names for key in recipes[name]))
    rows = ["| field | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        cells = [_cell(recipes[n][key]) if key in recipes[n] else "(default)" for n in names]
        rows.append(f"| `{key}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if FLAGS_MARKER in markdown:
        markdown = markdown.replace(FLAGS_MARKER, flags_table())
    if RECIPES_MARKER in markdown:
        markdown = markdown.replace(RECIPES_MARKER, recipes_table())
    return markdown
