"""ALoRE tuner layers: parameter plumbing around :mod:`alore_peft.functional`.

:class:`AloreLayer` holds everything an adapted module does, once: creating
adapters, the forward paths, merging and unmerging, and the folded-weight
cache. A subclass says only what it wraps:

- which frozen weights absorb the adapter (:meth:`AloreLayer.consumer_weights`):
  the wrapped ``nn.Linear``/``nn.Conv2d`` itself here, every layer that reads a
  container's input for :class:`alore_peft.block.AloreBlock`;
- where its input is and how the wrapped module runs with folded weights.

Forward paths (``compute_path``):

- **factored**: ``dW`` is never built; three token-sized matmuls per adapter
  (:func:`alore_peft.functional.apply`). What training uses on linear layers
  and blocks.
- **fold**: the consumers run once with ``W (I + sum S) + sum P``
  (:func:`alore_peft.functional.folded_weight`). Convolutions always fold
  (the update is a few kernel taps, the tokens are many); inference folds.
- **cached fold**: in eval mode with gradients off, the folded weights are
  kept between calls, so an unmerged model serves at the merged model's cost.
  The cache holds one extra copy of every weight the adapter folds into, and
  is dropped whenever any adapter or base weight changes (parameter version
  counters and storage), on ``train()``/``eval()``, and when adapters are
  switched, enabled, disabled, merged, unmerged or deleted. A layer whose
  tensors are inference tensors (built or loaded under
  ``torch.inference_mode()``: no version counter) folds on every call instead.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import functional
from .config import AloreConfig

__all__ = ["AloreLayer", "Linear", "Conv2d", "LAYER_TYPES", "RuleMixes"]


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter (bumped by every in-place write); -1 for an inference tensor, which has none."""
    return -1 if t.is_inference() else t._version


class RuleMixes:
    """Every adapter's :class:`~alore_peft.functional.RuleMix`, built once per model forward.

    The tuner holds one and opens :meth:`scope` around each forward of the
    model; inside it, every layer call of one adapter (same rules, rank, scale,
    dtype and grad mode) shares one mixing matrix and one rule-gradient
    buffer. Gradient checkpointing recomputes layers after the forward, inside
    the backward pass: those calls share one mix per backward pass
    (``torch._C._current_graph_task_id``), kept until the thread's next
    forward; their key holds the rules' version counter, so rules changed in
    place since (an optimizer step in a backward hook) are never served from an
    older mix. A layer called on its own, outside both, builds its own: the
    same values, two more operators. Scopes belong to the thread that opened
    them: ``nn.DataParallel`` runs its replicas, which share this object, in
    threads of their own.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def depth(self) -> int:
        """How many scopes the calling thread has open."""
        return getattr(self._local, "depth", 0)

    @property
    def built(self) -> dict[tuple, functional.RuleMix]:
        """The mixes the calling thread's open scope has built (empty outside a scope)."""
        return getattr(self._local, "built", {}) if self.depth else {}

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Share each adapter's mix between the calls this thread makes inside (re-entrant)."""
        local = self._local
        depth = getattr(local, "depth", 0)
        if not depth:
            local.built = {}
            local.recomputed = None  # a new forward: what the last backward pass recomputed is done with
        local.depth = depth + 1
        try:
            yield
        finally:
            local.depth -= 1
            if not local.depth:
                local.built = {}

    def get(self, A: torch.Tensor, r: int, dtype: torch.dtype, scale: float) -> functional.RuleMix:
        """The mix of rules ``A`` for rank ``r`` and ``scale`` in ``dtype``: shared in a scope or a backward pass, else new."""
        local = self._local
        if torch.compiler.is_compiling():
            return functional.rule_mix(A, r, dtype, scale)
        if getattr(local, "depth", 0):
            built, version = local.built, 0  # the rules cannot change during one forward
        else:
            task = torch._C._current_graph_task_id()
            if task < 0:  # neither in a forward of the model nor in a backward pass
                return functional.rule_mix(A, r, dtype, scale)
            recomputed = getattr(local, "recomputed", None)
            if recomputed is None or recomputed[0] != task:
                recomputed = local.recomputed = (task, {})
            built, version = recomputed[1], _version(A)  # a backward hook may step the optimizer
        key = (id(A), version, r, dtype, scale, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        mix = built.get(key)
        if mix is None:
            mix = built[key] = functional.rule_mix(A, r, dtype, scale)
        return mix

    def __getstate__(self) -> dict:
        return {}  # a copy or a pickle starts outside any forward

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> "RuleMixes":
        return RuleMixes()


def _factors_to_file_layout(layer: "AloreLayer", state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: each adapter's stored ``(B2, C2)`` written as ``B`` ``(n, d_out / n, r)`` and ``C`` ``(n, r, d_in / n)``.

    The file (and state-dict) layout of the factors is the documented one,
    whatever the layers store (:func:`~alore_peft.functional.factor_matrices`).
    """
    for adapter, n in layer.num_experts.items():
        b_key, c_key = f"{prefix}alore_B.{adapter}", f"{prefix}alore_C.{adapter}"
        if b_key in state_dict and state_dict[b_key].dim() == 2:
            state_dict[b_key] = state_dict[b_key].unflatten(0, (n, -1)).transpose(1, 2)  # (n, d_out / n, r)
        if c_key in state_dict and state_dict[c_key].dim() == 2:
            state_dict[c_key] = state_dict[c_key].unflatten(0, (n, -1))  # (n, r, d_in / n)


def _factors_from_file_layout(layer: "AloreLayer", state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre-hook: a file's 3-D ``B`` and ``C`` to the stored matrices (2-D tensors, already stored, pass as given)."""
    for kind in ("alore_B.", "alore_C."):
        start = prefix + kind
        for key in [k for k in state_dict if k.startswith(start) and "." not in k[len(start):]]:
            value = state_dict[key]
            if isinstance(value, torch.Tensor) and value.dim() == 3:
                n, rows, cols = value.shape  # B: (n, d_out / n, r); C: (n, r, d_in / n)
                matrix = value.transpose(1, 2).reshape(n * cols, rows) if kind == "alore_B." else value.reshape(-1, cols)
                state_dict[key] = matrix.contiguous()


class AloreLayer(BaseTunerLayer):
    """State and behaviour shared by every ALoRE-wrapped module.

    Subclasses define the sizes the adapter sees (``in_dim``, ``out_dim``,
    ``kernel_taps``), the feature axis of the input (``_feature_dim``), the
    weights the adapter folds into (:meth:`consumer_weights`) and how the
    wrapped module runs with folded weights (:meth:`_run_folded`).
    """

    adapter_layer_names = ("alore_A", "alore_B", "alore_C")
    other_param_names = ("r", "num_experts", "alpha", "scaling", "mode", "compute_path", "alore_dropout")
    _feature_dim: int = -1
    modes: tuple[str, ...] = ("sequential", "parallel")

    def __init__(
        self,
        base_layer: nn.Module,
        shared_rules: Optional[nn.ParameterDict] = None,
        rule_mixes: Optional[RuleMixes] = None,
    ) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.num_experts: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.mode: dict[str, str] = {}
        self.compute_path: dict[str, str] = {}
        self.alore_dropout = nn.ModuleDict({})
        self.alore_A = nn.ParameterDict({})  # (n, n, n) per adapter, only when rules are not shared
        # B and C stored as the matrices the factored path multiplies by, (n r, d_out / n) and (n r, d_in / n)
        # (functional.factor_matrices): no reshape per call, and their gradients come out of one matmul each in
        # that layout. factors() and the state dict show (n, d_out / n, r) and (n, r, d_in / n).
        self.alore_B = nn.ParameterDict({})
        self.alore_C = nn.ParameterDict({})
        self._register_state_dict_hook(_factors_to_file_layout)
        self.register_load_state_dict_pre_hook(_factors_from_file_layout)
        # The tuner's rule matrices: a plain reference, not a submodule, so the
        # state dict holds them once (on the tuner) however many layers use them.
        self.__dict__["_shared_rules"] = shared_rules
        self.__dict__["_rule_mixes"] = rule_mixes if rule_mixes is not None else RuleMixes()
        self.__dict__["_fold_cache"] = None  # (key, {consumer name: folded weight})
        self.__dict__["_fold_can_pay"] = {}  # adapter name -> functional.fold_can_pay for this layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

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
    def kernel_taps(self) -> int:
        """Kernel positions a parallel ``dW`` spans (``kh * kw`` for a convolution, else 1)."""
        return 1

    def delta_shape(self, mode: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of ``dW`` in ``mode`` (:func:`alore_peft.functional.delta_shape`)."""
        return functional.delta_shape(mode, self.in_dim, self.out_dim, self.kernel_taps)

    # -- what the adapter folds into -------------------------------------------
    def consumer_weights(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, weight)`` of every frozen weight the adapter folds into.

        Raises:
            ValueError: if the adapter cannot be folded (a block not traced yet,
                or whose input reaches something else than linear/conv layers).
        """
        return [(name, module._parameters[attr]) for name, module, attr in self._consumer_slots()]

    def _consumer_slots(self) -> list[tuple[str, nn.Module, str]]:
        """``(name, module, attribute)`` of every consumer weight, looked up afresh through the module dicts.

        The eval-mode fold cache checks these on every call, so they are read
        the cheap way (``_modules`` / ``_parameters``), never remembered: a
        replaced weight is seen at once.
        """
        return [("weight", self._modules["base_layer"], "weight")]

    def _run_folded(self, weights: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        """Run the wrapped module with ``weights`` in place of its consumers' own."""
        raise NotImplementedError

    def _find_input(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Optional[str]]:
        """The tensor the adapter acts on, and the keyword it came under (``None``: first positional)."""
        return args[0], None

    # -- creation ----------------------------------------------------------
    def check_config(self, config: AloreConfig, module_name: str = "") -> None:
        """Raise a clear error if ``config`` cannot be placed on this layer; touch nothing."""
        where = f"module '{module_name}'" if module_name else f"a {type(self.get_base_layer()).__name__}"
        if config.mode not in self.modes:
            raise ValueError(
                f"{where} cannot take an ALoRE adapter with mode={config.mode!r}: a "
                f"{type(self).__name__} supports {', '.join(repr(m) for m in self.modes)}."
            )
        check_divisible(config.num_experts, config.mode, self.delta_shape(config.mode), where)

    def update_layer(self, adapter_name: str, config: AloreConfig, module_name: str = "") -> None:
        """Create adapter ``adapter_name`` on this layer from ``config``."""
        self.check_config(config, module_name)
        self._fold_can_pay.pop(adapter_name, None)
        if config.share_rules and (self._shared_rules is None or adapter_name not in self._shared_rules):
            raise ValueError(
                f"Adapter '{adapter_name}' uses share_rules=True but no shared rule matrices were given to this "
                "layer; create ALoRE layers through get_peft_model (or AloreModel), not directly."
            )
        n, r, mode = config.num_experts, config.r, config.mode
        d_out, d_in = self.delta_shape(mode)
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
        c = torch.empty(n, r, q_in).uniform_(-c_bound, c_bound)
        if config.init_weights:
            b = torch.zeros(n, q_out, r)  # dW = 0: the adapter is an exact identity at step 0
        else:
            b_bound = 1.0 / math.sqrt(n * r)
            b = torch.empty(n, q_out, r).uniform_(-b_bound, b_bound)
        b2, c2 = functional.factor_matrices(b, c)  # stored (n r, q_out) and (n r, q_in)
        self.alore_C[adapter_name] = nn.Parameter(c2.contiguous())
        self.alore_B[adapter_name] = nn.Parameter(b2.contiguous())
        if not config.share_rules:
            self.alore_A[adapter_name] = nn.Parameter(functional.init_rules(n, config.rule_init))
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
        """``(A, B, C)`` of ``adapter_name``: ``(n, n, n)``, ``(n, d_out / n, r)``, ``(n, r, d_in / n)``.

        ``B`` and ``C`` are views of the stored matrices: ``B[i]`` and ``C[i]`` are expert ``i``'s factors, and
        writing them (under ``torch.no_grad()``) writes the parameters.
        """
        B, C = functional.factor_views(self.alore_B[adapter_name], self.alore_C[adapter_name], self.num_experts[adapter_name])
        return self.rules(adapter_name), B, C

    def _stored(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, B2, C2)``: the rules and the stored factor matrices, read straight from the parameter dicts (the hot path)."""
        modules = self._modules
        A = modules["alore_A"]._parameters.get(adapter_name)
        if A is None:
            A = self._shared_rules._parameters[adapter_name]
        return A, modules["alore_B"]._parameters[adapter_name], modules["alore_C"]._parameters[adapter_name]

    def _mix(self, adapter_name: str, A: torch.Tensor, dtype: torch.dtype) -> functional.RuleMix:
        """The adapter's rules (``A``) as its scaled mixing matrix in ``dtype``, shared by the calls of one model forward."""
        return self._rule_mixes.get(A, self.r[adapter_name], dtype, self.scaling[adapter_name])

    def _factors_and_scale(self, adapter_name: str) -> functional.Factors:
        A, B, C = self.factors(adapter_name)
        return A, B, C, self.scaling[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s * dW`` of ``adapter_name``: ``delta_shape(mode)``, in the factors' dtype."""
        A, B, C = self.factors(adapter_name)
        return functional.delta_weight(A.to(B.dtype), B, C, self.scaling[adapter_name])

    # -- merging -----------------------------------------------------------
    def _deltas64(self, adapter_names: list[str]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(sum S, sum P)`` of ``adapter_names`` in float64 (``None`` where a mode has none)."""
        seq: Optional[torch.Tensor] = None
        par: Optional[torch.Tensor] = None
        for name in adapter_names:
            A, B, C = (t.double() for t in self.factors(name))
            delta = functional.delta_weight(A, B, C, self.scaling[name])
            if self.mode[name] == "sequential":
                seq = delta if seq is None else seq + delta
            else:
                par = delta if par is None else par + delta
        return seq, par

    def merge_plan(self, adapter_names: list[str]) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """The consumer weights with exactly ``adapter_names`` merged, computed from the current ones.

        Nothing is written. Merged adapters form one group,
        ``W' = W (I + sum S) + sum P``, however many merge calls built it, so a
        merged layer always equals the unmerged one with those adapters active.

        Raises:
            ValueError: if the current merge cannot be undone (``I + S``
                singular) or the adapter cannot be folded.
        """
        weights = [p for _, p in self.consumer_weights()]
        seq_now, par_now = self._deltas64(self.merged_adapters)
        if seq_now is not None:
            functional.check_invertible(seq_now)
        seq_new, par_new = self._deltas64(adapter_names)
        plan = []
        with torch.no_grad():
            for p in weights:
                w = p.detach()
                if self.merged_adapters:
                    w = functional.unmerge_weight(w, seq_now, par_now)
                if adapter_names:
                    w = functional.merge_weight(w, seq_new, par_new)
                plan.append((p, w))
        return plan

    def check_merge(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Raise if :meth:`merge` with these arguments would fail; change nothing."""
        names = self._to_merge(adapter_names, warn=False)
        if not names:
            return
        plan = self.merge_plan(self.merged_adapters + names)
        if safe_merge:
            self._check_finite(plan, names)

    def check_unmerge(self) -> None:
        """Raise if :meth:`unmerge` would fail (``I + S`` singular); change nothing."""
        if self.merged:
            self.consumer_weights()
            seq_now, _ = self._deltas64(self.merged_adapters)
            if seq_now is not None:
                functional.check_invertible(seq_now)

    def _to_merge(self, adapter_names: Optional[list[str]], warn: bool = True) -> list[str]:
        if warn:
            names = check_adapters_to_merge(self, adapter_names)
        else:
            names = [a for a in (adapter_names or self.active_adapters) if a not in self.merged_adapters]
        # Adapters that do not touch this layer are skipped, as in PEFT's LoRA.
        return [a for a in names if a in self.alore_B]

    def _check_finite(self, plan: list[tuple[nn.Parameter, torch.Tensor]], names: list[str]) -> None:
        if not all(torch.isfinite(w).all() for _, w in plan):
            raise ValueError(
                f"Merging adapter(s) {names} would put NaN or inf values into the weights of this "
                f"{type(self.get_base_layer()).__name__}; the weights were left untouched. Check the adapter for "
                "non-finite values."
            )

    def _write(self, plan: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        with torch.no_grad():
            for p, w in plan:
                p.copy_(w)  # in place: bumps the version counter (and so drops folded-weight caches)
        self._clear_cache()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into the consumer weights: ``W' = W (I + sum S) + sum P``.

        Merging more adapters later refolds the whole group from the original
        weight, so two calls give what one call with both gives.

        Args:
            safe_merge: Check the merged weights for NaN/inf before writing any;
                on failure raise and leave them untouched.
            adapter_names: Adapters to merge (default: the active ones).
        """
        names = self._to_merge(adapter_names)
        if not names:
            return
        plan = self.merge_plan(self.merged_adapters + names)
        if safe_merge:
            self._check_finite(plan, names)
        self._write(plan)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Undo every merge, restoring the consumer weights to float32 round-off (a float64 solve)."""
        if not self.merged:
            return
        self._write(self.merge_plan([]))
        self.merged_adapters.clear()

    # -- state changes drop the folded-weight cache ---------------------------
    def _clear_cache(self) -> None:
        self.__dict__["_fold_cache"] = None

    def train(self, mode: bool = True):
        self._clear_cache()
        return nn.Module.train(self, mode)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        self._clear_cache()
        super().set_adapter(adapter_names, inference_mode=inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        self._clear_cache()
        super().enable_adapters(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        self._clear_cache()
        self._fold_can_pay.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    # -- forward -----------------------------------------------------------
    # Every training step runs these once per adapted layer, and on a GPU the step waits on them: they read
    # the module's own dicts (``_modules``, ``_parameters``) instead of going through nn.Module attribute
    # lookup and ParameterDict/ModuleDict indexing, which cost microseconds each.
    def _active(self) -> list[str]:
        names = self._active_adapter
        factors = self._modules["alore_B"]._parameters
        if isinstance(names, str):
            return [names] if names in factors else []
        return [a for a in names if a in factors]

    def _path(self, active: list[str]) -> str:
        paths = self.compute_path
        if len(active) == 1:
            return paths[active[0]]
        chosen = {paths[a] for a in active}
        return "factored" if "factored" in chosen else "fold" if "fold" in chosen else "auto"

    def _dropout_active(self, active: list[str]) -> bool:
        if not self.training:
            return False
        dropouts = self._modules["alore_dropout"]._modules
        for a in active:
            if isinstance(dropouts[a], nn.Dropout):
                return True
        return False

    def _adapter_needs_grad(self, active: list[str]) -> bool:
        if not torch.is_grad_enabled():
            return False
        for a in active:
            A, B2, C2 = self._stored(a)
            if B2.requires_grad or C2.requires_grad or A.requires_grad:
                return True
        return False

    def _use_fold(self, active: list[str], x: torch.Tensor, dropout: Optional[bool] = None) -> bool:
        """Fold the adapters into the weights for this call, or run the factored path.

        ``dropout``: :meth:`_dropout_active`, when the caller already knows it.
        """
        path = self._path(active)
        if dropout is None:
            dropout = self._dropout_active(active)
        if path != "auto" or dropout:
            return path == "fold" and not dropout
        if torch.compiler.is_compiling():
            return False
        needs_grad = self._adapter_needs_grad(active)
        if needs_grad:
            for a in active:
                if self._fold_can_pay_for(a):
                    break
            else:
                return False  # the factored path is the cheaper at any number of tokens (the paper's sizes)
        elif not self.training and not torch.is_grad_enabled():
            return True  # cached across calls
        tokens = x.numel() // x.shape[self._feature_dim]
        rows = self._fold_rows()
        return all(
            functional.prefer_fold(tokens, self.in_dim, rows, self.num_experts[a], self.r[a], needs_grad, self.mode[a])
            for a in active
        )

    def _fold_can_pay_for(self, adapter_name: str) -> bool:
        """:func:`~alore_peft.functional.fold_can_pay` for this layer's adapter, worked out once."""
        gates = self._fold_can_pay
        gate = gates.get(adapter_name)
        if gate is None:
            n, r, mode = self.num_experts[adapter_name], self.r[adapter_name], self.mode[adapter_name]
            gate = gates[adapter_name] = functional.fold_can_pay(self.in_dim, self.out_dim, n, r, mode)
        return gate

    def _fold_rows(self) -> int:
        """Rows of the weights a fold builds (``d_out`` of a linear layer)."""
        return self.out_dim

    def _cache_key(self, active: list[str]) -> Optional[tuple]:
        """What the cached folded weights were built from, or ``None`` when they must not be cached.

        Runs on every cached eval-mode call: the tensors are read straight from
        the module dicts. An inference tensor (a model built or loaded under
        ``torch.inference_mode()``) has no version counter to tell an in-place
        write, so its layer folds afresh on every call instead.
        """
        tensors = [module._parameters[attr] for _, module, attr in self._consumer_slots()]
        for a in active:
            tensors.extend(self._stored(a))  # the stored tensors, not views
        built_from = []
        for t in tensors:
            if t.is_inference():
                return None
            built_from.append((id(t), t.data_ptr(), t._version, t.dtype))
        return tuple(active), tuple(self.scaling[a] for a in active), tuple(built_from)

    def folded_weights(self, active: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
        """``{consumer name: W (I + sum S) + sum P}`` for the active adapters (or ``active``).

        In eval mode with gradients off the result is cached until any of the
        tensors it was built from changes (see the module docstring).
        """
        active = self._active() if active is None else active
        cacheable = not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        key = self._cache_key(active) if cacheable else None
        if key is not None:
            cached = self._fold_cache
            if cached is not None and cached[0] == key:
                return cached[1]
        seq = [self._factors_and_scale(a) for a in active if self.mode[a] == "sequential"]
        par = [self._factors_and_scale(a) for a in active if self.mode[a] == "parallel"]
        weights = {name: functional.folded_weight(w, seq, par) for name, w in self.consumer_weights()}
        if key is not None:
            self.__dict__["_fold_cache"] = (key, weights)
        return weights

    def _adapt(
        self,
        x: torch.Tensor,
        name: str,
        base: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``base + s dW drop(x)`` along the feature axis (``x + s dW x`` when ``base`` is ``None``)."""
        A, B2, C2 = self._stored(name)  # the factor matrices, (n r, d_out / n) and (n r, d_in / n)
        dropout = self._modules["alore_dropout"]._modules[name]
        dropped = self.training and not isinstance(dropout, nn.Identity)
        h = dropout(x) if dropped else x
        residual = base is None and not dropped
        if base is None and dropped:
            base = x
        axis = self._feature_dim
        if axis != -1:
            h = h.movedim(axis, -1)  # (..., features)
            base = None if base is None else base.movedim(axis, -1)
        dtype, autocast = functional.call_dtype(h, B2)
        out = functional.apply_stored(h, self._mix(name, A, dtype), B2, C2, base, residual, dtype, autocast)
        if axis == -1:
            return out
        # Back to the input's layout: the wrapped convolution then runs as it would on its own input.
        out = out.movedim(-1, axis)
        return out.contiguous() if x.is_contiguous() else out

    def _sequential_input(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """``x + sum_a s_a dW_a x`` over the sequential adapters."""
        h = None
        for name in names:
            h = self._adapt(x, name, base=h)
        return x if h is None else h

    def _parallel_out(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + s dW x`` for a parallel adapter."""
        return self._adapt(x, name, base=result)

    def _call_base(self, h: torch.Tensor, key: Optional[str], args: tuple, kwargs: dict) -> Any:
        base = self._modules["base_layer"]
        if key is None:
            return base(h, *args[1:], **kwargs)
        return base(*args, **{**kwargs, key: h})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        active = [] if self.merged_adapters else self._active()
        if not active:
            return self.base_layer(*args, **kwargs)
        x, key = self._find_input(args, kwargs)
        dropout = self._dropout_active(active)
        if self._use_fold(active, x, dropout):
            return self._run_folded(self.folded_weights(active), args, kwargs)
        return self._factored(active, x, key, args, kwargs, dropout)

    def _factored(
        self, active: list[str], x: torch.Tensor, key: Optional[str], args: tuple, kwargs: dict, dropout: bool
    ) -> Any:
        """The wrapped module on ``x + sum S x``, plus ``sum P x``: ``dW`` never built (``dropout``: any active)."""
        modes = self.mode
        if len(active) == 1 and modes[active[0]] == "sequential":  # the common case, without the loops
            return self._call_base(self._adapt(x, active[0]), key, args, kwargs)
        h = self._sequential_input(x, [a for a in active if modes[a] == "sequential"])
        result = self._call_base(h, key, args, kwargs)
        for name in active:
            if modes[name] == "parallel":
                result = self._parallel_out(name, x, result)
        return result

    def __repr__(self) -> str:
        return "alore." + super().__repr__()


def check_divisible(n: int, mode: str, shape: tuple[int, int], where: str) -> None:
    """Raise the error a user sees when ``num_experts`` does not divide an update's shape."""
    d_out, d_in = shape
    if d_out % n or d_in % n:
        valid = functional.valid_num_experts(d_out, d_in)
        raise ValueError(
            f"num_experts={n} does not divide the dimensions of {where}: its {mode} ALoRE update is "
            f"{d_out} x {d_in}. Valid num_experts for it: {valid}. Pick one of these, or leave this module "
            "out with exclude_modules."
        )


class Linear(nn.Module, AloreLayer):
    """ALoRE around an ``nn.Linear``: features on the last axis."""

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str,
        config: AloreConfig,
        shared_rules: Optional[nn.ParameterDict] = None,
        module_name: str = "",
        rule_mixes: Optional[RuleMixes] = None,
    ) -> None:
        super().__init__()
        AloreLayer.__init__(self, base_layer, shared_rules, rule_mixes)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    @property
    def in_dim(self) -> int:
        return self.get_base_layer().in_features

    @property
    def out_dim(self) -> int:
        return self.get_base_layer().out_features

    # The wrapped layer's public sizes, as PEFT's layers and model code read them.
    in_features = in_dim
    out_features = out_dim

    def _run_folded(self, weights: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
        return nn.functional.linear(args[0], weights["weight"], self._modules["base_layer"]._parameters["bias"])

    def _factored(
        self, active: list[str], x: torch.Tensor, key: Optional[str], args: tuple, kwargs: dict, dropout: bool
    ) -> Any:
        # One adapter on a frozen nn.Linear: the layer and its adapter in one function (fewer operators).
        base = self._modules["base_layer"]
        if len(active) == 1 and type(base) is nn.Linear and not dropout:
            weight, bias = base._parameters["weight"], base._parameters["bias"]
            name = active[0]
            A, B2, C2 = self._stored(name)  # the factor matrices, (n r, d_out / n) and (n r, d_in / n)
            dtype, autocast = functional.call_dtype(x, B2)
            frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
            if frozen and (autocast or weight.dtype == dtype == x.dtype):
                sequential = self.mode[name] == "sequential"
                mix = self._mix(name, A, dtype)
                return functional.linear_stored(x, weight, bias, mix, B2, C2, sequential, dtype, autocast)
        return super()._factored(active, x, key, args, kwargs, dropout)

    # nn.Module comes first in the MRO, so its placeholders must be pointed at AloreLayer's.
    forward = AloreLayer.forward
    train = AloreLayer.train
    __repr__ = AloreLayer.__repr__


def _conv_attribute(name: str) -> property:
    return property(lambda self: getattr(self.get_base_layer(), name), doc=f"The wrapped convolution's ``{name}``.")


class Conv2d(nn.Module, AloreLayer):
    """ALoRE around an ``nn.Conv2d``: channels on axis 1.

    Sequential: the adapter mixes the input channels of every pixel, which
    folds exactly into every kernel tap (zero padding stays zero).
    Parallel: ``dW`` is ``(c_out, c_in * kh * kw)``, a kernel of the
    convolution's shape, always applied as a kernel: folded into the weight,
    one convolution per call (or, with dropout active, a second convolution on
    the dropped input). Sequential: folded likewise in inference; in training
    :func:`alore_peft.functional.prefer_fold` picks per call between folding
    (the convolution then forms its weight gradient) and mixing the channels of
    every pixel (cheaper where the pixels are few and the channels many).
    """

    _feature_dim = 1

    def __init__(
        self,
        base_layer: nn.Conv2d,
        adapter_name: str,
        config: AloreConfig,
        shared_rules: Optional[nn.ParameterDict] = None,
        module_name: str = "",
        rule_mixes: Optional[RuleMixes] = None,
    ) -> None:
        check_conv(base_layer, module_name)
        super().__init__()
        AloreLayer.__init__(self, base_layer, shared_rules, rule_mixes)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    @property
    def in_dim(self) -> int:
        return self.get_base_layer().in_channels

    @property
    def out_dim(self) -> int:
        return self.get_base_layer().out_channels

    @property
    def kernel_taps(self) -> int:
        kh, kw = self.get_base_layer().kernel_size
        return kh * kw

    in_features = in_dim
    out_features = out_dim
    in_channels = _conv_attribute("in_channels")
    out_channels = _conv_attribute("out_channels")
    kernel_size = _conv_attribute("kernel_size")
    stride = _conv_attribute("stride")
    padding = _conv_attribute("padding")
    dilation = _conv_attribute("dilation")
    groups = _conv_attribute("groups")
    padding_mode = _conv_attribute("padding_mode")

    def _run_folded(self, weights: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
        base = self._modules["base_layer"]
        return base._conv_forward(args[0], weights["weight"], base._parameters["bias"])

    def _use_fold(self, active: list[str], x: torch.Tensor, dropout: Optional[bool] = None) -> bool:
        path = self._path(active)
        if path == "factored" or (self._dropout_active(active) if dropout is None else dropout):
            return False
        if path == "fold" or any(self.mode[a] == "parallel" for a in active):
            return True  # a parallel update acts on kernel patches: it is always a kernel
        if not self._adapter_needs_grad(active):
            return True  # inference: one convolution (cached in eval mode)
        # Training a sequential adapter: folding makes the convolution form its weight gradient; mixing
        # the channels of every pixel costs per pixel. The cost model picks per call.
        tokens = x.numel() // x.shape[1]
        return all(
            functional.prefer_fold(tokens, self.in_dim, self.out_dim, self.num_experts[a], self.r[a], True,
                                   "sequential", self.kernel_taps, channels_first=True)
            for a in active
        )

    def _parallel_out(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # dW acts on kernel patches: a second convolution with dW as its kernel, no bias.
        base = self.get_base_layer()
        delta = self.get_delta_weight(name).to(base.weight.dtype).view(base.weight.shape)
        h = self.alore_dropout[name](x)
        return result + base._conv_forward(h, delta, None)

    forward = AloreLayer.forward
    train = AloreLayer.train
    __repr__ = AloreLayer.__repr__


def check_conv(conv: nn.Conv2d, module_name: str = "") -> None:
    """Raise the error a user sees for a grouped convolution target."""
    if conv.groups != 1:
        raise ValueError(
            f"ALoRE supports Conv2d with groups=1 only; module '{module_name}' has groups={conv.groups} "
            "(a depthwise or grouped convolution). Leave it out with exclude_modules or target a 1x1 / dense "
            "convolution instead."
        )


LAYER_TYPES: dict[type[nn.Module], type[AloreLayer]] = {nn.Linear: Linear, nn.Conv2d: Conv2d}
