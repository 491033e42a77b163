"""Dense prediction: the traced placement adapts the backbone only, and merges exactly.

UperNet (ConvNeXt and Swin backbones), DPT (DINOv2 backbone), Mask2Former
(Swin backbone) and DETR-style detectors, built small by
:mod:`alore_peft.tiny_models`. Their necks, pixel decoders, transformer
decoders and heads read the backbone's features and are left alone: the
placement is restricted to the transformers backbone inside the model.
"""

from __future__ import annotations

import pytest
import torch

from alore_peft.placement import _backbone_mixin, example_inputs, find_placement
from alore_peft.tiny_models import DENSE_MODELS, tiny_dense_model

from .test_coverage import Row, adapt_and_merge

BackboneMixin = _backbone_mixin()
# Models without a transformers backbone module: the placement stays in their base model.
NO_BACKBONE = {"segformer"}
# Detectors with tied box heads: PEFT asks them for their input embeddings, which they do not have.
# kinds of adapted inputs per model: transformers backbones get attention and MLP inputs, CNNs pointwise ones
KINDS = {
    "upernet-convnext": {"mlp"},
    "upernet-swin": {"attention", "mlp"},
    "dpt-dinov2": {"attention", "mlp"},
    "mask2former-swin": {"attention", "mlp"},
    "segformer": {"attention", "mlp"},
}


@pytest.mark.parametrize("name", sorted(DENSE_MODELS))
def test_placement_stays_in_the_backbone(name):
    model = tiny_dense_model(name)
    placement = find_placement(model)
    assert len(placement.scope) == 1 and placement.scope[0], placement.scope
    backbone = placement.scope[0]
    # By structure, not by name: the scope is the model's transformers backbone (or its base model).
    if name in NO_BACKBONE:
        assert model.get_submodule(backbone) is model.base_model
    else:
        assert isinstance(model.get_submodule(backbone), BackboneMixin)
    assert placement.sites, placement.table()
    assert all(s.target.startswith(backbone + ".") for s in placement.sites), placement.table()
    assert {s.kind for s in placement.sites} == KINDS.get(name, {"pointwise"}), placement.table()
    # The rest of the model has attention and MLP layers of its own (decoders, necks): they were passed over.
    outside = [k for k in placement.skipped if k.reason.startswith("outside the backbone or base model")]
    assert outside, placement.table()


@pytest.mark.parametrize("name", sorted(DENSE_MODELS))
def test_backbone_adapters_merge_exactly(name):
    model = tiny_dense_model(name)
    placement = find_placement(model)
    row = adapt_and_merge(model, placement.targets, example_inputs(model, batch_size=2, seed=1), Row(name, "adapted"))
    assert row.ran == row.wrapped == len(placement.sites), row
    assert row.effect > 1e-3, row


def test_example_inputs_follow_the_config():
    model = tiny_dense_model("mask2former-swin")
    assert example_inputs(model)["pixel_values"].shape == (1, 3, 64, 64)
    assert torch.is_floating_point(example_inputs(model)["pixel_values"])


def test_segmentation_example_learns_and_merges(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_segmentation.py"
    spec = importlib.util.spec_from_file_location("finetune_segmentation", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "30", "--output-dir", str(tmp_path)])
    assert result["loss_last"] < 0.5 * result["loss_first"], result
    assert result["accuracy_after"] > result["accuracy_before"] + 0.2, result
    assert result["merge_diff"] <= 1e-5 * result["logit_scale"] + 1e-6, result
    assert (tmp_path / "adapter_model.safetensors").exists()
