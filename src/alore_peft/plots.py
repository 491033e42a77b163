"""Pictures of an ALoRE adapter: contribution heat maps and per-expert image overlays.

matplotlib is an optional dependency (``pip install alore-peft[plots]``); it
is imported inside the functions, never at package import. Figures are built
with ``matplotlib.figure.Figure`` directly (no pyplot), so plotting never
changes the caller's backend or global figure state.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Optional, Sequence, Union

import torch

from .experts import contribution_matrix

__all__ = ["plot_contribution_heatmap", "plot_expert_maps", "require_matplotlib"]

PathLike = Union[str, "os.PathLike[str]"]


def require_matplotlib() -> Any:
    """Import and return ``matplotlib.figure``; raise a clear ImportError when missing."""
    try:
        import matplotlib.figure
    except ImportError as exc:
        raise ImportError(
            "alore_peft.plots needs matplotlib, which is not installed. Install it with: "
            "pip install 'alore-peft[plots]' (or pip install matplotlib)."
        ) from exc
    return matplotlib.figure


def _short_names(names: Sequence[str]) -> list[str]:
    """Drop the leading path segments every name shares (``vit.layers.`` etc.)."""
    parts = [name.split(".") for name in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return [".".join(p[common:]) for p in parts]


def _save(fig: Any, path: Optional[PathLike]) -> None:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=fig.get_dpi(), bbox_inches="tight")


def plot_contribution_heatmap(
    records: Sequence[dict],
    path: Optional[PathLike] = None,
    value: str = "norm",
    title: Optional[str] = None,
    annotate: Optional[bool] = None,
) -> Any:
    """Heat map of expert contributions: one row per layer, one column per expert.

    Args:
        records: Output of :func:`alore_peft.experts.expert_records`.
        path: Where to save the figure (format from the suffix: ``.png``, ``.svg``, ...).
        value: ``"norm"`` (``s ||A_i||_F ||B_i C_i||_F``) or ``"share"`` (of the
            layer's total).
        title: Figure title.
        annotate: Write the value in every cell (default: when there are at
            most 40 rows and 16 experts).

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    figure_mod = require_matplotlib()
    if not records:
        raise ValueError("records is empty; pass the output of alore_peft.experts.expert_records(model).")
    names, matrix = contribution_matrix(records, value=value)
    rows, n = matrix.shape
    if annotate is None:
        annotate = rows <= 40 and n <= 16
    fig = figure_mod.Figure(figsize=(1.6 + 0.75 * n, 1.2 + 0.32 * rows), dpi=110)
    ax = fig.add_subplot()
    image = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(n), [f"E{i}" for i in range(n)])
    ax.set_yticks(range(rows), _short_names(names), fontsize=8)
    ax.set_xlabel("expert")
    label = "contribution norm  s·‖A_i‖·‖B_i C_i‖" if value == "norm" else "share of the layer's expert norms"
    fig.colorbar(image, ax=ax, label=label, fraction=0.08, pad=0.03)
    if annotate:
        finite = matrix[torch.isfinite(matrix)]
        mid = float(finite.min() + finite.max()) / 2 if finite.numel() else 0.0
        for (i, j), v in zip(itertools.product(range(rows), range(n)), matrix.flatten().tolist()):
            if v == v:  # not NaN
                color = "black" if v > mid else "white"
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title(title or "ALoRE expert contributions to dW")
    _save(fig, path)
    return fig


def _to_hwc(images: Any) -> torch.Tensor:
    """Images as ``(batch, H, W, 3)`` floats in [0, 1] (min-max scaled per image)."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"images must be (batch, C, H, W) or (batch, H, W, C); got shape {tuple(x.shape)}.")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.permute(0, 2, 3, 1)  # (batch, H, W, C)
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    # Model inputs are normalised; rescale each image to [0, 1] for display only.
    lo = x.flatten(1).min(dim=1).values.view(-1, 1, 1, 1)
    hi = x.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def plot_expert_maps(
    images: Any,
    maps: torch.Tensor,
    path: Optional[PathLike] = None,
    titles: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    relative: bool = False,
    background: str = "contour",
    cmap: Optional[str] = None,
) -> Any:
    """Each expert's contribution map next to its image.

    One row per image: the image, then one panel per expert. Maps are drawn
    at their own resolution (one square per patch, no smoothing) over the
    image's extent.

    Args:
        images: ``(batch, C, H, W)`` or ``(batch, H, W, C)``; model inputs are fine
            (each image is min-max scaled for display).
        maps: ``(batch, n, h, w)``, from :func:`alore_peft.experts.expert_maps`
            or :func:`~alore_peft.experts.combine_maps`.
        path: Where to save the figure.
        titles: One label per image (e.g. the class).
        title: Figure title.
        relative: ``False``: the maps themselves, on a colour scale shared by
            the experts of one row (rows are scaled separately).
            ``True``: each expert's share of the experts' total at every patch
            (:func:`alore_peft.experts.map_shares`), on one diverging scale for
            the whole figure, centred on the even share ``1 / n`` and as wide as
            the largest deviation from it.
        background: ``"contour"``: the image's outline (at half its brightness
            range) drawn over the map; ``"blend"``: the map half transparent
            over a grey copy of the image; ``"none"``.
        cmap: Matplotlib colour map (default ``"inferno"``, or ``"RdBu_r"``
            with ``relative=True``).

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    from .experts import map_shares

    if background not in ("contour", "blend", "none"):
        raise ValueError(f"background must be 'contour', 'blend' or 'none', got background={background!r}.")
    figure_mod = require_matplotlib()
    pics = _to_hwc(images)  # (batch, H, W, 3)
    maps = torch.as_tensor(maps).detach().float().cpu()
    if maps.dim() != 4 or maps.shape[0] != pics.shape[0]:
        raise ValueError(
            f"maps must be (batch, n, h, w) with the images' batch size {pics.shape[0]}; got {tuple(maps.shape)}."
        )
    batch, n = maps.shape[:2]
    if relative:
        maps = map_shares(maps)
    cmap = cmap or ("RdBu_r" if relative else "inferno")
    height, width = pics.shape[1:3]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # the map's squares cover the image exactly
    grey = pics.mean(dim=-1)  # (batch, H, W)
    fig = figure_mod.Figure(figsize=(1.7 * (n + 1) + 0.6, 1.75 * batch + 0.6), dpi=110)
    axes = fig.subplots(batch, n + 1, squeeze=False)
    even = 1.0 / n
    # Shares: one symmetric scale around the even share, as wide as the largest deviation.
    spread = max(float((maps - even).abs().max()), 1e-6) if relative else 0.0
    for b in range(batch):
        if relative:
            vmin, vmax = even - spread, even + spread
        else:
            vmin, vmax = 0.0, float(maps[b].max()) or 1.0
        axes[b, 0].imshow(pics[b].numpy())
        if titles is not None:
            axes[b, 0].set_ylabel(titles[b], fontsize=8)
        level = 0.5 * float(grey[b].min() + grey[b].max())
        for i in range(n):
            ax = axes[b, i + 1]
            if background == "blend":
                ax.imshow(grey[b].numpy(), cmap="gray")
            shown = ax.imshow(
                maps[b, i].numpy(),
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
                interpolation="nearest",
                extent=extent,
                alpha=0.6 if background == "blend" else 1.0,
            )
            if background == "contour" and float(grey[b].max()) > float(grey[b].min()):
                # White on the dark end of inferno; black on the white middle of the diverging map.
                ax.contour(grey[b].numpy(), levels=[level], colors="black" if relative else "white", linewidths=0.6)
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
            if b == 0:
                ax.set_title(f"expert {i}", fontsize=9)
        for ax in axes[b]:
            ax.set_xticks([])
            ax.set_yticks([])
        if not relative:
            fig.colorbar(shown, ax=list(axes[b]), fraction=0.015, pad=0.01)
    if relative:
        fig.colorbar(
            shown,
            ax=axes.ravel().tolist(),
            fraction=0.015,
            pad=0.01,
            label=f"share of the experts' total (even: 1/{n} = {even:.3g})",
        )
    axes[0, 0].set_title("input", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)
    return fig
