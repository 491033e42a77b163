"""The PEFT API on ALoRE: one table of (model, config) cases crossed with shared checks."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import alore_peft
from alore_peft import AloreConfig, AloreLayer

from .models import small_conv_net, tiny_mlp, tiny_vit
from .tolerances import TOLERANCES

TOL = dict(zip(("rtol", "atol"), TOLERANCES[torch.float32]))  # float32 end-to-end outputs


@dataclass
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    config: dict
    make_input: Callable[[], torch.Tensor]
    n_targets: int
    shapes: list = field(default_factory=list)  # (d_out, d_in) of each adapted update

    def build(self, **overrides) -> tuple[nn.Module, nn.Module]:
        """(untouched copy of the base model, PEFT model)."""
        base = self.make_model()
        reference = copy.deepcopy(base)
        model = get_peft_model(base, AloreConfig(**{**self.config, **overrides}))
        return reference, model


def _vit_input():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _mlp_input():
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


def _image_input():
    return torch.randn(3, 4, 12, 12, generator=torch.Generator().manual_seed(0))


def _out(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


CASES = [
    Case("mlp-sequential", tiny_mlp, dict(r=2, num_experts=4, target_modules=["lin0", "lin1"]), _mlp_input, 2,
         [(16, 16), (32, 32)]),
    Case("mlp-parallel", tiny_mlp, dict(r=2, num_experts=2, mode="parallel", target_modules=["lin0", "lin1"]),
         _mlp_input, 2, [(32, 16), (8, 32)]),
    Case("vit-sequential", tiny_vit, dict(r=2, num_experts=4, target_modules=["q_proj", "v_proj", "fc1"]),
         _vit_input, 6, [(32, 32)] * 6),
    Case("vit-parallel", tiny_vit, dict(r=4, num_experts=4, mode="parallel", target_modules=["q_proj", "v_proj"],
                                        modules_to_save=["classifier"]), _vit_input, 4, [(32, 32)] * 4),
    Case("vit-unshared-rules", tiny_vit, dict(r=2, num_experts=2, share_rules=False, dropout=0.1,
                                              target_modules=["q_proj", "fc2"]), _vit_input, 4,
         [(32, 32), (64, 64)] * 2),
    # Block placement: one adapter on each attention and MLP input, folded into q/k/v and fc1.
    Case("vit-blocks", tiny_vit, dict(r=2, num_experts=4, target_modules=["attention", "mlp"]), _vit_input, 4,
         [(32, 32)] * 4),
    Case("conv-sequential", small_conv_net, dict(r=2, num_experts=4, target_modules=["stem", "body", "proj"]),
         _image_input, 3, [(4, 4), (8, 8), (8, 8)]),
    Case("conv-parallel", small_conv_net, dict(r=2, num_experts=4, mode="parallel",
                                               target_modules=["stem", "body", "proj"]),
         _image_input, 3, [(8, 4 * 9), (8, 8 * 9), (16, 8)]),
]
IDS = [c.name for c in CASES]


def alore_layers(model):
    return [m for m in model.modules() if isinstance(m, AloreLayer)]


def train_steps(model, x, steps=2, lr=1e-2):
    """A few AdamW steps on a real loss; returns which adapter tensors ever got a non-zero gradient."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=lr)
    got_grad = {n: False for n in params}
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = _out(model, x).pow(2).mean()
        loss.backward()
        for n, p in params.items():
            got_grad[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        opt.step()
    model.eval()
    return got_grad


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identity_at_init_bit_for_bit(case):
    reference, model = case.build()
    x = case.make_input()
    assert torch.equal(_out(model, x), _out(reference, x))
    assert len(alore_layers(model)) == case.n_targets


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_factor_gets_gradient_and_params_counted(case, capsys):
    _, model = case.build()
    config = model.peft_config["default"]
    n, r = config.num_experts, config.r
    experts = sum(r * (d_out + d_in) for d_out, d_in in case.shapes)
    rules = n**3 * (1 if config.share_rules else case.n_targets)
    head = sum(p.numel() for name, p in model.named_parameters() if "modules_to_save" in name and p.requires_grad)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == experts + rules + head
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out

    got_grad = train_steps(model, case.make_input(), steps=2)
    adapter_params = [name for name in got_grad if "alore_" in name]
    assert adapter_params and all(got_grad[name] for name in adapter_params), got_grad
    # Only adapter (and modules_to_save) parameters are trainable.
    assert all("alore_" in name or "modules_to_save" in name for name in got_grad)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_disable_adapter_gives_base_output(case):
    reference, model = case.build(init_weights=False)
    x = case.make_input()
    assert not torch.allclose(_out(model, x), _out(reference, x), **TOL)
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, x), _out(reference, x), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_unmerge_exact(case):
    reference, model = case.build(init_weights=False)
    x = case.make_input()
    expected = _out(model, x)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    assert all(layer.merged for layer in alore_layers(model))
    torch.testing.assert_close(_out(model, x), expected, **TOL)
    changed = [n for n, p in model.named_parameters() if n in base_weights and not torch.equal(p, base_weights[n])]
    assert changed, "merging must change the base weights"
    model.unmerge_adapter()
    for name, p in model.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(p, base_weights[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_out(model, x), expected, **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_and_unload_returns_plain_modules(case):
    reference, model = case.build(init_weights=False)
    x = case.make_input()
    expected = _out(model, x)
    merged = model.merge_and_unload(safe_merge=True)
    assert not alore_layers(merged)
    assert not any("alore_" in name for name, _ in merged.named_parameters())
    assert {type(m) for m in merged.modules()} <= {type(m) for m in reference.modules()} | {
        type(m) for m in model.modules() if "ModulesToSave" in type(m).__name__
    }
    torch.testing.assert_close(_out(merged, x), expected, **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unload_restores_base(case):
    reference, model = case.build(init_weights=False)
    x = case.make_input()
    base = model.unload()
    assert not alore_layers(base)
    if not case.config.get("modules_to_save"):
        torch.testing.assert_close(_out(base, x), _out(reference, x), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_round_trip(case, tmp_path):
    _, model = case.build(init_weights=False)
    train_steps(model, case.make_input(), steps=1)
    x = case.make_input()
    with torch.no_grad():  # the loaded adapter is frozen: compare both on the same (inference) path
        expected = _out(model, x)
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "adapter_model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ALORE"
    loaded = PeftModel.from_pretrained(case.make_model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded, x), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters()), "inference mode by default"
    trainable = PeftModel.from_pretrained(case.make_model(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "alore_" in n)
    if trainable.peft_config["default"].share_rules:
        assert trainable.base_model.alore_rules["default"].requires_grad


def test_shared_rules_one_copy_trained_by_all_layers(tmp_path):
    _, model = CASES[2].build()
    layers = alore_layers(model)
    rules = model.base_model.alore_rules["default"]
    assert all(layer.rules("default") is rules for layer in layers)
    assert [k for k in model.state_dict() if "rules" in k or "alore_A" in k] == ["base_model.alore_rules.default"]
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path)
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    assert [k for k in keys if "rules" in k] == ["base_model.alore_rules"]
    # Each layer's contribution reaches the rules: dropping a layer's path changes the gradient.
    train_steps(model, CASES[2].make_input(), steps=1)  # B != 0 from here on
    x = CASES[2].make_input()
    _out(model, x).pow(2).mean().backward()
    full = rules.grad.clone()
    rules.grad = None
    with torch.no_grad():
        layers[0].alore_B["default"].zero_()
    _out(model, x).pow(2).mean().backward()
    assert not torch.allclose(rules.grad, full)


def test_unshared_rules_are_per_layer():
    _, model = CASES[4].build()
    rules = [layer.rules("default") for layer in alore_layers(model)]
    assert len({id(r) for r in rules}) == len(rules)
    assert len(model.base_model.alore_rules) == 0


def test_two_adapters_add_set_delete(tmp_path):
    reference, model = CASES[0].build(init_weights=False)
    x = _mlp_input()
    out_a = _out(model, x)
    model.add_adapter("b", AloreConfig(r=1, num_experts=2, mode="parallel", init_weights=False,
                                       target_modules=["lin0"]))
    assert torch.equal(_out(model, x), out_a), "adding an adapter must not activate it"
    model.set_adapter("b")
    out_b = _out(model, x)
    assert not torch.allclose(out_b, out_a)
    # Only b is trainable now, including its own shared rules.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".b" in n for n in trainable), trainable
    # Both at once: sequential a on the input, parallel b beside it.
    model.base_model.set_adapter(["default", "b"])
    out_ab = _out(model, x)
    assert not torch.allclose(out_ab, out_a) and not torch.allclose(out_ab, out_b)
    model.merge_adapter()
    torch.testing.assert_close(_out(model, x), out_ab, **TOL)
    model.unmerge_adapter()
    torch.testing.assert_close(_out(model, x), out_ab, **TOL)
    model.base_model.set_adapter("default")
    model.delete_adapter("b")
    assert "b" not in model.peft_config and "b" not in model.base_model.alore_rules
    assert all("b" not in layer.alore_B for layer in alore_layers(model))
    torch.testing.assert_close(_out(model, x), out_a, **TOL)  # unmerge restores weights to round-off


def test_load_adapter_second_adapter(tmp_path):
    _, model = CASES[2].build(init_weights=False)
    model.save_pretrained(tmp_path)
    x = _vit_input()
    expected = _out(model, x)
    other = PeftModel.from_pretrained(tiny_vit(), tmp_path, adapter_name="first")
    other.load_adapter(tmp_path, adapter_name="second")
    other.set_adapter("second")
    torch.testing.assert_close(_out(other, x), expected, rtol=0, atol=0)


def test_round_trip_in_a_fresh_process(tmp_path):
    base = tiny_vit()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, AloreConfig(r=2, num_experts=4, init_weights=False,
                                             target_modules=["q_proj", "fc1"]))
    model.save_pretrained(tmp_path / "adapter")
    x = _vit_input()
    torch.save(x, tmp_path / "x.pt")
    torch.save({k: v for k, v in model.state_dict().items() if "alore_" in k}, tmp_path / "adapter.pt")
    with torch.no_grad():  # the loaded adapter is frozen: both run the inference path
        torch.save(_out(model.eval(), x), tmp_path / "expected.pt")
    # The adapter comes back bit for bit. The outputs agree to float32 round-off, not bit for bit: the
    # reloaded frozen weights are memory-mapped from the safetensors file at whatever offset its header
    # leaves, and the BLAS rounds unaligned inputs differently (about 1e-8 here).
    script = textwrap.dedent(
        f"""
        import torch, alore_peft
        from peft import PeftModel
        from transformers import ViTForImageClassification
        base = ViTForImageClassification.from_pretrained({str(tmp_path / 'base')!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
        saved = torch.load({str(tmp_path / 'adapter.pt')!r})
        loaded = model.state_dict()
        assert saved and all(torch.equal(loaded[k], v) for k, v in saved.items()), sorted(saved)
        with torch.no_grad():
            out = model(torch.load({str(tmp_path / 'x.pt')!r})).logits
        torch.testing.assert_close(out, torch.load({str(tmp_path / 'expected.pt')!r}), rtol=1e-6, atol=1e-6)
        print("identical adapter, same outputs")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "identical adapter, same outputs" in result.stdout


def test_hf_trainer_one_step_saves_only_adapter(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_vit(), AloreConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"pixel_values": torch.randn(4, 3, 32, 32, generator=g).tolist(), "labels": [0, 1, 2, 0]})
    data.set_format("torch")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=data).train()
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if "alore_B" in n)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]


# -- bad input is refused, nothing is lost ------------------------------------------------------------------------


def _module_types(model):
    return [(n, type(m)) for n, m in model.named_modules()]


def test_adapter_of_another_width_is_refused_and_base_unchanged(tmp_path):
    _, model = CASES[2].build(init_weights=False)
    model.save_pretrained(tmp_path)
    wider = tiny_vit(hidden_size=64)
    types, x = _module_types(wider), _vit_input()
    expected = _out(wider, x)
    with pytest.raises(ValueError, match="does not fit this base model"):
        PeftModel.from_pretrained(wider, tmp_path)
    assert _module_types(wider) == types and not hasattr(wider, "peft_config")
    torch.testing.assert_close(_out(wider, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_adapter_file_is_refused_and_base_unchanged(tmp_path, damage):
    _, model = CASES[2].build(init_weights=False)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 16 + data[16:])
    base = tiny_vit()
    types = _module_types(base)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        PeftModel.from_pretrained(base, tmp_path)
    assert _module_types(base) == types


def test_safe_merge_refuses_non_finite_and_leaves_weights():
    _, model = CASES[0].build(init_weights=False)
    layer = alore_layers(model)[0]
    with torch.no_grad():
        layer.alore_B["default"][0, 0] = float("nan")
    before = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before)
    assert not layer.merged


def test_num_experts_not_dividing_names_module_and_valid_values():
    with pytest.raises(ValueError, match=r"module 'lin1'.*Valid num_experts for it: \[1, 2, 4, 8\]"):
        get_peft_model(tiny_mlp(), AloreConfig(num_experts=3, mode="parallel", target_modules=["lin1"]))


def test_unsupported_target_type_is_refused():
    with pytest.raises(ValueError, match="ALoRE can adapt torch.nn.Linear"):
        get_peft_model(tiny_mlp(), AloreConfig(mode="parallel", target_modules=["act"]))


BAD_CONFIGS = [
    (dict(r=0), "r=0"),
    (dict(r=2.5), "r=2.5"),
    (dict(num_experts=-1), "num_experts=-1"),
    (dict(alpha="big"), "alpha='big'"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(mode="serial"), "mode='serial'"),
    (dict(compute_path="fast"), "compute_path='fast'"),
    (dict(rule_init="zeros"), "rule_init='zeros'"),
    (dict(alpha=float("inf")), "alpha=inf"),
    (dict(alpha=float("-inf")), "alpha=-inf"),
    (dict(alpha=float("nan")), "alpha=nan"),
    (dict(share_rules="yes"), "share_rules='yes'"),
    (dict(layers_pattern="layers"), "layers_to_transform"),
]


@pytest.mark.parametrize("kwargs,needle", BAD_CONFIGS, ids=[n for _, n in BAD_CONFIGS])
def test_invalid_config_values_are_named(kwargs, needle):
    with pytest.raises(ValueError, match="AloreConfig") as info:
        AloreConfig(**kwargs)
    assert needle in str(info.value)


def test_unknown_model_type_without_targets():
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(tiny_mlp(), AloreConfig())


def test_registration_is_idempotent():
    import importlib

    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    importlib.reload(alore_peft)
    alore_peft.register(alore_peft.AloreConfig, alore_peft.AloreModel)
    assert list(PeftType).count(PeftType.ALORE) == 1
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType("ALORE")] is alore_peft.AloreModel
    assert AloreConfig().peft_type == "ALORE"
