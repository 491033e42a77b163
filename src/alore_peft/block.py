"""Block placement: one ALoRE adapter on the input of a container module.

The paper places one adapter in front of each block's attention (q, k and v
read the same normalised tokens, so they share it) and one in front of the
MLP. :class:`AloreBlock` wraps such a container (a ViT block's ``attention``
or ``mlp``) and runs ``container(x + s * dW x, *args, **kwargs)``.

Merging folds ``I + s * dW`` into every linear or convolution that reads the
container's input: ``W' = W (I + s dW)``. That is exact only if the input
reaches nothing else, so the container is traced first: it runs once under a
:class:`torch.overrides.TorchFunctionMode` that records every torch function
applied to the very input tensor. ``linear`` and ``conv2d`` calls that take it
as their input are the consumers; metadata reads (``shape``, ``dtype``, ...)
are harmless; anything else (a residual add, a norm, a reshape feeding an
attention kernel) makes the container unfoldable, and it is refused.

The trace runs at injection on a small random input when the container
accepts one alone; otherwise (e.g. a window attention that needs a whole
window of tokens) the tuner runs one dummy image through a transformers
vision model, or the first real forward pass does it. The first real forward
pass re-traces with the real arguments (not under ``torch.compile``).
Merging an untraced block is refused before any weight changes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.overrides import TorchFunctionMode

from . import functional as F
from .config import AloreConfig
from .layer import AloreLayer

__all__ = ["AloreBlock", "BlockTrace", "trace_container", "find_input", "INPUT_KWARGS"]

# Keyword names under which containers receive their input when it is not positional.
INPUT_KWARGS = ("hidden_states", "x", "input", "inputs", "features")

_METADATA_METHODS = [
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.ndimension,
    torch.Tensor.numel,
    torch.Tensor.nelement,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.is_contiguous,
    torch.Tensor.stride,
    torch.Tensor.element_size,
    torch.Tensor.get_device,
    torch.Tensor.__len__,
]
_METADATA_PROPERTIES = [
    "shape",
    "ndim",
    "dtype",
    "device",
    "requires_grad",
    "is_cuda",
    "is_meta",
    "is_sparse",
    "is_quantized",
    "layout",
    "is_leaf",
    "grad_fn",
]
# Property reads reach the mode as the getter (a method-wrapper, compared by ==).
_METADATA_FUNCS = _METADATA_METHODS + [getattr(torch.Tensor, name).__get__ for name in _METADATA_PROPERTIES]
_LINEAR_FUNCS = [torch.nn.functional.linear]
_CONV2D_FUNCS = [torch.nn.functional.conv2d, torch.conv2d]


def _contains(obj: Any, target: torch.Tensor) -> bool:
    """Whether ``target`` (by identity) is ``obj`` or sits in a list/tuple/dict inside it."""
    if obj is target:
        return True
    if isinstance(obj, (list, tuple)):
        return any(_contains(o, target) for o in obj)
    if isinstance(obj, dict):
        return any(_contains(o, target) for o in obj.values())
    return False


def _func_name(func: Any) -> str:
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and owner is not None:
        return f"Tensor.{getattr(owner, '__name__', owner)}"
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


class _InputUseRecorder(TorchFunctionMode):
    """Records every torch function call that receives the tensor ``x``."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = x
        self.uses: list[tuple[Any, tuple, dict, bool]] = []  # (func, args, kwargs, returned x itself)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _contains(args, self.x) or _contains(kwargs, self.x):
            self.uses.append((func, args, kwargs, out is self.x))
        return out


@dataclass
class BlockTrace:
    """What a container does with its input.

    Attributes:
        consumers: Names (relative to the container) of the weight parameters
            of the ``linear``/``conv2d`` calls that read the input, in call order,
            each once.
        kinds: ``"linear"`` or ``"conv2d"`` per consumer.
        problems: Why the adapter cannot be folded into the consumers; empty if
            it can.
        source: ``"probe"`` (a random input at injection) or ``"forward"`` (a
            real forward pass).
    """

    consumers: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    source: str = "probe"

    @property
    def foldable(self) -> bool:
        return bool(self.consumers) and not self.problems


def trace_container(
    container: nn.Module,
    x: torch.Tensor,
    args: tuple = (),
    kwargs: Optional[dict] = None,
    *,
    in_dim: int,
    feature_dim: int,
    source: str = "forward",
) -> tuple[Any, BlockTrace]:
    """Run ``container`` on ``x`` (its input) and find out what reads ``x``.

    Args:
        container: The module whose input the adapter transforms.
        x: Its input tensor, passed first and positionally unless one of
            ``kwargs`` already is ``x``.
        args: The other positional arguments.
        kwargs: Keyword arguments.
        in_dim: Width of the adapter: every consumer must read ``in_dim``
            features on ``feature_dim``.
        feature_dim: Axis of ``x`` the adapter acts on.
        source: Recorded in the returned trace.

    Returns:
        The container's output and the :class:`BlockTrace`.
    """
    kwargs = kwargs or {}
    names = {id(p): name for name, p in container.named_parameters(remove_duplicate=False)}
    recorder = _InputUseRecorder(x)
    with recorder:
        if any(v is x for v in kwargs.values()):
            out = container(*args, **kwargs)
        else:
            out = container(x, *args, **kwargs)

    trace = BlockTrace(source=source)
    for sub_name, sub in container.named_modules():
        if isinstance(sub, BaseTunerLayer):
            trace.problems.append(
                f"'{sub_name}' inside it is itself an adapter layer, so its weight is not a plain frozen weight"
            )
    axis = feature_dim % x.dim()
    for func, f_args, f_kwargs, returned_x in recorder.uses:
        if returned_x or any(func == m for m in _METADATA_FUNCS):
            continue  # reads metadata, or a no-op such as .contiguous() on a contiguous tensor
        is_linear = any(func is f for f in _LINEAR_FUNCS)
        is_conv = any(func is f for f in _CONV2D_FUNCS)
        inp = f_args[0] if f_args else f_kwargs.get("input")
        weight = f_args[1] if len(f_args) > 1 else f_kwargs.get("weight")
        if not (is_linear or is_conv) or inp is not x or weight is x:
            trace.problems.append(f"{_func_name(func)} is applied to it")
            continue
        kind = "linear" if is_linear else "conv2d"
        name = names.get(id(weight))
        if name is None:
            trace.problems.append(f"a {kind} reads it with a weight that is not a parameter of the container")
            continue
        expected_axis = x.dim() - 1 if is_linear else 1
        if axis != expected_axis:
            trace.problems.append(
                f"the {kind} with weight '{name}' reads axis {expected_axis} while the adapter acts on axis {axis}"
            )
            continue
        if is_conv:
            groups = f_args[6] if len(f_args) > 6 else f_kwargs.get("groups", 1)
            if groups != 1:
                trace.problems.append(f"the conv2d with weight '{name}' has groups={groups}")
                continue
        if weight.shape[1] != in_dim:
            trace.problems.append(f"the {kind} with weight '{name}' reads {weight.shape[1]} features, not {in_dim}")
            continue
        if name not in trace.consumers:
            trace.consumers.append(name)
            trace.kinds.append(kind)
    if not trace.consumers and not trace.problems:
        trace.problems.append("no linear or conv2d reads it")
    return out, trace


def find_input(args: tuple, kwargs: dict) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """The container's input and where it is.

    Returns:
        ``(x, None)`` for the first positional argument, ``(x, key)`` for a known
        keyword (``INPUT_KWARGS``), ``(None, None)`` if neither holds a tensor.
    """
    if args:
        return (args[0], None) if isinstance(args[0], torch.Tensor) else (None, None)
    for key in INPUT_KWARGS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key], key
    return None, None


def _candidate_layers(container: nn.Module) -> list[tuple[str, nn.Module]]:
    """The container's ``nn.Linear``/``nn.Conv2d`` layers, one per (kind, input width), in registration order.

    The first one the container's input fits sets the adapter's width and axis.
    """
    seen, found = set(), []
    for name, sub in container.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            key = (isinstance(sub, nn.Linear), _width_and_axis(sub)[0])
            if key not in seen:
                seen.add(key)
                found.append((name, sub))
    return found


def _width_and_axis(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, -1
    return layer.in_channels, 1


def _probe_input(layer: nn.Module) -> torch.Tensor:
    """A small random input of the width (and, for a conv, the spatial size) ``layer`` accepts."""
    gen = torch.Generator().manual_seed(0)
    width, _ = _width_and_axis(layer)
    if isinstance(layer, nn.Linear):
        x = torch.randn(1, 3, width, generator=gen)  # (batch, tokens, features)
    else:
        extent = max(d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size))
        size = 2 * max(extent, *layer.stride)
        x = torch.randn(1, width, size, size, generator=gen)  # (batch, channels, H, W)
    return x.to(device=layer.weight.device, dtype=layer.weight.dtype)


def _probe(container: nn.Module, layer: nn.Module) -> Optional[BlockTrace]:
    """Trace ``container`` on a random input sized for ``layer``; ``None`` if it does not run on it alone."""
    modes = [(m, m.training) for m in container.modules()]
    container.eval()  # no dropout, no running-statistics updates
    width, axis = _width_and_axis(layer)
    try:
        with torch.no_grad():
            _, trace = trace_container(container, _probe_input(layer), in_dim=width, feature_dim=axis, source="probe")
        return trace
    except Exception:  # needs other arguments or input shapes: traced at the first forward instead
        return None
    finally:
        for m, mode in modes:
            m.training = mode


class AloreBlock(nn.Module, AloreLayer):
    """A sequential ALoRE adapter on the input of a container module.

    ``forward(x, *args, **kwargs) = container(x + sum_a s_a dW_a x, *args, **kwargs)``
    with ``x`` the first positional argument (or the ``hidden_states`` keyword).
    One expert set serves every linear/conv inside that reads ``x``; merging
    folds it into all of them.

    The adapter's width and feature axis come from an ``nn.Linear`` (last
    axis) or ``nn.Conv2d`` (axis 1) in the container: the first whose input
    size the container accepts on a probe, else the first one. The trace
    checks that every consumer agrees.

    Args:
        base_layer: The container.
        adapter_name: Name of the first adapter.
        config: Its configuration; ``mode`` must be ``"sequential"``.
        shared_rules: The tuner's shared rule matrices.
        module_name: The container's name in the model, for error messages.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: AloreConfig,
        shared_rules: Optional[nn.ParameterDict] = None,
        module_name: str = "",
    ) -> None:
        _check_sequential(config, base_layer, module_name)
        candidates = _candidate_layers(base_layer)
        if not candidates:
            raise ValueError(
                f"Target module '{module_name}' is a {type(base_layer).__name__} with no torch.nn.Linear or "
                "torch.nn.Conv2d inside, so an ALoRE adapter on its input has nothing to be folded into. Target the "
                "container whose input feeds linear layers (e.g. an attention or MLP module), or a Linear directly."
            )
        # The adapter takes the width of the first layer whose input size the container accepts.
        (ref_name, ref), trace = candidates[0], None
        for name, layer in candidates:
            trace = _probe(base_layer, layer)
            if trace is not None:
                ref_name, ref = name, layer
                break
        super().__init__()
        AloreLayer.__init__(self, base_layer, shared_rules)
        self.module_name = module_name
        self._ref_name = ref_name
        self._in_dim, self._feature_dim = _width_and_axis(ref)
        self.trace: Optional[BlockTrace] = None
        self._warned_unfoldable = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)
        if trace is not None and not trace.foldable:
            raise ValueError(self._unfoldable_message(trace))
        self.trace = trace

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

    def update_layer(self, adapter_name: str, config: AloreConfig, module_name: str = "") -> None:
        _check_sequential(config, self.get_base_layer(), module_name or self.module_name)
        super().update_layer(adapter_name, config, module_name)

    # -- tracing -----------------------------------------------------------
    def _unfoldable_message(self, trace: BlockTrace) -> str:
        container = self.get_base_layer()
        prefix = f"{self.module_name}." if self.module_name else ""
        linears = [prefix + n for n, m in container.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        return (
            f"Cannot place an ALoRE adapter on the input of '{self.module_name}' "
            f"({type(container).__name__}): the adapter must be folded into the layers that read that input, but "
            f"{'; '.join(trace.problems)}. Target its input linear layers directly instead (e.g. target_modules="
            f"{linears[:3]} with mode='sequential', one adapter each), or a container whose input only reaches "
            "linear or conv layers."
        )

    def consumer_parameters(self) -> list[nn.Parameter]:
        """The weights the adapter folds into; raise a clear error if there are none to fold into safely."""
        if self.trace is None:
            raise ValueError(
                f"Cannot merge the ALoRE adapter on '{self.module_name}' ({type(self.get_base_layer()).__name__}) "
                "yet: it needs other arguments than a lone tensor, so the layers that read its input are found during "
                "a forward pass. Run one forward pass of the model first (e.g. on one batch under torch.no_grad()), "
                "or target the linear layers inside it instead. No weight was changed."
            )
        if not self.trace.foldable:
            raise ValueError(self._unfoldable_message(self.trace) + " No weight was changed.")
        container = self.get_base_layer()
        return [container.get_parameter(name) for name in self.trace.consumers]

    # -- merging -----------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into every consumer: ``W' = W (I + sum_a s_a dW_a)``.

        Args:
            safe_merge: Check the merged weights for NaN/inf before writing any;
                on failure raise and leave them untouched.
            adapter_names: Adapters to merge (default: the active ones).
        """
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.alore_B]
        if not adapter_names:
            return
        params = self.consumer_parameters()
        with torch.no_grad():
            seq, _ = self._group_deltas(adapter_names)
            merged = [F.merge_weight(p.data, seq) for p in params]
            if safe_merge and not all(torch.isfinite(m).all() for m in merged):
                raise ValueError(
                    f"Merging adapter(s) {adapter_names} into '{self.module_name}' would put NaN or inf values into "
                    "its weights; the weights were left untouched. Check the adapter for non-finite values."
                )
            for p, m in zip(params, merged):
                p.data.copy_(m)
        self.merged_adapters.extend(adapter_names)
        self._merge_groups.append(list(adapter_names))

    def unmerge(self) -> None:
        """Undo every merge, newest first: ``W = W' (I + S)^-1`` solved in float64."""
        if not self._merge_groups:
            return
        params = self.consumer_parameters()
        with torch.no_grad():
            while self._merge_groups:
                group = self._merge_groups[-1]
                seq, _ = self._group_deltas(group)
                for p in params:
                    p.data.copy_(F.unmerge_weight(p.data, seq))
                self._merge_groups.pop()
                for name in group:
                    self.merged_adapters.remove(name)

    # -- forward -----------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        container = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return container(*args, **kwargs)
        if self.merged:
            return container(*args, **kwargs)
        x, key = find_input(args, kwargs)
        if x is None:
            raise ValueError(
                f"The ALoRE block on '{self.module_name}' could not find its input tensor: pass it as the first "
                f"positional argument or as one of the keywords {INPUT_KWARGS}."
            )
        active = [a for a in self.active_adapters if a in self.alore_B]
        if active:
            if x.shape[self._feature_dim] != self._in_dim:
                raise ValueError(
                    f"The ALoRE adapter on '{self.module_name}' acts on {self._in_dim} features on axis "
                    f"{self._feature_dim} (the input width of its first layer, '{self._ref_name}'), but the container "
                    f"received a tensor of shape {tuple(x.shape)}. Target a container whose input that layer reads, "
                    "or its Linear layers directly."
                )
        h = self._with_sequential(x, active)
        if key is None:
            args = (h,) + args[1:]
        else:
            kwargs = {**kwargs, key: h}
        if (self.trace is not None and self.trace.source == "forward") or torch.compiler.is_compiling():
            return container(*args, **kwargs)
        # First forward: trace with the real arguments (confirms or replaces a probe's trace).
        out, trace = trace_container(
            container,
            h,
            args[1:] if key is None else args,
            kwargs,
            in_dim=self._in_dim,
            feature_dim=self._feature_dim,
        )
        self.trace = trace
        if not trace.foldable and not self._warned_unfoldable:
            self._warned_unfoldable = True
            warnings.warn(self._unfoldable_message(trace) + " Training works, but merging will be refused.")
        return out


def _check_sequential(config: AloreConfig, container: nn.Module, module_name: str) -> None:
    if config.mode != "sequential":
        raise ValueError(
            f"Target module '{module_name}' is a {type(container).__name__}, a container: ALoRE can adapt a "
            f"container only by transforming its input (mode='sequential'), but mode={config.mode!r}. Use "
            "mode='sequential', or target the torch.nn.Linear / torch.nn.Conv2d layers inside it for the parallel "
            "mode."
        )
