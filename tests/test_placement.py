"""Block placement: one adapter on a container's input, folded exactly into every consumer."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from alore_peft import AloreConfig
from alore_peft.block import AloreBlock
from alore_peft.functional import reference_delta_weight

from .models import tiny_vit
from .tolerances import TOLERANCES

RTOL, ATOL = TOLERANCES[torch.float32]


def _pixels(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 32, generator=g)


def _delta(layer, adapter: str = "default") -> torch.Tensor:
    """``s * dW`` of ``layer`` by the naive kron definition."""
    A, B, C = layer.factors(adapter)
    # init_rules' QR output is non-contiguous, which torch.kron (torch 2.13) cannot take.
    return reference_delta_weight(A.detach().contiguous(), B.detach(), C.detach(), layer.scaling[adapter])


def _blocks(model: nn.Module) -> dict[str, AloreBlock]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AloreBlock)}


def _paper_vit(**kwargs) -> tuple[nn.Module, nn.Module]:
    """(base copy, peft model) of the tiny ViT with one adapter before each attention and MLP."""
    base = tiny_vit()
    reference = copy.deepcopy(base)
    config = dict(r=2, num_experts=4, target_modules=["attention", "mlp"], init_weights=False)
    config.update(kwargs)
    return reference, get_peft_model(base, AloreConfig(**config))


# -- small containers ----------------------------------------------------------------


class FeedForward(nn.Module):
    """Its input reaches fc1 only: foldable."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Residual(nn.Module):
    """Its input is also added to the output: not foldable."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(x) + x


class Normed(nn.Module):
    """Its input goes through a LayerNorm first: not foldable."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return self.fc(self.norm(x))


class ComputedWeight(nn.Module):
    """Reads its input with a weight computed on the fly: nothing to fold into."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return nn.functional.linear(x, 2 * self.fc.weight)


class Gated(nn.Module):
    """Calls the same Linear twice on its input: one consumer, folded once."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.out(self.fc(x) * torch.sigmoid(self.fc(x)))


class OutputFirst(nn.Module):
    """Registers its output layer first: the adapter must still take the input layer's width."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.out, self.inp = nn.Linear(16, d), nn.Linear(d, 16)

    def forward(self, x):
        return self.out(torch.relu(self.inp(x)))


class NeedsScale(nn.Module):
    """Cannot run on a lone probe tensor (a second argument is required)."""

    def __init__(self, d: int = 8, residual: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.residual = residual

    def forward(self, x, scale):
        out = self.fc2(torch.relu(self.fc1(x))) * scale
        return out + x if self.residual else out


class KeywordInput(nn.Module):
    """Receives its input as ``hidden_states=``, like many transformers modules."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, hidden_states=None, mask=None):
        return self.q(hidden_states) * self.k(hidden_states).softmax(-1)


class ConvPair(nn.Module):
    """A 1x1 and a strided, padded 3x3 convolution read the input: foldable on the channel axis."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, 2 * c, 1, stride=2)
        self.b = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.out = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        return self.out(torch.relu(self.a(x)) + self.b(x))


class Net(nn.Module):
    """``inp -> block -> head``; ``call`` decides how the block is called."""

    def __init__(self, block: nn.Module, call: str = "positional", d: int = 8) -> None:
        super().__init__()
        self.inp, self.block, self.head = nn.Linear(d, d), block, nn.Linear(d, 3)
        self.call = call

    def forward(self, x):
        h = self.inp(x)
        if self.call == "scale":
            h = self.block(h, 2.0)
        elif self.call == "keyword":
            h = self.block(hidden_states=h, mask=None)
        else:
            h = self.block(h)
        return self.head(h)


class ConvNet(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, c, 3, padding=1), ConvPair(c), nn.Conv2d(c, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def _net(block: nn.Module, call: str = "positional", seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(block, call).eval()


def _tokens(seed: int = 2) -> torch.Tensor:
    return torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(seed))


def _block_config(**kwargs) -> AloreConfig:
    return AloreConfig(**{"r": 2, "num_experts": 4, "target_modules": ["block"], "init_weights": False, **kwargs})


# -- the paper configuration on a transformers ViT ------------------------------------


def test_vit_blocks_share_one_adapter_per_container():
    _, model = _paper_vit()
    blocks = _blocks(model)
    assert sorted(name.rsplit(".", 2)[-2:][1] for name in blocks) == ["attention", "attention", "mlp", "mlp"]
    consumers = {name.rsplit(".", 1)[-1]: blk.trace.consumers for name, blk in blocks.items()}
    assert consumers["attention"] == ["q_proj.weight", "k_proj.weight", "v_proj.weight"]
    assert consumers["mlp"] == ["fc1.weight"]
    # One expert set per container: 4 containers x r * (d + d), plus the shared n^3 rules.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 4 * 2 * (32 + 32) + 4**3
    # q/k/v are plain Linears again, not adapters of their own.
    assert not any("q_proj.alore" in name for name, _ in model.named_parameters())


def test_block_forward_matches_kron_reference():
    _, model = _paper_vit()
    block = model.base_model.model.vit.layers[0].attention
    dW = _delta(block)  # (32, 32)
    x = torch.randn(2, 5, 32)
    expected = block.get_base_layer()(x + x @ dW.T)[0]
    torch.testing.assert_close(block(x)[0], expected, rtol=RTOL, atol=ATOL)
    assert (block(x)[0] - block.get_base_layer()(x)[0]).abs().max() > 1e-3  # the adapter does something


def test_merge_and_unload_folds_into_every_consumer():
    reference, model = _paper_vit()
    x = _pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        block = model.base_model.model.vit.layers[1].attention
        dW = _delta(block).double()
        eye = torch.eye(32, dtype=torch.float64)
        merged = model.merge_and_unload()
        got = merged(pixel_values=x).logits
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert not _blocks(merged)
    attn, ref_attn = merged.vit.layers[1].attention, reference.vit.layers[1].attention
    for name in ("q_proj", "k_proj", "v_proj"):
        want = (getattr(ref_attn, name).weight.double() @ (eye + dW)).float()
        torch.testing.assert_close(getattr(attn, name).weight, want, rtol=RTOL, atol=ATOL)
    # Everything that does not read the container's input is untouched.
    for name in ("o_proj.weight", "q_proj.bias"):
        assert torch.equal(attn.get_parameter(name), ref_attn.get_parameter(name))
    assert torch.equal(merged.vit.layers[1].mlp.fc2.weight, reference.vit.layers[1].mlp.fc2.weight)
    assert torch.equal(merged.vit.layers[1].layernorm_before.weight, reference.vit.layers[1].layernorm_before.weight)


def test_two_adapters_merge_as_one_group_and_unmerge():
    reference, model = _paper_vit()
    model.add_adapter("second", AloreConfig(r=2, num_experts=2, target_modules=["attention"], init_weights=False))
    model.base_model.set_adapter(["default", "second"])
    x = _pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        model.merge_adapter(["default", "second"])
        torch.testing.assert_close(model(pixel_values=x).logits, expected, rtol=RTOL, atol=ATOL)
        model.unmerge_adapter()
    restored = model.base_model.model.vit.layers[0].attention.get_base_layer().q_proj.weight
    torch.testing.assert_close(restored, reference.vit.layers[0].attention.q_proj.weight, rtol=0, atol=1e-6)


def test_safe_merge_refuses_non_finite_and_changes_nothing():
    reference, model = _paper_vit()
    block = model.base_model.model.vit.layers[0].attention
    with torch.no_grad():
        block.alore_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(block.get_base_layer().q_proj.weight, reference.vit.layers[0].attention.q_proj.weight)


def test_paper_parameter_count_on_vit_b16():
    # ViT-B/16 shape, built on the meta device (no memory, no init cost).
    with torch.device("meta"):
        base = ViTForImageClassification(ViTConfig(num_labels=10))
    model = get_peft_model(base, AloreConfig(r=4, num_experts=4, target_modules=["attention", "mlp"]))
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    assert len(_blocks(model)) == 24
    assert trainable == 24 * 2 * 768 * 4 + 4**3 == 147_520


# -- refusals ---------------------------------------------------------------------------


def test_parallel_mode_refuses_containers():
    with pytest.raises(ValueError, match="mode='sequential'"):
        get_peft_model(tiny_vit(), AloreConfig(target_modules=["attention"], mode="parallel"))
    _, model = _paper_vit()
    with pytest.raises(ValueError, match="only by transforming its input"):
        model.add_adapter("par", AloreConfig(target_modules=["attention"], mode="parallel"))


@pytest.mark.parametrize(
    "block, needle",
    [
        (Residual(), "add"),
        (Normed(), "layer_norm"),
        (ComputedWeight(), "not a parameter of the container"),
    ],
    ids=["residual", "layernorm", "computed-weight"],
)
def test_unfoldable_container_refused_at_injection(block, needle):
    with pytest.raises(ValueError, match="Cannot place an ALoRE adapter") as info:
        get_peft_model(_net(block), _block_config())
    assert needle in str(info.value)
    assert "target_modules=" in str(info.value)  # says what to do instead


def test_nested_targets_refused():
    with pytest.raises(ValueError, match="both the container"):
        get_peft_model(tiny_vit(), AloreConfig(target_modules=["attention", "q_proj"]))


def test_container_without_linear_refused():
    with pytest.raises(ValueError, match="no torch.nn.Linear or torch.nn.Conv2d"):
        get_peft_model(tiny_vit(), AloreConfig(target_modules=["layernorm_before"]))


def test_num_experts_must_divide_container_width():
    with pytest.raises(ValueError, match=r"Valid num_experts for it: \[1, 2, 4, 8\]"):
        get_peft_model(_net(FeedForward()), _block_config(num_experts=3))


# -- tracing details ----------------------------------------------------------------


def test_repeated_consumer_is_folded_once():
    model = get_peft_model(_net(Gated()), _block_config())
    assert model.base_model.model.block.trace.consumers == ["fc.weight"]
    x = _tokens()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(model.merge_and_unload()(x), expected, rtol=RTOL, atol=ATOL)


def test_width_comes_from_the_layer_that_reads_the_input():
    model = get_peft_model(_net(OutputFirst()), _block_config())
    block = model.base_model.model.block
    assert block.in_dim == 8 and block.trace.consumers == ["inp.weight"]
    x = _tokens()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(model.merge_and_unload()(x), expected, rtol=RTOL, atol=ATOL)


def test_keyword_input_is_adapted_and_folded():
    model = get_peft_model(_net(KeywordInput(), call="keyword"), _block_config())
    block = model.base_model.model.block
    assert block.trace.consumers == ["q.weight", "k.weight"]
    x = _tokens()
    with torch.no_grad():
        expected = model(x)
        with model.disable_adapter():
            assert (model(x) - expected).abs().max() > 1e-3
        torch.testing.assert_close(model.merge_and_unload()(x), expected, rtol=RTOL, atol=ATOL)


def test_container_needing_more_arguments_is_traced_at_first_forward():
    model = get_peft_model(_net(NeedsScale(), call="scale"), _block_config())
    block = model.base_model.model.block
    assert block.trace is None
    before = {k: v.clone() for k, v in model.base_model.model.state_dict().items()}
    with pytest.raises(ValueError, match="Run one forward pass of the model first"):
        model.merge_and_unload()
    after = model.base_model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    x = _tokens()
    with torch.no_grad():
        expected = model(x)
    assert block.trace.source == "forward" and block.trace.consumers == ["fc1.weight"]
    with torch.no_grad():
        torch.testing.assert_close(model.merge_and_unload()(x), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("block, call", [(FeedForward(), "positional"), (NeedsScale(), "scale"), (KeywordInput(), "keyword")])
def test_first_forward_under_inference_mode_traces_and_matches(block, call):
    # Inference tensors carry no version counter: the trace of a first forward under inference_mode (a loaded
    # adapter served straight away) must still work, find the same consumers and compute what no_grad does.
    x = _tokens()
    reference = get_peft_model(_net(copy.deepcopy(block), call), _block_config())
    with torch.no_grad():
        expected = reference(x)
    model = get_peft_model(_net(copy.deepcopy(block), call), _block_config())
    with torch.inference_mode():
        out = model(x)
    trace = model.base_model.model.block.trace
    assert trace.source == "forward" and trace.consumers == reference.base_model.model.block.trace.consumers
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(model.merge_and_unload()(x), expected, rtol=RTOL, atol=ATOL)


def test_unfoldable_container_found_at_first_forward_refuses_merge():
    model = get_peft_model(_net(NeedsScale(residual=True), call="scale"), _block_config())
    x = _tokens()
    with pytest.warns(UserWarning, match="merging will be refused"):
        with torch.no_grad():
            model(x)
    weight = model.base_model.model.block.get_base_layer().fc1.weight.clone()
    with pytest.raises(ValueError, match="add.*No weight was changed"):
        model.merge_and_unload()
    assert torch.equal(model.base_model.model.block.get_base_layer().fc1.weight, weight)


def test_conv_consumers_fold_per_kernel_tap():
    torch.manual_seed(0)
    model = get_peft_model(ConvNet().eval(), _block_config())
    block = model.base_model.model.block
    assert block.trace.consumers == ["a.weight", "b.weight"] and block.trace.kinds == ["conv2d", "conv2d"]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = model(x)
        base = block.get_base_layer()
        dW = _delta(block)  # (4, 4) channel mixing
        h = block.get_base_layer().get_submodule("a")
        manual = base(torch.einsum("ij,bjhw->bihw", torch.eye(4) + dW, model.base_model.model.stem(x)))
        torch.testing.assert_close(block(model.base_model.model.stem(x)), manual, rtol=RTOL, atol=ATOL)
        assert h.weight.shape == (8, 4, 1, 1)
        torch.testing.assert_close(model.merge_and_unload()(x), expected, rtol=RTOL, atol=ATOL)
