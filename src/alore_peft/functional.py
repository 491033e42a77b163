"""The ALoRE Kronecker-sum math as pure functions.

An ALoRE update aggregates ``n`` low-rank experts in the space of Kronecker
products::

    dW = scale * sum_{i=1..n} A[i] (x) (B[i] @ C[i])

with the tensors stored stacked over experts:

====== ======================== ===========================================
tensor shape                    meaning
====== ======================== ===========================================
``A``  ``(n, n, n)``            rule matrices; ``A[i]`` is expert i's n x n rule
``B``  ``(n, d_out / n, r)``    expert up factors
``C``  ``(n, r, d_in / n)``     expert down factors
``dW`` ``(d_out, d_in)``        the update (``(d_out, d_in)`` like ``nn.Linear``)
====== ======================== ===========================================

Nothing in this module knows about ``nn.Module`` or PEFT. Every function is
differentiable and works for any floating dtype.

Index convention (``q_in = d_in / n``, ``q_out = d_out / n``)::

    kron(A_i, M_i)[p * q_out + a, j * q_in + b] = A_i[p, j] * M_i[a, b]

so splitting an input vector into ``n`` blocks ``x = [x_0 ... x_{n-1}]`` of
``q_in`` features, block ``p`` of the output is
``sum_i sum_j A_i[p, j] * M_i @ x_j``.

**The fold.** The rules fold into the up factors,

    Bf[(p, a), (j, i, r)] = A[i, p, j] * B[i, a, r]          # (d_out, n * n * r)

and ``dW = Bf @ V`` with ``V`` the block-diagonal matrix that applies every
expert's ``C[i]`` to every input block ``j``: that builds ``dW``
(:func:`delta_weight`) and folds a weight, ``W @ dW = (W @ Bf) @ V``, without
ever building a ``d_in x d_in`` update (:func:`folded_weight`).

**The factored path.** A call never builds ``dW`` nor ``Bf``: the rules mix
the experts' rank-``r`` projections of the input blocks (an ``(n^2 r, n^2
r)`` matrix built once per model forward, :func:`rule_mix`), so ``dW x`` is
three token-sized matmuls with no copy of a per-token tensor between them
(:func:`apply`, :func:`linear`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.nn.functional import linear as nn_linear

__all__ = [
    "Factors",
    "delta_weight",
    "fold_rules",
    "RuleMix",
    "rule_mix",
    "mix_matrix",
    "compute_dtype",
    "call_dtype",
    "apply",
    "apply_stored",
    "factor_matrices",
    "factor_views",
    "linear",
    "linear_stored",
    "folded_weight",
    "reference_delta_weight",
    "merge_weight",
    "unmerge_weight",
    "check_invertible",
    "init_rules",
    "valid_num_experts",
    "delta_shape",
    "rank_bound",
    "expert_parameters",
    "rule_parameters",
    "factored_flops",
    "fold_flops",
    "prefer_fold",
    "fold_can_pay",
    "expert_outputs",
    "expert_norms",
    "effective_rank",
    "numerical_rank",
]

# (A, B, C, scale): one adapter's factors and scale, as layers hand them over.
Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]


def _check(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> tuple[int, int, int, int]:
    """Return ``(n, r, q_out, q_in)`` after checking that the factors agree."""
    n = A.shape[0]
    if A.shape != (n, n, n):
        raise ValueError(f"rules A must have shape (n, n, n); got {tuple(A.shape)}")
    if B.dim() != 3 or C.dim() != 3 or B.shape[0] != n or C.shape[0] != n or B.shape[2] != C.shape[1]:
        raise ValueError(
            f"factors must be B: (n, d_out/n, r) and C: (n, r, d_in/n) with n={n}; "
            f"got B {tuple(B.shape)} and C {tuple(C.shape)}"
        )
    return n, B.shape[2], B.shape[1], C.shape[2]


# -- the fold ------------------------------------------------------------------
def _fold_views(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``B`` as broadcast views on the fold's index ``(p, a, j, i, r)``, no copy."""
    n, q_out, r = B.shape
    if torch.compiler.is_compiling():  # the compiler traces permutes, not raw strides
        return A.permute(1, 2, 0)[:, None, :, :, None], B.permute(1, 0, 2)[None, :, None, :, :]
    # One op each in eager mode, where a GPU pays per operator.
    shape = (n, q_out, n, n, r)
    a_view = A.as_strided(shape, (A.stride(1), 0, A.stride(2), A.stride(0), 0), A.storage_offset())
    b_view = B.as_strided(shape, (0, B.stride(1), 0, B.stride(0), B.stride(2)), B.storage_offset())
    return a_view, b_view


def fold_rules(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The rules folded into the up factors, ``Bf[(p, a), (j, i, r)] = A[i, p, j] * B[i, a, r]``.

    ``dW x`` is then ``Bf`` applied to ``x``'s blocks projected by every
    expert's ``C`` (see the module docstring).

    Args:
        A: Rule matrices, ``(n, n, n)``.
        B: Up factors, ``(n, d_out / n, r)``.

    Returns:
        ``(d_out, n * n * r)`` in ``B``'s dtype.
    """
    n, q_out, r = B.shape
    a_view, b_view = _fold_views(A.to(B.dtype), B)
    return (a_view * b_view).reshape(n * q_out, n * n * r)  # (d_out, n_j * n_i * r)


def delta_weight(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Build the dense update ``dW = scale * sum_i kron(A[i], B[i] @ C[i])``.

    ``dW = Bf @ V``: one matmul of ``d_out * d_in * n * r`` multiply-adds
    after the fold. Use it once per optimiser step or at merge time, never
    per token.

    Args:
        A: Rule matrices, ``(n, n, n)``.
        B: Up factors, ``(n, d_out / n, r)``.
        C: Down factors, ``(n, r, d_in / n)``.
        scale: Scalar multiplier ``s``.

    Returns:
        ``(d_out, d_in)`` tensor in the factors' dtype.
    """
    n, r, q_out, q_in = _check(A, B, C)
    bf = fold_rules(A, B).view(n * q_out * n, n * r)  # ((p, a, j), (i, r))
    dW = (bf @ C.reshape(n * r, q_in)).view(n * q_out, n * q_in)  # ((p, a), (j, b))
    return dW * scale if scale != 1.0 else dW


def reference_delta_weight(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The naive definition ``scale * sum_i torch.kron(A[i], B[i] @ C[i])``.

    Slow and obviously correct: the yardstick every fast path is tested against.
    """
    return scale * sum(torch.kron(A[i].contiguous(), B[i] @ C[i]) for i in range(A.shape[0]))


# -- the factored path -----------------------------------------------------------
# The rules act in the rank space. With ``z`` every block of ``x`` projected
# down by every expert, ``z[t, (j, i, r)] = C[i] @ x_j``, the rules mix the
# blocks inside it and every expert's up factor then writes every output block:
#
#     u[t, (p, i, r)] = sum_j A[i, p, j] z[t, (j, i, r)]        u = z @ M
#     y[t, (p, a)]    = sum_{i, r} u[t, (p, i, r)] B[i, a, r]   one (T n, n r) x (n r, d_out / n) matmul
#
# ``M`` (:func:`mix_matrix`, ``(n^2 r, n^2 r)``) depends on the rules alone, so
# an adapter whose layers share their rules builds it once per model forward
# (:class:`RuleMix`), and the rules' gradient is one matmul over every layer's
# ``z`` and ``u`` gradient, once per backward pass (:class:`_RuleGrad`).
# Per layer: three matmuls forward, five backward, ``T (n r (d_in + d_out) +
# (n^2 r)^2)`` multiply-adds forward. The matmuls read the factors as
# matrices, ``B`` as ``B2[(i, r), a] = B[i, a, r]`` (``(n r, d_out / n)``) and
# ``C`` as ``C2[(i, r), b] = C[i, r, b]`` (``(n r, d_in / n)``), the layout the
# layers store them in (:func:`factor_matrices`), and their gradients come out
# of one matmul each in that layout.


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as a ``(-1, width)`` matrix: one view when ``t`` is contiguous, else a contiguous copy."""
    return t.view(-1, width) if t.is_contiguous() else t.reshape(-1, width).contiguous()


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)  # whether autocast is on anywhere


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``False`` for devices without autocast, e.g. ``meta``)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * a @ b`` in one matmul (``addmm`` with ``beta=0`` ignores its input)."""
    if scale == 1.0:
        return torch.mm(a, b)
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scale)


def mix_matrix(A: torch.Tensor, r: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The rules as one matrix on the rank space, ``M[(j, i, s), (p, k, t)] = A[i, p, j] [i == k] [s == t]``.

    ``z @ M`` mixes the ``n`` input blocks of every expert's rank-``r``
    projection ``z[t, (j, i, s)]`` into output blocks (see the comment above).
    Plain differentiable operators: the reference for (and the compiled form of)
    what :func:`rule_mix` builds.

    Args:
        A: Rule matrices, ``(n, n, n)``.
        r: Rank of every expert.
        dtype: Result dtype (default ``A``'s).

    Returns:
        ``(n * n * r, n * n * r)``.
    """
    n = A.shape[0]
    dtype = dtype or A.dtype
    eye_n = torch.eye(n, dtype=dtype, device=A.device)
    eye_r = torch.eye(r, dtype=dtype, device=A.device)
    return torch.einsum("ipj,ik,st->jispkt", A.to(dtype), eye_n, eye_r).reshape(n * n * r, n * n * r)


def _mix_views(m: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """The entries of ``M`` that hold a rule, as an ``(i, p, j, s)`` view of ``M`` (contiguous ``(K, K)``)."""
    k = n * n * r
    return m.as_strided((n, n, n, r), (r * k + r, n * r, n * r * k, k + 1), m.storage_offset())


class _RuleGrad:
    """The gradient of one :class:`RuleMix`'s ``M``, collected from every layer that read ``M``.

    ``gM = sum over calls of z^T gu``. Each layer hands over its ``z`` and
    ``gu`` (``(T, n^2 r)`` each; ``z`` is kept for its backward anyway) instead
    of running its own small matmul, and the rules' backward runs one matmul
    over all of them, so the sum costs the same few operators per step
    whatever the number of layers. A backward pass
    (``torch._C._current_graph_task_id``) starts afresh, so a pass that never
    reached the rules (``torch.autograd.grad`` of other tensors) leaves nothing
    behind for the next one.
    """

    __slots__ = ("zs", "gus", "task")

    def __init__(self) -> None:
        self.zs: list[torch.Tensor] = []
        self.gus: list[torch.Tensor] = []
        self.task: Optional[int] = None

    def add(self, z: torch.Tensor, gu: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if self.task != task:
            self.zs, self.gus, self.task = [], [], task
        self.zs.append(z)
        self.gus.append(gu)

    def take(self, scale: float) -> Optional[torch.Tensor]:
        """``scale * sum z^T gu`` over this pass's calls, ``(n^2 r, n^2 r)``, or ``None``."""
        zs, gus = (self.zs, self.gus) if self.task == torch._C._current_graph_task_id() else ([], [])
        self.zs, self.gus, self.task = [], [], None
        if not zs:
            return None
        z = zs[0] if len(zs) == 1 else torch.cat(zs)  # (sum T, n^2 r)
        gu = gus[0] if len(gus) == 1 else torch.cat(gus)
        return _scaled_mm(z.t(), gu, scale)


def _build_mix(A: torch.Tensor, r: int, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``scale *`` :func:`mix_matrix` in two operators (eager): zeros, then the rules written onto their entries."""
    n = A.shape[0]
    k = n * n * r
    m = torch.zeros(k, k, dtype=dtype, device=A.device)
    a_view = A.as_strided((n, n, n, r), (A.stride(0), A.stride(1), A.stride(2), 0), A.storage_offset())
    if scale == 1.0:
        _mix_views(m, n, r).copy_(a_view)  # (i, p, j, s)
    else:
        torch.mul(a_view, scale, out=_mix_views(m, n, r))
    return m


class _MixBuild(torch.autograd.Function):
    """``scale * M`` from the rules; its backward sums what its layers handed over (:class:`_RuleGrad`)."""

    @staticmethod
    def forward(ctx, A, r, dtype, scale, grad):  # noqa: D102
        ctx.set_materialize_grads(False)
        ctx.grad, ctx.n, ctx.r, ctx.scale, ctx.a_dtype = grad, A.shape[0], r, scale, A.dtype
        return _build_mix(A, r, dtype, scale)

    @staticmethod
    def backward(ctx, gm):  # noqa: D102
        total = ctx.grad.take(ctx.scale)  # the gradient at M, the scale applied in the matmul
        if gm is not None:  # a consumer that returned its share (at scale * M) instead of handing it over
            total = gm * ctx.scale if total is None else total.add_(gm, alpha=ctx.scale)
        if total is None:
            return None, None, None, None, None
        diag = _mix_views(total.contiguous(), ctx.n, ctx.r)  # (i, p, j, s)
        return torch.sum(diag, dim=3, dtype=ctx.a_dtype), None, None, None, None


class RuleMix:
    """One adapter's rules as the scaled mixing matrix ``scale * M`` (:func:`mix_matrix`), and where its gradient collects.

    Built by :func:`rule_mix`. Every layer call that hands the same object to
    :func:`apply` or :func:`linear` shares one matrix, and the rules' gradient
    from all of them is one matmul in the rules' backward; the layers do this
    for every call of one model forward.
    """

    __slots__ = ("matrix", "grad", "scale")

    def __init__(self, matrix: torch.Tensor, grad: Optional[_RuleGrad] = None, scale: float = 1.0) -> None:
        self.matrix, self.grad, self.scale = matrix, grad, scale


def rule_mix(A: torch.Tensor, r: int, dtype: torch.dtype, scale: float = 1.0) -> RuleMix:
    """The :class:`RuleMix` of rules ``A`` for experts of rank ``r``: ``scale * M`` in the compute dtype ``dtype``.

    Differentiable in ``A``. The adapter's scale lives in the matrix, so the
    layers' matmuls carry no scaling of their own. Under ``torch.compile`` the
    matrix is plain operators (:func:`mix_matrix`) and every layer returns its
    own gradient of it.
    """
    scale = float(scale)
    if torch.compiler.is_compiling():
        m = mix_matrix(A, r, dtype)
        return RuleMix(m if scale == 1.0 else m * scale, None, scale)
    if A.requires_grad and torch.is_grad_enabled():
        grad = _RuleGrad()
        return RuleMix(_MixBuild.apply(A, r, dtype, scale, grad), grad, scale)
    with torch.no_grad():
        return RuleMix(_build_mix(A, r, dtype, scale), None, scale)


# The factored functions below take and return any number of leading batch
# dimensions and reshape inside (views of contiguous tensors), so a layer call
# adds one node to the autograd graph. ``x``'s ``(T, d_in)`` rows read as ``(T n,
# q_in)`` are its blocks; ``z`` read as ``(T, n^2 r)`` is every expert's
# projection of every block; ``M`` carries the scale. The matmuls run in the
# compute dtype ``dtype`` (the autocast dtype, else the factors'), with autocast
# switched off inside.


def _down_mix(x: torch.Tensor, c2: torch.Tensor, m: torch.Tensor) -> tuple:
    """``(blocks, z, u)``: ``x``'s blocks ``(T n, q_in)``, projected ``(T, (j, i, r))``, mixed ``z @ M`` as ``(T n, (i, r))``."""
    blocks = _rows(x, c2.shape[1])
    z = nn_linear(blocks, c2).view(-1, m.shape[0])  # blocks @ C^T, then (T, (j, i, r))
    return blocks, z, torch.mm(z, m).view(-1, c2.shape[0])


def _factor_grads(ctx, g_blocks: torch.Tensor, need_gz: bool, saved: tuple) -> tuple:
    """``(gz, gM, gB2, gC2)`` from ``g_blocks``, the gradient at the adapter's output as ``(T n, d_out / n)``.

    ``gz`` is ``(T n, n r)``; ``gB2`` and ``gC2`` are ``(n r, d / n)``, the factors' matrix layout.
    """
    blocks, z, u, m, b2 = saved[:5]
    need_m, need_b, need_c = ctx.needs_input_grad[ctx.factor_slots]
    b_dtype, c_dtype = ctx.factor_dtypes
    gz = gm = gb = gc = None
    if need_gz or need_c or need_m:
        gu = nn_linear(g_blocks, b2).view(z.shape)  # g @ B: (T, (p, i, r))
        if need_m:
            if ctx.sink is not None:
                ctx.sink.add(z, gu)  # summed with every other layer's in one matmul (the rules' backward)
            else:
                gm = torch.mm(z.t(), gu)
        if need_gz or need_c:
            gz = nn_linear(gu, m).view(u.shape)  # gu @ M^T, as (T n, (i, r))
            if need_c:
                gc = _cast(torch.mm(gz.t(), blocks), c_dtype)
    if need_b:
        gb = _cast(torch.mm(u.t(), g_blocks), b_dtype)
    return gz, gm, gb, gc


def _save(ctx, x: torch.Tensor, b2: torch.Tensor, c2: torch.Tensor, spec: tuple, *tensors: torch.Tensor) -> None:
    """What both factored functions keep for their backward: ``tensors``, and the dtypes to give back."""
    ctx.save_for_backward(*tensors)
    ctx.dtype, ctx.sink = spec[1], spec[3]
    ctx.x_meta, ctx.factor_dtypes = (x.shape, x.dtype), (b2.dtype, c2.dtype)


def _autocast_off(on: bool, x: torch.Tensor, fn, *args):
    """``fn(*args)`` with autocast (``on`` for ``x``'s device) switched off: the factored functions pick their dtypes themselves."""
    if on:
        with torch.autocast(x.device.type, enabled=False):
            return fn(*args)
    return fn(*args)


def _autocast_on_for(t: torch.Tensor) -> bool:
    """Whether autocast is on for ``t``'s device (asked of the device only when autocast is on anywhere)."""
    return _any_autocast() and _autocast_on(t.device.type)


class _FactoredDelta(torch.autograd.Function):
    """``base + x @ dW.T`` (or ``x + ...`` with ``residual``) as three token-sized matmuls.

    ``x``: ``(..., d_in)``; ``m``: ``scale * M``; ``B2``, ``C2``: the factors
    as ``(n r, d_out / n)`` and ``(n r, d_in / n)``; ``base``: ``(..., d_out)``
    or ``None``; ``spec``: ``(residual, dtype, autocast, sink)``.
    """

    @staticmethod
    def forward(ctx, x, m, B2, C2, base, spec):  # noqa: D102
        return _autocast_off(spec[2], x, _FactoredDelta._forward, ctx, x, m, B2, C2, base, spec)

    @staticmethod
    def _forward(ctx, x, m, B2, C2, base, spec):
        residual, dtype, autocast = spec[0], spec[1], spec[2]
        b2, c2 = _cast(B2, dtype), _cast(C2, dtype)
        xc = _cast(x, dtype)
        blocks, z, u = _down_mix(xc, c2, m)
        # Under autocast x + s dW x comes out in the autocast dtype, which its consumers would cast it to.
        acc = (xc if autocast else x) if residual else base
        fused = acc is not None and acc.dtype == dtype
        if acc is None:
            out = torch.mm(u, b2)  # (T n, d_out / n)
        elif fused:
            out = torch.addmm(blocks if acc is xc else _rows(acc, b2.shape[1]), u, b2)
        else:  # e.g. a float32 adapter beside a bfloat16 base layer: add in the base's dtype
            out = _rows(acc, b2.shape[1]) + torch.mm(u, b2).to(acc.dtype)
        _save(ctx, x, B2, C2, spec, blocks, z, u, m, b2, c2)
        ctx.residual, ctx.fused, ctx.factor_slots = residual, fused, slice(1, 4)
        return out.view(*x.shape[:-1], m.shape[0] // c2.shape[0] * b2.shape[1])  # (..., n d_out / n)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _autocast_off(_autocast_on_for(grad), grad, _FactoredDelta._backward, ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        need_x, need_base = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        saved = ctx.saved_tensors
        b2, c2 = saved[4], saved[5]
        g_blocks = _rows(_cast(grad, ctx.dtype), b2.shape[1])  # (T n, d_out / n)
        gz, gm, gb, gc = _factor_grads(ctx, g_blocks, need_x, saved)
        gx = None
        if need_x:
            if ctx.residual and ctx.fused:
                gx = torch.addmm(g_blocks, gz, c2)  # g + gz @ C: (T n, q_in)
            else:
                gx = torch.mm(gz, c2)
                if ctx.residual:  # the identity path keeps the input's dtype
                    gx = _rows(grad, c2.shape[1]) + gx.to(grad.dtype)
            gx = _cast(gx.view(ctx.x_meta[0]), ctx.x_meta[1])
        return gx, gm, gb, gc, (grad if need_base else None), None


class _FactoredLinear(torch.autograd.Function):
    """A frozen ``nn.Linear`` and its adapter in one function: ``x W^T + b + s dW x`` or ``(x + s dW x) W^T + b``.

    Owning the linear's backward lets the input gradient collect both paths in
    place (one matmul each) instead of adding two tensors. ``weight`` and
    ``bias`` must not require gradients. ``spec``: ``(sequential, dtype,
    autocast, sink)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, m, B2, C2, spec):  # noqa: D102
        return _autocast_off(spec[2], x, _FactoredLinear._forward, ctx, x, weight, bias, m, B2, C2, spec)

    @staticmethod
    def _forward(ctx, x, weight, bias, m, B2, C2, spec):
        sequential, dtype = spec[0], spec[1]
        b2, c2 = _cast(B2, dtype), _cast(C2, dtype)
        xc, wc = _cast(x, dtype), _cast(weight, dtype)
        blocks, z, u = _down_mix(xc, c2, m)
        if sequential:
            h = torch.addmm(blocks, u, b2)  # x + s dW x: (T n, q_in)
            out = nn_linear(h.view(xc.shape), wc, _cast(bias, dtype))
        else:
            out = nn_linear(xc, wc, _cast(bias, dtype))
            out.view(-1, b2.shape[1]).addmm_(u, b2)  # a fresh tensor of this function's own: updated in place
        _save(ctx, x, B2, C2, spec, blocks, z, u, m, b2, c2, wc)
        ctx.sequential, ctx.factor_slots = sequential, slice(3, 6)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return _autocast_off(_autocast_on_for(grad), grad, _FactoredLinear._backward, ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        need_x = ctx.needs_input_grad[0]
        saved = ctx.saved_tensors
        b2, c2, wc = saved[4], saved[5], saved[6]
        g = _cast(grad, ctx.dtype)  # (..., d_out)
        # The gradient at the linear's input, (..., d_in): one matmul, in x's shape (a fresh, contiguous tensor).
        g_in = torch.matmul(g, wc) if (need_x or ctx.sequential) else None
        gz, gm, gb, gc = _factor_grads(ctx, _rows(g_in if ctx.sequential else g, b2.shape[1]), need_x, saved)
        gx = None
        if need_x:
            g_in.view(-1, c2.shape[1]).addmm_(gz, c2)  # both paths, in place
            gx = _cast(g_in, ctx.x_meta[1])
        return gx, None, None, gm, gb, gc, None


# ``Function.apply`` runs Python bookkeeping for functorch transforms (``vmap``, ``grad``) before it enters
# autograd's C++ entry point: about 2 µs per call, on every adapted layer's call. Outside such a transform
# and outside ``torch.compile`` (which traces ``Function.apply`` itself), the layers enter directly; the
# one input that can be a functorch wrapper left over from a finished transform, ``x``, is unwrapped as
# ``Function.apply`` would.
_LINEAR_APPLY = super(torch.autograd.Function, _FactoredLinear).apply
_DELTA_APPLY = super(torch.autograd.Function, _FactoredDelta).apply
_unwrap_if_dead = getattr(torch._C._functorch, "unwrap_if_dead", lambda t: t)


def _plain_autograd() -> bool:
    """Neither compiling nor inside a functorch transform: a Function may be entered directly."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active())


def compute_dtype(x: torch.Tensor, B: torch.Tensor) -> torch.dtype:
    """The dtype the factored path computes in: the autocast dtype when autocast is on for ``x``'s device, else ``B``'s."""
    return call_dtype(x, B)[0]


def call_dtype(x: torch.Tensor, B: torch.Tensor) -> tuple[torch.dtype, bool]:
    """``(compute_dtype(x, B), whether autocast is on for x's device)``."""
    if not _any_autocast():  # one call instead of reading x's device: every layer call asks
        return B.dtype, False
    device = x.device.type
    if _autocast_on(device):
        return torch.get_autocast_dtype(device), True
    return B.dtype, False


def _resolve_dtype(
    x: torch.Tensor, B: torch.Tensor, dtype: Optional[torch.dtype], autocast: Optional[bool]
) -> tuple[torch.dtype, bool]:
    if dtype is None:
        return call_dtype(x, B)
    return dtype, _autocast_on(x.device.type) if autocast is None else autocast


def _mix_for(A: torch.Tensor, r: int, dtype: torch.dtype, scale: float, mix: Optional[RuleMix]) -> RuleMix:
    if mix is None:
        return rule_mix(A, r, dtype, scale)
    k = A.shape[0] ** 2 * r
    if mix.matrix.shape != (k, k) or mix.matrix.dtype != dtype or mix.scale != float(scale):
        raise ValueError(
            f"mix holds a {tuple(mix.matrix.shape)} {mix.matrix.dtype} matrix for scale {mix.scale}; these factors "
            f"need rule_mix(A, r={r}, dtype={dtype}, scale={float(scale)}), ({k}, {k})"
        )
    return mix


def apply(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    scale: float = 1.0,
    base: Optional[torch.Tensor] = None,
    residual: bool = False,
    mix: Optional[RuleMix] = None,
) -> torch.Tensor:
    """Compute ``x @ dW.T`` without building ``dW`` (plus ``base``, or plus ``x``).

    Three token-sized matmuls (the comment above the factored path):
    ``tokens * (n * r * (d_in + d_out) + (n * n * r) ** 2)`` multiply-adds,
    three kernels forward and four or five backward, whatever ``n`` and ``r``.
    ``base`` (a parallel adapter's base-layer output) or ``x`` itself
    (``residual``, a sequential adapter's ``x + s dW x``) is added inside the
    last matmul.

    Under autocast the matmuls run in the autocast dtype; otherwise in the
    factors' dtype, ``x`` cast to it and the result cast back.

    Args:
        x: Inputs, ``(..., d_in)``; any number of leading batch dimensions.
        A: Rule matrices, ``(n, n, n)``.
        B: Up factors, ``(n, d_out / n, r)``, any strides (fastest as a
            view of the layers' ``(n r, d_out / n)`` storage,
            :func:`factor_views`).
        C: Down factors, ``(n, r, d_in / n)``.
        scale: Scalar multiplier ``s``.
        base: ``(..., d_out)`` to add the update to, or ``None``.
        residual: Return ``x + s dW x`` (needs ``d_out == d_in``; excludes ``base``).
        mix: ``rule_mix(A, r, compute dtype, scale)`` to share between calls
            (built here when ``None``).

    Returns:
        ``(..., d_out)``: ``x @ delta_weight(A, B, C, scale).T`` (+ ``base`` or ``x``),
        in ``base``'s (else ``x``'s) dtype, or the autocast dtype.
    """
    n, r, q_out, q_in = _check(A, B, C)
    d_in, d_out = n * q_in, n * q_out
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features on its last axis; the factors expect d_in={d_in}")
    if residual and (base is not None or d_out != d_in):
        raise ValueError("residual=True needs a square update (d_out == d_in) and no base")
    dtype = compute_dtype(x, B)
    return apply_stored(x, _mix_for(A, r, dtype, scale, mix), *factor_matrices(B, C), base, residual)


def factor_matrices(B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as the matrices the factored path multiplies by: ``(B2, C2)``, the layers' storage.

    ``B2[(i, r), a] = B[i, a, r]``, ``(n r, d_out / n)``, and ``C2[(i, r), b] =
    C[i, r, b]``, ``(n r, d_in / n)``: differentiable, views where the strides
    allow (``B`` from :func:`factor_views`, any ``C`` that is contiguous).

    Args:
        B: Up factors, ``(n, d_out / n, r)``.
        C: Down factors, ``(n, r, d_in / n)``.
    """
    n, q_out, r = B.shape
    return B.transpose(1, 2).reshape(n * r, q_out), C.reshape(n * r, C.shape[2])


def factor_views(B2: torch.Tensor, C2: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers' ``(B2, C2)`` storage (:func:`factor_matrices`) seen as ``(B, C)``: ``(n, d_out / n, r)`` and ``(n, r, d_in / n)``.

    Views: an in-place write to ``B[i]`` or ``C[i]`` (expert ``i``) writes the stored matrices.
    """
    r = B2.shape[0] // n
    return B2.unflatten(0, (n, r)).transpose(1, 2), C2.unflatten(0, (n, r))


def apply_stored(
    x: torch.Tensor,
    mix: RuleMix,
    B2: torch.Tensor,
    C2: torch.Tensor,
    base: Optional[torch.Tensor] = None,
    residual: bool = False,
    dtype: Optional[torch.dtype] = None,
    autocast: Optional[bool] = None,
) -> torch.Tensor:
    """:func:`apply` for checked arguments in the layers' layout: ``B2``, ``C2`` from :func:`factor_matrices`.

    What the layers call: no argument checks, the factors handed over as
    stored (no view of them in the autograd graph), ``mix`` already built for
    the compute dtype ``dtype`` and the scale. ``dtype`` and ``autocast``
    (whether autocast is on for ``x``'s device) are :func:`call_dtype`'s
    answer, worked out here when ``None``.
    """
    if dtype is None or autocast is None:
        dtype, autocast = _resolve_dtype(x, B2, dtype, autocast)
    spec = (residual, dtype, autocast, mix.grad)
    if _plain_autograd():
        out = _DELTA_APPLY(_unwrap_if_dead(x), mix.matrix, B2, C2, base, spec)
    else:
        out = _FactoredDelta.apply(x, mix.matrix, B2, C2, base, spec)
    if base is None and not residual and out.dtype != x.dtype and not autocast:
        out = out.to(x.dtype)  # no autocast: back to the input's dtype
    return out


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    scale: float = 1.0,
    mode: str = "parallel",
    mix: Optional[RuleMix] = None,
) -> torch.Tensor:
    """A frozen linear layer with its adapter, factored: what an adapted ``nn.Linear`` computes while training.

    ``"parallel"``: ``x W^T + b + s x dW^T``; ``"sequential"``:
    ``(x + s x dW^T) W^T + b``. Equal to :func:`apply` around
    ``torch.nn.functional.linear``, with one operator fewer forward and
    backward: the input gradient of both paths is collected in one buffer.

    Args:
        x: Inputs, ``(..., d_in)``.
        weight: The frozen weight, ``(d_out, d_in)`` (``requires_grad=False``).
        bias: The frozen bias, ``(d_out,)``, or ``None``.
        A: Rule matrices, ``(n, n, n)``.
        B: Up factors: ``(n, d_out / n, r)`` parallel, ``(n, d_in / n, r)`` sequential (any strides, as in :func:`apply`).
        C: Down factors, ``(n, r, d_in / n)``.
        scale: Scalar multiplier ``s``.
        mode: ``"parallel"`` or ``"sequential"``.
        mix: ``rule_mix(A, r, compute dtype, scale)`` to share between calls (built here when ``None``).

    Returns:
        ``(..., d_out)`` in the compute dtype (the autocast dtype, else the factors').
    """
    n, r, q_out, q_in = _check(A, B, C)
    d_out_w, d_in = weight.shape
    expected = delta_shape(mode, d_in, d_out_w)
    if (n * q_out, n * q_in) != expected or x.shape[-1] != d_in:
        raise ValueError(
            f"a {mode} adapter on a {d_out_w} x {d_in} weight needs a {expected[0]} x {expected[1]} update; the "
            f"factors give {n * q_out} x {n * q_in} and x has {x.shape[-1]} features"
        )
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("functional.linear needs a frozen weight and bias; use apply() around the layer instead")
    mix = _mix_for(A, r, compute_dtype(x, B), scale, mix)
    return linear_stored(x, weight, bias, mix, *factor_matrices(B, C), mode == "sequential")


def linear_stored(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mix: RuleMix,
    B2: torch.Tensor,
    C2: torch.Tensor,
    sequential: bool,
    dtype: Optional[torch.dtype] = None,
    autocast: Optional[bool] = None,
) -> torch.Tensor:
    """:func:`linear` for checked arguments in the layers' layout (``B2``, ``C2``: :func:`factor_matrices`; see :func:`apply_stored`)."""
    if dtype is None or autocast is None:
        dtype, autocast = _resolve_dtype(x, B2, dtype, autocast)
    spec = (sequential, dtype, autocast, mix.grad)
    if _plain_autograd():
        return _LINEAR_APPLY(_unwrap_if_dead(x), weight, bias, mix.matrix, B2, C2, spec)
    return _FactoredLinear.apply(x, weight, bias, mix.matrix, B2, C2, spec)


# -- folding into weights ---------------------------------------------------------
def _times_delta(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``M @ dW`` (without the scale) for ``M: (rows, d_out)``: three plain matmuls, no ``d x d`` matrix.

    ``M``'s blocks times every expert's up factor, then the rules mixing the
    ``n`` blocks (one small dense ``(n*n*r, n*n*r)`` matrix), then the down
    factors: ``rows * n * r * (2 * d + n * n * r)`` multiply-adds, against
    ``rows * d * n * r * (n + 1)`` through ``Bf``.
    """
    n, r, q_out, q_in = _check(A, B, C)
    rows = weight.shape[0]
    dtype = weight.dtype
    b_cat = B.to(dtype).permute(1, 0, 2).reshape(q_out, n * r)  # (a, (i, r))
    mb = (weight.reshape(rows * n, q_out) @ b_cat).view(rows, n * n * r)  # (rows, (p, i, r)): M's blocks times B
    # mix[(p, i, r), (j, k, t)] = A[i, p, j] * [i == k] * [r == t]: the rules on the block index.
    eye_n = torch.eye(n, dtype=dtype, device=A.device)
    eye_r = torch.eye(r, dtype=dtype, device=A.device)
    rules = A.to(dtype).permute(1, 0, 2)  # (p, i, j)
    mix = rules[:, :, None, :, None, None] * eye_n[None, :, None, None, :, None] * eye_r[None, None, :, None, None, :]
    m_bf = mb @ mix.reshape(n * n * r, n * n * r)  # (rows, (j, i, r)) = M @ Bf
    out = m_bf.view(rows * n, n * r) @ C.reshape(n * r, q_in).to(dtype)  # ((rows, j), b)
    return out.view(rows, n * q_in)


def folded_weight(
    weight: torch.Tensor,
    sequential: Sequence[Factors] = (),
    parallel: Sequence[Factors] = (),
) -> torch.Tensor:
    """``W (I + sum S) + sum P``, differentiable, returned in ``weight``'s dtype.

    What a layer computes with its adapters folded in, for a call that folds
    instead of running the factored path (convolutions while training;
    cached inference). A sequential ``S = s dW`` mixes the input axis of every
    kernel tap: ``W @ S = (W @ Bf) @ V``, about ``rows * d_in * n * r * (n +
    1)`` multiply-adds, never the ``d_in**3`` of a dense product. Computed in
    the wider of the weight's and the factors' dtypes.

    Args:
        weight: ``(d_out, d_in, *kernel)``.
        sequential: ``(A, B, C, scale)`` of every sequential adapter (square ``d_in x d_in``).
        parallel: ``(A, B, C, scale)`` of every parallel adapter (``d_out x d_in * prod(kernel)``).

    Returns:
        Same shape and dtype as ``weight``.
    """
    dtype = weight.dtype
    for _, B, _, _ in (*sequential, *parallel):
        dtype = torch.promote_types(dtype, B.dtype)
    w = weight.to(dtype)
    out = w
    if sequential:
        # Input channels last: one row per output channel and kernel tap.
        moved = w.movedim(1, -1) if w.dim() > 2 else w  # (d_out, *kernel, d_in)
        rows = moved.reshape(-1, moved.shape[-1])  # (d_out * taps, d_in)
        mixed = None
        for A, B, C, s in sequential:
            term = _times_delta(rows, A, B, C)
            term = term * s if s != 1.0 else term
            mixed = term if mixed is None else mixed + term
        mixed = mixed.view(moved.shape)
        out = out + (mixed.movedim(-1, 1) if w.dim() > 2 else mixed)
    for A, B, C, s in parallel:
        out = out + delta_weight(A, B, C, s).to(dtype).view(w.shape)
    return out.to(weight.dtype)


def merge_weight(
    weight: torch.Tensor, seq_delta: torch.Tensor | None = None, par_delta: torch.Tensor | None = None
) -> torch.Tensor:
    """Fold adapters into a frozen weight exactly: ``W' = W (I + S) + P``, in float64.

    ``S`` (sequential adapters, acting on the layer's input) mixes the input
    axis of every kernel tap, so the same formula covers ``nn.Linear``
    (``W: (d_out, d_in)``) and convolutions (``W: (c_out, c_in, *kernel)``).
    ``P`` (parallel adapters) is added with the weight's shape. Computed in
    float64 and returned in the weight's dtype.

    Args:
        weight: Frozen weight, ``(d_out, d_in, *kernel)``.
        seq_delta: ``S``, ``(d_in, d_in)``, or ``None``.
        par_delta: ``P``, ``(d_out, d_in * prod(kernel))``, or ``None``.

    Returns:
        The merged weight, same shape and dtype as ``weight``.
    """
    w = weight.double()
    if seq_delta is not None:
        # W'[o, j, ...] = sum_i W[o, i, ...] (I + S)[i, j]
        w = w + torch.einsum("oi...,ij->oj...", w, seq_delta.double())
    if par_delta is not None:
        w = w + par_delta.double().reshape(w.shape)
    return w.to(weight.dtype)


def check_invertible(seq_delta: torch.Tensor, limit: float = 1e12) -> None:
    """Raise if ``I + S`` is numerically singular, so a merged weight cannot be unmerged."""
    eye_plus = torch.eye(seq_delta.shape[0], dtype=torch.float64, device=seq_delta.device) + seq_delta.double()
    cond = torch.linalg.cond(eye_plus)
    if not torch.isfinite(cond) or cond > limit:
        raise ValueError(
            f"Cannot unmerge: I + s*dW is numerically singular (condition number {cond.item():.3g}), so the "
            "original weight cannot be recovered. Reload the base model instead."
        )


def unmerge_weight(
    weight: torch.Tensor, seq_delta: torch.Tensor | None = None, par_delta: torch.Tensor | None = None
) -> torch.Tensor:
    """Invert :func:`merge_weight`: ``W = (W' - P) (I + S)^-1``.

    Subtraction cannot undo ``W (I + S)``; a float64 solve against ``I + S``
    restores ``W`` to float32 round-off.

    Raises:
        ValueError: if ``I + S`` is numerically singular, so ``W`` is lost
            (:func:`check_invertible`).
    """
    w = weight.double()
    if par_delta is not None:
        w = w - par_delta.double().reshape(w.shape)
    if seq_delta is not None:
        check_invertible(seq_delta)
        eye_plus = torch.eye(seq_delta.shape[0], dtype=torch.float64, device=w.device) + seq_delta.double()
        # Solve X (I + S) = W' on the input axis: move it last, flatten the rest.
        moved = w.movedim(1, -1)  # (d_out, *kernel, d_in)
        flat = moved.reshape(-1, moved.shape[-1])
        solved = torch.linalg.solve(eye_plus, flat, left=False)
        w = solved.reshape(moved.shape).movedim(-1, 1)
    return w.to(weight.dtype)


def init_rules(n: int, method: str = "orthogonal", generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh rule matrices, ``(n, n, n)``.

    ``"orthogonal"`` draws each ``A[i]`` uniformly from the orthogonal group:
    well conditioned, unit singular values (so an expert's contribution has
    the scale of its low-rank factor) and different for every expert.
    ``"normal"`` draws i.i.d. ``N(0, 1 / n)`` entries.
    """
    g = torch.randn(n, n, n, generator=generator, dtype=torch.float64)
    if method == "normal":
        return (g / n**0.5).float()
    if method != "orthogonal":
        raise ValueError(f"unknown rule initialisation {method!r}; use 'orthogonal' or 'normal'")
    q, r = torch.linalg.qr(g)
    # Fix the signs so the distribution is uniform (Haar), not biased by QR.
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.float().contiguous()


# -- sizes and counts ----------------------------------------------------------------
def valid_num_experts(*dims: int, limit: int = 64) -> list[int]:
    """The Kronecker sizes ``n <= limit`` that divide every one of ``dims``."""
    return [n for n in range(1, limit + 1) if all(d % n == 0 for d in dims)]


def delta_shape(mode: str, in_dim: int, out_dim: int, kernel_taps: int = 1) -> tuple[int, int]:
    """``(d_out, d_in)`` of ``dW`` for a target reading ``in_dim`` and writing ``out_dim`` features.

    ``"sequential"``: square on the input, ``(in_dim, in_dim)``. ``"parallel"``:
    the target's weight, ``(out_dim, in_dim * kernel_taps)`` (``kernel_taps =
    kh * kw`` for a convolution).
    """
    if mode == "sequential":
        return in_dim, in_dim
    if mode == "parallel":
        return out_dim, in_dim * kernel_taps
    raise ValueError(f"mode must be 'sequential' or 'parallel', got mode={mode!r}")


def rank_bound(d_out: int, d_in: int, n: int, r: int) -> int:
    """The largest rank ``dW`` can reach: ``min(d_out, d_in, n**2 * r)`` (LoRA of rank r: ``r``)."""
    return min(d_out, d_in, n * n * r)


def expert_parameters(d_out: int, d_in: int, r: int) -> int:
    """Expert parameters of one adapted layer, ``r * (d_in + d_out)``, whatever ``n``."""
    return r * (d_out + d_in)


def rule_parameters(n: int, layers: int = 1, share_rules: bool = True) -> int:
    """Rule parameters of one adapter: ``n**3`` once when shared, per layer otherwise."""
    return n**3 if share_rules else n**3 * layers


# -- cost model ------------------------------------------------------------------------
def factored_flops(tokens: int, d_in: int, d_out: int, n: int, r: int, needs_grad: bool = False) -> int:
    """Multiply-adds that :func:`apply` adds to a layer call of ``tokens`` rows.

    ``tokens * (n * r * (d_in + d_out) + (n * n * r) ** 2)``: the down and up
    projections and the rules' mixing matrix; with gradients the backward pass
    costs about twice the forward.
    """
    forward = tokens * (n * r * (d_in + d_out) + (n * n * r) ** 2)
    return 3 * forward if needs_grad else forward


def fold_flops(
    tokens: int,
    d_in: int,
    d_out: int,
    n: int,
    r: int,
    needs_grad: bool = False,
    mode: str = "parallel",
    taps: int = 1,
) -> int:
    """Multiply-adds that folding adds to a layer's call (``d_out x d_in`` weight, ``taps`` kernel positions).

    Parallel: building ``dW`` (``d_out * d_in * taps * n * r``). Sequential:
    ``W @ dW`` as three thin matmuls (``d_out * taps * n * r * (2 * d_in + n**2 * r)``,
    :func:`folded_weight`). With gradients the backward also forms the gradient
    of the folded weight (``tokens * d_out * d_in * taps``, what a frozen layer
    never computes) and of the build.
    """
    build = _build_flops(d_in, d_out, n, r, mode, taps)
    if not needs_grad:
        return build
    return 3 * build + tokens * d_out * taps * d_in


def _build_flops(d_in: int, d_out: int, n: int, r: int, mode: str, taps: int) -> int:
    """Multiply-adds of building the folded weight once (:func:`fold_flops` without gradients)."""
    rows = d_out * taps
    if mode == "parallel":
        return rows * d_in * n * r
    return rows * n * r * (2 * d_in + n * n * r)


def prefer_fold(
    tokens: int,
    d_in: int,
    d_out: int,
    n: int,
    r: int,
    needs_grad: bool = False,
    mode: str = "parallel",
    taps: int = 1,
    channels_first: bool = False,
) -> bool:
    """Whether folding the adapters into the weight for one call is cheaper than the factored path.

    Multiply-adds alone undercount the fold: it streams the weight through
    thin products and passes over it, each costing several multiply-adds' time
    per value, counted here as ``16 * d_out * d_in * taps`` extra. With
    gradients, the build's thin products (forward and backward) count three
    times their multiply-adds on a linear layer's input (measured: ``n = 16,
    r = 4`` on a 768-wide layer, 197 tokens, the fold took 2.8 times the
    factored path's time). On a ``channels_first`` input (a convolution's) the
    factored path instead moves the pixels to channels-last and back, counted
    as ``32 * tokens * d_in``, and the build keeps its plain count
    (MobileNetV2's pointwise convolutions train about 4 % slower with the
    factor). In practice: yes for inference on a few hundred tokens or more; in
    training, no for a linear layer or block at the paper's sizes and yes where
    the rules' ``(n^2 r)^2`` mixing outgrows the layer (``n = 16, r = 8`` on a
    768-wide layer; :func:`fold_can_pay`); for a convolution in training, yes
    where the pixels are many and the channels few, no deep in a network where
    it is the other way round.
    """
    fold = fold_flops(tokens, d_in, d_out, n, r, needs_grad, mode, taps) + 16 * d_out * d_in * taps
    if needs_grad and not channels_first:
        fold += 6 * _build_flops(d_in, d_out, n, r, mode, taps)
    return fold < _factored_cost(tokens, d_in, d_out, n, r, needs_grad, mode, channels_first)


def _factored_cost(
    tokens: int, d_in: int, d_out: int, n: int, r: int, needs_grad: bool, mode: str, channels_first: bool
) -> int:
    update_out = d_in if mode == "sequential" else d_out
    cost = factored_flops(tokens, d_in, update_out, n, r, needs_grad)
    return cost + 32 * tokens * d_in if channels_first else cost


def fold_can_pay(
    d_in: int, d_out: int, n: int, r: int, mode: str = "parallel", taps: int = 1, channels_first: bool = False
) -> bool:
    """Whether :func:`prefer_fold` can pick the fold for a call with gradients, at any number of tokens.

    Per token, the fold's backward forms the gradient of the folded weight
    (``d_out * taps * d_in``) and the factored path costs
    :func:`factored_flops` of one token; everything else the fold costs does
    not grow with the tokens. So when the factored path is the cheaper per
    token, it is the cheaper for every call, and a layer in training need not
    ask. False at the paper's sizes (``n = r = 4`` on a 768-wide layer: about
    86 thousand multiply-adds per token against 590 thousand).
    """
    return _factored_cost(1, d_in, d_out, n, r, True, mode, channels_first) > d_out * taps * d_in


# -- looking inside: each expert apart -----------------------------------------------
def expert_outputs(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Each expert's share of ``x @ dW.T``, kept apart.

    The factored computation without the sum over experts, so
    ``expert_outputs(x, A, B, C, s).sum(-2) == apply(x, A, B, C, s)``.

    Args:
        x: Inputs, ``(..., d_in)``.
        A: Rule matrices, ``(n, n, n)``.
        B: Up factors, ``(n, d_out / n, r)``.
        C: Down factors, ``(n, r, d_in / n)``.
        scale: Scalar multiplier ``s``.

    Returns:
        ``(..., n, d_out)``: slice ``[..., i, :]`` is ``s * kron(A_i, B_i C_i) x``.
    """
    n, r, q_out, q_in = _check(A, B, C)
    lead = x.shape[:-1]
    xb = x.reshape(*lead, n, q_in)  # (..., n_j, q_in): x split into n blocks
    z = xb @ C.reshape(n * r, q_in).T  # (..., n_j, n_i * r)
    z = z.reshape(*lead, n, n, r)  # (..., n_j, n_i, r)
    u = torch.einsum("ipj,...jir->...pir", A, z)  # (..., n_p, n_i, r)
    # Up-project expert by expert instead of summing over experts.
    y = torch.einsum("...pir,iar->...ipa", u, B)  # (..., n_i, n_p, q_out)
    return y.reshape(*lead, n, n * q_out) * scale  # (..., n_i, d_out)


def expert_norms(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Frobenius norm of every expert's term ``s * kron(A_i, B_i @ C_i)``.

    Uses ``||kron(X, Y)||_F = ||X||_F ||Y||_F`` and
    ``||B C||_F**2 = sum((B^T B) * (C C^T))``: ``O(n r**2 d)`` work, neither the
    Kronecker product nor ``B_i @ C_i`` is built. Computed in float64. The
    experts' norms do not add up to ``||dW||_F``: the terms are not orthogonal.

    Args:
        A: Rule matrices, ``(n, n, n)``.
        B: Up factors, ``(n, d_out / n, r)``.
        C: Down factors, ``(n, r, d_in / n)``.
        scale: Scalar multiplier ``s``.

    Returns:
        ``(n,)`` float64 norms.
    """
    _check(A, B, C)
    A, B, C = A.double(), B.double(), C.double()
    btb = B.transpose(1, 2) @ B  # (n, r, r)
    cct = C @ C.transpose(1, 2)  # (n, r, r)
    # Round-off can push an exact zero slightly negative.
    bc_sq = (btb * cct).sum(dim=(1, 2)).clamp_min(0)  # (n,)
    return abs(scale) * torch.linalg.matrix_norm(A) * bc_sq.sqrt()


def effective_rank(matrix: torch.Tensor) -> float:
    """Entropy-based effective rank (Roy & Vetterli, 2007) of a 2-D matrix.

    ``exp(H(p))`` with ``p_k = sigma_k / sum(sigma)`` over the singular values:
    1 for a rank-one matrix, ``k`` for ``k`` equal singular values, smoothly in
    between; 0.0 for an all-zero matrix.
    """
    sigma = torch.linalg.svdvals(matrix.double())
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(matrix: torch.Tensor, rtol: Optional[float] = None) -> int:
    """Number of singular values above ``rtol * sigma_max`` (as ``numpy.linalg.matrix_rank``).

    Args:
        matrix: A 2-D tensor (computed in float64).
        rtol: Relative tolerance; default ``max(matrix.shape) * eps(float64)``.
    """
    sigma = torch.linalg.svdvals(matrix.double())
    if sigma.numel() == 0 or sigma[0] <= 0:
        return 0
    if rtol is None:
        rtol = max(matrix.shape) * torch.finfo(torch.float64).eps
    return int((sigma > rtol * sigma[0]).sum())

