"""``AutoPeftModelForImageClassification``: base model and adapter from the adapter folder alone."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft import get_peft_model
from transformers import ViTForImageClassification

from alore_peft import AloreConfig
from alore_peft.auto import AutoPeftModelForImageClassification
from alore_peft.block import AloreBlock

from .models import tiny_vit
from .tolerances import TOLERANCES

RTOL, ATOL = TOLERANCES[torch.float32]


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_peft_has_no_image_classification_auto_class():
    # Why this class exists: PEFT's AutoPeftModelFor... cover text tasks only.
    assert not hasattr(peft, "AutoPeftModelForImageClassification")


@pytest.fixture
def trained_adapter(tmp_path):
    """A tiny ViT saved to a folder, loaded back, adapted, trained one step and saved as an adapter."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_vit().save_pretrained(base_dir)
    base = ViTForImageClassification.from_pretrained(base_dir)
    model = get_peft_model(base, AloreConfig(target_modules=["attention", "mlp"], modules_to_save=["classifier"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 2])
    for _ in range(2):  # B starts at zero: after two steps every factor has moved
        optimizer.zero_grad()
        model(pixel_values=_pixels(), labels=labels).loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        expected = model(pixel_values=_pixels()).logits
    return base_dir, adapter_dir, expected


def test_auto_class_loads_base_and_adapter(trained_adapter):
    base_dir, adapter_dir, expected = trained_adapter
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ALORE" and saved["base_model_name_or_path"] == str(base_dir)
    loaded = AutoPeftModelForImageClassification.from_pretrained(adapter_dir)
    assert isinstance(loaded, peft.PeftModel) and not loaded.training
    assert sum(isinstance(m, AloreBlock) for m in loaded.modules()) == 4
    with torch.no_grad():
        got = loaded(pixel_values=_pixels()).logits
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    # The adapter really is in play: the base model alone answers differently.
    with torch.no_grad(), loaded.disable_adapter():
        assert (loaded(pixel_values=_pixels()).logits - expected).abs().max() > 1e-4


def test_auto_class_trainable_and_moved_base(trained_adapter, tmp_path):
    base_dir, adapter_dir, expected = trained_adapter
    moved = tmp_path / "moved"
    base_dir.rename(moved)
    with pytest.raises(ValueError, match="does not exist; pass base_model_name_or_path"):
        AutoPeftModelForImageClassification.from_pretrained(adapter_dir)
    loaded = AutoPeftModelForImageClassification.from_pretrained(
        adapter_dir, is_trainable=True, base_model_name_or_path=str(moved)
    )
    assert any(p.requires_grad for n, p in loaded.named_parameters() if "alore_" in n)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=_pixels()).logits, expected, rtol=RTOL, atol=ATOL)


def test_auto_class_is_not_instantiated_directly():
    with pytest.raises(EnvironmentError, match="from_pretrained"):
        AutoPeftModelForImageClassification()
