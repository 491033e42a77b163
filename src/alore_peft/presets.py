"""Default ALoRE targets (used when ``target_modules=None``).

Each preset gives the paper's placement for one backbone family: one
sequential adapter on the input of every block's attention (shared by q, k
and v) and one on the input of its MLP. A name that is a container (an
attention or MLP module) gets block placement (:class:`alore_peft.block.AloreBlock`);
a ``Linear`` name gets the same adapter on that layer's input.

Transformers models are keyed by ``config.model_type``; timm models (which
have no ``model_type``) by their class name. Every preset is checked by
``tests/test_presets.py`` (or ``tests/test_timm.py``) on a tiny random model:
each container's input reaches only linear layers, so the adapters fold
exactly into the frozen weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from torch import nn

__all__ = [
    "Preset",
    "PRESETS",
    "TIMM_PRESETS",
    "DEFAULT_TARGET_MODULES",
    "TIMM_TARGET_MODULES",
    "default_targets",
    "missing_targets_message",
]

Targets = Union[list[str], str]


@dataclass(frozen=True)
class Preset:
    """The default placement for one backbone family.

    Attributes:
        key: ``config.model_type`` (transformers) or the model class name (timm).
        targets: ``target_modules``: name suffixes, or a regex matched against
            the full module name.
        placement: Where the adapters sit, in words (for the docs).
    """

    key: str
    targets: Targets
    placement: str


_VIT_LIKE = "block input of each layer's `attention` (feeds q/k/v_proj) and `mlp` (feeds fc1)"

PRESETS: tuple[Preset, ...] = (
    Preset("vit", ["attention", "mlp"], _VIT_LIKE),
    Preset("deit", ["attention", "mlp"], _VIT_LIKE),
    Preset("vit_mae", ["attention", "mlp"], _VIT_LIKE),
    Preset("vit_msn", ["attention", "mlp"], _VIT_LIKE),
    Preset(
        "dinov2",
        ["attention", "mlp"],
        "block input of each layer's `attention` (feeds q/k/v_proj) and `mlp` (feeds fc1, or gate_proj and up_proj "
        "with use_swiglu_ffn)",
    ),
    Preset("dinov2_with_registers", ["attention", "mlp"], _VIT_LIKE),
    Preset("beit", ["attention", "mlp"], _VIT_LIKE),
    Preset("swin", ["attention", "mlp"], "block input of each window attention (feeds q/k/v_proj) and `mlp` (fc1)"),
    Preset(
        "convnext",
        ["pwconv1"],
        "input of each block's `pwconv1` (the MLP's first Linear); the depthwise conv before it cannot absorb "
        "channel mixing, so there is one adapter per block",
    ),
    Preset("convnextv2", ["pwconv1"], "input of each block's `pwconv1`, as for convnext"),
    Preset(
        "clip_vision_model",
        r".*encoder\.layers\.\d+\.(self_attn|mlp)",
        "block input of each encoder layer's `self_attn` (feeds q/k/v_proj) and `mlp` (fc1)",
    ),
    Preset(
        "siglip_vision_model",
        r".*encoder\.layers\.\d+\.(self_attn|mlp)",
        "block input of each encoder layer's `self_attn` and `mlp`; the attention-pooling head is left alone",
    ),
    Preset(
        "clip",
        r".*vision_model\.encoder\.layers\.\d+\.(self_attn|mlp)",
        "vision tower only: block input of each encoder layer's `self_attn` and `mlp`",
    ),
    Preset(
        "siglip",
        r".*vision_model\.encoder\.layers\.\d+\.(self_attn|mlp)",
        "vision tower only: block input of each encoder layer's `self_attn` and `mlp`",
    ),
)

TIMM_PRESETS: tuple[Preset, ...] = (
    Preset(
        "VisionTransformer",
        r"(.*\.)?blocks\.\d+\.(attn|mlp)",
        "block input of each block's `attn` (feeds the fused qkv Linear) and `mlp` (fc1)",
    ),
    Preset(
        "MlpMixer",
        r"(.*\.)?blocks\.\d+\.(mlp_tokens|mlp_channels)",
        "block input of each block's `mlp_tokens` (its input is transposed: the adapter mixes patches, the axis "
        "fc1 reads) and `mlp_channels` (mixes channels)",
    ),
    Preset(
        "ConvNeXt",
        r"(.*\.)?stages\.\d+\.blocks\.\d+\.mlp",
        "block input of each block's `mlp` (feeds fc1, a Linear or a 1x1 conv); one adapter per block",
    ),
)

DEFAULT_TARGET_MODULES: dict[str, Targets] = {p.key: p.targets for p in PRESETS}
TIMM_TARGET_MODULES: dict[str, Targets] = {p.key: p.targets for p in TIMM_PRESETS}


def _timm_class(model: Optional[nn.Module]) -> Optional[str]:
    if model is None or not type(model).__module__.startswith("timm."):
        return None
    return type(model).__name__


def default_targets(model_type: Optional[str], model: Optional[nn.Module] = None) -> Optional[Targets]:
    """The preset ``target_modules`` for a model, or ``None`` if there is none.

    Args:
        model_type: ``config.model_type`` of a transformers model.
        model: The model itself, to recognise timm models by class.
    """
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    timm_class = _timm_class(model)
    if timm_class in TIMM_TARGET_MODULES:
        return TIMM_TARGET_MODULES[timm_class]
    return None


def missing_targets_message(model_type: Optional[str], model: Optional[nn.Module] = None) -> str:
    """The error for a model with no known default targets."""
    known = ", ".join(sorted(DEFAULT_TARGET_MODULES))
    known_timm = ", ".join(sorted(TIMM_TARGET_MODULES))
    what = f"model_type={model_type!r}"
    if _timm_class(model) is not None:
        what = f"the timm model class {_timm_class(model)!r}"
    return (
        f"AloreConfig.target_modules is None and {what} has no default ALoRE targets (known model types: {known}; "
        f"timm classes: {known_timm}). Pass the modules to adapt: container names for one adapter on each "
        "container's input, e.g. AloreConfig(target_modules=['attention', 'mlp']) for the blocks of a ViT-like "
        "model, or Linear/Conv2d names such as target_modules=['q_proj', 'v_proj'] (name suffixes), or a regex "
        "string such as target_modules=r'.*\\.layers\\.\\d+\\.(attention|mlp)'; print(model) lists the module names."
    )
