"""Default targets (``target_modules=None``) on every preset backbone, tiny and real-size.

Run ``python -m tests.test_presets`` to print the backbone table of
docs/placement.md; ``test_docs_table_is_current`` fails when the two differ.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Callable

import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model
from torch import nn

from alore_peft import AloreConfig
from alore_peft.block import AloreBlock
from alore_peft.layer import AloreLayer
from alore_peft.presets import DEFAULT_TARGET_MODULES, PRESETS

from .tolerances import TOLERANCES

RTOL, ATOL = TOLERANCES[torch.float32]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "placement.md"

_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
)
_DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8)
_CONVNEXT = dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, layer_scale_init_value=1.0, num_labels=3)
_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)

# key (model_type, or model_type-variant) -> (tiny model builder, expected adapted modules)
TINY: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(**_VIT, num_labels=3)), 4),
    "deit": (lambda: T.DeiTForImageClassification(T.DeiTConfig(**_VIT, num_labels=3)), 4),
    "vit_mae": (lambda: T.ViTMAEModel(T.ViTMAEConfig(**_VIT)), 4),
    "vit_msn": (lambda: T.ViTMSNForImageClassification(T.ViTMSNConfig(**_VIT, num_labels=3)), 4),
    "dinov2": (lambda: T.Dinov2ForImageClassification(T.Dinov2Config(**_DINO, num_labels=3)), 4),
    "dinov2-swiglu": (lambda: T.Dinov2Model(T.Dinov2Config(**_DINO, use_swiglu_ffn=True)), 4),
    "dinov2_with_registers": (
        lambda: T.Dinov2WithRegistersForImageClassification(T.Dinov2WithRegistersConfig(**_DINO, num_labels=3)),
        4,
    ),
    "beit": (lambda: T.BeitForImageClassification(T.BeitConfig(**_VIT, use_relative_position_bias=True)), 4),
    "swin": (
        lambda: T.SwinForImageClassification(
            T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
        ),
        4,
    ),
    "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(**_CONVNEXT)), 2),
    "convnextv2": (lambda: T.ConvNextV2ForImageClassification(T.ConvNextV2Config(**_CONVNEXT)), 2),
    "clip_vision_model": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**_VIT)), 4),
    "siglip_vision_model": (lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**_VIT)), 4),
    "clip": (lambda: T.CLIPModel(T.CLIPConfig(vision_config=_VIT, text_config=_TEXT)), 4),
    "siglip": (
        lambda: T.SiglipForImageClassification(T.SiglipConfig(vision_config=_VIT, text_config=_TEXT, num_labels=3)),
        4,
    ),
}


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    if model.config.model_type == "vit_mae":
        inputs["noise"] = torch.rand(2, 16, generator=g)  # fixes MAE's random patch masking
    if model.config.model_type == "clip":
        inputs["input_ids"] = torch.randint(0, 100, (2, 5), generator=g)
    return inputs


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    for name in ("logits_per_image", "logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no tensor output in {type(out).__name__}")


def test_every_preset_has_a_tiny_case():
    assert set(DEFAULT_TARGET_MODULES) <= {key.split("-")[0] for key in TINY}


@pytest.mark.parametrize("key", sorted(TINY))
def test_default_targets_inject_fold_and_round_trip(key, tmp_path):
    build, expected_layers = TINY[key]
    torch.manual_seed(0)
    reference = build().eval()
    model = get_peft_model(copy.deepcopy(reference), AloreConfig(init_weights=False))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AloreLayer)}
    assert len(layers) == expected_layers, sorted(layers)
    assert not any(".text_model." in name or ".head." in name for name in layers)  # vision blocks only
    for name, layer in layers.items():
        if isinstance(layer, AloreBlock):
            # Every container preset is foldable, found at injection (probe or dummy image).
            assert layer.trace is not None and layer.trace.foldable, (name, layer.trace)
            assert all(c.rsplit(".", 1)[0].split(".")[-1] in {"q_proj", "k_proj", "v_proj", "fc1", "gate_proj",
                                                               "up_proj"} for c in layer.trace.consumers)
    inputs = _inputs(reference)
    with torch.no_grad():
        expected = _output(model, inputs)
        assert (expected - _output(reference, inputs)).abs().max() > 1e-4  # the adapters act
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    with torch.no_grad():
        # A loaded adapter is frozen, and requires_grad can change the kernel path by 1 ulp.
        torch.testing.assert_close(_output(loaded, inputs), expected, rtol=RTOL, atol=ATOL)
        merged = loaded.merge_and_unload()
        assert not any(isinstance(m, AloreLayer) for m in merged.modules())
        torch.testing.assert_close(_output(merged, inputs), expected, rtol=RTOL, atol=ATOL)


def test_swin_windows_are_traced_with_a_dummy_image():
    # A window attention cannot run on a lone 3-token probe; injection traces it through the whole model.
    model = get_peft_model(TINY["swin"][0]().eval(), AloreConfig())
    sources = {m.trace.source for m in model.modules() if isinstance(m, AloreBlock)}
    assert sources == {"forward"}


def test_unknown_model_type_error_says_how_to_pass_targets():
    model = T.ResNetForImageClassification(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    with pytest.raises(ValueError) as info:
        get_peft_model(model, AloreConfig())
    message = str(info.value)
    assert "model_type='resnet'" in message and "known model types: beit, clip" in message
    assert "target_modules=['attention', 'mlp']" in message


# -- the real-size table of docs/placement.md ------------------------------------------

# (model_type, name, builder on the meta device)
REAL_SIZE: list[tuple[str, str, Callable[[], nn.Module]]] = [
    ("vit", "ViT-B/16", lambda: T.ViTForImageClassification(T.ViTConfig())),
    (
        "vit",
        "ViT-L/16",
        lambda: T.ViTForImageClassification(
            T.ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        ),
    ),
    (
        "vit",
        "ViT-H/14",
        lambda: T.ViTForImageClassification(
            T.ViTConfig(
                hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120, patch_size=14
            )
        ),
    ),
    ("deit", "DeiT-B/16", lambda: T.DeiTForImageClassification(T.DeiTConfig())),
    ("vit_mae", "MAE ViT-B/16", lambda: T.ViTMAEModel(T.ViTMAEConfig())),
    ("vit_msn", "MSN ViT-B/16", lambda: T.ViTMSNForImageClassification(T.ViTMSNConfig())),
    ("dinov2", "DINOv2 ViT-B/14", lambda: T.Dinov2ForImageClassification(T.Dinov2Config())),
    (
        "dinov2_with_registers",
        "DINOv2-reg ViT-B/14",
        lambda: T.Dinov2WithRegistersForImageClassification(T.Dinov2WithRegistersConfig(patch_size=14)),
    ),
    ("beit", "BEiT-B/16", lambda: T.BeitForImageClassification(T.BeitConfig())),
    (
        "swin",
        "Swin-B (224, window 7)",
        lambda: T.SwinForImageClassification(
            T.SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7)
        ),
    ),
    (
        "convnext",
        "ConvNeXt-B",
        lambda: T.ConvNextForImageClassification(
            T.ConvNextConfig(hidden_sizes=[128, 256, 512, 1024], depths=[3, 3, 27, 3])
        ),
    ),
    (
        "convnextv2",
        "ConvNeXt V2-B",
        lambda: T.ConvNextV2ForImageClassification(
            T.ConvNextV2Config(hidden_sizes=[128, 256, 512, 1024], depths=[3, 3, 27, 3])
        ),
    ),
    ("clip_vision_model", "CLIP ViT-B/16 vision", lambda: T.CLIPVisionModel(T.CLIPVisionConfig(patch_size=16))),
    (
        "clip",
        "CLIP ViT-B/16 (image classifier)",
        lambda: T.CLIPForImageClassification(T.CLIPConfig(vision_config={"patch_size": 16})),
    ),
    ("siglip_vision_model", "SigLIP B/16 vision", lambda: T.SiglipVisionModel(T.SiglipVisionConfig())),
    ("siglip", "SigLIP B/16 (image classifier)", lambda: T.SiglipForImageClassification(T.SiglipConfig())),
]


def _count(build: Callable[[], nn.Module]) -> tuple[int, int]:
    """(adapted modules, trainable parameters outside the classifier) with AloreConfig() defaults."""
    with torch.device("meta"):
        base = build()
    model = get_peft_model(base, AloreConfig())  # r=4, num_experts=4, shared rules
    layers = sum(isinstance(m, AloreLayer) for m in model.modules())
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    return layers, trainable


def _targets_text(targets) -> str:
    # A pipe inside a table cell must be escaped, even inside a code span.
    text = f"`{targets}`" if isinstance(targets, str) else ", ".join(f"`{t}`" for t in targets)
    return text.replace("|", "\\|")


def backbone_table() -> str:
    """The markdown table of docs/placement.md, computed on meta-device models."""
    presets = {p.key: p for p in PRESETS}
    rows = [
        "| model_type | backbone | default targets | adapters | trainable (r=4, n=4) |",
        "|---|---|---|---:|---:|",
    ]
    for model_type, name, build in REAL_SIZE:
        layers, trainable = _count(build)
        rows.append(
            f"| {model_type} | {name} | {_targets_text(presets[model_type].targets)} | {layers} | {trainable:,} |"
        )
    return "\n".join(rows)


def _docs_block(marker: str) -> str:
    text = DOCS.read_text()
    match = re.search(rf"<!-- {marker}:begin -->\n(.*?)\n<!-- {marker}:end -->", text, re.S)
    assert match, f"docs/placement.md has no {marker} block"
    return match.group(1).strip()


def test_docs_table_is_current():
    assert _docs_block("backbone-table") == backbone_table(), "regenerate with: python -m tests.test_presets"


if __name__ == "__main__":
    print(backbone_table())
