"""Size an ALoRE adapter from a parameter budget, without arithmetic by hand.

:func:`plan_budget` finds the layers an :class:`~alore_peft.AloreConfig` would
adapt (by injecting into a weightless copy of the model on the ``meta``
device, so the matching is PEFT's own), then lists every ``(r, num_experts)``
that fits the budget with its exact trainable count:

    trainable = r * sum_over_layers(d_out + d_in) + rules
    rules     = n**3 (share_rules=True) or n**3 * layers (share_rules=False)

where ``d_out x d_in`` is the shape of each layer's update ``dW`` (square,
``d_in x d_in``, in sequential mode). Modules in ``modules_to_save`` (e.g. a
new classifier head) are not part of the count. Each row also gives the rank
``dW`` can reach per layer, ``min(d_out, d_in, n**2 * r)``.

    >>> from alore_peft.budget import plan_budget
    >>> rows = plan_budget(model_type="vit", budget=150_000, target_modules=["q_proj", "fc1"])
    >>> best = rows[0]; config = best.to_config(modules_to_save=["classifier"])
"""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from . import functional
from .config import MODES, AloreConfig
from .layer import AloreLayer
from .targets import target_names

__all__ = ["LayerShape", "BudgetRow", "adapted_shapes", "plan_budget", "SORT_KEYS"]

SORT_KEYS = ("params", "rank")

# Fields that decide which layers are adapted and how many parameters they get;
# a planned row fixes them.
_PLANNED_FIELDS = (
    "r",
    "num_experts",
    "mode",
    "share_rules",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
)


@dataclass(frozen=True)
class LayerShape:
    """One adapted layer: its name and the shape of its update ``dW``."""

    name: str
    d_out: int
    d_in: int


@dataclass(frozen=True)
class BudgetRow:
    """One ``(r, num_experts)`` that fits the budget.

    Attributes:
        r: Expert rank.
        num_experts: Number of experts ``n`` (the Kronecker size).
        trainable: Exact trainable ALoRE parameters (``expert_params + rule_params``).
        expert_params: ``r * sum(d_out + d_in)`` over the adapted layers.
        rule_params: Rule matrices: ``n**3`` once, or per layer without sharing.
        layers: Number of adapted layers.
        min_rank: Smallest per-layer rank bound ``min(d_out, d_in, n**2 r)``.
        max_rank: Largest per-layer rank bound.
        rank_bounds: Per-layer rank bounds, in layer order.
        budget: The budget the row was planned for.
        settings: The planned AloreConfig fields other than ``r`` and ``num_experts``.
    """

    r: int
    num_experts: int
    trainable: int
    expert_params: int
    rule_params: int
    layers: int
    min_rank: int
    max_rank: int
    rank_bounds: tuple[int, ...] = field(repr=False)
    budget: int = field(repr=False)
    settings: dict = field(repr=False, compare=False)

    @property
    def budget_used(self) -> float:
        """``trainable / budget``."""
        return self.trainable / self.budget

    def as_dict(self) -> dict[str, Any]:
        """A flat record for tables (``rank_bounds`` and ``settings`` left out)."""
        out = asdict(self)
        out.pop("rank_bounds")
        out.pop("settings")
        out["budget_used"] = self.budget_used
        return out

    def to_config(self, **overrides: Any) -> AloreConfig:
        """An :class:`AloreConfig` with this row's ``r``, ``num_experts`` and placement.

        Args:
            **overrides: Other AloreConfig fields (``alpha``, ``dropout``,
                ``modules_to_save``, ``init_weights``, ...). Fields that change
                the parameter count (``r``, ``num_experts``, ``mode``,
                ``share_rules``, the target selection) are refused: plan again
                with those instead.
        """
        fixed = sorted(set(overrides) & set(_PLANNED_FIELDS))
        if fixed:
            raise ValueError(
                f"BudgetRow.to_config cannot override {fixed}: they decide the parameter count this row was planned "
                "for. Call plan_budget again with the values you want."
            )
        settings = dict(self.settings)
        target = settings.get("target_modules")
        if isinstance(target, (set, tuple)):
            settings["target_modules"] = sorted(target)
        return AloreConfig(r=self.r, num_experts=self.num_experts, **settings, **overrides)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device (no memory, no data)."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) in memo:
            continue
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (
            nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
        )
    return copy.deepcopy(model, memo)


def _model_from_config(model_type: Optional[str], config: Any) -> nn.Module:
    from transformers import AutoConfig, AutoModel, PretrainedConfig

    if config is None:
        if model_type is None:
            raise ValueError("plan_budget needs model=..., model_type=... or config=...; none was given.")
        try:
            config = AutoConfig.for_model(model_type)
        except ValueError as exc:
            raise ValueError(
                f"model_type={model_type!r} is not a transformers model type ({exc}); use e.g. model_type='vit', "
                "or pass the model's config."
            ) from exc
    elif isinstance(config, dict):
        config = dict(config)
        kind = config.pop("model_type", model_type)
        if kind is None:
            raise ValueError("config is a dict without 'model_type'; add it or pass model_type=... too.")
        config = AutoConfig.for_model(kind, **config)
    elif not isinstance(config, PretrainedConfig):
        raise ValueError(f"config must be a transformers PretrainedConfig or a dict, got a {type(config).__name__}.")
    elif model_type is not None and config.model_type != model_type:
        raise ValueError(
            f"model_type={model_type!r} disagrees with config.model_type={config.model_type!r}; pass only one."
        )
    # No weights are allocated: the skeleton only tells which layers match and their sizes.
    with torch.device("meta"):
        return AutoModel.from_config(config)


def adapted_shapes(
    model: Optional[nn.Module] = None,
    *,
    model_type: Optional[str] = None,
    config: Any = None,
    target_modules: Optional[Union[Sequence[str], str]] = None,
    mode: str = "sequential",
    exclude_modules: Optional[Union[Sequence[str], str]] = None,
    layers_to_transform: Optional[Union[Sequence[int], int]] = None,
    layers_pattern: Optional[Union[Sequence[str], str]] = None,
) -> tuple[list[LayerShape], Any]:
    """The layers an AloreConfig with these settings adapts, and their ``dW`` shapes.

    Args:
        model: The base model (left untouched: a weightless copy is adapted).
        model_type: Alternatively, a transformers model type (default config of
            that type, e.g. ViT-B/16 for ``"vit"``).
        config: Alternatively, a transformers config (or a dict with ``model_type``).
        target_modules, mode, exclude_modules, layers_to_transform, layers_pattern:
            As in :class:`AloreConfig`; ``target_modules=None`` uses the
            model type's defaults.

    Returns:
        ``(shapes, resolved_target_modules)``.
    """
    from peft import get_peft_model

    if model is None:
        skeleton = _model_from_config(model_type, config)
    else:
        if any(isinstance(m, AloreLayer) for m in model.modules()):
            raise ValueError(
                "plan_budget needs the base model, but this model already contains ALoRE layers; pass the model "
                "before get_peft_model (or model.get_base_model() after unload())."
            )
        skeleton = _meta_copy(model)
    if isinstance(target_modules, (list, tuple)):
        target_modules = list(target_modules)
    probe = AloreConfig(
        r=1,
        num_experts=1,  # divides everything: the probe only reads shapes
        mode=mode,
        target_modules=target_modules,
        exclude_modules=list(exclude_modules) if isinstance(exclude_modules, (list, tuple)) else exclude_modules,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
    )
    names = target_names(skeleton)
    valid = f"Valid target names in this model: layers {', '.join(names['layers'])}"
    if mode == "sequential" and names["containers"]:
        valid += f"; blocks (sequential mode) {', '.join(names['containers'])}"
    if isinstance(target_modules, list):
        # PEFT only refuses a list none of whose names match; a budget planned on a typo would be wrong.
        modules = [name for name, _ in skeleton.named_modules()]
        unknown = [t for t in target_modules if not any(m == t or m.endswith("." + t) for m in modules)]
        if unknown:
            raise ValueError(f"target_modules {unknown} match no module of the model. {valid}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes about meta tensors are irrelevant to a skeleton
        try:
            peft_model = get_peft_model(skeleton, probe)
        except ValueError as exc:
            raise ValueError(f"No ALoRE layer can be placed with these settings: {exc} {valid}.") from exc
    shapes = []
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, AloreLayer):
            d_out, d_in = module.delta_shape(mode)
            shapes.append(LayerShape(name, d_out, d_in))
    resolved = peft_model.peft_config["default"].target_modules
    return shapes, resolved


def plan_budget(
    model: Optional[nn.Module] = None,
    *,
    budget: int,
    model_type: Optional[str] = None,
    config: Any = None,
    target_modules: Optional[Union[Sequence[str], str]] = None,
    mode: str = "sequential",
    share_rules: bool = True,
    exclude_modules: Optional[Union[Sequence[str], str]] = None,
    layers_to_transform: Optional[Union[Sequence[int], int]] = None,
    layers_pattern: Optional[Union[Sequence[str], str]] = None,
    ranks: Optional[Sequence[int]] = None,
    max_experts: int = 64,
    sort: str = "params",
) -> list[BudgetRow]:
    """Every ``(r, num_experts)`` whose trainable count fits ``budget``.

    ``num_experts`` runs over the values that divide every adapted dimension
    (:func:`alore_peft.functional.valid_num_experts`, up to ``max_experts``).
    ``r`` runs over ``ranks`` or, by default, ``1, 2, ...`` while the count
    fits, and never past an expert's block size ``min(d_out, d_in) / n`` of
    the smallest layer (a larger ``r`` adds parameters but no rank).

    Args:
        model: The base model (not modified). Or give ``model_type`` / ``config``.
        budget: Maximum trainable ALoRE parameters (``modules_to_save`` excluded).
        model_type: A transformers model type, used with its default config
            when ``config`` is not given.
        config: A transformers config (or a dict with ``model_type``).
        target_modules, mode, share_rules, exclude_modules, layers_to_transform,
            layers_pattern: As in :class:`AloreConfig`.
        ranks: Ranks to consider (default: all that fit).
        max_experts: Largest ``num_experts`` considered.
        sort: ``"params"`` (default): most parameters first (the budget best
            used), ties by reachable rank, then fewer experts. ``"rank"``:
            highest smallest-layer rank bound first, ties by fewer parameters.

    Returns:
        The rows, sorted; empty when nothing fits (even ``r=1`` is over budget).
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"budget must be a positive number of parameters, got budget={budget!r}; e.g. 150000.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}.")
    if sort not in SORT_KEYS:
        raise ValueError(f"sort must be one of {SORT_KEYS}, got sort={sort!r}.")
    if ranks is not None and any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in ranks):
        raise ValueError(f"ranks must be positive integers, got ranks={list(ranks)!r}.")
    shapes, resolved = adapted_shapes(
        model,
        model_type=model_type,
        config=config,
        target_modules=target_modules,
        mode=mode,
        exclude_modules=exclude_modules,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
    )
    settings = {
        "mode": mode,
        "share_rules": share_rules,
        "target_modules": target_modules if target_modules is not None else resolved,
        "exclude_modules": exclude_modules,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": layers_pattern,
    }
    dims = sorted({d for s in shapes for d in (s.d_out, s.d_in)})
    per_rank = sum(s.d_out + s.d_in for s in shapes)
    rows = []
    for n in functional.valid_num_experts(*dims, limit=max_experts):
        rules = functional.rule_parameters(n, len(shapes), share_rules)
        block = min(min(s.d_out, s.d_in) for s in shapes) // n
        candidates = ranks if ranks is not None else range(1, block + 1)
        for r in candidates:
            trainable = r * per_rank + rules  # sum of functional.expert_parameters over the layers
            if trainable > budget:
                if ranks is None:
                    break  # counts grow with r
                continue
            bounds = tuple(functional.rank_bound(s.d_out, s.d_in, n, r) for s in shapes)
            rows.append(
                BudgetRow(
                    r=r,
                    num_experts=n,
                    trainable=trainable,
                    expert_params=r * per_rank,
                    rule_params=rules,
                    layers=len(shapes),
                    min_rank=min(bounds),
                    max_rank=max(bounds),
                    rank_bounds=bounds,
                    budget=budget,
                    settings=settings,
                )
            )
    if sort == "params":
        rows.sort(key=lambda row: (-row.trainable, -sum(row.rank_bounds), row.num_experts))
    else:
        rows.sort(key=lambda row: (-row.min_rank, -sum(row.rank_bounds), row.trainable, row.num_experts))
    return rows
