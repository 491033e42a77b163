"""Every compute path of an ALoRE layer gives the naive ``torch.kron`` result; the fast ones stay fast.

One table of layers (``nn.Linear`` and ``nn.Conv2d`` in both modes, a 1x1 and
a strided 3x3 convolution, and a block on a container that three linear
layers read) crossed with the paths (``factored``, ``fold``, ``auto``) and the
dtypes: values and gradients against a reference that builds ``dW`` as
``sum_i kron(A[i], B[i] @ C[i])`` in float64. Then: the eval-mode cache never
serves a stale weight, every layer and a whole model compile with
``fullgraph=True``, and a training call runs no more operators than PEFT's
LoRA at the same budget.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import alore_peft.layer as L
from alore_peft import AloreBlock, AloreConfig
from alore_peft import functional

from .models import tiny_vit, tiny_vit_config
from .tolerances import assert_close

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class Attention(nn.Module):
    """A container whose input three linear layers read (like a ViT attention's q, k, v)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return torch.cat([q * k, v], dim=-1)


@dataclass(frozen=True)
class LayerCase:
    name: str
    make_base: Callable[[], nn.Module]
    input_shape: tuple
    modes: tuple = ("sequential", "parallel")


LAYER_CASES = [
    LayerCase("linear", lambda: nn.Linear(16, 24), (2, 5, 16)),
    LayerCase("conv1x1", lambda: nn.Conv2d(8, 12, kernel_size=1), (2, 8, 5, 4)),
    LayerCase("conv3x3", lambda: nn.Conv2d(8, 12, kernel_size=3, padding=1, stride=2), (2, 8, 5, 4)),
    LayerCase("block", Attention, (2, 5, 16), modes=("sequential",)),
]
PATHS = ("factored", "fold", "auto")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [(case, mode, path) for case in LAYER_CASES for mode in case.modes for path in PATHS]
IDS = [f"{case.name}-{mode}-{path}" for case, mode, path in CASES]


def make_layer(case: LayerCase, mode: str, path: str = "auto", dtype=torch.float32, seed: int = 0) -> L.AloreLayer:
    torch.manual_seed(seed)
    base = case.make_base().requires_grad_(False)
    cfg = AloreConfig(
        r=2, num_experts=4, alpha=3.0, mode=mode, share_rules=False, init_weights=False, compute_path=path
    )
    if case.name == "block":
        layer = AloreBlock(base, "default", cfg, module_name="attention")
    else:
        layer = L.LAYER_TYPES[type(base)](base, "default", cfg, module_name="layer")
    return layer.to(dtype)


def make_input(case: LayerCase, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.input_shape, generator=g).to(dtype).requires_grad_(True)


def reference(layer: L.AloreLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output in float64 from ``sum_i kron(A[i], B[i] @ C[i])``, differentiable in x, A, B, C."""
    A, B, C = (t.double() for t in layer.factors("default"))
    dW = functional.reference_delta_weight(A, B, C, layer.scaling["default"])
    mode = layer.mode["default"]
    base = copy.deepcopy(layer.get_base_layer()).double()
    xd = x.double()
    if isinstance(base, nn.Conv2d):
        if mode == "sequential":  # dW mixes the input channels of every pixel
            return base(xd + torch.einsum("oi,bihw->bohw", dW, xd))
        return base(xd) + base._conv_forward(xd, dW.view(base.weight.shape), None)
    if mode == "sequential":
        return base(xd + xd @ dW.T)
    return base(xd) + xd @ dW.T


def store_b_other(layer: L.AloreLayer) -> None:
    """Re-store the up factor matrix column-major (not the layers' layout): any layout must compute the same."""
    B = layer.alore_B["default"]
    stored = B.detach().t().contiguous().t()
    layer.alore_B["default"] = nn.Parameter(stored, requires_grad=B.requires_grad)


@pytest.mark.parametrize("b_layout", ["stored", "other"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,mode,path", CASES, ids=IDS)
def test_every_path_matches_kron_values_and_gradients(case, mode, path, dtype, b_layout):
    layer = make_layer(case, mode, path, dtype)
    if b_layout == "other":
        store_b_other(layer)
    x = make_input(case, dtype)
    A = layer.factors("default")[0]
    B, C = layer.alore_B["default"], layer.alore_C["default"]  # the parameters, (n r, d_out / n) and (n r, d_in / n)
    assert B.is_contiguous() == (b_layout == "stored")
    out = layer(x)
    ref = reference(layer, x)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tensors = [x, A, B, C]
    grads = torch.autograd.grad(out, tensors, g.to(dtype), retain_graph=True)
    for got, want in zip(grads, torch.autograd.grad(ref, tensors, g)):
        assert got is not None and got.abs().sum() > 0
        assert_close(got, want, dtype)
    if path == "factored" and b_layout == "stored":  # the layers' own layout: accumulating the gradients copies nothing
        assert [got.stride() for got in grads[1:]] == [p.stride() for p in (A, B, C)]


@pytest.mark.parametrize("case,mode,path", CASES, ids=IDS)
def test_an_empty_batch_passes_every_path(case, mode, path):
    layer = make_layer(case, mode, path)
    x = make_input(case)[:0].detach().requires_grad_(True)  # no samples: the last batch of a filtered dataset
    out = layer(x)
    assert out.shape == reference(layer, x.detach()).shape and out.shape[0] == 0
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("case,mode,path", CASES, ids=IDS)
def test_eval_without_gradients_matches_kron(case, mode, path):
    # Inference: "auto" serves from cached folded weights; every path gives one answer.
    layer = make_layer(case, mode, path, torch.float64).eval()
    x = make_input(case, torch.float64).detach()
    with torch.no_grad():
        out = layer(x)
    assert_close(out, reference(layer, x), torch.float64)


@pytest.mark.parametrize("case,mode,path", CASES, ids=IDS)
def test_float32_layer_under_bfloat16_autocast_matches_kron(case, mode, path):
    # The usual mixed-precision setup: float32 adapter and weights, autocast on.
    layer = make_layer(case, mode, path, torch.float32)
    x = make_input(case, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert_close(out, reference(layer, x), torch.bfloat16)
    (grad_x,) = torch.autograd.grad(out.float().sum(), [x])
    assert grad_x.dtype == torch.float32 and torch.isfinite(grad_x).all()


def test_auto_path_picks_per_call_and_folds_in_training_only_where_the_mixing_outgrows_the_layer():
    case = LAYER_CASES[0]
    layer = make_layer(case, "parallel", "auto")  # 16 -> 24, n = 4, r = 2: mixing 32 values per token
    x = torch.randn(1, 4096, 16)
    assert functional.fold_can_pay(16, 24, 4, 2)  # ... costs more per token than the 16 x 24 weight
    training = functional.prefer_fold(4096, 16, 24, 4, 2, needs_grad=True)
    assert training and layer._use_fold(["default"], x)  # training: the flop model decides, per call
    assert not functional.prefer_fold(1, 16, 24, 4, 2, needs_grad=True) and not layer._use_fold(["default"], x[:, :1])
    layer.eval()
    assert layer._use_fold(["default"], x) == training  # gradients on: as in training
    with torch.no_grad():
        assert layer._use_fold(["default"], x)  # inference in eval mode: cached fold
    layer.train()
    with torch.no_grad():  # train mode without gradients: the flop model decides, per call
        assert layer._use_fold(["default"], x) == functional.prefer_fold(4096, 16, 24, 4, 2)
        assert not layer._use_fold(["default"], x[:, :1])
    # The paper's sizes: the factored path is the cheaper per token, so training never folds.
    wide = get_peft_model(nn.Sequential(nn.Linear(768, 768)), AloreConfig(r=4, num_experts=4, target_modules=["0"]))
    assert not functional.fold_can_pay(768, 768, 4, 4, "sequential")
    assert not wide.base_model.model[0]._use_fold(["default"], torch.randn(1, 4096, 768))


@pytest.mark.parametrize("mode,targets", [("sequential", ["attention", "mlp"]), ("parallel", ["q_proj", "fc1"])],
                         ids=["block", "parallel"])
def test_training_folds_where_the_mixing_outgrows_the_layer_with_the_factored_gradients(mode, targets):
    # r = 8, n = 4 on 32-wide layers: mixing n^2 r = 128 values per token costs more than the weights.
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = []
    for path in ("auto", "factored"):
        model = get_peft_model(tiny_vit(), AloreConfig(r=8, num_experts=4, mode=mode, target_modules=targets,
                                                        init_weights=False, compute_path=path)).train()
        folds = []

        def record(layer, args, kwargs):  # the path each adapted layer takes for this call
            folds.append(layer._use_fold(["default"], layer._find_input(args, kwargs)[0]))

        for layer in (m for m in model.modules() if isinstance(m, L.AloreLayer)):
            layer.register_forward_pre_hook(record, with_kwargs=True)
        logits = model(pixel_values=x).logits
        logits.square().sum().backward()
        results.append((folds, logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (auto_folds, auto_out, auto_grads), (factored_folds, out, grads) = results
    assert any(auto_folds) and not any(factored_folds)
    assert_close(auto_out, out, torch.float32)
    assert auto_grads.keys() == grads.keys() and any("alore_rules" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(auto_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("taps,channels_first", [(1, False), (9, True)])
def test_fold_can_pay_bounds_the_cost_model(mode, taps, channels_first):
    # Where fold_can_pay says no, prefer_fold never picks the fold with gradients, whatever the tokens.
    for d_in, d_out, n, r in [(768, 768, 4, 4), (768, 3072, 4, 8), (64, 64, 4, 8), (16, 24, 4, 2), (768, 768, 16, 8)]:
        can = functional.fold_can_pay(d_in, d_out, n, r, mode, taps, channels_first)
        picks = [functional.prefer_fold(t, d_in, d_out, n, r, True, mode, taps, channels_first) for t in (1, 197, 10**6)]
        assert can or not any(picks), (d_in, d_out, n, r)
        assert not can or picks[-1], (d_in, d_out, n, r)  # and where it says yes, enough tokens make the fold pay


# -- the folded-weight cache never serves a stale weight ---------------------------------
def _vit_model(mode: str, targets: list[str]) -> nn.Module:
    return get_peft_model(tiny_vit(), AloreConfig(r=2, num_experts=4, mode=mode, target_modules=targets,
                                                  init_weights=False))


def _fresh(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output with every cache dropped (what a first call computes)."""
    for m in model.modules():
        if isinstance(m, L.AloreLayer):
            m._clear_cache()
    with torch.no_grad():
        return model(x).logits


def _cached(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def _adapter_param(model, suffix):
    return next(p for n, p in model.named_parameters() if n.endswith(suffix))


def _optimizer_step(model):
    model.train()
    model(torch.randn(2, 3, 32, 32)).logits.pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()


@torch.no_grad()
def _copy_into_up_factor(model):
    up = _adapter_param(model, "alore_B.default")
    up.copy_(torch.randn_like(up))


@torch.no_grad()
def _scale_rules_in_place(model):
    model.base_model.alore_rules["default"].mul_(-1.0)


@torch.no_grad()
def _shift_base_weight(model):
    layer = next(m for m in model.modules() if isinstance(m, L.AloreLayer))
    layer.consumer_weights()[0][1].add_(0.5)  # a weight the adapter folds into


def _replace_base_weight(model):
    layer = next(m for m in model.modules() if isinstance(m, L.AloreLayer))
    name, weight = layer.consumer_weights()[0]
    path, _, attr = name.rpartition(".")
    owner = layer.get_base_layer().get_submodule(path)
    setattr(owner, attr, torch.nn.Parameter(weight.detach() + 0.5, requires_grad=False))  # a new tensor object


def _load_down_factors(model):
    model.load_state_dict({k: v + 0.25 for k, v in model.state_dict().items() if "alore_C" in k}, strict=False)


def _dtype_round_trip(model):
    model.double()
    model.float()


def _train_then_eval(model):
    model.train()
    model.eval()


def _double_scale(model):
    for layer in model.modules():
        if isinstance(layer, L.AloreLayer):
            layer.scaling["default"] *= 2


# Each a change to the model after its cache is filled.
CHANGES = {
    "optimizer step": _optimizer_step,
    "up factor copied": _copy_into_up_factor,
    "shared rules in place": _scale_rules_in_place,
    "base weight in place": _shift_base_weight,
    "base weight replaced": _replace_base_weight,
    "state dict loaded": _load_down_factors,
    "dtype round trip": _dtype_round_trip,
    "train then eval": _train_then_eval,
    "merged": lambda model: model.merge_adapter(),
    "scale changed": _double_scale,
    "adapter disabled": None,  # checked inside the context manager
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("mode,targets", [("sequential", ["attention", "mlp"]), ("parallel", ["q_proj", "fc1"]),
                                          ("sequential", ["q_proj", "fc1"])], ids=["block", "parallel", "sequential"])
def test_cache_never_serves_a_stale_weight(mode, targets, change):
    model = _vit_model(mode, targets).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _cached(model, x)  # a block traces its consumers on its first call (the factored path)
    before = _cached(model, x)
    assert torch.equal(_cached(model, x), before), "a repeated call is served from the cache"
    layers = [m for m in model.modules() if isinstance(m, L.AloreLayer)]
    assert all(m._fold_cache is not None for m in layers)
    if change == "adapter disabled":
        with model.disable_adapter():
            after = _cached(model, x)
            torch.testing.assert_close(after, _fresh(model, x), rtol=0, atol=0)
        torch.testing.assert_close(_cached(model, x), before, rtol=0, atol=0)
        return
    CHANGES[change](model)
    after = _cached(model, x)
    expected = _fresh(model, x)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    if change not in ("dtype round trip", "train then eval", "merged"):
        assert not torch.equal(after, before), "the change must change the output"


def test_writes_through_data_are_seen_after_eval():
    # ``.data`` has a version counter of its own, so such writes are invisible until the next eval()/train().
    model = _vit_model("sequential", ["attention", "mlp"]).eval()
    x = torch.randn(2, 3, 32, 32)
    _cached(model, x)
    before = _cached(model, x)
    _adapter_param(model, "alore_B.default").data.mul_(3.0)
    model.eval()
    after = _cached(model, x)
    torch.testing.assert_close(after, _fresh(model, x), rtol=0, atol=0)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("mode,targets", [("sequential", ["attention", "mlp"]), ("parallel", ["q_proj", "fc1"]),
                                          ("sequential", ["q_proj", "fc1"])], ids=["block", "parallel", "sequential"])
def test_a_model_loaded_under_inference_mode_serves_and_sees_in_place_writes(mode, targets, tmp_path):
    # Loaded inside torch.inference_mode(), every parameter is an inference tensor: no version counter, so
    # nothing is cached (a write could not be told), and both modes serve what a normally loaded model does.
    from peft import PeftModel

    _vit_model(mode, targets).save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = _cached(PeftModel.from_pretrained(tiny_vit(), tmp_path).eval(), x)
    with torch.inference_mode():
        model = PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
        assert all(p.is_inference() for p in model.parameters())
        for _ in range(2):
            torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=0)
        assert all(m._fold_cache is None for m in model.modules() if isinstance(m, L.AloreLayer))
        _adapter_param(model, "alore_B.default").mul_(3.0)
        changed = model(x).logits
        assert not torch.allclose(changed, expected)
        model.train()  # a train-mode forward (the factored path) under inference mode
        torch.testing.assert_close(model(x).logits, changed, rtol=1e-5, atol=1e-6)


def test_cached_block_call_puts_the_containers_own_weights_back_even_on_error():
    model = _vit_model("sequential", ["attention", "mlp"]).eval()
    x = torch.randn(2, 3, 32, 32)
    _cached(model, x)
    params = dict(model.named_parameters())
    _cached(model, x)  # served from the folded weights swapped into the containers for the call
    assert {name: id(p) for name, p in model.named_parameters()} == {name: id(p) for name, p in params.items()}
    block = next(m for m in model.modules() if isinstance(m, AloreBlock))
    consumer = block.get_base_layer().get_submodule(block.trace.consumers[0].rpartition(".")[0])

    def fail(module, args):
        assert not isinstance(module.weight, nn.Parameter), "the folded weight is in place during the call"
        raise RuntimeError("fails inside the container")

    handle = consumer.register_forward_pre_hook(fail)
    with torch.no_grad(), pytest.raises(RuntimeError, match="inside the container"):
        model(pixel_values=x)
    handle.remove()
    assert all(p is params[name] for name, p in model.named_parameters())


@pytest.mark.parametrize("mode,targets", [("sequential", ["attention", "mlp"]), ("parallel", ["q_proj", "fc1"]),
                                          ("sequential", ["q_proj", "fc1"])], ids=["block", "parallel", "sequential"])
def test_cached_inference_runs_the_base_models_operators(mode, targets, monkeypatch):
    # Unmerged, in eval mode without gradients: exactly the operators of the model without adapters.
    opcount = _load_benchmark("opcount", monkeypatch)
    torch.manual_seed(0)
    base = tiny_vit().eval()
    model = get_peft_model(copy.deepcopy(base), AloreConfig(r=2, num_experts=4, mode=mode, target_modules=targets,
                                                             init_weights=False)).eval()
    x = torch.randn(2, 3, 32, 32)
    counts = {}
    for name, net in (("base", base), ("alore", model)):
        counts[name] = opcount.count_ops(lambda net=net: _cached(net, x))  # warm-up call fills the cache
        counts[name] = (counts[name].aten, counts[name].kernels)
    assert counts["alore"] == counts["base"]
    assert not torch.allclose(_cached(model, x), _cached(base, x))  # and the adapters are in the output


def test_cache_is_dropped_when_adapters_switch():
    model = get_peft_model(tiny_vit(), AloreConfig(r=2, num_experts=4, target_modules=["attention", "mlp"],
                                                  init_weights=False)).eval()
    model.add_adapter("other", AloreConfig(r=2, num_experts=4, target_modules=["attention", "mlp"],
                                           init_weights=False))
    x = torch.randn(2, 3, 32, 32)
    _cached(model, x)  # blocks trace their consumers on their first call
    first = _cached(model, x)
    model.set_adapter("other")
    other = _cached(model, x)
    assert not torch.allclose(first, other)
    torch.testing.assert_close(other, _fresh(model, x), rtol=0, atol=0)
    model.set_adapter("default")
    torch.testing.assert_close(_cached(model, x), first, rtol=0, atol=0)


# -- the rules mixed once per model forward ---------------------------------------------------
def test_one_rule_mix_per_adapter_and_forward_and_nothing_kept_after(monkeypatch):
    model = _vit_model("sequential", ["attention", "mlp"])  # four adapted containers, one adapter
    built = []
    real = functional.rule_mix
    monkeypatch.setattr(functional, "rule_mix", lambda *args: built.append(args) or real(*args))
    model.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model(pixel_values=x).logits.sum().backward()
    assert len(built) == 1
    mixes = model.base_model._rule_mixes
    assert mixes.built == {} and mixes.depth == 0
    model.base_model(pixel_values=x)  # the tuner's own forward opens the same scope
    assert len(built) == 2
    layer = next(m for m in model.modules() if isinstance(m, L.AloreLayer))
    h = torch.randn(2, 17, layer.in_dim)
    layer(h), layer(h)  # outside a model forward: every call builds its own
    assert len(built) == 4


def test_rule_mix_scopes_belong_to_their_thread():
    # nn.DataParallel runs replicas that share one RuleMixes in threads: a scope is the opening thread's alone.
    mixes = L.RuleMixes()
    A = torch.randn(4, 4, 4)
    inside, seen = threading.Event(), {}

    def other_thread():
        inside.wait()
        seen["outside"] = mixes.get(A, 2, torch.float32, 1.0)  # no scope of its own: a new mix
        with mixes.scope():
            seen["depth"] = mixes.depth
            seen["own"] = mixes.get(A, 2, torch.float32, 1.0)
            seen["again"] = mixes.get(A, 2, torch.float32, 1.0)

    worker = threading.Thread(target=other_thread)
    worker.start()
    with mixes.scope():
        mine = mixes.get(A, 2, torch.float32, 1.0)
        inside.set()
        worker.join()
        assert mixes.get(A, 2, torch.float32, 1.0) is mine and mixes.depth == 1 and len(mixes.built) == 1
    assert seen["outside"] is not mine and seen["own"] is not mine and seen["again"] is seen["own"]
    assert seen["depth"] == 1 and mixes.depth == 0 and mixes.built == {}
    torch.testing.assert_close(seen["own"].matrix, mine.matrix, rtol=0, atol=0)
    assert copy.deepcopy(mixes).depth == 0 and pickle.loads(pickle.dumps(mixes)).built == {}


def test_rule_mixes_in_a_backward_pass_are_shared_per_pass_and_rules_version():
    mixes = L.RuleMixes()
    A = torch.randn(4, 4, 4, requires_grad=True)
    seen = []

    def hook(grad: torch.Tensor) -> torch.Tensor:  # runs inside the backward pass, as a recomputed layer does
        first, again = mixes.get(A, 2, torch.float32, 1.0), mixes.get(A, 2, torch.float32, 1.0)
        with torch.no_grad():
            A.mul_(1.0)  # the rules change in place: a mix of the old values must not be served
        seen.append((first, again, mixes.get(A, 2, torch.float32, 1.0)))
        return grad

    for _ in range(2):
        y = A * 2.0
        y.register_hook(hook)
        y.sum().backward()
    (first, again, changed), (next_pass, _, _) = seen
    assert first is again and changed is not first and next_pass is not first
    assert mixes.get(A, 2, torch.float32, 1.0) is not mixes.get(A, 2, torch.float32, 1.0)  # outside both: new
    with mixes.scope():  # a forward starts afresh
        assert mixes.get(A, 2, torch.float32, 1.0) is mixes.get(A, 2, torch.float32, 1.0)
    assert mixes._local.recomputed is None


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    # Recomputed layers run after the forward that built the shared mix, inside the backward pass: they
    # share one mix of their own per backward pass (reentrant: its gradient taken once per segment).
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = _vit_model("sequential", ["attention", "mlp"])
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        model(pixel_values=x).logits.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and any("alore_rules" in n for n in grads[0])
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("reentrant,extra", [(False, 0), (True, 5)], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("mode,targets", [("sequential", ["attention", "mlp"]), ("parallel", ["q_proj", "v_proj"])],
                         ids=["block", "parallel"])
def test_recomputed_layers_share_one_rule_mix(mode, targets, reentrant, extra, monkeypatch):
    # Gradient checkpointing recomputes each block inside the backward pass: that adds the block's forward
    # to a step, for ALoRE as for LoRA, and no mix per recomputed layer. Reentrant checkpointing runs a
    # backward pass per block, so the rules' gradient is joined and taken once per block: at most
    # `extra` kernels more (the products joined, one matmul, one reduction, the addition into .grad).
    opcount = _load_benchmark("opcount", monkeypatch)
    from transformers import ViTForImageClassification

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def per_block(config, checkpointing: bool) -> int:
        kernels = []
        for layers in (2, 3):
            vit_config = tiny_vit_config(64)
            vit_config.num_hidden_layers = layers
            torch.manual_seed(0)
            model = get_peft_model(ViTForImageClassification(vit_config), copy.deepcopy(config))
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
                model.enable_input_require_grads()
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]

            def step(model=model, params=params) -> None:
                model(pixel_values=x).logits.sum().backward()
                for p in params:
                    p.grad = None

            kernels.append(opcount.count_ops(step).kernels)
        return kernels[1] - kernels[0]

    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    alore = AloreConfig(r=4, num_experts=4, mode=mode, target_modules=targets, compute_path="factored")
    recompute_lora = per_block(lora, True) - per_block(lora, False)
    recompute_alore = per_block(alore, True) - per_block(alore, False)
    assert recompute_alore <= recompute_lora + extra, (recompute_alore, recompute_lora)


# -- compiling --------------------------------------------------------------------------
@pytest.mark.parametrize("case,mode,path", [c for c in CASES if c[2] == "auto"],
                         ids=[i for i, c in zip(IDS, CASES) if c[2] == "auto"])
def test_compiled_layer_has_no_graph_break_and_matches_eager(case, mode, path):
    # backend="aot_eager": dynamo must capture the whole layer (fullgraph=True) and AOT autograd
    # must trace its backward; it skips inductor's C++ code generation, which is too slow for CI.
    torch._dynamo.reset()
    layer = make_layer(case, mode, path)
    layer(make_input(case))  # a block traces its consumers on the first eager call
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = make_input(case, seed=3)
    A = layer.factors("default")[0]
    B, C = layer.alore_B["default"], layer.alore_C["default"]
    out_c = compiled(x)
    g = torch.randn(out_c.shape, generator=torch.Generator().manual_seed(4))
    grads_c = torch.autograd.grad(out_c, [x, A, B, C], g)
    out_e = layer(x)
    grads_e = torch.autograd.grad(out_e, [x, A, B, C], g)
    assert_close(out_c, out_e.double(), torch.float32)
    for got, want in zip(grads_c, grads_e):
        assert_close(got, want.double(), torch.float32)
    layer.eval()
    with torch.no_grad():
        assert_close(compiled(x), layer(x).double(), torch.float32)


@pytest.mark.parametrize("mode,targets", [("sequential", ["attention", "mlp"]), ("parallel", ["q_proj", "v_proj"]),
                                          ("sequential", ["q_proj", "v_proj"])], ids=["block", "parallel", "sequential"])
def test_compiled_whole_model_has_no_graph_break(mode, targets):
    torch._dynamo.reset()
    model = _vit_model(mode, targets)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    model.train()
    model(pixel_values=x)  # blocks trace their consumers on the first eager call
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = compiled(pixel_values=x, labels=labels).loss
    grads_c = torch.autograd.grad(loss_c, [p for p in model.parameters() if p.requires_grad])
    loss_e = model(pixel_values=x, labels=labels).loss
    grads_e = torch.autograd.grad(loss_e, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads_c, grads_e):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values=x).logits, model(pixel_values=x).logits,
                                   rtol=1e-4, atol=1e-5)


# -- operators of a training call, against PEFT's LoRA at the same budget --------------------
# Kernel-launching operators each further adapted layer adds beyond (negative: below) the LoRA on the same
# layer, per precision. The layer runs three matmuls forward and five backward; fusing the frozen
# nn.Linear into the adapter's function collects the input gradient in place. In float32 a residual
# x + s dW x copies an input it does not own: a sequential linear layer forward, a block forward and
# backward. Under autocast every path casts fewer tensors than LoRA. Fixed numbers: any regression fails.
EXTRA_KERNELS = {
    (False, "alore_par"): -2,
    (False, "alore_par_fc1"): -2,
    (False, "alore_seq"): -1,
    (False, "alore_block"): 0,
    (True, "alore_par"): -6,
    (True, "alore_par_fc1"): -6,
    (True, "alore_seq"): -5,
    (True, "alore_block"): -4,
}
# Once per step, whatever the number of layers: the rules' mixing matrix (zeros, one copy) and their
# gradient (one matmul over every layer's products, one reduction); from the second layer on, joining
# those products adds two more.
PER_FORWARD_KERNELS = 4


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16-autocast"])
@pytest.mark.parametrize("name", ["alore_par", "alore_par_fc1", "alore_seq", "alore_block"])
def test_training_call_runs_about_loras_operators(name, autocast, monkeypatch):
    bench = _load_benchmark("bench_layer", monkeypatch)
    alore = bench.adapter_ops(name, autocast=autocast)
    lora = bench.adapter_ops(bench.LORA_OF[name], autocast=autocast)
    assert alore["kernel_ops"] <= lora["kernel_ops"] + EXTRA_KERNELS[(autocast, name)], (alore, lora)
    assert alore["aten_ops"] <= lora["aten_ops"], (alore, lora)  # host dispatch: every ATen call, views included
    if not autocast:
        # Sharing is what makes the per-layer numbers: a lone layer adds only the per-forward work.
        assert alore["alone"]["kernel_ops"] - alore["kernel_ops"] <= PER_FORWARD_KERNELS, alore
        assert lora["alone"] == {"aten_ops": lora["aten_ops"], "kernel_ops": lora["kernel_ops"]}


# -- the layers enter autograd's C++ entry point directly ------------------------------------
FACTORED_CASES = [(case, mode) for case in LAYER_CASES for mode in case.modes if case.name in ("linear", "block")]


@pytest.mark.parametrize("case,mode", FACTORED_CASES, ids=[f"{c.name}-{m}" for c, m in FACTORED_CASES])
def test_factored_calls_skip_function_apply_except_under_functorch_transforms(case, mode, monkeypatch):
    """``Function.apply``'s Python wrapper (functorch bookkeeping) is skipped on the hot path, kept inside a transform."""
    entered = []
    for fn in (functional._FactoredLinear, functional._FactoredDelta):
        real = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *args, _real=real: entered.append(args[0]) or _real(*args))
    layer, x = make_layer(case, mode, "factored"), make_input(case)
    out = layer(x)
    out.sum().backward()
    assert entered == []
    assert_close(out, reference(layer, x.detach()), torch.float32)  # the direct entry computes the same
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters() if p.requires_grad)
    # Inside torch.func transforms (and torch.compile) the layers go through Function.apply instead.
    inside = []
    torch.func.vmap(lambda t: inside.append(functional._plain_autograd()) or t)(x.detach())
    assert inside == [False] and functional._plain_autograd()


# -- the benchmark scripts' smoke tests (they must run and write well-formed output; timings are not checked)
def _load_benchmark(name: str, monkeypatch):
    # The scripts default OMP_WAIT_POLICY at import; keep that out of this process's environment.
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)  # the benchmarks flush subnormals (PyTorch's default keeps them)


def test_bench_adapters_quick_writes_json_and_table(tmp_path, monkeypatch, keep_threads):
    bench = _load_benchmark("bench_adapters", monkeypatch)
    bench.main(["--quick", "--reps", "1", "--infer-reps", "1", "--warmup", "0", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "bench_adapters.json").read_text())
    table = (tmp_path / "bench_adapters.md").read_text()
    assert report["meta"]["quick"] and "not meaningful" in table and "n/a (smoke model)" in table
    (result,) = report["results"]
    assert set(result["train"]) == set(bench.METHODS)
    assert {"base"} | {f"{m}:{k}" for m in bench.ADAPTERS for k in ("unmerged", "merged")} == set(result["infer"])
    for stats in list(result["train"].values()) + list(result["infer"].values()):
        assert stats["n"] == 1 and stats["median_ms"] > 0 and stats["cpu_median_ms"] >= 0
    for name, mem in result["memory"].items():
        assert mem["peak_mib"] >= mem["own_mib"] > 0, name
    assert result["memory"]["full"]["increase_mib"] > result["memory"]["lora"]["increase_mib"]
    # The same budget as LoRA r=4 on q, v, plus the shared 4 x 4 x 4 rules.
    assert result["adapter_params"]["alore_seq"] == result["adapter_params"]["alore_par"]
    assert result["adapter_params"]["alore_seq"] == result["adapter_params"]["lora"] + 4**3
    for name, err in result["merge_rel_err"].items():
        assert err < 1e-4, name  # the merged model computes what the unmerged one did
    frozen = result["ops"]["zero_cost"]
    for name in bench.ADAPTERS:  # every adapter adds operators to the frozen backbone's step
        assert result["ops"][name]["kernel_ops"] > frozen["kernel_ops"] and f"| {name} |" in table
    assert "Operators per train step" in table and "Targets" in table
    assert result["ratios"]["lora_copy"]["train_vs_lora"] > 0 and "Control: `lora_copy`" in table


def test_bench_layer_quick_writes_json_and_table(tmp_path, monkeypatch, keep_threads):
    bench = _load_benchmark("bench_layer", monkeypatch)
    bench.main(["--quick", "--reps", "1", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "bench_layer.json").read_text())
    assert report["max_abs_diff_merged"] < 1e-4
    names = set(bench.configs())
    for regime in ("train", "infer"):
        assert set(report[regime]) == names
    for precision in ("float32", "bfloat16_autocast"):
        assert set(report["ops"][precision]) == names - {"base"}
        assert all(o["kernel_ops"] > 0 for o in report["ops"][precision].values())
    host = report["host_us"]  # per adapted layer, adapters on minus off on the same model
    assert set(host) == names - {"base"}
    assert all(math.isfinite(h[regime]) for h in host.values() for regime in ("forward", "train"))
    table = (tmp_path / "bench_layer.md").read_text()
    assert "| alore_block |" in table and "Host time each adapted layer adds" in table


def test_bench_mix_size_quick_writes_json_and_table(tmp_path, monkeypatch, keep_threads):
    bench = _load_benchmark("bench_mix_size", monkeypatch)
    bench.main(["--quick", "--out-dir", str(tmp_path)])
    rows = json.loads((tmp_path / "bench_mix_size.json").read_text())["rows"]
    # n = 4, r = 2 on a 32-wide layer stays factored; r = 8 (mixing 128 values per token) folds.
    assert [(row["mix"], row["auto_folds"]) for row in rows] == [(32, False), (128, True)]
    assert all(row["factored_ms"] > 0 and row["auto_ms"] > 0 and row["auto_vs_factored"] > 0 for row in rows)
    assert "| 64 | 4 | 8 | parallel | 128 | fold |" in (tmp_path / "bench_mix_size.md").read_text()


def test_bench_conv_quick_writes_json_and_table(tmp_path, monkeypatch, keep_threads):
    bench = _load_benchmark("bench_conv", monkeypatch)
    bench.main(["--quick", "--backbones", "mobilenet_v2", "--out-dir", str(tmp_path)])
    report = json.loads((tmp_path / "bench_conv.json").read_text())
    assert report["meta"]["flush_denormal"] == torch.set_flush_denormal(True)  # flushed wherever the CPU can
    (result,) = report["results"]
    assert result["kernels"] == ["(1, 1)"] and result["adapted_convs"] > 0
    assert set(result["train"]) == set(bench.METHODS)
    for name in ("alore_par", "alore_seq"):  # adapters add operators to the frozen model's step
        assert result["ops"][name]["kernel_ops"] > result["ops"]["frozen"]["kernel_ops"]
    assert "| mobilenet_v2 |" in (tmp_path / "bench_conv.md").read_text()
