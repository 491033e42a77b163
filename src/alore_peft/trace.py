"""Which layers read a tensor: the tracer behind block placement.

An adapter on a container's input (:class:`alore_peft.block.AloreBlock`) is
folded into every linear or convolution that reads that input,
``W' = W (I + s dW)``. That is exact only if the input reaches nothing else,
so the container is traced: it runs once under a
:class:`torch.overrides.TorchFunctionMode` that records every torch function
applied to the very input tensor. ``linear`` and ``conv2d`` calls that take it
as their input are the consumers; metadata reads (``shape``, ``dtype``, ...)
are harmless; anything else (a residual add, a norm, a reshape feeding an
attention kernel) makes the container unfoldable.

The trace runs on a small random input sized for one of the container's
layers when the container accepts one alone (:func:`probe`), otherwise during
a real forward pass with the real arguments (:func:`trace_container`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "INPUT_KWARGS",
    "BlockTrace",
    "trace_container",
    "find_input",
    "candidate_layers",
    "width_and_axis",
    "probe",
    "ContainerProbe",
    "probe_container",
    "METADATA_FUNCS",
    "LINEAR_FUNCS",
    "CONV2D_FUNCS",
]

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
METADATA_FUNCS = _METADATA_METHODS + [getattr(torch.Tensor, name).__get__ for name in _METADATA_PROPERTIES]
LINEAR_FUNCS = [torch.nn.functional.linear]
CONV2D_FUNCS = [torch.nn.functional.conv2d, torch.conv2d]


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
        self.uses: list[tuple[Any, tuple, dict, bool]] = []  # (func, args, kwargs, returned x unchanged)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        version = self.x._version
        out = func(*args, **kwargs)
        if _contains(args, self.x) or _contains(kwargs, self.x):
            # A call that hands x back is a harmless no-op (.contiguous() on a contiguous tensor), unless it
            # wrote into x (an in-place op bumps its version counter).
            self.uses.append((func, args, kwargs, out is self.x and self.x._version == version))
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
    if x.is_inference():
        # An inference tensor (a first forward under torch.inference_mode) has no version counter, which the
        # recorder reads to tell a no-op from an in-place write: trace on a normal tensor with the same values.
        with torch.inference_mode(False):
            normal = x.clone()
        kwargs = {k: normal if v is x else v for k, v in kwargs.items()}
        x = normal
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
        if returned_x or any(func == m for m in METADATA_FUNCS):
            continue  # reads metadata, or a no-op such as .contiguous() on a contiguous tensor
        is_linear = any(func is f for f in LINEAR_FUNCS)
        is_conv = any(func is f for f in CONV2D_FUNCS)
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


def candidate_layers(container: nn.Module) -> list[tuple[str, nn.Module]]:
    """The container's ``nn.Linear``/``nn.Conv2d`` layers, one per (kind, input width), in registration order.

    The first one the container's input fits sets the adapter's width and axis.
    """
    seen, found = set(), []
    for name, sub in container.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            key = (isinstance(sub, nn.Linear), width_and_axis(sub)[0])
            if key not in seen:
                seen.add(key)
                found.append((name, sub))
    return found


def width_and_axis(layer: nn.Module) -> tuple[int, int]:
    """``(input width, feature axis)`` of a ``nn.Linear`` (last axis) or ``nn.Conv2d`` (axis 1)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, -1
    return layer.in_channels, 1


def probe_input(layer: nn.Module) -> torch.Tensor:
    """A small random input of the width (and, for a conv, the spatial size) ``layer`` accepts."""
    gen = torch.Generator().manual_seed(0)
    width, _ = width_and_axis(layer)
    if isinstance(layer, nn.Linear):
        x = torch.randn(1, 3, width, generator=gen)  # (batch, tokens, features)
    else:
        extent = max(d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size))
        size = 2 * max(extent, *layer.stride)
        x = torch.randn(1, width, size, size, generator=gen)  # (batch, channels, H, W)
    return x.to(device=layer.weight.device, dtype=layer.weight.dtype)


def probe(container: nn.Module, layer: nn.Module) -> Optional[BlockTrace]:
    """Trace ``container`` on a random input sized for ``layer``; ``None`` if it does not run on it alone."""
    modes = [(m, m.training) for m in container.modules()]
    container.eval()  # no dropout, no running-statistics updates
    width, axis = width_and_axis(layer)
    try:
        with torch.no_grad():
            _, trace = trace_container(container, probe_input(layer), in_dim=width, feature_dim=axis, source="probe")
        return trace
    except Exception:  # needs other arguments or input shapes: traced at the first forward instead
        return None
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class ContainerProbe:
    """Where an adapter on a container's input sits, as found before any forward pass.

    Attributes:
        ref_name: The layer (relative to the container) whose input width the adapter takes.
        in_dim: That width.
        feature_dim: The axis the adapter acts on (-1 for linear layers, 1 for convolutions).
        trace: The probe's trace, or ``None`` when the container needs more than a
            lone tensor to run (it is then traced during the first forward pass).
    """

    ref_name: str
    in_dim: int
    feature_dim: int
    trace: Optional[BlockTrace]


def probe_container(container: nn.Module) -> Optional[ContainerProbe]:
    """Pick the adapter's width from the first layer whose input the container accepts alone.

    When it accepts none alone (it needs other arguments), the width most of its
    layers read is taken.

    Returns ``None`` if the container has no ``nn.Linear``/``nn.Conv2d`` inside.
    Runs the container in eval mode without gradients and restores every
    module's train/eval flag.
    """
    candidates = candidate_layers(container)
    if not candidates:
        return None
    for name, layer in candidates:
        trace = probe(container, layer)
        if trace is not None:
            return ContainerProbe(name, *width_and_axis(layer), trace)
    # No probe ran: take the input width most of its layers read (a small helper network inside, such as a
    # position-bias MLP, must not set it); the first real forward pass checks it.
    counts: dict[tuple[bool, int], int] = {}
    for _, sub in container.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            key = (isinstance(sub, nn.Linear), width_and_axis(sub)[0])
            counts[key] = counts.get(key, 0) + 1
    name, layer = max(candidates, key=lambda c: counts[(isinstance(c[1], nn.Linear), width_and_axis(c[1])[0])])
    return ContainerProbe(name, *width_and_axis(layer), None)
