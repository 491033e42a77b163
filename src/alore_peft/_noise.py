"""Keeping expected library noise out of the package's own commands (``alore``, ``alore-train``).

Two messages are expected every time and say nothing about the user's run:

- PEFT reads ``model.is_gradient_checkpointing`` whenever it wraps a
  transformers model, which transformers >= 5 answers with a
  ``FutureWarning`` (the property is renamed ``is_activation_checkpointing``);
- transformers prints a load report listing the classifier head as missing
  when a backbone is loaded with a new head of ``num_labels`` outputs, which is
  the point of fine-tuning it.

Both are filtered narrowly: the warning by its exact text, the load report
only for the head's own weights; any other missing or mis-sized weight is
still reported.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, Union

__all__ = ["expected_warnings_hidden", "from_pretrained_with_new_head", "progress_bars_hidden"]

_GRADIENT_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"


@contextmanager
def expected_warnings_hidden() -> Iterator[None]:
    """Hide transformers' ``is_gradient_checkpointing`` FutureWarning (raised when PEFT wraps a model)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_GRADIENT_CHECKPOINTING_WARNING, category=FutureWarning)
        yield


@contextmanager
def progress_bars_hidden() -> Iterator[None]:
    """Hide transformers' "Loading weights" / "Writing model shards" bars (instant for adapter-sized work)."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def from_pretrained_with_new_head(
    model_cls: Any, source: str, head: Union[Sequence[str], Callable[[Any], Sequence[str]]], **kwargs: Any
) -> tuple[Any, dict]:
    """``model_cls.from_pretrained(source, **kwargs)`` without transformers' load report for a new head.

    Args:
        model_cls: A transformers model class (or auto class).
        source: Folder or Hub id.
        head: Name prefixes of the weights expected to be new or re-sized
            (e.g. ``["classifier."]``), or a function of the loaded model that
            gives them; other missing or mismatched weights are reported on
            stderr in one line each.
        **kwargs: Passed to ``from_pretrained``.

    Returns:
        ``(model, loading info)`` as ``output_loading_info=True`` gives them.
    """
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = model_cls.from_pretrained(source, output_loading_info=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)

    head_prefixes = head(model) if callable(head) else head

    def unexpected(keys) -> list[str]:
        names = [key if isinstance(key, str) else key[0] for key in keys]
        return sorted(k for k in names if not any(k.startswith(p) for p in head_prefixes))

    for kind in ("missing_keys", "mismatched_keys"):
        keys = unexpected(info.get(kind, ()))
        if keys:
            what = "missing from" if kind == "missing_keys" else "of another shape in"
            print(
                f"note: {len(keys)} weight(s) of {type(model).__name__} are {what} {source} and were initialised at "
                f"random: {keys[:4]}{' ...' if len(keys) > 4 else ''}",
                file=sys.stderr,
            )
    return model, info
