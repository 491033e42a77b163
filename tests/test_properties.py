"""Properties over random shapes, ranks, expert counts, modes, dtypes and placements (``hypothesis``).

Bounded (a few dozen examples each, no deadline) so the suite stays within CI's time.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn

from alore_peft import AloreConfig, functional

from .test_failure_paths import assert_unchanged, snapshot
from .tolerances import assert_close

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def factors(draw, square: bool = False):
    n = draw(st.sampled_from([1, 2, 3, 4]))
    r = draw(st.integers(1, 4))
    q_in = draw(st.integers(1, 5))
    q_out = q_in if square else draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, n, generator=g).to(dtype)
    B = torch.randn(n, q_out, r, generator=g).to(dtype)
    C = torch.randn(n, r, q_in, generator=g).to(dtype)
    batch = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    x = torch.randn(*batch, n * q_in, generator=g).to(dtype)
    return A, B, C, x, draw(st.floats(-2, 2, allow_nan=False))


@SETTINGS
@given(factors(), st.booleans())
def test_factored_apply_equals_the_kron_reference(drawn, with_base):
    A, B, C, x, scale = drawn
    dW = functional.reference_delta_weight(A.double(), B.double(), C.double(), scale)
    base = torch.randn(*x.shape[:-1], dW.shape[0], dtype=x.dtype) if with_base else None
    y = functional.apply(x, A, B, C, scale, base=base)
    expected = x.double() @ dW.T + (base.double() if with_base else 0)
    assert_close(y, expected, x.dtype)


@SETTINGS
@given(factors(square=True))
def test_residual_apply_equals_x_plus_the_kron_reference(drawn):
    A, B, C, x, scale = drawn
    dW = functional.reference_delta_weight(A.double(), B.double(), C.double(), scale)
    assert_close(functional.apply(x, A, B, C, scale, residual=True), x.double() + x.double() @ dW.T, x.dtype)


@st.composite
def adapted_models(draw):
    """A small random model (linear or convolutional), a config that fits it, and an input."""
    kind = draw(st.sampled_from(["linear", "conv"]))
    mode = draw(st.sampled_from(["sequential", "parallel"]))
    n = draw(st.sampled_from([1, 2, 4]))
    width, hidden = n * draw(st.integers(1, 3)), n * draw(st.integers(1, 3))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if kind == "linear":
        model = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, n * 2))
        x = torch.randn(2, 3, width)
    else:
        k = draw(st.sampled_from([1, 3]))
        model = nn.Sequential(nn.Conv2d(width, hidden, k, padding=k // 2), nn.Tanh(), nn.Conv2d(hidden, n * 2, 1))
        x = torch.randn(2, width, 5, 5)
    config = dict(r=draw(st.integers(1, 3)), num_experts=n, mode=mode, target_modules=["0", "2"],
                  share_rules=draw(st.booleans()), alpha=draw(st.floats(0.5, 4)), init_weights=False)
    return model.eval(), config, x


@SETTINGS
@given(adapted_models())
def test_merge_then_unmerge_restores_weights_and_merged_equals_unmerged(drawn):
    base, config, x = drawn
    originals = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, AloreConfig(**config))
    with torch.no_grad():
        expected = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
    restored = model.base_model.model.state_dict()
    for key, value in originals.items():
        name = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(restored.get(name, restored.get(key)), value, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(adapted_models())
def test_save_then_load_is_bit_exact(drawn):
    base, config, x = drawn
    model = get_peft_model(base, AloreConfig(**config))
    saved = {k: v.clone() for k, v in model.state_dict().items() if "alore_" in k}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(model.unload(), folder)
    reloaded = {k: v for k, v in loaded.state_dict().items() if "alore_" in k}
    assert reloaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(reloaded[key], value), key


@SETTINGS
@given(adapted_models(), st.integers(3, 7))
def test_a_failed_injection_leaves_the_model_bit_identical(drawn, bad_n):
    base, config, x = drawn
    width = base[0].in_features if isinstance(base[0], nn.Linear) else base[0].in_channels
    if width % bad_n == 0:
        bad_n = width + 1  # n larger than the layer: never divides it
    before = snapshot(base)
    with pytest.raises(ValueError, match="does not divide"):
        get_peft_model(base, AloreConfig(**{**config, "num_experts": bad_n}))
    assert_unchanged(before, base)
