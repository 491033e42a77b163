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
"""

from __future__ import annotations

import torch

__all__ = [
    "delta_weight",
    "apply",
    "linear_with_delta",
    "reference_delta_weight",
    "factored_flops",
    "fold_flops",
    "prefer_fold",
    "valid_num_experts",
    "merge_weight",
    "unmerge_weight",
    "init_rules",
]


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


def delta_weight(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Build the dense update ``dW = scale * sum_i kron(A[i], B[i] @ C[i])``.

    Cost: ``d_out * d_in * (r / n + n)`` multiply-adds. Use it once per
    optimiser step or at merge time, never per token.

    Args:
        A: Rule matrices, ``(n, n, n)``.
        B: Up factors, ``(n, d_out / n, r)``.
        C: Down factors, ``(n, r, d_in / n)``.
        scale: Scalar multiplier ``s``.

    Returns:
        ``(d_out, d_in)`` tensor in the factors' dtype.
    """
    n, _, q_out, q_in = _check(A, B, C)
    M = torch.bmm(B, C)  # (n, q_out, q_in): expert i's low-rank block
    # dW[p, a, j, b] = sum_i A[i, p, j] * M[i, a, b]
    dW = torch.einsum("ipj,iab->pajb", A, M)  # (n, q_out, n, q_in)
    return dW.reshape(n * q_out, n * q_in) * scale


def apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Compute ``x @ dW.T`` without building ``dW``.

    Two matmuls with the stacked expert factors (the cost of a LoRA of rank
    ``n * r``) around an ``n x n`` rule mixing per token:
    ``tokens * (n * r * (d_in + d_out) + n**3 * r)`` multiply-adds.

    No per-token tensor is copied or permuted, ``scale`` multiplies a small
    factor, not the output, and each call runs few operations (what a GPU
    pays for, more than multiply-adds). The rule mixing runs as one matmul with
    a dense ``(n*n*r, n*n*r)`` mixing matrix built from ``A`` when that costs at
    most half the two projections (``n**3 * r <= (d_in + d_out) / 2``, e.g.
    n = r = 4 on a 768-wide layer: fastest on CPU), otherwise as a batched
    matmul over the experts on an expert-major layout (``n**3 * r``
    multiply-adds per token).

    Args:
        x: Inputs, ``(..., d_in)``; any number of leading batch dimensions.
        A: Rule matrices, ``(n, n, n)``.
        B: Up factors, ``(n, d_out / n, r)``.
        C: Down factors, ``(n, r, d_in / n)``.
        scale: Scalar multiplier ``s``.

    Returns:
        ``(..., d_out)``, equal to ``x @ delta_weight(A, B, C, scale).T``.
    """
    n, r, q_out, q_in = _check(A, B, C)
    lead = x.shape[:-1]
    blocks = x.reshape(-1, q_in)  # (T * n_j, q_in): every token split into n blocks
    tokens = blocks.shape[0] // n
    if n**3 * r <= (n * q_in + n * q_out) // 2:
        # Down-project every block with every expert at once.
        z = blocks @ C.reshape(n * r, q_in).T  # (T * n_j, n_i * r)
        # Rule mixing as one matmul: mix[(p, i, r), (j, k, t)] = s * A[i, p, j] * [i == k] * [r == t],
        # the rules broadcast against an identity on (expert, rank); s rides along for free.
        eye = torch.eye(n * r, dtype=A.dtype, device=A.device).view(1, n, r, 1, n, r)  # (1, i, r, 1, k, t)
        if scale != 1.0:
            eye = eye * scale
        rules = A.permute(1, 0, 2)[:, :, None, :, None, None]  # (p, i, 1, j, 1, 1)
        mix = (rules * eye).reshape(n * n * r, n * n * r)  # (n_p * n_i * r, n_j * n_k * r)
        u = z.view(tokens, n * n * r) @ mix.T  # (T, n_p * n_i * r)
        # Up-project: the experts' outputs add up inside one matmul.
        b_cat = B.permute(1, 0, 2).reshape(q_out, n * r)  # (q_out, n_i * r)
        y = u.view(tokens * n, n * r) @ b_cat.T  # (T * n_p, q_out)
    else:
        # Down-projection, expert-major: the mixing below then reads it without a copy.
        z = C.reshape(n * r, q_in) @ blocks.T  # (n_i * r, T * n_j)
        # Rule mixing: block p of expert i collects sum_j A[i, p, j] * z[i, :, j].
        u = torch.bmm(z.view(n, r * tokens, n), A.transpose(1, 2))  # (n_i, r * T, n_p)
        b_t = (B * scale if scale != 1.0 else B).transpose(1, 2).reshape(n * r, q_out)  # (n_i * r, q_out)
        y = u.view(n * r, tokens * n).T @ b_t  # (T * n_p, q_out)
    return y.view(*lead, n * q_out)


def linear_with_delta(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """Compute ``x @ (weight + dW).T + bias`` by folding ``dW`` into the weight once.

    The "parallel" adapter and its base layer in one matmul: ``dW`` is built
    once per call (never per token) and the per-token cost is exactly the base
    layer's. Worth it without gradients from a few hundred tokens per call
    (about 500 for a 768 x 768 layer at n = r = 4; :func:`prefer_fold` decides,
    and ``compute_path="auto"`` asks it), never while gradients flow.

    Args:
        x: Inputs, ``(..., d_in)``.
        weight: Base weight, ``(d_out, d_in)``.
        bias: Base bias, ``(d_out,)`` or ``None``.
        A: Rule matrices, ``(n, n, n)``.
        B: Up factors, ``(n, d_out / n, r)``.
        C: Down factors, ``(n, r, d_in / n)``.
        scale: Scalar multiplier ``s``.

    Returns:
        ``(..., d_out)``.
    """
    dW = delta_weight(A, B, C, scale).to(weight.dtype)  # (d_out, d_in)
    return torch.nn.functional.linear(x, weight + dW, bias)


def reference_delta_weight(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The naive definition ``scale * sum_i torch.kron(A[i], B[i] @ C[i])``.

    Slow and obviously correct: the yardstick every fast path is tested against.
    """
    return scale * sum(torch.kron(A[i], B[i] @ C[i]) for i in range(A.shape[0]))


def factored_flops(tokens: int, d_in: int, d_out: int, n: int, r: int, needs_grad: bool = False) -> int:
    """Multiply-adds that :func:`apply` adds to a layer call of ``tokens`` rows.

    With gradients the backward pass costs about twice the forward.
    """
    forward = tokens * (n * r * (d_in + d_out) + n**3 * r)
    return 3 * forward if needs_grad else forward


def fold_flops(tokens: int, d_in: int, d_out: int, n: int, r: int, needs_grad: bool = False) -> int:
    """Multiply-adds that :func:`linear_with_delta` adds to the base layer's matmul.

    Building ``dW`` costs ``d_out * d_in * (n + r / n)``. With gradients the
    backward must also form the gradient of the folded weight
    (``tokens * d_out * d_in``) and of the build.
    """
    build = d_out * d_in * n + (d_out * d_in * r) // n
    if not needs_grad:
        return build
    return 2 * build + tokens * d_out * d_in


def prefer_fold(tokens: int, d_in: int, d_out: int, n: int, r: int, needs_grad: bool = False) -> bool:
    """Whether folding ``dW`` into the weight is cheaper than the factored path.

    Multiply-adds alone undercount the fold: building ``dW`` streams the
    ``d_out x d_in`` update through products whose inner size is only ``n`` or
    ``r`` and through about five passes (the expert products, the rule sum and
    its permuted copy, the scale, the add to the weight), each costing several
    multiply-adds' time per value. They are counted as ``16 * d_out * d_in``
    extra. At n = r = 4 this model then predicts folding from 500 tokens
    (768 x 768) and 800 (768 x 3072); ``benchmarks/bench_layer.py`` measured
    the crossovers on CPU at 512 and between 1,024 and 1,576 tokens (counting
    multiply-adds alone predicted 120 and 190).

    In practice: yes for inference on ViT-B/16's layers from 3 (768 x 768) or
    5 (768 x 3072) images of 224 px per call, no whenever gradients flow.
    """
    build_passes = 16 * d_out * d_in
    fold = fold_flops(tokens, d_in, d_out, n, r, needs_grad) + build_passes
    return fold < factored_flops(tokens, d_in, d_out, n, r, needs_grad)


def valid_num_experts(*dims: int, limit: int = 64) -> list[int]:
    """The Kronecker sizes ``n <= limit`` that divide every one of ``dims``."""
    return [n for n in range(1, limit + 1) if all(d % n == 0 for d in dims)]


def merge_weight(
    weight: torch.Tensor, seq_delta: torch.Tensor | None = None, par_delta: torch.Tensor | None = None
) -> torch.Tensor:
    """Fold adapters into a frozen weight: ``W' = W (I + S) + P``.

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


def unmerge_weight(
    weight: torch.Tensor, seq_delta: torch.Tensor | None = None, par_delta: torch.Tensor | None = None
) -> torch.Tensor:
    """Invert :func:`merge_weight`: ``W = (W' - P) (I + S)^-1``.

    Subtraction cannot undo ``W (I + S)``; a float64 solve against ``I + S``
    restores ``W`` to float32 round-off.

    Raises:
        ValueError: if ``I + S`` is numerically singular, so ``W`` is lost.
    """
    w = weight.double()
    if par_delta is not None:
        w = w - par_delta.double().reshape(w.shape)
    if seq_delta is not None:
        eye_plus = torch.eye(seq_delta.shape[0], dtype=torch.float64, device=w.device) + seq_delta.double()
        cond = torch.linalg.cond(eye_plus)
        if not torch.isfinite(cond) or cond > 1e12:
            raise ValueError(
                f"Cannot unmerge: I + s*dW is numerically singular (condition number {cond.item():.3g}), so the "
                "original weight cannot be recovered. Reload the base model instead."
            )
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
