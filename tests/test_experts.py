"""alore_peft.experts (and the expert math in alore_peft.functional) against naive Kronecker references, on tiny models with hand-set weights."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

from alore_peft import AloreConfig

from alore_peft import experts as insp
from alore_peft import functional

from .models import tiny_vit
from .tolerances import TOLERANCES

TOL = dict(zip(("rtol", "atol"), TOLERANCES[torch.float32]))
TOL64 = dict(zip(("rtol", "atol"), TOLERANCES[torch.float64]))


def random_factors(n, r, d_out, d_in, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, n, generator=g, dtype=dtype)
    B = torch.randn(n, d_out // n, r, generator=g, dtype=dtype)
    C = torch.randn(n, r, d_in // n, generator=g, dtype=dtype)
    return A, B, C


def naive_expert(A, B, C, i, scale):
    return scale * torch.kron(A[i].contiguous(), (B[i] @ C[i]).contiguous())  # (d_out, d_in)


@pytest.mark.parametrize(
    "n, r, d_out, d_in, lead, dtype",
    [
        (4, 2, 16, 8, (3,), torch.float64),
        (2, 3, 6, 10, (2, 5), torch.float64),
        (3, 1, 9, 9, (), torch.float32),
        (1, 4, 8, 4, (2, 1), torch.float32),
    ],
)
def test_expert_outputs_split_apply_exactly(n, r, d_out, d_in, lead, dtype):
    A, B, C = random_factors(n, r, d_out, d_in, dtype)
    x = torch.randn(*lead, d_in, dtype=dtype)
    per = functional.expert_outputs(x, A, B, C, 0.7)
    tol = dict(zip(("rtol", "atol"), TOLERANCES[dtype]))
    assert per.shape == (*lead, n, d_out)
    torch.testing.assert_close(per.sum(-2), functional.apply(x, A, B, C, 0.7), **tol)
    for i in range(n):
        torch.testing.assert_close(per[..., i, :], x @ naive_expert(A, B, C, i, 0.7).T, **tol)


@pytest.mark.parametrize("n, r, d_out, d_in", [(4, 2, 16, 8), (3, 5, 6, 12), (1, 1, 3, 3)])
def test_expert_norms_match_naive_kron(n, r, d_out, d_in):
    A, B, C = random_factors(n, r, d_out, d_in, torch.float64, seed=n)
    got = functional.expert_norms(A, B, C, -1.5)  # a negative scale still gives a norm
    want = torch.stack([torch.linalg.matrix_norm(naive_expert(A, B, C, i, -1.5)) for i in range(n)])
    torch.testing.assert_close(got, want, **TOL64)


def test_expert_norm_is_zero_exactly_for_a_zeroed_expert():
    A, B, C = random_factors(4, 2, 8, 8)
    B[1] = 0
    norms = functional.expert_norms(A, B, C, 2.0)
    assert norms[1] == 0
    assert (norms[[0, 2, 3]] > 0).all()


def test_effective_and_numerical_rank_of_known_matrices():
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    equal = q1[:, :5] @ q2[:, :5].T * 3.0  # five equal singular values
    assert functional.numerical_rank(equal) == 5
    assert functional.effective_rank(equal) == pytest.approx(5.0, rel=1e-9)
    rank_one = torch.outer(torch.arange(1.0, 7.0), torch.arange(1.0, 5.0))
    assert functional.numerical_rank(rank_one) == 1
    assert functional.effective_rank(rank_one) == pytest.approx(1.0, rel=1e-6)
    # Singular values 1 and 1/3: p = (3/4, 1/4).
    two = torch.diag(torch.tensor([1.0, 1.0 / 3.0, 0.0]))
    assert functional.effective_rank(two) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert functional.numerical_rank(two) == 2
    assert functional.numerical_rank(two, rtol=0.5) == 1
    assert functional.effective_rank(torch.zeros(4, 3)) == 0.0
    assert functional.numerical_rank(torch.zeros(4, 3)) == 0


# -- on a model ------------------------------------------------------------------
LINEAR = dict(r=1, num_experts=4, target_modules=["q_proj", "fc1"], init_weights=False)


def vit_with_adapter(**overrides):
    torch.manual_seed(0)
    return get_peft_model(tiny_vit(), AloreConfig(**{**LINEAR, **overrides}))


def layer_by_name(model, name):
    return dict(insp.alore_layers(model))[name]


def test_zeroed_expert_has_zero_norm_and_zero_map():
    model = vit_with_adapter()
    target = "vit.layers.1.mlp.fc1"
    with torch.no_grad():
        layer_by_name(model, target).factors("default")[1][2] = 0
    records = insp.expert_records(model)
    assert len(records) == 4 * 4  # 4 layers x 4 experts
    by_key = {(rec["layer"], rec["expert"]): rec for rec in records}
    assert by_key[(target, 2)]["norm"] == 0
    assert by_key[(target, 2)]["share"] == 0
    assert all(rec["norm"] > 0 for key, rec in by_key.items() if key != (target, 2))
    shares = sum(rec["share"] for rec in records if rec["layer"] == target)
    assert shares == pytest.approx(1.0)

    pixels = torch.randn(3, 3, 32, 32)
    maps = insp.expert_maps(model, pixels)
    assert set(maps) == {name for name, _ in insp.alore_layers(model)}
    assert maps[target].shape == (3, 4, 4, 4)  # (batch, experts, 32/8, 32/8)
    assert maps[target][:, 2].abs().max() == 0
    assert (maps[target][:, [0, 1, 3]] > 0).all()


def test_maps_are_the_per_token_norm_of_the_naive_expert_output_on_the_patch_grid():
    model = vit_with_adapter(r=2, mode="parallel")
    name = "vit.layers.0.attention.q_proj"
    layer = layer_by_name(model, name)
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    pixels = torch.randn(2, 3, 32, 32)
    maps = insp.expert_maps(model, pixels, layers=[name])
    handle.remove()
    x = seen["x"]  # (batch, 1 + 16 tokens, 32)
    assert x.shape == (2, 17, 32) and list(maps) == [name]
    A, B, C = (t.detach() for t in layer.factors("default"))
    for i in range(4):
        y = x @ naive_expert(A, B, C, i, layer.scaling["default"]).T  # (batch, tokens, d_out)
        norms = y.norm(dim=-1)[:, 1:]  # CLS dropped: (batch, 16) in row-major patch order
        torch.testing.assert_close(maps[name][:, i], norms.reshape(2, 4, 4), **TOL)
    # The grid order is row-major: patch (row 1, column 2) is token 1 + 1 * 4 + 2.
    y0 = x[0, 1 + 1 * 4 + 2] @ naive_expert(A, B, C, 0, layer.scaling["default"]).T
    torch.testing.assert_close(maps[name][0, 0, 1, 2], y0.norm(), **TOL)


def test_single_expert_map_equals_the_layers_own_adapter_output():
    """With one expert left, its map is the norm of what the layer itself adds to its input."""
    model = vit_with_adapter()
    name = "vit.layers.1.attention.q_proj"
    layer = layer_by_name(model, name)
    with torch.no_grad():
        for i in (0, 1, 3):
            layer.factors("default")[1][i] = 0
    seen = {}
    handle = layer.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    maps = insp.expert_maps(model, torch.randn(2, 3, 32, 32), layers=[name])
    handle.remove()
    with torch.no_grad():
        A, B, C = layer.factors("default")
        added = functional.apply(seen["x"], A, B, C, layer.scaling["default"])  # (batch, tokens, 32): s dW x
    torch.testing.assert_close(maps[name][:, 2], added.norm(dim=-1)[:, 1:].reshape(2, 4, 4), **TOL)
    assert maps[name][:, [0, 1, 3]].abs().max() == 0


def test_block_placement_and_parallel_conv_maps():
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_vit(), AloreConfig(r=2, num_experts=4, target_modules=["attention"], init_weights=False)
    )
    maps = insp.expert_maps(model, torch.randn(2, 3, 32, 32))
    assert sorted(maps) == ["vit.layers.0.attention", "vit.layers.1.attention"]
    assert all(m.shape == (2, 4, 4, 4) and (m > 0).all() for m in maps.values())

    # A parallel adapter on the patch-embedding convolution acts on 8 x 8 x 3 patches.
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_vit(), AloreConfig(r=2, num_experts=4, target_modules=["projection"], mode="parallel", init_weights=False)
    )
    name = "vit.embeddings.patch_embeddings.projection"
    layer = layer_by_name(model, name)
    with torch.no_grad():
        for i in (0, 2, 3):
            layer.factors("default")[1][i] = 0
    pixels = torch.randn(2, 3, 32, 32)
    maps = insp.expert_maps(model, pixels)
    with torch.no_grad():
        with_adapter = layer(pixels)
        with model.disable_adapter():
            without = layer(pixels)
    torch.testing.assert_close(maps[name][:, 1], (with_adapter - without).norm(dim=1), **TOL)
    assert maps[name][:, [0, 2, 3]].abs().max() == 0


def test_layer_records_ranks_follow_the_construction():
    model = vit_with_adapter(r=1, num_experts=4)  # d = 32: bound min(32, 16 * 1) = 16
    one_expert = "vit.layers.0.mlp.fc1"
    with torch.no_grad():
        for i in (0, 1, 2):
            layer_by_name(model, one_expert).factors("default")[1][i] = 0
        layer_by_name(model, "vit.layers.1.mlp.fc1").alore_B["default"].zero_()
    records = {rec["layer"]: rec for rec in insp.layer_records(model)}
    full = records["vit.layers.0.attention.q_proj"]
    assert (full["d_out"], full["d_in"], full["rank_bound"], full["params"]) == (32, 32, 16, 1 * (32 + 32))
    assert full["numerical_rank"] == 16  # generic random experts reach the bound
    assert 1 < full["effective_rank"] <= 16
    # One expert: kron(orthogonal 4 x 4 rule, rank-1 block) has rank 4 with four equal singular values.
    assert records[one_expert]["numerical_rank"] == 4
    assert records[one_expert]["effective_rank"] == pytest.approx(4.0, rel=1e-6)
    zero = records["vit.layers.1.mlp.fc1"]
    assert (zero["delta_norm"], zero["numerical_rank"], zero["effective_rank"]) == (0.0, 0, 0.0)
    layer = layer_by_name(model, "vit.layers.0.attention.q_proj")
    dense = layer.get_delta_weight("default").double()
    assert full["delta_norm"] == pytest.approx(float(torch.linalg.matrix_norm(dense.detach())), rel=1e-5)


def test_rules_records_and_model_forms_agree():
    model = vit_with_adapter()
    rules = insp.rule_matrices(model)
    assert list(rules) == ["shared"]
    torch.testing.assert_close(rules["shared"], model.base_model.alore_rules["default"].detach())
    from_peft = insp.expert_records(model)
    assert insp.expert_records(model.base_model) == from_peft  # the tuner
    assert insp.expert_records(model.base_model.model) == from_peft  # the plain module
    names, matrix = insp.contribution_matrix(from_peft)
    assert matrix.shape == (4, 4) and names[0] == "vit.layers.0.attention.q_proj"
    assert matrix[0, 3] == from_peft[3]["norm"]

    own = vit_with_adapter(share_rules=False)
    rules = insp.rule_matrices(own)
    assert sorted(rules) == sorted(name for name, _ in insp.alore_layers(own))
    assert all(a.shape == (4, 4, 4) for a in rules.values())
    params = {rec["layer"]: rec["params"] for rec in insp.layer_records(own)}
    assert all(p == 1 * (32 + 32) + 4**3 for p in params.values())


def test_combine_maps_weighs_layers_equally():
    maps = {"a": torch.ones(1, 2, 2, 2), "b": torch.full((1, 2, 2, 2), 10.0), "z": torch.zeros(1, 2, 2, 2)}
    maps["b"][0, 1] = 30.0  # layer b: expert 1 three times expert 0
    combined = insp.combine_maps(maps)
    torch.testing.assert_close(combined[0, 0], torch.full((2, 2), (1 + 0.5 + 0) / 3))
    torch.testing.assert_close(combined[0, 1], torch.full((2, 2), (1 + 1.5 + 0) / 3))
    torch.testing.assert_close(insp.combine_maps(maps, normalize=False)[0, 1], torch.full((2, 2), 31 / 3))


def test_map_shares_sum_to_one_where_any_expert_acts():
    maps = torch.tensor([[[[1.0, 0.0]], [[3.0, 0.0]]]])  # (batch 1, n 2, 1 x 2)
    shares = insp.map_shares(maps)
    torch.testing.assert_close(shares, torch.tensor([[[[0.25, 0.0]], [[0.75, 0.0]]]]))


def test_clear_errors():
    with pytest.raises(ValueError, match="contains no ALoRE layer"):
        insp.expert_records(nn.Linear(4, 4))
    model = vit_with_adapter()
    with pytest.raises(ValueError, match="adapter='other' is not an ALoRE adapter"):
        insp.expert_records(model, adapter="other")
    with pytest.raises(ValueError, match=r"layers=\['nope'\] are not ALoRE layers"):
        insp.expert_maps(model, torch.randn(1, 3, 32, 32), layers=["nope"])
    with pytest.raises(ValueError, match="fewer than the 8 x 8 patch grid"):
        insp.expert_maps(model, torch.randn(1, 3, 32, 32), grid=(8, 8))
