"""Look inside a trained ALoRE adapter: what each expert contributes, and where.

The math (:func:`~alore_peft.functional.expert_outputs`,
:func:`~alore_peft.functional.expert_norms`, the ranks) lives in
:mod:`alore_peft.functional`; this module finds the layers, runs the model and
turns the numbers into records and maps.

Everything here is a pure read of the model: no parameter is changed, hooks are
removed before returning, and results are tensors or lists of flat ``dict``
records (``pandas.DataFrame(records)`` turns them into a table).

Definitions used throughout (``s`` is the adapter's scale ``alpha / r``):

- **Expert contribution** of expert ``i`` to a layer's update:
  ``s * kron(A_i, B_i @ C_i)``. Its Frobenius norm factorises,
  ``||kron(X, Y)||_F = ||X||_F * ||Y||_F``, so it is computed as
  ``s * ||A_i||_F * ||B_i @ C_i||_F`` without building the Kronecker product,
  and ``||B_i @ C_i||_F**2 = sum((B_i^T B_i) * (C_i C_i^T))`` without building
  ``B_i @ C_i`` either. The experts' norms do not add up to ``||dW||_F``: the
  terms are not orthogonal in general.
- **Effective rank** of ``dW`` (Roy & Vetterli, 2007): with singular values
  ``sigma_k`` and ``p_k = sigma_k / sum(sigma)``, ``exp(-sum p_k log p_k)``. It
  is 1 for a rank-one matrix, ``k`` for ``k`` equal singular values, and
  smoothly in between; 0 for ``dW = 0``.
- **Numerical rank** of ``dW``: the number of singular values above
  ``rtol * sigma_max`` (default ``rtol = max(d_out, d_in) * eps`` of the
  computing dtype, float64 here, as in ``numpy.linalg.matrix_rank``).
- **Rank bound**: ``min(d_out, d_in, n**2 * r)``, what ``dW`` can reach.
- **Expert map** of expert ``i`` at a layer: the L2 norm, per token, of that
  expert's output ``s * kron(A_i, B_i C_i) x`` on the layer's input ``x``,
  reshaped to the image's patch grid (leading CLS/register tokens dropped).
"""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from . import functional
from .functional import effective_rank, expert_norms, expert_outputs, numerical_rank
from .layer import AloreLayer
from .layer import Conv2d as AloreConv2d
from .trace import find_input

__all__ = [
    "alore_layers",
    "expert_records",
    "layer_records",
    "rule_matrices",
    "contribution_matrix",
    "expert_maps",
    "combine_maps",
    "map_shares",
]


# -- finding the layers ---------------------------------------------------------
def _inner_model(model: nn.Module) -> nn.Module:
    """The user's model inside a PeftModel or an AloreModel tuner (names then match the base model)."""
    from peft import PeftModel

    from .model import AloreModel

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, AloreModel):
        model = model.model
    return model


def alore_layers(model: nn.Module) -> list[tuple[str, AloreLayer]]:
    """``(name, layer)`` for every ALoRE layer, in module order.

    Args:
        model: A ``PeftModel``, an ``AloreModel`` or any module that contains
            ALoRE layers. Names are relative to the base model (no
            ``base_model.model.`` prefix).

    Raises:
        ValueError: If the model contains no ALoRE layer.
    """
    inner = _inner_model(model)
    found = [(name, m) for name, m in inner.named_modules() if isinstance(m, AloreLayer)]
    if not found:
        raise ValueError(
            f"model (a {type(model).__name__}) contains no ALoRE layer; pass the model returned by "
            "peft.get_peft_model(base, AloreConfig(...)) or PeftModel.from_pretrained(base, adapter_dir)."
        )
    return found


def _pick_adapter(layers: Sequence[tuple[str, AloreLayer]], adapter: Optional[str]) -> str:
    names = sorted({a for _, layer in layers for a in layer.alore_B})
    if adapter is None:
        active = [a for a in layers[0][1].active_adapters if a in layers[0][1].alore_B]
        if active:
            return active[0]
        if len(names) == 1:
            return names[0]
        raise ValueError(f"adapter=None is ambiguous: the model has ALoRE adapters {names}; pass adapter=NAME.")
    if adapter not in names:
        raise ValueError(f"adapter={adapter!r} is not an ALoRE adapter of this model; it has {names}.")
    return adapter


def _adapter_layers(model: nn.Module, adapter: Optional[str]) -> tuple[str, list[tuple[str, AloreLayer]]]:
    """The adapter (picked as :func:`_pick_adapter` does) and ``(name, layer)`` of every layer holding it."""
    layers = alore_layers(model)
    adapter = _pick_adapter(layers, adapter)
    return adapter, [(name, layer) for name, layer in layers if adapter in layer.alore_B]


def _layer_index(name: str) -> Optional[int]:
    """The first numbered path segment (the block index in ``...layers.3.attention.q_proj``)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


# -- records --------------------------------------------------------------------
@torch.no_grad()
def expert_records(model: nn.Module, adapter: Optional[str] = None) -> list[dict]:
    """One record per (layer, expert): the norm of the expert's contribution to ``dW``.

    Args:
        model: A ``PeftModel``, ``AloreModel`` or module containing ALoRE layers.
        adapter: Adapter name; default the active one.

    Returns:
        Dicts with keys ``layer``, ``block`` (first number in the layer name,
        or ``None``), ``expert``, ``norm`` (``s * ||A_i||_F ||B_i C_i||_F``)
        and ``share`` (the expert's norm over the sum of the layer's norms;
        0 for an all-zero layer).
    """
    adapter, layers = _adapter_layers(model, adapter)
    records = []
    for name, layer in layers:
        A, B, C = layer.factors(adapter)
        norms = expert_norms(A, B, C, layer.scaling[adapter])  # (n,)
        total = float(norms.sum())
        for i, value in enumerate(norms.tolist()):
            records.append(
                {
                    "layer": name,
                    "block": _layer_index(name),
                    "expert": i,
                    "norm": value,
                    "share": value / total if total > 0 else 0.0,
                }
            )
    return records


@torch.no_grad()
def layer_records(model: nn.Module, adapter: Optional[str] = None, rtol: Optional[float] = None) -> list[dict]:
    """One record per ALoRE layer: shapes, parameter count, ``||dW||`` and its ranks.

    Builds each layer's dense ``dW`` once (for the singular values).

    Args:
        model: A ``PeftModel``, ``AloreModel`` or module containing ALoRE layers.
        adapter: Adapter name; default the active one.
        rtol: Tolerance of :func:`numerical_rank`.

    Returns:
        Dicts with keys ``layer``, ``block``, ``mode``, ``d_out``, ``d_in``
        (of ``dW``: square in sequential mode), ``r``, ``num_experts``,
        ``scale``, ``params`` (the layer's ``B`` and ``C``, plus its own rules
        when they are not shared), ``delta_norm`` (``||s dW||_F``),
        ``effective_rank``, ``numerical_rank`` and ``rank_bound``
        (``min(d_out, d_in, n**2 r)``).
    """
    adapter, layers = _adapter_layers(model, adapter)
    records = []
    for name, layer in layers:
        A, B, C = layer.factors(adapter)
        n, r, scale = layer.num_experts[adapter], layer.r[adapter], layer.scaling[adapter]
        delta = functional.delta_weight(A.double(), B.double(), C.double(), scale)  # (d_out, d_in)
        d_out, d_in = delta.shape
        own_rules = functional.rule_parameters(n) if adapter in layer.alore_A else 0
        records.append(
            {
                "layer": name,
                "block": _layer_index(name),
                "mode": layer.mode[adapter],
                "d_out": d_out,
                "d_in": d_in,
                "r": r,
                "num_experts": n,
                "scale": scale,
                "params": functional.expert_parameters(d_out, d_in, r) + own_rules,
                "delta_norm": float(torch.linalg.matrix_norm(delta)),
                "effective_rank": effective_rank(delta),
                "numerical_rank": numerical_rank(delta, rtol),
                "rank_bound": functional.rank_bound(d_out, d_in, n, r),
            }
        )
    return records


@torch.no_grad()
def rule_matrices(model: nn.Module, adapter: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The rule matrices ``A`` (``(n, n, n)``, detached copies) of an adapter.

    Returns:
        ``{"shared": A}`` when the adapter shares its rules across layers,
        otherwise ``{layer_name: A}`` for every layer.
    """
    adapter, layers = _adapter_layers(model, adapter)
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        if adapter in layer.alore_A:
            out[name] = layer.alore_A[adapter].detach().clone()
        else:
            out["shared"] = layer.rules(adapter).detach().clone()
    return out


def contribution_matrix(records: Sequence[dict], value: str = "norm") -> tuple[list[str], torch.Tensor]:
    """Pivot :func:`expert_records` into a layers x experts matrix.

    Args:
        records: Output of :func:`expert_records`.
        value: Record key to place in the cells (``"norm"`` or ``"share"``).

    Returns:
        ``(layer_names, matrix)`` with ``matrix`` of shape ``(layers, n)``; a
        layer with fewer experts than the widest one is padded with NaN.
    """
    names: list[str] = []
    for rec in records:
        if rec["layer"] not in names:
            names.append(rec["layer"])
    n = 1 + max(rec["expert"] for rec in records)
    matrix = torch.full((len(names), n), float("nan"), dtype=torch.float64)
    row = {name: k for k, name in enumerate(names)}
    for rec in records:
        matrix[row[rec["layer"]], rec["expert"]] = rec[value]
    return names, matrix


# -- maps over the image --------------------------------------------------------
def _find_patch_size(model: nn.Module) -> Optional[tuple[int, int]]:
    for m in (model, _inner_model(model)):
        config = getattr(m, "config", None)
        patch = getattr(config, "patch_size", None) if config is not None else None
        if isinstance(patch, int):
            return patch, patch
        if isinstance(patch, (tuple, list)) and len(patch) == 2:
            return int(patch[0]), int(patch[1])
    return None


def _call_model(model: nn.Module, pixel_values: torch.Tensor) -> None:
    inner = _inner_model(model)
    try:
        params = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "pixel_values" in params:
        model(pixel_values=pixel_values)
    else:
        model(pixel_values)


@contextmanager
def _capture_inputs(layers: Sequence[tuple[str, AloreLayer]]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input of every layer (first positional argument or input keyword) during a forward pass."""
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # Block containers may receive their input as a keyword (hidden_states=...).
            x, _ = find_input(args, kwargs)
            if x is not None:
                captured[name] = x.detach()

        return hook

    try:
        for name, layer in layers:
            handles.append(layer.register_forward_pre_hook(make_hook(name), with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def expert_maps(
    model: nn.Module,
    pixel_values: torch.Tensor,
    adapter: Optional[str] = None,
    layers: Optional[Sequence[str]] = None,
    grid: Optional[tuple[int, int]] = None,
    forward: Optional[Callable[[torch.Tensor], object]] = None,
) -> dict[str, torch.Tensor]:
    """Where on the image each expert acts: per-token norms of its output, on the patch grid.

    Runs one forward pass (in eval mode, without gradients; the model's
    train/eval state is restored), captures the input of every ALoRE layer
    with forward pre-hooks and computes each expert's output on it with
    :func:`expert_outputs`. Works for sequential and parallel adapters alike:
    both act on the layer's input.

    Token layouts: ``(batch, tokens, d)`` for transformer layers, where tokens
    are ``P`` leading prefix tokens (CLS, registers) followed by the
    ``H * W`` patches in row-major order; prefix tokens are dropped.
    Convolutions (``(batch, C, H, W)``) give their own spatial grid.

    Args:
        model: A ``PeftModel``, ``AloreModel`` or module containing ALoRE layers.
        pixel_values: ``(batch, channels, height, width)`` model input.
        adapter: Adapter name; default the active one.
        layers: Names of the layers to map (default: all ALoRE layers).
        grid: Patch grid ``(H, W)``; default ``pixel_values``' size divided by
            ``model.config.patch_size``.
        forward: Callable running the model on ``pixel_values``; default
            ``model(pixel_values=...)`` (or positional when the forward takes
            no ``pixel_values`` argument).

    Returns:
        ``{layer_name: maps}`` with ``maps`` of shape ``(batch, n, H, W)``.

    Raises:
        ValueError: On unknown layer names, or a token count that does not
            fit the patch grid.
    """
    adapter, chosen = _adapter_layers(model, adapter)
    if layers is not None:
        known = {name for name, _ in chosen}
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise ValueError(
                f"layers={unknown} are not ALoRE layers of adapter {adapter!r}; choose from {sorted(known)}."
            )
        chosen = [(name, layer) for name, layer in chosen if name in set(layers)]

    if grid is None and pixel_values.dim() == 4:
        patch = _find_patch_size(model)
        if patch is not None:
            grid = (pixel_values.shape[-2] // patch[0], pixel_values.shape[-1] // patch[1])

    was_training = model.training
    model.eval()
    try:
        with _capture_inputs(chosen) as captured:
            if forward is None:
                _call_model(model, pixel_values)
            else:
                forward(pixel_values)
    finally:
        model.train(was_training)

    maps: dict[str, torch.Tensor] = {}
    for name, layer in chosen:
        if name not in captured:
            raise ValueError(f"ALoRE layer {name!r} did not run during the forward pass, so it has no map.")
        x = captured[name]
        A, B, C = layer.factors(adapter)
        feature_dim = layer._feature_dim
        if isinstance(layer, AloreConv2d) and layer.mode[adapter] == "parallel":
            maps[name] = _conv_parallel_maps(layer, adapter, x)  # (batch, n, H_out, W_out)
            continue
        if feature_dim != -1:
            x = x.movedim(feature_dim, -1)  # (batch, H, W, C) for a convolution
        per_expert = expert_outputs(x.to(B.dtype), A.to(B.dtype), B, C, layer.scaling[adapter])
        norms = per_expert.norm(dim=-1)  # (batch, *positions, n)
        if feature_dim != -1:
            maps[name] = norms.movedim(-1, 1)  # (batch, n, H, W)
            continue
        if norms.dim() != 3:
            raise ValueError(
                f"ALoRE layer {name!r} got an input of shape {tuple(x.shape)}; expert maps need (batch, tokens, "
                "features) or a convolution's (batch, channels, H, W)."
            )
        tokens = norms.shape[1]
        if grid is None:
            raise ValueError(
                "expert_maps could not find the patch grid: the model has no config.patch_size. Pass grid=(H, W), "
                "the number of patch rows and columns."
            )
        h, w = grid
        prefix = tokens - h * w
        if prefix < 0:
            raise ValueError(
                f"ALoRE layer {name!r} sees {tokens} tokens, fewer than the {h} x {w} patch grid; pass grid=(H, W) "
                "for this input, or map only layers that see every patch (layers=[...])."
            )
        # (batch, prefix + H*W, n) -> drop CLS/register tokens -> (batch, n, H, W)
        maps[name] = norms[:, prefix:, :].transpose(1, 2).reshape(norms.shape[0], -1, h, w)
    return maps


def _conv_parallel_maps(layer: AloreLayer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """Per-expert maps of a parallel Conv2d adapter, whose ``dW`` acts on kernel patches.

    Each expert's update is built densely (convolution kernels are small) with
    the other experts' up factors zeroed, so ``n`` stays the Kronecker size,
    and applied as a convolution without bias.
    """
    A, B, C = layer.factors(adapter)
    base = layer.get_base_layer()
    out = []
    for i in range(B.shape[0]):
        keep = torch.zeros(B.shape[0], 1, 1, dtype=B.dtype, device=B.device)
        keep[i] = 1
        delta = functional.delta_weight(A.to(B.dtype), B * keep, C, layer.scaling[adapter])  # (c_out, c_in * kh * kw)
        y = base._conv_forward(x.to(B.dtype), delta.reshape(base.weight.shape), None)  # (batch, c_out, H', W')
        out.append(y.norm(dim=1))  # (batch, H', W')
    return torch.stack(out, dim=1)  # (batch, n, H', W')


def combine_maps(maps: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
    """Average expert maps over layers.

    Args:
        maps: Output of :func:`expert_maps` (all on one grid).
        normalize: Divide each layer's maps by their mean over images, experts
            and positions first, so every layer weighs the same whatever the
            size of its update (a layer with an all-zero update contributes
            zeros).

    Returns:
        ``(batch, n, H, W)``.
    """
    if not maps:
        raise ValueError("maps is empty; pass the output of expert_maps for at least one layer.")
    shapes = {tuple(m.shape) for m in maps.values()}
    if len(shapes) != 1:
        raise ValueError(f"combine_maps needs maps of one shape; got {sorted(shapes)}. Select layers of one grid.")
    stacked = torch.stack(list(maps.values()))  # (layers, batch, n, H, W)
    if normalize:
        mean = stacked.flatten(1).mean(dim=1)  # (layers,)
        scale = torch.where(mean > 0, 1.0 / mean.clamp_min(torch.finfo(mean.dtype).tiny), torch.zeros_like(mean))
        stacked = stacked * scale.view(-1, *([1] * (stacked.dim() - 1)))
    return stacked.mean(dim=0)


def map_shares(maps: torch.Tensor) -> torch.Tensor:
    """Each expert's share of the experts' total at every position.

    Args:
        maps: ``(batch, n, H, W)`` expert maps.

    Returns:
        ``(batch, n, H, W)`` summing to 1 over the experts wherever any
        expert is non-zero, 0 where all are.
    """
    total = maps.sum(dim=1, keepdim=True)  # (batch, 1, H, W)
    return torch.where(total > 0, maps / total.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))
