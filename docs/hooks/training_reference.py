"""mkdocs hook: write the generated tables of ``docs/training.md`` from the code.

``<!-- generated: train-flags -->`` becomes the table of ``alore-train`` flags
(names, defaults and help from :class:`alore_peft.training.TrainArgs`), and
``<!-- generated: recipes -->`` the values of every shipped recipe, so the page
cannot drift from what the code does.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

# Read the sources directly: importing alore_peft would import torch, which the docs build does not need.
TRAINING = Path(__file__).resolve().parents[2] / "src" / "alore_peft" / "training"

FLAGS_MARKER = "<!-- generated: train-flags -->"
RECIPES_MARKER = "<!-- generated: recipes -->"


def _cell(value) -> str:
    text = "" if value is None else repr(value) if isinstance(value, str) else str(value)
    return f"`{text}`" if text else "(unset)"


def _args_module():
    """``alore_peft/training/args.py`` loaded on its own (it imports only the standard library)."""
    name = "_alore_training_args_for_docs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TRAINING / "args.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses looks the module up while building the class
        spec.loader.exec_module(module)
    return sys.modules[name]


def flags_table() -> str:
    """Markdown table of every ``alore-train`` flag."""
    args = _args_module()
    TrainArgs, _field_help = args.TrainArgs, args._field_help

    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for spec in dataclasses.fields(TrainArgs):
        if not spec.metadata.get("cli", True):
            continue
        flag = "--" + spec.name.replace("_", "-")
        if isinstance(spec.default, bool):
            flag = f"{flag} / --no-{spec.name.replace('_', '-')}"
        text = _field_help(spec.name).replace("%%", "%").replace("|", "\\|")
        rows.append(f"| `{flag}` | {_cell(spec.default)} | {text} |")
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
