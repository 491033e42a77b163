"""alore_peft.budget: every planned count equals what PEFT reports after get_peft_model."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import ViTModel

from alore_peft import AloreLayer
from alore_peft import functional
from alore_peft.budget import plan_budget

from .models import tiny_vit, tiny_vit_config


def alore_trainable(model) -> int:
    """What PEFT reports as trainable, minus the modules_to_save copies (e.g. a new head)."""
    reported, _ = model.get_nb_trainable_parameters()
    saved = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and "modules_to_save" in name)
    return reported - saved


def check_rows_against_peft(base, rows, **overrides):
    for row in rows:
        model = get_peft_model(copy.deepcopy(base), row.to_config(**overrides))
        assert alore_trainable(model) == row.trainable, row
        layers = [m for m in model.modules() if isinstance(m, AloreLayer)]
        assert len(layers) == row.layers
        bounds = []
        for layer in layers:
            d_out, d_in = layer.get_delta_weight("default").shape
            bounds.append(min(d_out, d_in, row.num_experts**2 * row.r))
        assert tuple(bounds) == row.rank_bounds


@pytest.mark.parametrize(
    "settings, budget",
    [
        (dict(target_modules=["q_proj", "fc1"]), 1000),  # sequential: 4 layers of 32 x 32
        (dict(target_modules=["q_proj", "fc1"], mode="parallel"), 1500),  # fc1 is 64 x 32
        (dict(target_modules=["fc1"], share_rules=False), 700),  # rules per layer
        (dict(target_modules=["attention", "mlp"]), 800),  # block placement
        (dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]), 400),
    ],
    ids=["sequential", "parallel", "own-rules", "blocks", "one-layer"],
)
def test_counts_equal_what_peft_reports(settings, budget):
    base = tiny_vit()
    rows = plan_budget(base, budget=budget, **settings)
    assert rows, "the budget admits some rows"
    assert all(row.trainable <= budget for row in rows)
    # Every fitting (r, n) is listed once: brute force over the same grid.
    assert len({(row.r, row.num_experts) for row in rows}) == len(rows)
    check_rows_against_peft(base, rows[:3] + rows[-2:], modules_to_save=["classifier"])
    # The planned model is untouched and keeps its weights.
    assert not any(isinstance(m, AloreLayer) for m in base.modules())
    assert all(p.device.type == "cpu" for p in base.parameters())


def test_grid_is_complete_and_sorted():
    base = tiny_vit()
    rows = plan_budget(base, budget=1000, target_modules=["q_proj", "fc1"])  # 4 layers x 64 per rank
    valid = functional.valid_num_experts(32)
    assert {row.num_experts for row in rows} <= set(valid)
    expected = {(r, n) for n in valid for r in range(1, 32 // n + 1) if r * 4 * 64 + n**3 <= 1000}
    assert {(row.r, row.num_experts) for row in rows} == expected
    trainable = [row.trainable for row in rows]
    assert trainable == sorted(trainable, reverse=True)
    by_rank = plan_budget(base, budget=1000, target_modules=["q_proj", "fc1"], sort="rank")
    assert [row.min_rank for row in by_rank] == sorted((row.min_rank for row in by_rank), reverse=True)
    assert sorted(by_rank, key=lambda row: (row.r, row.num_experts)) == sorted(
        rows, key=lambda row: (row.r, row.num_experts)
    )
    # Explicit ranks restrict the grid.
    only = plan_budget(base, budget=1000, target_modules=["q_proj", "fc1"], ranks=[2])
    assert {row.r for row in only} == {2}


def test_vit_base_paper_count_from_model_type_alone():
    rows = plan_budget(model_type="vit", budget=150_000, target_modules=["q_proj", "fc1"])
    row = next(row for row in rows if (row.r, row.num_experts) == (4, 4))
    # 12 blocks x 2 adapters x 2 * 768 * 4 + 4**3, the paper's 0.15M; dW reaches rank 64.
    assert (row.trainable, row.layers, row.min_rank) == (147_520, 24, 64)
    assert rows[0].trainable == max(r.trainable for r in rows) <= 150_000


def test_config_path_matches_a_real_model():
    config = tiny_vit_config()
    rows = plan_budget(config=config, budget=900, target_modules=["q_proj", "fc1"], mode="parallel")
    torch.manual_seed(0)
    check_rows_against_peft(ViTModel(config), rows[:2])


def test_to_config_and_errors():
    rows = plan_budget(tiny_vit(), budget=1000, target_modules=["q_proj", "fc1"])
    config = rows[0].to_config(alpha=8.0, modules_to_save=["classifier"])
    assert (config.r, config.num_experts, config.alpha, config.mode) == (
        rows[0].r,
        rows[0].num_experts,
        8.0,
        "sequential",
    )
    assert config.target_modules == {"q_proj", "fc1"}
    with pytest.raises(ValueError, match=r"cannot override \['r'\]"):
        rows[0].to_config(r=8)
    record = rows[0].as_dict()
    assert record["budget_used"] == pytest.approx(rows[0].trainable / 1000)
    assert plan_budget(tiny_vit(), budget=10, target_modules=["q_proj"]) == []  # even r=1 is 4 * 64 > 10
    with pytest.raises(ValueError, match="budget must be a positive number"):
        plan_budget(tiny_vit(), budget=0, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="No ALoRE layer can be placed.*Valid target names.*q_proj"):
        plan_budget(tiny_vit(), budget=1000, target_modules=r"vit\.no_such\..*")
    # A list with one unknown name is refused too (PEFT alone would adapt the others silently).
    with pytest.raises(ValueError, match=r"\['no_such_module'\] match no module.*layers classifier, fc1"):
        plan_budget(tiny_vit(), budget=1000, target_modules=["q_proj", "no_such_module"])
    with pytest.raises(ValueError, match="already contains ALoRE layers"):
        model = get_peft_model(tiny_vit(), rows[0].to_config())
        plan_budget(model, budget=1000, target_modules=["q_proj"])
