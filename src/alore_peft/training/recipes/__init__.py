"""Training recipes: YAML files of :class:`~alore_peft.training.args.TrainArgs` values.

``--recipe vtab1k`` or ``--recipe fgvc`` picks a file shipped here;
``--recipe path/to/file.yaml`` reads any other. :func:`load_recipe` returns
the file's mapping as it is; :func:`alore_peft.training.resolve_args` checks
that every key is a ``TrainArgs`` field, and any flag given on the command
line overrides the recipe's value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["RECIPE_DIR", "available_recipes", "load_recipe", "recipe_path"]

RECIPE_DIR = Path(__file__).resolve().parent


def available_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """The YAML file of a recipe name or path.

    Raises:
        ValueError: If it is neither a shipped recipe nor an existing file.
    """
    if name_or_path in available_recipes():
        return RECIPE_DIR / f"{name_or_path}.yaml"
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    raise ValueError(
        f"--recipe {name_or_path!r} is neither a shipped recipe ({', '.join(available_recipes())}) nor an existing "
        "YAML file; pass one of those names or the path of a file."
    )


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe's YAML mapping (``TrainArgs`` field name -> value).

    Args:
        name_or_path: A shipped recipe name (see :func:`available_recipes`) or a
            YAML file path.

    Returns:
        The recipe's values as a plain dict (checked against ``TrainArgs`` by
        :func:`alore_peft.training.resolve_args`).

    Raises:
        ValueError: If the file is not a YAML mapping.
    """
    import yaml

    path = recipe_path(name_or_path)
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(
            f"Recipe {str(path)!r} must be a YAML mapping of TrainArgs fields, got {type(values).__name__}."
        )
    return values
