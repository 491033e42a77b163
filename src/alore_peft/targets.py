"""Target strings: names or one regex, decided in one place.

PEFT reads ``target_modules`` two ways: a list of names, each matched as a
suffix of a module's dotted name (``"q_proj"`` matches
``vit.layers.0.attention.q_proj``), or a single string, a regex that must
match a module's whole name. The command lines take targets as text
(``alore-train --target-modules q_proj,v_proj``, ``alore budget --targets
q_proj v_proj``) and need one rule to tell the two apart: a value holding any
of :data:`REGEX_CHARACTERS` is a regex. Module names never contain these
characters (``.`` is left out: it separates the parts of every dotted name).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import nn

__all__ = ["REGEX_CHARACTERS", "is_regex", "parse_targets", "split_targets", "target_names"]

REGEX_CHARACTERS = frozenset("*+?()[]{}|\\^$")


def is_regex(text: str) -> bool:
    """Whether a target string is a regex (it holds a character of :data:`REGEX_CHARACTERS`) rather than a name."""
    return any(ch in REGEX_CHARACTERS for ch in text)


def parse_targets(values: Sequence[str], flag: str = "--targets") -> Union[list[str], str]:
    """Several names, or one regex, from a list of command-line values.

    Args:
        values: The values given (at least one).
        flag: The option they came from, for the error message.

    Returns:
        The one value itself when it is a regex, else the list of names.

    Raises:
        ValueError: If a regex comes with other values (PEFT takes one regex or a list of names, not both).
    """
    values = [v.strip() for v in values if v.strip()]
    regexes = [v for v in values if is_regex(v)]
    if regexes and len(values) > 1:
        raise ValueError(
            f"{flag} {' '.join(values)!r} mixes a regex ({regexes[0]!r}) with other values; pass either one regex "
            "(matched against whole module names) or several module names (matched as name suffixes)."
        )
    return regexes[0] if regexes else values


def split_targets(text: Optional[str], flag: str = "--target-modules") -> Optional[Union[list[str], str]]:
    """``"q_proj,v_proj"`` as a list of names, or a text holding a regex character as one regex (commas included).

    Args:
        text: The option's value, or ``None``.
        flag: The option it came from, for the error message.

    Returns:
        ``None`` for ``None``, else what :func:`parse_targets` returns.
    """
    if text is None:
        return None
    if is_regex(text):
        return text.strip()
    return parse_targets(text.split(","), flag)


def target_names(model: nn.Module) -> dict[str, list[str]]:
    """The short names a target list can use on ``model``, for error messages.

    Returns:
        ``{"layers": [...], "containers": [...]}``: the last name part of every
        ``nn.Linear`` / ``nn.Conv2d`` (adapted directly, both modes), and of
        every other module holding one (block placement, sequential mode only),
        each sorted and without numeric parts such as list indices.
    """
    layers: set[str] = set()
    containers: set[str] = set()
    for name, module in model.named_modules():
        if not name:
            continue
        short = name.rsplit(".", 1)[-1]
        if short.isdigit() or short == "base_layer" or "alore_" in name:  # skip indices and adapter internals
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            layers.add(short)
        elif not isinstance(module, (nn.ModuleList, nn.ModuleDict)) and any(
            isinstance(m, (nn.Linear, nn.Conv2d)) for m in module.modules()
        ):
            containers.add(short)
    return {"layers": sorted(layers), "containers": sorted(containers - layers)}
