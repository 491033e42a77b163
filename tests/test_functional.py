"""Every function of :mod:`alore_peft.functional` against the naive ``torch.kron`` sum."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from alore_peft import functional

from .tolerances import TOLERANCES, assert_close

# (d_out, d_in) pairs, square and not; n is drawn from those that divide both.
SHAPES = [(8, 8), (16, 8), (8, 24), (64, 64), (48, 16)]
EXPERTS = [1, 2, 4, 8]
RANKS = [1, 4, 8]
DTYPES = list(TOLERANCES)
BATCH_SHAPES = [(5,), (2, 3), (2, 1, 3)]

CASES = [
    (d_out, d_in, n, r)
    for (d_out, d_in), n, r in itertools.product(SHAPES, EXPERTS, RANKS)
    if d_out % n == 0 and d_in % n == 0
]


def _factors(d_out, d_in, n, r, dtype, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, n, generator=g).to(dtype)
    B = torch.randn(n, d_out // n, r, generator=g).to(dtype)
    C = torch.randn(n, r, d_in // n, generator=g).to(dtype)
    return tuple(t.requires_grad_(grad) for t in (A, B, C))


def _reference(A, B, C, scale):
    # The reference runs in float64 so it is the yardstick, not another approximation.
    return functional.reference_delta_weight(A.double(), B.double(), C.double(), scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_out,d_in,n,r", CASES)
def test_delta_weight_matches_kron(d_out, d_in, n, r, dtype):
    A, B, C = _factors(d_out, d_in, n, r, dtype)
    dW = functional.delta_weight(A, B, C, 0.5)
    assert dW.shape == (d_out, d_in) and dW.dtype == dtype
    assert_close(dW, _reference(A, B, C, 0.5), dtype)


def test_fold_rules_times_the_block_diagonal_down_factor_is_delta_weight():
    A, B, C = _factors(12, 8, 4, 3, torch.float64)
    bf = functional.fold_rules(A, B)  # (d_out, n * n * r)
    assert bf.shape == (12, 4 * 4 * 3)
    # V applies every expert's C to every input block: V[(j, i, r), (j', b)] = [j == j'] C[i, r, b].
    V = torch.block_diag(*[C.reshape(12, 2)] * 4)  # (n * n * r, d_in)
    assert_close(bf @ V, _reference(A, B, C, 1.0), torch.float64)


APPLY_VARIANTS = ["plain", "base", "residual"]


# Every shape with a batch shape and every variant that fits it (a residual update is square).
APPLY_CASES = [
    (*case, BATCH_SHAPES[i % len(BATCH_SHAPES)], variant)
    for i, case in enumerate(CASES)
    for variant in APPLY_VARIANTS
    if variant != "residual" or case[0] == case[1]
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_out,d_in,n,r,batch,variant", APPLY_CASES)
def test_factored_apply_matches_kron_values_and_gradients(d_out, d_in, n, r, batch, variant, dtype):
    A, B, C = _factors(d_out, d_in, n, r, dtype, grad=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*batch, d_in, generator=g).to(dtype).requires_grad_()
    base = torch.randn(*batch, d_out, generator=g).to(dtype).requires_grad_()
    kwargs = {"base": base} if variant == "base" else {"residual": True} if variant == "residual" else {}
    y = functional.apply(x, A, B, C, 0.5, **kwargs)
    assert y.shape == (*batch, d_out) and y.dtype == dtype
    xd = x.double()
    expected = xd @ _reference(A, B, C, 0.5).T
    expected = expected + (base.double() if variant == "base" else xd if variant == "residual" else 0)
    assert_close(y, expected, dtype)
    inputs = [x, A, B, C] + ([base] if variant == "base" else [])
    grad = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(y, inputs, grad.to(dtype)), torch.autograd.grad(expected, inputs, grad)):
        assert got.dtype == dtype
        assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("d_out,d_in,n,r", CASES[::4])
def test_frozen_linear_with_adapter_matches_kron(d_out, d_in, n, r, mode, dtype):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(d_out, d_in, generator=g).to(dtype)
    b = torch.randn(d_out, generator=g).to(dtype)
    A, B, C = _factors(d_in if mode == "sequential" else d_out, d_in, n, r, dtype, grad=True)
    x = torch.randn(3, 4, d_in, generator=g).to(dtype).requires_grad_()
    y = functional.linear(x, W, b, A, B, C, 0.5, mode)
    dW, xd = _reference(A, B, C, 0.5), x.double()
    if mode == "sequential":
        expected = (xd + xd @ dW.T) @ W.double().T + b.double()
    else:
        expected = xd @ (W.double() + dW).T + b.double()
    assert_close(y, expected, dtype)
    grad = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, [x, A, B, C], grad.to(dtype))
    for got_one, want in zip(got, torch.autograd.grad(expected, [x, A, B, C], grad)):
        assert_close(got_one, want, dtype)


@pytest.mark.parametrize("n,r", [(1, 3), (2, 1), (3, 2), (4, 4)])
def test_rule_mix_is_the_rules_on_the_rank_space(n, r):
    A = torch.randn(n, n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    M = functional.rule_mix(A, r, torch.float64).matrix
    torch.testing.assert_close(functional.rule_mix(A, r, torch.float64, 0.25).matrix, 0.25 * M, rtol=0, atol=0)
    want = torch.zeros(n * n * r, n * n * r, dtype=torch.float64)
    for i, p, j, s in itertools.product(range(n), range(n), range(n), range(r)):
        want[(j * n + i) * r + s, (p * n + i) * r + s] = A[i, p, j]
    torch.testing.assert_close(M, want, rtol=0, atol=0)
    torch.testing.assert_close(functional.mix_matrix(A, r), want, rtol=0, atol=0)
    assert functional.rule_mix(A, r, torch.bfloat16).matrix.dtype == torch.bfloat16


def _shared_mix_chain(x, A, Bs, Cs, W, mix, scales):
    """Four calls that read one set of rules: parallel and sequential linears, a residual, a parallel apply."""
    h = functional.linear(x, W, None, A, Bs[0], Cs[0], scales[0], "parallel", mix=mix)
    h = functional.linear(h, W, None, A, Bs[1], Cs[1], scales[1], "sequential", mix=mix)
    h = functional.apply(h, A, Bs[2], Cs[2], scales[2], residual=True, mix=mix)
    return functional.apply(h, A, Bs[3], Cs[3], scales[3], base=h, mix=mix)


def _dense_chain(x, A, Bs, Cs, W, scales):
    d = [_reference(A, B, C, s) for B, C, s in zip(Bs, Cs, scales)]
    xd, Wd = x.double(), W.double()
    h = xd @ (Wd + d[0]).T
    h = (h + h @ d[1].T) @ Wd.T
    h = h + h @ d[2].T
    return h + h @ d[3].T


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layers_sharing_one_rule_mix_get_the_kron_gradients(dtype):
    # One scaled mixing matrix for every call, its gradient summed in the rules' backward: the rules'
    # gradient must be the sum over all calls, in every backward pass of the graph, whatever ran before.
    n, r, d = 4, 2, 16
    g = torch.Generator().manual_seed(3)
    A = torch.randn(n, n, n, generator=g).to(dtype).requires_grad_()
    Bs = [torch.randn(n, r, d // n, generator=g).to(dtype).transpose(1, 2).requires_grad_() for _ in range(4)]
    Cs = [torch.randn(n, r, d // n, generator=g).to(dtype).requires_grad_() for _ in range(4)]
    W = (torch.randn(d, d, generator=g) / d**0.5).to(dtype)
    x = torch.randn(2, 3, d, generator=g).to(dtype).requires_grad_()
    tensors = [x, A, *Bs, *Cs]
    shared = (0.7,) * 4
    expected = _dense_chain(x, A, Bs, Cs, W, shared)
    grad = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(expected, tensors, grad)
    mix = functional.rule_mix(A, r, dtype, 0.7)
    y = _shared_mix_chain(x, A, Bs, Cs, W, mix, shared)
    assert_close(y, expected, dtype)
    torch.autograd.grad(y, [x], grad.to(dtype), retain_graph=True)  # a pass that never reaches the rules
    for _ in range(2):  # the same graph twice
        got = torch.autograd.grad(y, tensors, grad.to(dtype), retain_graph=True)
        for got_one, want_one in zip(got, want):
            assert_close(got_one, want_one, dtype)
    assert got[1].stride() == A.stride()  # accumulated without a copy
    # Built per call, each call with its own scale: the kron gradients too.
    own = (0.5, 0.7, 1.3, 0.9)
    expected = _dense_chain(x, A, Bs, Cs, W, own)
    y_own = _shared_mix_chain(x, A, Bs, Cs, W, None, own)
    assert_close(y_own, expected, dtype)
    want = torch.autograd.grad(expected, tensors, grad)
    for got_one, want_one in zip(torch.autograd.grad(y_own, tensors, grad.to(dtype)), want):
        assert_close(got_one, want_one, dtype)


def test_a_mix_of_the_wrong_rank_dtype_or_scale_is_refused():
    A, B, C = _factors(8, 8, 2, 3, torch.float32, grad=True)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"rule_mix\(A, r=3, dtype=torch.float32, scale=1.0\)"):
        functional.apply(x, A, B, C, mix=functional.rule_mix(A, 2, torch.float32))
    with pytest.raises(ValueError, match="torch.bfloat16"):
        functional.apply(x, A, B, C, mix=functional.rule_mix(A, 3, torch.bfloat16))
    with pytest.raises(ValueError, match=r"scale=0.5\)"):
        functional.apply(x, A, B, C, 0.5, mix=functional.rule_mix(A, 3, torch.float32, 2.0))


def test_frozen_linear_refuses_a_trainable_weight_and_a_wrong_shape():
    A, B, C = _factors(8, 8, 4, 2, torch.float32)
    W = torch.randn(8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        functional.linear(torch.randn(2, 8), W, None, A, B, C)
    with pytest.raises(ValueError, match="needs a 6 x 8 update"):
        functional.linear(torch.randn(2, 8), torch.randn(6, 8), None, A, B, C)


@pytest.mark.parametrize("residual", [False, True], ids=["base", "residual"])
def test_float32_factors_under_bfloat16_autocast(residual):
    # The usual mixed-precision setup: float32 adapter, float32 or bfloat16 activations, autocast on.
    A, B, C = _factors(16, 16, 4, 2, torch.float32, grad=True)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    base = None if residual else torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = functional.apply(x, A, B, C, 2.0, base=None if residual else base.bfloat16(), residual=residual)
    assert y.dtype == torch.bfloat16  # x + s dW x comes out in the dtype its consumers would cast it to
    expected = x.double() @ _reference(A, B, C, 2.0).T + (x.double() if residual else base.double())
    assert_close(y, expected, torch.bfloat16)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and all(t.grad.dtype == torch.float32 for t in (A, B, C))


def test_bfloat16_input_beside_float32_factors_without_autocast_keeps_the_input_dtype():
    A, B, C = _factors(16, 16, 4, 2, torch.float32)
    x = torch.randn(2, 16).bfloat16()
    assert functional.apply(x, A, B, C, residual=True).dtype == torch.bfloat16
    assert functional.apply(x, A, B, C).dtype == torch.bfloat16
    assert functional.apply(x, A, B, C, base=torch.zeros(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)], ids=str)
def test_folded_weight_matches_dense_merge(kernel, dtype):
    A, B, C = _factors(8, 8, 4, 2, dtype, grad=True)
    A2, B2, C2 = _factors(12, 8 * math.prod(kernel or (1,)), 4, 2, dtype, seed=1, grad=True)
    W = torch.randn(12, 8, *kernel, generator=torch.Generator().manual_seed(4)).to(dtype)
    folded = functional.folded_weight(W, sequential=[(A, B, C, 0.3)], parallel=[(A2, B2, C2, 0.7)])
    assert folded.shape == W.shape and folded.dtype == dtype
    S, P = _reference(A, B, C, 0.3), _reference(A2, B2, C2, 0.7)
    expected = torch.einsum("oi...,ij->oj...", W.double(), torch.eye(8, dtype=torch.float64) + S) + P.view(W.shape)
    assert_close(folded, expected, dtype)
    grad = torch.randn(W.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    inputs = [A, B, C, A2, B2, C2]
    for got, want in zip(torch.autograd.grad(folded, inputs, grad.to(dtype)), torch.autograd.grad(expected, inputs, grad)):
        assert_close(got, want, dtype)


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)], ids=str)
def test_merge_then_unmerge_restores_weight(kernel):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(12, 8, *kernel, generator=g)
    S = 0.1 * torch.randn(8, 8, generator=g)
    P = 0.1 * torch.randn(12, 8 * (kernel[0] * kernel[1] if kernel else 1), generator=g)
    merged = functional.merge_weight(W, S, P)
    # W' = W (I + S) + P, checked on the input axis of every tap.
    expected = torch.einsum("oi...,ij->oj...", W.double(), torch.eye(8, dtype=torch.float64) + S.double())
    torch.testing.assert_close(merged.double(), expected + P.double().reshape(W.shape), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(functional.unmerge_weight(merged, S, P), W, rtol=1e-6, atol=1e-6)


def test_unmerge_refuses_a_singular_update():
    W = torch.randn(4, 4)
    S = -torch.eye(4)  # I + S = 0: W is gone after merging
    with pytest.raises(ValueError, match="singular"):
        functional.unmerge_weight(functional.merge_weight(W, S), S)
    with pytest.raises(ValueError, match="singular"):
        functional.check_invertible(S)
    functional.check_invertible(0.1 * torch.eye(4))


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_orthogonal_rules_are_orthogonal(n):
    A = functional.init_rules(n, "orthogonal", generator=torch.Generator().manual_seed(0))
    assert A.shape == (n, n, n)
    eye = torch.eye(n).expand(n, n, n)
    torch.testing.assert_close(A @ A.transpose(1, 2), eye, rtol=1e-5, atol=1e-5)
    if n > 1:
        assert not torch.allclose(A[0], A[1]), "experts must start with different rules"


def test_normal_rules_and_unknown_init():
    A = functional.init_rules(4, "normal", generator=torch.Generator().manual_seed(0))
    assert A.shape == (4, 4, 4) and A.abs().mean() > 0.1
    with pytest.raises(ValueError, match="orthogonal"):
        functional.init_rules(4, "zeros")


def test_rank_can_exceed_lora_at_same_budget():
    """The paper's point: rank(dW) reaches min(d, n^2 r), not r."""
    A, B, C = _factors(64, 64, 4, 2, torch.float64, seed=5)
    dW = functional.delta_weight(A, B, C)
    assert torch.linalg.matrix_rank(dW) == functional.rank_bound(64, 64, 4, 2) == 32  # n^2 r = 32 > r = 2
    assert functional.numerical_rank(dW) == 32


def test_sizes_and_counts():
    assert functional.delta_shape("sequential", 768, 3072) == (768, 768)
    assert functional.delta_shape("parallel", 768, 3072) == (3072, 768)
    assert functional.delta_shape("parallel", 16, 32, kernel_taps=9) == (32, 144)
    with pytest.raises(ValueError, match="mode"):
        functional.delta_shape("serial", 8, 8)
    assert functional.rank_bound(768, 768, 4, 4) == 64 and functional.rank_bound(8, 8, 4, 4) == 8
    # The paper's ViT-B/16 count: 24 adapters of 2 * 768 * 4, plus the shared 4^3 rules.
    assert 24 * functional.expert_parameters(768, 768, 4) + functional.rule_parameters(4) == 147_520
    assert functional.rule_parameters(4, layers=24, share_rules=False) == 24 * 64
    A, B, C = _factors(16, 24, 4, 3, torch.float64)
    assert B.numel() + C.numel() == functional.expert_parameters(16, 24, 3)


def test_flop_model_prefers_fold_only_without_gradients_on_many_tokens():
    assert functional.prefer_fold(4096, 768, 768, 4, 4, needs_grad=False)
    assert not functional.prefer_fold(1, 768, 768, 4, 4, needs_grad=False)
    assert not functional.prefer_fold(4096, 768, 768, 4, 4, needs_grad=True)
    assert functional.factored_flops(10, 8, 8, 2, 1, needs_grad=True) == 3 * functional.factored_flops(10, 8, 8, 2, 1)


def test_valid_num_experts():
    assert functional.valid_num_experts(12, 8) == [1, 2, 4]


def test_mismatched_factors_are_refused():
    A, B, C = _factors(8, 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="factors"):
        functional.delta_weight(A, B, C[:, :1])
    with pytest.raises(ValueError, match="d_in=8"):
        functional.apply(torch.randn(2, 6), A, B, C)
    with pytest.raises(ValueError, match="square"):
        functional.apply(torch.randn(2, 8), *_factors(16, 8, 4, 2, torch.float32), residual=True)


def test_expert_outputs_sum_to_the_factored_update():
    A, B, C = _factors(12, 8, 4, 2, torch.float64)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    per = functional.expert_outputs(x, A, B, C, 0.7)  # (3, 5, n, d_out)
    assert per.shape == (3, 5, 4, 12)
    assert_close(per.sum(-2), functional.apply(x, A, B, C, 0.7), torch.float64)
    for i in range(4):
        expected = 0.7 * x @ torch.kron(A[i], B[i] @ C[i]).T
        assert_close(per[..., i, :], expected, torch.float64)
