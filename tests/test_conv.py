"""ALoRE on ``nn.Conv2d``: both modes against a naive kron reference, merged exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from alore_peft import AloreConfig, Conv2d
from alore_peft.functional import reference_delta_weight

from .models import tiny_vit
from .tolerances import TOLERANCES

RTOL, ATOL = TOLERANCES[torch.float32]


def _delta(layer, adapter: str = "default") -> torch.Tensor:
    """``s * dW`` by the naive kron definition (sequential: (c_in, c_in); parallel: (c_out, c_in*kh*kw))."""
    A, B, C = layer.factors(adapter)
    # init_rules' QR output is non-contiguous, which torch.kron (torch 2.13) cannot take.
    return reference_delta_weight(A.detach().contiguous(), B.detach(), C.detach(), layer.scaling[adapter])


def _naive_merged_weight(weight: torch.Tensor, dW: torch.Tensor, mode: str) -> torch.Tensor:
    """The merged kernel, built tap by tap (sequential) or by reshaping (parallel)."""
    if mode == "parallel":
        return weight + dW.reshape(weight.shape)
    out = torch.empty_like(weight)
    eye = torch.eye(weight.shape[1])
    for p in range(weight.shape[2]):
        for q in range(weight.shape[3]):
            out[:, :, p, q] = weight[:, :, p, q] @ (eye + dW)  # (c_out, c_in) per tap
    return out


CONV_CASES = [
    # (c_in, c_out, kernel, stride, padding, bias)
    (4, 8, 1, 1, 0, True),
    (8, 4, 3, 1, 1, True),
    (4, 8, 3, 2, 1, False),
    (8, 8, (1, 3), (2, 1), (0, 1), True),
    (4, 4, 5, 3, 2, True),
]


def _conv_model(c_in, c_out, kernel, stride, padding, bias, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias)).eval()


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}-s{c[3]}-p{c[4]}")
def test_conv_matches_naive_reference_and_merges_exactly(mode, case):
    base = _conv_model(*case)
    conv = copy.deepcopy(base[0])
    model = get_peft_model(base, AloreConfig(r=2, num_experts=4, mode=mode, target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    assert isinstance(layer, Conv2d)
    x = torch.randn(2, case[0], 11, 10)
    dW = _delta(layer)
    if mode == "sequential":
        assert dW.shape == (case[0], case[0])
        expected = conv(x + torch.einsum("ij,bjhw->bihw", dW, x))
    else:
        kh, kw = conv.kernel_size
        assert dW.shape == (case[1], case[0] * kh * kw)
        expected = conv._conv_forward(x, conv.weight + dW.reshape(conv.weight.shape), conv.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=RTOL, atol=ATOL)
        layer.merge()
        torch.testing.assert_close(
            layer.get_base_layer().weight, _naive_merged_weight(conv.weight, dW, mode), rtol=RTOL, atol=ATOL
        )
        torch.testing.assert_close(model(x), expected, rtol=RTOL, atol=ATOL)
        layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, conv.weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_conv_dropout_acts_on_the_adapter_branch(mode):
    base = _conv_model(4, 8, 3, 2, 1, True)
    conv = copy.deepcopy(base[0])
    model = get_peft_model(
        base, AloreConfig(r=2, num_experts=4, mode=mode, dropout=0.5, target_modules=["0"], init_weights=False)
    )
    model.train()
    layer = model.base_model.model[0]
    x = torch.randn(2, 4, 9, 9)
    dW = _delta(layer)
    torch.manual_seed(3)
    got = model(x)
    torch.manual_seed(3)  # the forward's only random draw is the dropout mask
    dropped = nn.functional.dropout(x, 0.5, training=True)
    if mode == "sequential":
        expected = conv(x + torch.einsum("ij,bjhw->bihw", dW, dropped))
    else:
        expected = conv(x) + conv._conv_forward(dropped, dW.reshape(conv.weight.shape), None)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    got.sum().backward()
    assert layer.alore_B["default"].grad.abs().sum() > 0 and layer.alore_C["default"].grad.abs().sum() > 0


def test_sequential_and_parallel_adapters_on_one_conv_merge_as_one_group():
    base = _conv_model(4, 8, 3, 1, 1, True)
    conv = copy.deepcopy(base[0])
    model = get_peft_model(base, AloreConfig(r=2, num_experts=4, target_modules=["0"], init_weights=False))
    model.add_adapter("par", AloreConfig(r=2, num_experts=2, mode="parallel", target_modules=["0"], init_weights=False))
    model.base_model.set_adapter(["default", "par"])
    layer = model.base_model.model[0]
    x = torch.randn(2, 4, 7, 7)
    S, P = _delta(layer, "default"), _delta(layer, "par")
    expected = conv(x + torch.einsum("ij,bjhw->bihw", S, x)) + conv._conv_forward(x, P.reshape(conv.weight.shape), None)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=RTOL, atol=ATOL)
        merged = model.merge_and_unload(adapter_names=["default", "par"])
        torch.testing.assert_close(merged(x), expected, rtol=RTOL, atol=ATOL)


def test_grouped_conv_refused():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(ValueError, match="groups=1 only.*groups=8"):
        get_peft_model(model, AloreConfig(target_modules=["0"]))


# -- the ViT patch embedding (3 input channels) -----------------------------------------

PATCH = "projection"  # vit.embeddings.patch_embeddings.projection: Conv2d(3, hidden, 8, stride=8)


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_patch_embedding_sequential_needs_n_dividing_3():
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_vit(), AloreConfig(num_experts=4, target_modules=[PATCH]))
    message = str(info.value)
    assert "num_experts=4" in message and "vit.embeddings.patch_embeddings.projection" in message
    assert "3 x 3" in message and "Valid num_experts for it: [1, 3]" in message


@pytest.mark.parametrize("mode, n", [("sequential", 3), ("sequential", 1), ("parallel", 4)])
def test_patch_embedding_adapts_and_merges(mode, n):
    reference = tiny_vit()
    model = get_peft_model(
        copy.deepcopy(reference),
        AloreConfig(r=2, num_experts=n, mode=mode, target_modules=[PATCH], init_weights=False),
    )
    layer = model.base_model.model.vit.embeddings.patch_embeddings.projection
    conv = reference.vit.embeddings.patch_embeddings.projection
    x = _pixels()
    dW = _delta(layer)
    assert dW.shape == ((3, 3) if mode == "sequential" else (32, 3 * 8 * 8))
    with torch.no_grad():
        if mode == "sequential":
            expected = conv(x + torch.einsum("ij,bjhw->bihw", dW, x))
        else:
            expected = conv._conv_forward(x, conv.weight + dW.reshape(conv.weight.shape), conv.bias)
        torch.testing.assert_close(layer(x), expected, rtol=RTOL, atol=ATOL)
        logits = model(pixel_values=x).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(pixel_values=x).logits, logits, rtol=RTOL, atol=ATOL)


def test_patch_embedding_with_paper_blocks_save_load(tmp_path):
    # hidden 48 and 3 channels are both divisible by n = 3.
    reference = tiny_vit(hidden_size=48)
    config = AloreConfig(r=2, num_experts=3, target_modules=[PATCH, "attention", "mlp"], init_weights=False)
    model = get_peft_model(copy.deepcopy(reference), config)
    x = _pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    with torch.no_grad():
        # A loaded adapter is frozen, and requires_grad can change the kernel path by 1 ulp.
        torch.testing.assert_close(loaded(pixel_values=x).logits, expected, rtol=RTOL, atol=ATOL)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(pixel_values=x).logits, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_wrapped_convolutions_keep_the_attributes_model_code_reads(mode):
    # transformers' default MobileNetV2Config (tf_padding=True) reads conv.stride, kernel_size and dilation
    # of every convolution in its forward: wrapped pointwise convolutions must still answer.
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    base = MobileNetV2ForImageClassification(MobileNetV2Config(depth_multiplier=0.35, num_labels=3)).eval()
    assert base.config.tf_padding
    pointwise = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                 and m.groups == 1 and m.in_channels % 4 == 0 and m.out_channels % 4 == 0]
    reference = copy.deepcopy(base)
    model = get_peft_model(base, AloreConfig(r=2, num_experts=4, mode=mode, target_modules=pointwise,
                                             init_weights=False))
    layer = model.get_submodule("base_model.model." + pointwise[0])
    conv = reference.get_submodule(pointwise[0])
    for name in ("stride", "padding", "dilation", "kernel_size", "groups", "in_channels", "out_channels"):
        assert getattr(layer, name) == getattr(conv, name), name
    assert (layer.in_features, layer.out_features) == (conv.in_channels, conv.out_channels)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=x).logits
        # A random MobileNetV2 (batch norms at their initial statistics) has tiny logits: compare relatively.
        scale = out.abs().max()
        assert (out - reference(pixel_values=x).logits).abs().max() > 1e-3 * scale
        merged = model.merge_and_unload()(pixel_values=x).logits
        torch.testing.assert_close(merged / scale, out / scale, rtol=RTOL, atol=ATOL)
