"""ALoRE tuner layers: parameter plumbing around :mod:`alore_peft.functional`.

A layer owns its expert factors ``B`` and ``C`` (and its rule matrices when
they are not shared), picks a compute path and hands the math to
:mod:`alore_peft.functional`. Merge, unmerge and forward all go through
:meth:`AloreLayer.get_delta_weight`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import functional as F
from .config import AloreConfig

__all__ = ["AloreLayer", "Linear", "Conv2d", "LAYER_TYPES"]


class AloreLayer(BaseTunerLayer):
    """State and behaviour shared by every ALoRE-wrapped module.

    Subclasses define the feature axis of their input (``_feature_dim``), the
    sizes the adapter sees (``in_dim``, ``out_dim``, ``parallel_in_dim``) and
    how the base module runs with a substituted weight (``_forward_with_weight``).
    """

    adapter_layer_names = ("alore_A", "alore_B", "alore_C")
    other_param_names = ("r", "num_experts", "alpha", "scaling", "mode", "compute_path", "alore_dropout")
    _feature_dim: int = -1

    def __init__(self, base_layer: nn.Module, shared_rules: Optional[nn.ParameterDict] = None) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.num_experts: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.mode: dict[str, str] = {}
        self.compute_path: dict[str, str] = {}
        self.alore_dropout = nn.ModuleDict({})
        self.alore_A = nn.ParameterDict({})  # (n, n, n) per adapter, only when rules are not shared
        self.alore_B = nn.ParameterDict({})  # (n, d_out / n, r)
        self.alore_C = nn.ParameterDict({})  # (n, r, d_in / n)
        # The tuner's rule matrices: a plain reference, not a submodule, so the
        # state dict holds them once (on the tuner) however many layers use them.
        self.__dict__["_shared_rules"] = shared_rules
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._merge_groups: list[list[str]] = []

    # -- sizes -------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        """Features on the input's feature axis."""
        raise NotImplementedError

    @property
    def out_dim(self) -> int:
        """Features on the output's feature axis."""
        raise NotImplementedError

    @property
    def parallel_in_dim(self) -> int:
        """Columns of a parallel ``dW`` (``in_dim`` times the kernel size for convolutions)."""
        return self.in_dim

    def _delta_shape(self, mode: str) -> tuple[int, int]:
        if mode == "sequential":
            return self.in_dim, self.in_dim
        return self.out_dim, self.parallel_in_dim

    # -- creation ----------------------------------------------------------
    def update_layer(self, adapter_name: str, config: AloreConfig, module_name: str = "") -> None:
        """Create adapter ``adapter_name`` on this layer from ``config``."""
        n, r, mode = config.num_experts, config.r, config.mode
        d_out, d_in = self._delta_shape(mode)
        if d_out % n or d_in % n:
            valid = F.valid_num_experts(d_out, d_in)
            where = f"module '{module_name}'" if module_name else f"a {type(self.get_base_layer()).__name__}"
            raise ValueError(
                f"num_experts={n} does not divide the dimensions of {where}: its {mode} ALoRE update is "
                f"{d_out} x {d_in}. Valid num_experts for it: {valid}. Pick one of these, or leave this module "
                "out with exclude_modules."
            )
        self.r[adapter_name] = r
        self.num_experts[adapter_name] = n
        self.alpha[adapter_name] = config.alpha
        self.scaling[adapter_name] = config.scaling
        self.mode[adapter_name] = mode
        self.compute_path[adapter_name] = config.compute_path
        self.alore_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

        q_out, q_in = d_out // n, d_in // n
        # C starts like LoRA's down factor; its fan-in is one input block (q_in)
        # because the orthogonal rules keep the block norms.
        c_bound = 1.0 / math.sqrt(q_in)
        self.alore_C[adapter_name] = nn.Parameter(torch.empty(n, r, q_in).uniform_(-c_bound, c_bound))
        if config.init_weights:
            b = torch.zeros(n, q_out, r)  # dW = 0: the adapter is an exact identity at step 0
        else:
            b_bound = 1.0 / math.sqrt(n * r)
            b = torch.empty(n, q_out, r).uniform_(-b_bound, b_bound)
        self.alore_B[adapter_name] = nn.Parameter(b)
        if not config.share_rules:
            self.alore_A[adapter_name] = nn.Parameter(F.init_rules(n, config.rule_init))
        elif self._shared_rules is None or adapter_name not in self._shared_rules:
            raise ValueError(
                f"Adapter '{adapter_name}' uses share_rules=True but no shared rule matrices were given to this "
                "layer; create ALoRE layers through get_peft_model (or AloreModel), not directly."
            )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        # New modules start in training mode; follow the wrapped module instead (model.eval() was maybe called).
        self.train(self.get_base_layer().training)
        self.set_adapter(self.active_adapters)

    def rules(self, adapter_name: str) -> torch.Tensor:
        """The rule matrices of ``adapter_name``, ``(n, n, n)``, shared or this layer's own."""
        if adapter_name in self.alore_A:
            return self.alore_A[adapter_name]
        return self._shared_rules[adapter_name]

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, B, C)`` of ``adapter_name``."""
        return self.rules(adapter_name), self.alore_B[adapter_name], self.alore_C[adapter_name]

    # -- the one delta ---------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * dW`` of ``adapter_name``: ``(in, in)`` sequential, ``(out, parallel_in)`` parallel."""
        A, B, C = self.factors(adapter_name)
        return F.delta_weight(A.to(B.dtype), B, C, self.scaling[adapter_name])

    def _group_deltas(self, adapter_names: list[str]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        seq = [self.get_delta_weight(a) for a in adapter_names if self.mode[a] == "sequential"]
        par = [self.get_delta_weight(a) for a in adapter_names if self.mode[a] == "parallel"]
        return (sum(seq) if seq else None), (sum(par) if par else None)

    # -- merging -----------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into the base weight: ``W' = W (I + sum S) + sum P``.

        The adapters merged in one call form one group, folded at once, so the
        merged layer equals the unmerged one with all of them active.

        Args:
            safe_merge: Check the merged weight for NaN/inf before writing it; on
                failure raise and leave the weight untouched.
            adapter_names: Adapters to merge (default: the active ones).
        """
        # Adapters that do not touch this layer are skipped, as in PEFT's LoRA.
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.alore_B]
        if not adapter_names:
            return
        base = self.get_base_layer()
        with torch.no_grad():
            seq, par = self._group_deltas(adapter_names)
            merged = F.merge_weight(base.weight.data, seq, par)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"Merging adapter(s) {adapter_names} would put NaN or inf values into the weights of this "
                    f"{type(base).__name__}; the weights were left untouched. Check the adapter for non-finite values."
                )
            base.weight.data.copy_(merged)
        self.merged_adapters.extend(adapter_names)
        self._merge_groups.append(list(adapter_names))

    def unmerge(self) -> None:
        """Undo every merge, newest first, restoring the base weight to float32 round-off."""
        base = self.get_base_layer()
        with torch.no_grad():
            while self._merge_groups:
                group = self._merge_groups[-1]
                seq, par = self._group_deltas(group)
                base.weight.data.copy_(F.unmerge_weight(base.weight.data, seq, par))
                self._merge_groups.pop()
                for name in group:
                    self.merged_adapters.remove(name)

    # -- forward -----------------------------------------------------------
    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Run the base module with ``weight`` in place of its own."""
        raise NotImplementedError

    def _adapter_out(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``s * dW x`` along the feature axis, factored (``dW`` is never built)."""
        A, B, C = self.factors(adapter_name)
        # Under autocast the matmuls pick their own dtype: casting x to the factors' dtype
        # first would only add two passes over it (bfloat16 -> float32 -> bfloat16, exact).
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(B.dtype)
        dropout = self.alore_dropout[adapter_name]
        if not isinstance(dropout, nn.Identity):
            h = dropout(h)
        if self._feature_dim != -1:
            h = h.movedim(self._feature_dim, -1)  # (..., features)
        out = F.apply(h, A.to(B.dtype), B, C, self.scaling[adapter_name])
        if self._feature_dim != -1:
            out = out.movedim(-1, self._feature_dim)
        return out.to(x.dtype)

    def _with_sequential(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """``x + s dW x`` summed over the sequential adapters (no ``sum()``: its leading ``0 +`` is one more pass)."""
        h = x
        for name in adapter_names:
            h = h + self._adapter_out(name, x)
        return h

    def _use_fold(self, adapter_name: str, x: torch.Tensor) -> bool:
        path = self.compute_path[adapter_name]
        if path != "auto":
            return path == "fold"
        if self.training and isinstance(self.alore_dropout[adapter_name], nn.Dropout):
            return False  # dropout acts on the branch input, which folding cannot reproduce
        B = self.alore_B[adapter_name]
        needs_grad = torch.is_grad_enabled() and B.requires_grad
        tokens = x.numel() // x.shape[self._feature_dim]
        n, r = self.num_experts[adapter_name], self.r[adapter_name]
        return F.prefer_fold(tokens, self.parallel_in_dim, self.out_dim, n, r, needs_grad)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.alore_B]
        seq = [a for a in active if self.mode[a] == "sequential"]
        par = [a for a in active if self.mode[a] == "parallel"]
        if not seq and len(par) == 1 and self._use_fold(par[0], x):
            # One matmul with W + s dW: the per-token cost of the base layer alone.
            weight = self.get_base_layer().weight
            delta = self.get_delta_weight(par[0]).to(weight.dtype).reshape(weight.shape)
            return self._forward_with_weight(x, weight + delta)
        h = self._with_sequential(x, seq)
        result = self.base_layer(h, *args, **kwargs)
        for a in par:
            result = result + self._parallel_out(a, x)
        return result

    def _parallel_out(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        return self._adapter_out(adapter_name, x)

    def __repr__(self) -> str:
        return "alore." + super().__repr__()


class Linear(nn.Module, AloreLayer):
    """ALoRE around an ``nn.Linear``: features on the last axis."""

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str,
        config: AloreConfig,
        shared_rules: Optional[nn.ParameterDict] = None,
        module_name: str = "",
    ) -> None:
        super().__init__()
        AloreLayer.__init__(self, base_layer, shared_rules)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    @property
    def in_dim(self) -> int:
        return self.get_base_layer().in_features

    @property
    def out_dim(self) -> int:
        return self.get_base_layer().out_features

    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, weight, self.get_base_layer().bias)

    # nn.Module comes first in the MRO, so its placeholders must be pointed at AloreLayer's.
    forward = AloreLayer.forward
    __repr__ = AloreLayer.__repr__


class Conv2d(nn.Module, AloreLayer):
    """ALoRE around an ``nn.Conv2d``: channels on axis 1.

    Sequential: the adapter mixes the input channels of every pixel, which
    merges exactly into every kernel tap (zero padding stays zero).
    Parallel: ``dW`` is ``(c_out, c_in * kh * kw)``, reshaped to the kernel
    and added to the weight once per call.
    """

    _feature_dim = 1

    def __init__(
        self,
        base_layer: nn.Conv2d,
        adapter_name: str,
        config: AloreConfig,
        shared_rules: Optional[nn.ParameterDict] = None,
        module_name: str = "",
    ) -> None:
        if base_layer.groups != 1:
            raise ValueError(
                f"ALoRE supports Conv2d with groups=1 only; module '{module_name}' has groups={base_layer.groups} "
                "(a depthwise or grouped convolution). Leave it out with exclude_modules or target a 1x1 / dense "
                "convolution instead."
            )
        super().__init__()
        AloreLayer.__init__(self, base_layer, shared_rules)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    @property
    def in_dim(self) -> int:
        return self.get_base_layer().in_channels

    @property
    def out_dim(self) -> int:
        return self.get_base_layer().out_channels

    @property
    def parallel_in_dim(self) -> int:
        kh, kw = self.get_base_layer().kernel_size
        return self.in_dim * kh * kw

    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return base._conv_forward(x, weight, base.bias)

    def _use_fold(self, adapter_name: str, x: torch.Tensor) -> bool:
        # A parallel conv update acts on kernel patches, so it is always applied as a
        # kernel; with dropout active it runs as a second convolution on the dropped input.
        return not (self.training and isinstance(self.alore_dropout[adapter_name], nn.Dropout))

    def _parallel_out(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        # Several adapters at once: each one's folded kernel, without the bias.
        base = self.get_base_layer()
        delta = self.get_delta_weight(adapter_name).to(base.weight.dtype).reshape(base.weight.shape)
        h = self.alore_dropout[adapter_name](x)
        return base._conv_forward(h, delta, None)

    forward = AloreLayer.forward
    __repr__ = AloreLayer.__repr__


LAYER_TYPES: dict[type[nn.Module], type[AloreLayer]] = {nn.Linear: Linear, nn.Conv2d: Conv2d}
