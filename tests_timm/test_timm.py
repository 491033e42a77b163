"""The paper's timm backbones (ViT, MLP-Mixer, ConvNeXt) with their default ALoRE placement.

timm imports torchvision at import time, and no torchvision wheel imports
beside the CPU torch of the main test environment, so this file lives outside
``tests/`` and runs in its own environment (docs/placement.md, "timm"; CI's
``.ci/run`` builds it). ``python tests_timm/test_timm.py`` prints the timm table
of docs/placement.md.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import timm  # noqa: E402,F401  (fails loudly outside the timm environment: never a silent skip)

from peft import PeftModel, get_peft_model  # noqa: E402
from timm.models.convnext import ConvNeXt  # noqa: E402
from timm.models.mlp_mixer import MlpMixer  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from alore_peft import AloreConfig  # noqa: E402
from alore_peft.block import AloreBlock  # noqa: E402
from alore_peft.functional import reference_delta_weight  # noqa: E402
from alore_peft.presets import TIMM_PRESETS  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5  # float32, as tests/tolerances.py
DOCS = Path(__file__).resolve().parents[1] / "docs" / "placement.md"

# name -> (builder, expected blocks, expected consumers per block-name suffix)
TINY = {
    "vit": (
        lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3),
        4,
        {"attn": ["qkv.weight"], "mlp": ["fc1.weight"]},
    ),
    "mixer": (
        lambda: MlpMixer(img_size=32, patch_size=8, embed_dim=32, num_blocks=2, num_classes=3),
        4,
        {"mlp_tokens": ["fc1.weight"], "mlp_channels": ["fc1.weight"]},
    ),
    "convnext": (
        lambda: ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=3, ls_init_value=1.0),
        4,
        {"mlp": ["fc1.weight"]},
    ),
    "convnext-conv-mlp": (
        lambda: ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=3, ls_init_value=1.0, conv_mlp=True),
        4,
        {"mlp": ["fc1.weight"]},
    ),
}


def _build(key: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TINY[key][0]().eval()
    torch.nn.init.normal_(model.get_classifier().weight)  # timm zero-inits some heads (Mixer): outputs would be 0
    return model


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("key", sorted(TINY))
def test_timm_default_placement_folds_and_round_trips(key, tmp_path):
    _, expected_blocks, consumers = TINY[key]
    reference = _build(key)
    model = get_peft_model(copy.deepcopy(reference), AloreConfig(init_weights=False))
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, AloreBlock)}
    assert len(blocks) == expected_blocks, sorted(blocks)
    for name, block in blocks.items():
        assert block.trace is not None and block.trace.consumers == consumers[name.rsplit(".", 1)[-1]]
    x = _pixels()
    with torch.no_grad():
        expected = model(x)
        assert (expected - reference(x)).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    with torch.no_grad():
        # A loaded adapter is frozen, and requires_grad can change the kernel path by 1 ulp.
        torch.testing.assert_close(loaded(x), expected, rtol=RTOL, atol=ATOL)
        merged = loaded.merge_and_unload()
        assert not any(isinstance(m, AloreBlock) for m in merged.modules())
        torch.testing.assert_close(merged(x), expected, rtol=RTOL, atol=ATOL)


def test_mixer_token_adapter_mixes_patches():
    # mlp_tokens reads the transposed tokens (batch, channels, patches): its adapter mixes the 16 patches,
    # the axis its fc1 reads, so it folds into fc1; a channel-mixing adapter there could not pass the GELU.
    model = get_peft_model(_build("mixer"), AloreConfig(init_weights=False))
    block = model.base_model.model.blocks[0].mlp_tokens
    assert block.in_dim == 16 and block.get_base_layer().fc1.in_features == 16
    A, B, C = block.factors("default")
    dW = reference_delta_weight(A.detach().contiguous(), B.detach(), C.detach(), block.scaling["default"])
    tokens_t = torch.randn(2, 32, 16)  # (batch, channels, patches)
    with torch.no_grad():
        torch.testing.assert_close(
            block(tokens_t), block.get_base_layer()(tokens_t + tokens_t @ dW.T), rtol=RTOL, atol=ATOL
        )


def test_timm_training_step():
    model = get_peft_model(_build("vit"), AloreConfig())
    model.train()
    model(_pixels()).square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "alore_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# -- real-size table -------------------------------------------------------------------

REAL_SIZE = [
    ("VisionTransformer", "vit_base_patch16_224"),
    ("MlpMixer", "mixer_b16_224"),
    ("ConvNeXt", "convnext_base"),
]


def _count(name: str) -> tuple[int, int]:
    with torch.device("meta"):
        base = timm.create_model(name, pretrained=False)
    model = get_peft_model(base, AloreConfig())
    blocks = sum(isinstance(m, AloreBlock) for m in model.modules())
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".head" not in n)
    return blocks, trainable


def timm_table() -> str:
    presets = {p.key: p for p in TIMM_PRESETS}
    rows = [
        "| timm class | model | default targets | adapters | trainable (r=4, n=4) |",
        "|---|---|---|---:|---:|",
    ]
    for cls, name in REAL_SIZE:
        blocks, trainable = _count(name)
        targets = f"`{presets[cls].targets}`".replace("|", "\\|")
        rows.append(f"| {cls} | {name} | {targets} | {blocks} | {trainable:,} |")
    return "\n".join(rows)


def test_vit_b16_paper_count():
    assert _count("vit_base_patch16_224") == (24, 147_520)


def test_docs_timm_table_is_current():
    match = re.search(r"<!-- timm-table:begin -->\n(.*?)\n<!-- timm-table:end -->", DOCS.read_text(), re.S)
    assert match, "docs/placement.md has no timm-table block"
    assert match.group(1).strip() == timm_table(), "regenerate with: python -m tests.test_timm (timm environment)"


if __name__ == "__main__":
    print(timm_table())
