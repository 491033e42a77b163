"""Every fast path of :mod:`alore_peft.functional` against the naive ``torch.kron`` sum."""

from __future__ import annotations

import itertools

import pytest
import torch

from alore_peft import functional as F

from .tolerances import TOLERANCES

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


def _factors(d_out, d_in, n, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, n, generator=g).to(dtype)
    B = torch.randn(n, d_out // n, r, generator=g).to(dtype)
    C = torch.randn(n, r, d_in // n, generator=g).to(dtype)
    return A, B, C


def _reference(A, B, C, scale):
    # The reference runs in float64 so it is the yardstick, not another approximation.
    return F.reference_delta_weight(A.double(), B.double(), C.double(), scale)


def _close(actual, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    # Scale the absolute tolerance by the magnitude of the result: sums of n*r products.
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_out,d_in,n,r", CASES)
def test_delta_weight_matches_kron(d_out, d_in, n, r, dtype):
    A, B, C = _factors(d_out, d_in, n, r, dtype)
    dW = F.delta_weight(A, B, C, 0.5)
    assert dW.shape == (d_out, d_in) and dW.dtype == dtype
    _close(dW, _reference(A, B, C, 0.5), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "d_out,d_in,n,r,batch", [(*case, BATCH_SHAPES[i % len(BATCH_SHAPES)]) for i, case in enumerate(CASES)]
)
def test_factored_apply_matches_kron(d_out, d_in, n, r, batch, dtype):
    A, B, C = _factors(d_out, d_in, n, r, dtype)
    x = torch.randn(*batch, d_in, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = F.apply(x, A, B, C, 0.5)
    assert y.shape == (*batch, d_out)
    _close(y, x.double() @ _reference(A, B, C, 0.5).T, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d_out,d_in,n,r", CASES[::3])
def test_linear_with_delta_matches_kron(d_out, d_in, n, r, dtype):
    A, B, C = _factors(d_out, d_in, n, r, dtype)
    g = torch.Generator().manual_seed(2)
    W = torch.randn(d_out, d_in, generator=g).to(dtype)
    b = torch.randn(d_out, generator=g).to(dtype)
    x = torch.randn(3, 4, d_in, generator=g).to(dtype)
    y = F.linear_with_delta(x, W, b, A, B, C, 0.5)
    expected = x.double() @ (W.double() + _reference(A, B, C, 0.5)).T + b.double()
    _close(y, expected, dtype)


@pytest.mark.parametrize("d_out,d_in,n,r", CASES[::4])
def test_gradients_of_factored_path_match_kron(d_out, d_in, n, r):
    """The factored path is differentiable in every factor and agrees with the reference's gradients."""
    A, B, C = (t.double().requires_grad_() for t in _factors(d_out, d_in, n, r, torch.float64))
    x = torch.randn(6, d_in, dtype=torch.float64)
    target = torch.randn(6, d_out, dtype=torch.float64)
    ((F.apply(x, A, B, C, 0.7) - target) ** 2).sum().backward()
    grads = [t.grad.clone() for t in (A, B, C)]
    for t in (A, B, C):
        t.grad = None
    ((x @ F.reference_delta_weight(A, B, C, 0.7).T - target) ** 2).sum().backward()
    for got, t in zip(grads, (A, B, C)):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)], ids=str)
def test_merge_then_unmerge_restores_weight(kernel):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(12, 8, *kernel, generator=g)
    S = 0.1 * torch.randn(8, 8, generator=g)
    P = 0.1 * torch.randn(12, 8 * (kernel[0] * kernel[1] if kernel else 1), generator=g)
    merged = F.merge_weight(W, S, P)
    # W' = W (I + S) + P, checked on the input axis of every tap.
    expected = torch.einsum("oi...,ij->oj...", W.double(), torch.eye(8, dtype=torch.float64) + S.double())
    torch.testing.assert_close(merged.double(), expected + P.double().reshape(W.shape), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(F.unmerge_weight(merged, S, P), W, rtol=1e-6, atol=1e-6)


def test_unmerge_refuses_a_singular_update():
    W = torch.randn(4, 4)
    S = -torch.eye(4)  # I + S = 0: W is gone after merging
    with pytest.raises(ValueError, match="singular"):
        F.unmerge_weight(F.merge_weight(W, S), S)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_orthogonal_rules_are_orthogonal(n):
    A = F.init_rules(n, "orthogonal", generator=torch.Generator().manual_seed(0))
    assert A.shape == (n, n, n)
    eye = torch.eye(n).expand(n, n, n)
    torch.testing.assert_close(A @ A.transpose(1, 2), eye, rtol=1e-5, atol=1e-5)
    if n > 1:
        assert not torch.allclose(A[0], A[1]), "experts must start with different rules"


def test_normal_rules_and_unknown_init():
    A = F.init_rules(4, "normal", generator=torch.Generator().manual_seed(0))
    assert A.shape == (4, 4, 4) and A.abs().mean() > 0.1
    with pytest.raises(ValueError, match="orthogonal"):
        F.init_rules(4, "zeros")


def test_rank_can_exceed_lora_at_same_budget():
    """The paper's point: rank(dW) reaches min(d, n^2 r), not r."""
    A, B, C = _factors(64, 64, 4, 2, torch.float64, seed=5)
    assert torch.linalg.matrix_rank(F.delta_weight(A, B, C)) == 32  # n^2 r = 32 > r = 2


def test_flop_model_prefers_fold_only_without_gradients_on_many_tokens():
    assert F.prefer_fold(4096, 768, 768, 4, 4, needs_grad=False)
    assert not F.prefer_fold(1, 768, 768, 4, 4, needs_grad=False)
    assert not F.prefer_fold(4096, 768, 768, 4, 4, needs_grad=True)


def test_valid_num_experts():
    assert F.valid_num_experts(12, 8) == [1, 2, 4]


def test_mismatched_factors_are_refused():
    A, B, C = _factors(8, 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="factors"):
        F.delta_weight(A, B, C[:, :1])
