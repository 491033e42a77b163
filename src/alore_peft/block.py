"""Block placement: one ALoRE adapter on the input of a container module.

The paper places one adapter in front of each block's attention (q, k and v
read the same normalised tokens, so they share it) and one in front of the
MLP. :class:`AloreBlock` wraps such a container (a ViT block's ``attention``
or ``mlp``) and runs ``container(x + s * dW x, *args, **kwargs)``.

Merging folds ``I + s * dW`` into every linear or convolution that reads the
container's input: ``W' = W (I + s dW)``. That is exact only if the input
reaches nothing else, so the container is traced (:mod:`alore_peft.trace`):
at injection on a small random input when the container accepts one alone;
otherwise (e.g. a window attention that needs a whole window of tokens) the
tuner runs one dummy image through a transformers vision model, or the first
real forward pass does it. The first real forward pass re-traces with the
real arguments (not under ``torch.compile``). Merging an untraced block is
refused before any weight changes.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from .config import AloreConfig
from .layer import AloreLayer, RuleMixes
from .trace import INPUT_KWARGS, BlockTrace, ContainerProbe, find_input, probe_container, trace_container

__all__ = ["AloreBlock", "probe_block"]


def probe_block(container: nn.Module, module_name: str = "") -> ContainerProbe:
    """Where an adapter on ``container``'s input would sit; raise a clear error if it cannot.

    Raises:
        ValueError: if the container has no linear/conv layer, or its probe
            trace shows the input reaches something the adapter cannot fold into.
    """
    found = probe_container(container)
    if found is None:
        raise ValueError(
            f"Target module '{module_name}' is a {type(container).__name__} with no torch.nn.Linear or "
            "torch.nn.Conv2d inside, so an ALoRE adapter on its input has nothing to be folded into. Target the "
            "container whose input feeds linear layers (e.g. an attention or MLP module), or a Linear directly."
        )
    if found.trace is not None and not found.trace.foldable:
        raise ValueError(unfoldable_message(container, module_name, found.trace))
    return found


def unfoldable_message(container: nn.Module, module_name: str, trace: BlockTrace) -> str:
    """Why an adapter on ``container``'s input cannot be folded, and what to target instead."""
    prefix = f"{module_name}." if module_name else ""
    linears = [prefix + n for n, m in container.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return (
        f"Cannot place an ALoRE adapter on the input of '{module_name}' "
        f"({type(container).__name__}): the adapter must be folded into the layers that read that input, but "
        f"{'; '.join(trace.problems)}. Target its input linear layers directly instead (e.g. target_modules="
        f"{linears[:3]} with mode='sequential', one adapter each), or a container whose input only reaches "
        "linear or conv layers."
    )


class AloreBlock(nn.Module, AloreLayer):
    """A sequential ALoRE adapter on the input of a container module.

    ``forward(x, *args, **kwargs) = container(x + sum_a s_a dW_a x, *args, **kwargs)``
    with ``x`` the first positional argument (or the ``hidden_states`` keyword).
    One expert set serves every linear/conv inside that reads ``x``; merging
    folds it into all of them.

    The adapter's width and feature axis come from an ``nn.Linear`` (last
    axis) or ``nn.Conv2d`` (axis 1) in the container: the first whose input
    size the container accepts on a probe, else the first one. The trace
    checks that every consumer agrees. Attributes the container has (e.g. a
    ``num_heads`` that model code reads) are readable on the block.

    Args:
        base_layer: The container.
        adapter_name: Name of the first adapter.
        config: Its configuration; ``mode`` must be ``"sequential"``.
        shared_rules: The tuner's shared rule matrices.
        module_name: The container's name in the model, for error messages.
        probed: The container's probe, if already taken (:func:`probe_block`).
        rule_mixes: The tuner's per-forward rule mixes (:class:`alore_peft.layer.RuleMixes`).
    """

    modes = ("sequential",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: AloreConfig,
        shared_rules: Optional[nn.ParameterDict] = None,
        module_name: str = "",
        probed: Optional[ContainerProbe] = None,
        rule_mixes: Optional[RuleMixes] = None,
    ) -> None:
        check_block_mode(config, base_layer, module_name)
        probed = probed or probe_block(base_layer, module_name)
        super().__init__()
        AloreLayer.__init__(self, base_layer, shared_rules, rule_mixes)
        self.module_name = module_name
        self._ref_name = probed.ref_name
        self._in_dim, self._feature_dim = probed.in_dim, probed.feature_dim
        self.trace: Optional[BlockTrace] = probed.trace
        self._warned_unfoldable = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            container = self.__dict__.get("_modules", {}).get("base_layer")
            if container is None or name.startswith("_"):
                raise
            return getattr(container, name)

    # -- sizes -------------------------------------------------------------
    @property
    def in_dim(self) -> int:
        return self._in_dim

    @property
    def out_dim(self) -> int:
        # The adapter maps the container's input to itself.
        return self._in_dim

    def _get_base_layer_device_and_dtype(self, base_layer):
        # A container has no weight of its own: follow the layer that sets the width.
        return super()._get_base_layer_device_and_dtype(self.get_base_layer().get_submodule(self._ref_name))

    def check_config(self, config: AloreConfig, module_name: str = "") -> None:
        check_block_mode(config, self.get_base_layer(), module_name or self.module_name)
        super().check_config(config, module_name or self.module_name)

    # -- what the adapter folds into -------------------------------------------
    def unfoldable_message(self, trace: BlockTrace) -> str:
        return unfoldable_message(self.get_base_layer(), self.module_name, trace)

    def consumer_weights(self) -> list[tuple[str, nn.Parameter]]:
        """The weights the adapter folds into; raise a clear error if there are none to fold into safely."""
        if self.trace is None:
            raise ValueError(
                f"Cannot merge the ALoRE adapter on '{self.module_name}' ({type(self.get_base_layer()).__name__}) "
                "yet: it needs other arguments than a lone tensor, so the layers that read its input are found during "
                "a forward pass. Run one forward pass of the model first (e.g. on one batch under torch.no_grad()), "
                "or target the linear layers inside it instead. No weight was changed."
            )
        if not self.trace.foldable:
            raise ValueError(self.unfoldable_message(self.trace) + " No weight was changed.")
        return super().consumer_weights()

    def _consumer_slots(self) -> list[tuple[str, nn.Module, str]]:
        container = self._modules["base_layer"]
        slots = []
        for name in self.trace.consumers:  # names of parameters of the container, e.g. "q_proj.weight"
            path, _, attr = name.rpartition(".")
            module = container
            for part in path.split(".") if path else ():
                module = module._modules[part]
            slots.append((name, module, attr))
        return slots

    def _run_folded(self, weights: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        container = self._modules["base_layer"]
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return torch.func.functional_call(container, weights, args, kwargs, strict=False)
        # Inference: swap the folded weights in for the call and back, without functional_call's
        # per-call walk over every submodule (it cost more than the block's own matmuls on short inputs).
        swapped = []
        try:
            for name, module, attr in self._consumer_slots():
                swapped.append((module, attr, module._parameters[attr]))
                module._parameters[attr] = weights[name]
            return container(*args, **kwargs)
        finally:
            for module, attr, param in reversed(swapped):
                module._parameters[attr] = param

    # -- forward -----------------------------------------------------------
    def _find_input(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Optional[str]]:
        x, key = find_input(args, kwargs)
        if x is None:
            raise ValueError(
                f"The ALoRE block on '{self.module_name}' could not find its input tensor: pass it as the first "
                f"positional argument or as one of the keywords {INPUT_KWARGS}."
            )
        if x.shape[self._feature_dim] != self._in_dim:
            raise ValueError(
                f"The ALoRE adapter on '{self.module_name}' acts on {self._in_dim} features on axis "
                f"{self._feature_dim} (the input width of its first layer, '{self._ref_name}'), but the container "
                f"received a tensor of shape {tuple(x.shape)}. Target a container whose input that layer reads, "
                "or its Linear layers directly."
            )
        return x, key

    def _use_fold(self, active: list[str], x: torch.Tensor, dropout: Optional[bool] = None) -> bool:
        # Folding needs the consumers, and replaces them for the whole call: only when the trace allows it.
        if self.trace is None or not self.trace.foldable:
            return False
        if self.training and not torch.is_grad_enabled() and self._path(active) == "auto":
            return False  # train-mode calls without gradients run the factored path
        return super()._use_fold(active, x, dropout)

    def _fold_rows(self) -> int:
        # Every consumer's rows (times its kernel taps): the fold builds all their weights.
        return sum(
            (w := module._parameters[attr]).numel() // w.shape[1] for _, module, attr in self._consumer_slots()
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        needs_trace = self.trace is None or self.trace.source != "forward"
        if not needs_trace or self.disable_adapters or self.merged or torch.compiler.is_compiling():
            return AloreLayer.forward(self, *args, **kwargs)
        active = self._active()
        if not active:
            return AloreLayer.forward(self, *args, **kwargs)
        # First forward with adapters: trace with the real arguments (confirms or replaces a probe's trace).
        x, key = self._find_input(args, kwargs)
        h = self._sequential_input(x, [a for a in active if self.mode[a] == "sequential"])
        out, trace = trace_container(
            self.get_base_layer(),
            h,
            args[1:] if key is None else args,
            kwargs if key is None else {**kwargs, key: h},
            in_dim=self._in_dim,
            feature_dim=self._feature_dim,
        )
        self.trace = trace
        self._clear_cache()
        if not trace.foldable and not self._warned_unfoldable:
            self._warned_unfoldable = True
            warnings.warn(self.unfoldable_message(trace) + " Training works, but merging will be refused.")
        return out

    train = AloreLayer.train
    __repr__ = AloreLayer.__repr__


def check_block_mode(config: AloreConfig, container: nn.Module, module_name: str) -> None:
    """Refuse a container target in parallel mode, with the way out."""
    if config.mode != "sequential":
        raise ValueError(
            f"Target module '{module_name}' is a {type(container).__name__}, a container: ALoRE can adapt a "
            f"container only by transforming its input (mode='sequential'), but mode={config.mode!r}. Use "
            "mode='sequential', or target the torch.nn.Linear / torch.nn.Conv2d layers inside it for the parallel "
            "mode."
        )
