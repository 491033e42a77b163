"""Nothing half-done: a call that fails leaves the user's model exactly as it was, and multi-adapter states stay consistent.

One table of failing calls crossed with one check (the model's state dict,
module types, ``requires_grad`` and train/eval flags bit-identical afterwards),
then the single cases: a retry after a failure works, shared rules follow
their adapter's dtype and trainability, merges split over several calls equal
one call, and what cannot be done is refused with a sentence that says why.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from alore_peft import AloreConfig, AloreLayer

from .models import tiny_mlp, tiny_vit


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave unchanged."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(name, type(m)) for name, m in model.named_modules()],
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "training": [(name, m.training) for name, m in model.named_modules()],
    }


def assert_unchanged(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"], "module tree changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def _vit3():
    return tiny_vit()  # 3 labels: num_experts=4 cannot divide the classifier's 3 outputs


FAILING_INJECTIONS: dict[str, tuple[Callable[[], nn.Module], dict, str]] = {
    "parallel, a target the experts do not divide": (
        _vit3, dict(mode="parallel", target_modules=["q_proj", "classifier"]), "does not divide"),
    "sequential, a container without linear layers": (
        _vit3, dict(target_modules=["attention", "layernorm_before"]), "no torch.nn.Linear"),
    "absurd num_experts": (_vit3, dict(num_experts=2000, target_modules=["q_proj"]), "does not divide"),
    "parallel mode on a container": (_vit3, dict(mode="parallel", target_modules=["attention"]), "container"),
    "nested targets": (_vit3, dict(target_modules=["attention", "q_proj"]), "both the container"),
    "grouped convolution": (
        lambda: nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 1)),
        dict(target_modules=["1", "0"]), "groups=1"),
}


@pytest.mark.parametrize("name", list(FAILING_INJECTIONS))
def test_failed_get_peft_model_leaves_the_model_as_it_was(name):
    make, kwargs, needle = FAILING_INJECTIONS[name]
    model = make()
    before = snapshot(model)
    with pytest.raises(ValueError, match=needle):
        get_peft_model(model, AloreConfig(r=2, **{"num_experts": 4, **kwargs}))
    assert_unchanged(before, model)


@pytest.mark.parametrize("name", list(FAILING_INJECTIONS))
def test_failed_add_adapter_leaves_the_peft_model_as_it_was(name):
    make, kwargs, needle = FAILING_INJECTIONS[name]
    first = ["1"] if "convolution" in name else ["classifier"]  # a first adapter away from the failing targets
    model = get_peft_model(make(), AloreConfig(r=2, num_experts=1, target_modules=first))
    before = snapshot(model)
    rules = set(model.base_model.alore_rules)
    with pytest.raises(ValueError, match=needle):
        model.add_adapter("other", AloreConfig(r=2, **{"num_experts": 4, **kwargs}))
    assert_unchanged(before, model)
    assert set(model.base_model.alore_rules) == rules, "no shared rules left behind"
    assert "other" not in model.peft_config


def test_a_retry_after_a_failure_works():
    model = _vit3()
    with pytest.raises(ValueError, match="does not divide"):
        get_peft_model(model, AloreConfig(num_experts=4, mode="parallel", target_modules=["q_proj", "classifier"]))
    peft_model = get_peft_model(model, AloreConfig(num_experts=1, mode="parallel", init_weights=False,
                                                  target_modules=["q_proj", "classifier"]))
    assert peft_model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 3)
    peft_model.add_adapter("b", AloreConfig(num_experts=2, target_modules=["q_proj"], init_weights=False))
    with pytest.raises(ValueError, match="does not divide"):
        peft_model.add_adapter("c", AloreConfig(num_experts=4, mode="parallel", target_modules=["classifier"]))
    peft_model.add_adapter("c", AloreConfig(num_experts=2, target_modules=["q_proj"], init_weights=False))
    peft_model.base_model.set_adapter(["b", "c"])
    assert torch.isfinite(peft_model(torch.randn(2, 3, 32, 32)).logits).all()


def test_unmerge_of_a_singular_update_changes_nothing():
    model = get_peft_model(tiny_mlp(), AloreConfig(r=8, num_experts=4, alpha=8, share_rules=False,
                                                  target_modules=["lin0", "lin1"], init_weights=False))
    lin1 = model.base_model.model.lin1
    with torch.no_grad():  # s dW = sum_i E_ii (x) (-I): I + s dW = 0 on lin1's input, so W is lost once merged
        q = lin1.in_dim // 4
        lin1.alore_A["default"].copy_(torch.diag_embed(torch.eye(4)))  # A_i = E_ii
        lin1.factors("default")[1].copy_(-torch.eye(q).expand(4, q, q))
        lin1.factors("default")[2].copy_(torch.eye(q).expand(4, q, q))
    model.merge_adapter()
    before = snapshot(model)
    with pytest.raises(ValueError, match="singular"):
        model.unmerge_adapter()
    assert_unchanged(before, model)
    assert all(m.merged for m in model.modules() if isinstance(m, AloreLayer)), "no layer was unmerged"
    with pytest.raises(ValueError, match="singular"):
        with model.disable_adapter():
            pass
    assert_unchanged(before, model)


def test_tied_consumer_weights_refuse_merging():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            shared = nn.Linear(8, 8)
            self.a = nn.Sequential(shared)  # one nn.Linear read by two containers
            self.b = nn.Sequential(shared)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.a(x) + self.b(x.flip(-1)))

    torch.manual_seed(0)
    model = get_peft_model(Shared(), AloreConfig(r=2, num_experts=2, target_modules=["a", "b"], init_weights=False))
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    before = snapshot(model)
    with pytest.raises(ValueError, match="tied or shared weights"):
        model.merge_adapter()
    assert_unchanged(before, model)
    with pytest.raises(ValueError, match="tied or shared weights"):
        model.merge_and_unload()
    assert_unchanged(before, model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_add_weighted_adapter_says_why_not():
    model = get_peft_model(tiny_mlp(), AloreConfig(r=2, num_experts=4, target_modules=["lin0"]))
    model.add_adapter("b", AloreConfig(r=2, num_experts=4, target_modules=["lin0"]))
    with pytest.raises(NotImplementedError, match="own rule matrices.*set_adapter"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix")


# -- multiple adapters: merged and unmerged agree however merges are split ------------------
MERGE_SPLITS = [
    (("sequential", "sequential"), ["lin0", "lin1"]),
    (("parallel", "sequential"), ["lin0", "lin1"]),
    (("sequential", "parallel"), ["lin0", "lin1"]),
    (("sequential", "sequential"), None),  # blocks: the ViT's attention and mlp inputs
]


@pytest.mark.parametrize("modes,targets", MERGE_SPLITS, ids=["seq+seq", "par+seq", "seq+par", "block+block"])
def test_merging_in_two_calls_equals_one_call(modes, targets):
    make = tiny_mlp if targets else tiny_vit
    targets = targets or ["attention", "mlp"]
    model = get_peft_model(make(), AloreConfig(r=2, num_experts=2, mode=modes[0], target_modules=targets,
                                               init_weights=False))
    model.add_adapter("b", AloreConfig(r=2, num_experts=2, mode=modes[1], target_modules=targets,
                                       init_weights=False))
    model.base_model.set_adapter(["default", "b"])
    x = torch.randn(2, 16) if make is tiny_mlp else torch.randn(2, 3, 32, 32)

    def out():
        with torch.no_grad():
            y = model(x)
            return y.logits if hasattr(y, "logits") else y

    out()  # blocks trace their consumers on their first call
    expected = out()
    one = copy.deepcopy(model)
    one.merge_adapter(["default", "b"])
    model.merge_adapter(["default"])
    model.merge_adapter(["b"])
    torch.testing.assert_close(out(), expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        y_one = one(x)
    torch.testing.assert_close(y_one.logits if hasattr(y_one, "logits") else y_one, expected, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(out(), expected, rtol=1e-4, atol=1e-5)


# -- shared rules follow their adapter's layers -------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("autocast", [True, False])
def test_shared_rules_take_the_adapters_dtype(dtype, autocast):
    model = get_peft_model(tiny_mlp().to(dtype), AloreConfig(r=2, num_experts=4, target_modules=["lin0"]),
                           autocast_adapter_dtype=autocast)
    factors = {p.dtype for n, p in model.named_parameters() if "alore_" in n}
    assert factors == {torch.float32 if autocast else dtype}


def test_shared_rules_trainability_follows_loading_and_disabling(tmp_path):
    config = AloreConfig(r=2, num_experts=4, target_modules=["lin0"], init_weights=False)
    get_peft_model(tiny_mlp(), config).save_pretrained(tmp_path)
    rules = lambda m, name: m.base_model.alore_rules[name].requires_grad  # noqa: E731
    frozen = PeftModel.from_pretrained(tiny_mlp(), tmp_path)
    frozen.load_adapter(tmp_path, adapter_name="trainable", is_trainable=True)
    assert not rules(frozen, "default") and rules(frozen, "trainable")
    trainable = PeftModel.from_pretrained(tiny_mlp(), tmp_path, is_trainable=True)
    trainable.load_adapter(tmp_path, adapter_name="frozen")
    assert rules(trainable, "default") and not rules(trainable, "frozen")
    with trainable.disable_adapter():
        assert not rules(trainable, "default")
    assert rules(trainable, "default")
