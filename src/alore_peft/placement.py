"""The paper's placement, found by tracing one forward pass of the model.

ALoRE puts one sequential adapter on each tensor that feeds an attention's
projections (q, k and v read it) and one on each tensor that feeds an MLP's
expansion (fc1, or gate and up). :func:`find_placement` finds those tensors
on any model from what it computes, not from module names:

1. **Trace.** One forward pass on an example input runs under a
   :class:`torch.overrides.TorchFunctionMode` that records every torch
   function call (its tensor arguments and results, by identity) and, with
   module hooks, which module call each one happens in and what tensor each
   module received.
2. **Group.** The ``linear``/``conv2d`` calls whose weight is a parameter are
   grouped by their input tensor: one group per tensor, its *consumers*.
3. **Classify** each group (first match wins):

   - ``attention``: a consumer's output reaches a softmax or
     ``scaled_dot_product_attention`` before any other linear layer (q/k/v, a
     fused qkv, or a kv projection);
   - ``mlp``: linear consumers that all widen the features (fc1; gate and up);
   - ``pointwise``: 1x1 convolutions (``groups=1``) that all widen the
     channels (the expansion of an inverted or bottleneck residual block);
   - otherwise not adapted: contractions (fc2, output projections), ``k x k``
     convolutions, and any consumer of the model input (stem or patch
     embedding) or of a constant (a position-bias table).

4. **Scope.** Only groups inside the backbone's repeated blocks are adapted:
   modules under an ``nn.ModuleList`` (the layers, stages or blocks of an
   encoder) inside the model's backbone: the transformers backbone it holds
   (a ``BackboneMixin`` module, as in UperNet, DPT, Mask2Former or DETR), or
   else its ``base_model`` (``vit`` in ``ViTForImageClassification``). Stems,
   poolers, necks, decode and detection heads are left alone.
5. **Place.** For each adapted tensor, the smallest module whose call
   received exactly that tensor and inside which nothing but the group's
   consumers reads it becomes a *block* target (``AloreBlock``: one adapter
   shared by q, k and v); the merge ``W' = W (I + s dW)`` into each consumer
   is then exact. If no module qualifies (the tensor also feeds a reshape or
   a norm inside every candidate), each consumer layer is targeted itself
   (one sequential adapter per layer, still exact). A consumer whose weight is
   also used elsewhere (tied, normalised at every call) cannot absorb an
   adapter, and its group is skipped with the reason.

The result's :attr:`Placement.targets` can be passed as
``AloreConfig(target_modules=...)``; ``print(placement)`` explains every
choice.
"""

from __future__ import annotations

import inspect
import re
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .trace import CONV2D_FUNCS, LINEAR_FUNCS, METADATA_FUNCS, find_input, probe_container

__all__ = ["Site", "Skipped", "Placement", "find_placement", "example_inputs", "PlacementError", "KINDS"]

KINDS = ("attention", "mlp", "pointwise", "conv")

# A consumer's output that reaches one of these (before another linear/conv) is an attention projection.
_ATTENTION_FUNCS = {"softmax", "_softmax", "scaled_dot_product_attention", "flex_attention"}
_ATTENTION_DEPTH = 16  # ops between a projection and its softmax (reshapes, rotary, scaling, masks)
# A linear whose output goes through one of these before the next layer or norm is an MLP's first layer.
_ACTIVATIONS = {
    "gelu", "relu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "mish", "elu", "leaky_relu", "relu6",
    "hardtanh", "softplus", "glu", "selu", "celu", "relu_", "silu_", "gelu_",
}
_GATES = {"sigmoid", "hardsigmoid", "sigmoid_", "hardsigmoid_"}
_NORMS = frozenset({"layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm", "normalize"})
_ACTIVATION_DEPTH = 6


class PlacementError(ValueError):
    """The model cannot be traced (no example input, or its forward pass fails)."""


# -- results ------------------------------------------------------------------------------


@dataclass
class Site:
    """One adapted tensor.

    Attributes:
        target: Module name to put in ``target_modules``.
        placement: ``"block"`` (the target is a container: one adapter on its
            input, shared by every consumer) or ``"layer"`` (the target is the
            consumer ``Linear``/``Conv2d`` itself).
        kind: ``"attention"``, ``"mlp"`` or ``"pointwise"``.
        consumers: Names of the layers that read the tensor (folded into on merge).
        width: Features the adapter acts on.
        why: Why this module was chosen, in words.
    """

    target: str
    placement: str
    kind: str
    consumers: list[str]
    width: int
    why: str


@dataclass
class Skipped:
    """A tensor read by linear/conv layers that gets no adapter, and why."""

    consumers: list[str]
    kind: str
    reason: str


@dataclass
class Placement:
    """The traced placement of a model.

    Attributes:
        sites: The adapted tensors, in forward order.
        skipped: Tensors read by linear/conv layers that are not adapted.
        scope: Module names the placement was restricted to (``[""]``: the whole model).
        model_class: Class name of the traced model.
    """

    sites: list[Site] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    scope: list[str] = field(default_factory=lambda: [""])
    model_class: str = ""
    _all_names: tuple[str, ...] = field(default=(), repr=False)

    @property
    def target_names(self) -> list[str]:
        """The full names of the target modules, in forward order."""
        return [s.target for s in self.sites]

    @property
    def targets(self) -> Union[list[str], str]:
        """``target_modules`` for :class:`~alore_peft.AloreConfig`.

        A regex (block indices replaced by ``\\d+``) when one matches exactly these
        modules among all the model's module names, else the list of full names.
        """
        names = self.target_names
        if not names:
            return []
        regex = _compress(names)
        if regex is not None and self._all_names:
            matched = {n for n in self._all_names if re.fullmatch(regex, n)}
            if matched == set(names):
                return regex
        return list(names)

    def counts(self) -> dict[str, int]:
        """Sites per kind."""
        out: dict[str, int] = defaultdict(int)
        for s in self.sites:
            out[s.kind] += 1
        return dict(out)

    def table(self) -> str:
        """A plain-text table of the sites and skipped groups, for people."""
        scope = ", ".join(s or "<whole model>" for s in self.scope)
        lines = [f"ALoRE placement of {self.model_class} (scope: {scope})"]
        if not self.sites:
            lines.append("  no tensor qualifies: nothing is adapted")
        width = max((len(s.target) for s in self.sites), default=6)
        for s in self.sites:
            consumers = ", ".join(_relative(c, s.target) for c in s.consumers)
            lines.append(f"  {s.target:<{width}}  {s.kind:<9}  {s.placement:<5}  d={s.width:<5}  -> {consumers}")
            lines.append(f"  {'':<{width}}  {s.why}")
        if self.skipped:
            lines.append(f"  not adapted ({len(self.skipped)} input tensors):")
            for k in self.skipped:
                lines.append(f"    {', '.join(k.consumers[:3])}{', ...' if len(k.consumers) > 3 else ''}: {k.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def _compress(names: list[str]) -> Optional[str]:
    """One regex for ``names``: numeric parts become ``\\d+``, the parts that differ an alternation."""
    patterns: list[list[str]] = []
    for name in names:
        parts = [r"\d+" if p.isdigit() else re.escape(p) for p in name.split(".")]
        if parts not in patterns:
            patterns.append(parts)
    if len(patterns) == 1:
        return r"\.".join(patterns[0])
    head = 0
    while all(len(p) > head for p in patterns) and len({p[head] for p in patterns}) == 1:
        head += 1
    tail = 0
    while all(len(p) > head + tail for p in patterns) and len({p[-1 - tail] for p in patterns}) == 1:
        tail += 1
    middles = list(dict.fromkeys(r"\.".join(p[head : len(p) - tail]) for p in patterns))
    if any(not m for m in middles):
        return None
    suffix = patterns[0][len(patterns[0]) - tail :] if tail else []
    parts = patterns[0][:head] + ["(" + "|".join(middles) + ")"] + suffix
    return r"\.".join(parts)


# -- example input --------------------------------------------------------------------------


def _vision_config(config: Any) -> Any:
    for name in ("vision_config", "backbone_config"):
        sub = getattr(config, name, None)
        if sub is not None and getattr(config, "image_size", None) is None:
            return sub
    return config


def example_inputs(model: nn.Module, batch_size: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """One random input batch built from the model's config.

    Images: ``pixel_values`` (or ``inputs`` for Perceiver) of ``num_channels`` x
    ``image_size`` from the model's config (or its ``vision_config``);
    patch-sequence models (SigLIP 2) get ``num_patches`` flattened patches with
    ``spatial_shapes`` and ``pixel_attention_mask``.

    Raises:
        PlacementError: The config does not say what the model reads.
    """
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    what = type(model).__name__
    if config is None or main not in ("pixel_values", "inputs"):
        raise PlacementError(
            f"Cannot build an example input for {what}: it reads {main!r}, not an image described by a transformers "
            "config (pixel_values of num_channels x image_size). Pass example_inputs= (a dict of keyword arguments "
            "for one forward pass), or name the modules to adapt in AloreConfig(target_modules=...)."
        )
    vision = _vision_config(config)
    channels = getattr(vision, "num_channels", None) or getattr(config, "num_channels", None) or 3
    size = getattr(vision, "image_size", None) or getattr(config, "image_size", None)
    if size is None:
        raise PlacementError(
            f"Cannot build an example input for {what}: its config has no image_size. Pass example_inputs="
            "{'pixel_values': a (1, channels, height, width) tensor}, or set model.config.image_size."
        )
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    params = _forward_parameters(model)
    if "spatial_shapes" in params and "pixel_attention_mask" in params:
        # A sequence of flattened patches: (batch, patches, channels * patch * patch).
        patch = getattr(vision, "patch_size", 16)
        patches = getattr(vision, "num_patches", (height // patch) * (width // patch))
        side = int(patches**0.5)
        pixels = torch.randn(batch_size, side * side, channels * patch * patch, generator=gen)
        return {
            "pixel_values": pixels.to(device=device, dtype=dtype),
            "spatial_shapes": torch.tensor([[side, side]] * batch_size, device=device),
            "pixel_attention_mask": torch.ones(batch_size, side * side, dtype=torch.long, device=device),
        }
    pixels = torch.randn(batch_size, channels, height, width, generator=gen)  # (B, C, H, W)
    return {main: pixels.to(device=device, dtype=dtype)}


def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


# -- tracing ---------------------------------------------------------------------------------


def _flat_tensors(obj: Any, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _flat_tensors(o, out)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            _flat_tensors(o, out)
    return out


def _func_name(func: Any) -> str:
    return getattr(func, "__name__", None) or repr(func)


@dataclass
class _Call:
    index: int
    name: str
    inputs: tuple[int, ...]  # nodes of every tensor argument
    outputs: tuple[int, ...]
    metadata: bool = False
    noop: bool = False  # returned one of its inputs unchanged (not an in-place op)
    # linear / conv2d with a parameter weight
    kind: Optional[str] = None
    x: Optional[int] = None
    x_shape: tuple[int, ...] = ()
    weight: Optional[str] = None  # parameter name
    weight_shape: tuple[int, ...] = ()
    groups: int = 1


class _Recorder(TorchFunctionMode):
    """Records every torch function call: its tensor arguments and results, by identity."""

    def __init__(self, param_names: dict[int, str]) -> None:
        super().__init__()
        self.param_names = param_names
        self.calls: list[_Call] = []
        self._nodes: dict[int, tuple[weakref.ref, int]] = {}
        self._next = 0
        self._keep: list[torch.Tensor] = []  # tensors without weakref support

    def node(self, t: torch.Tensor) -> int:
        entry = self._nodes.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        node, self._next = self._next, self._next + 1
        try:
            ref = weakref.ref(t)
        except TypeError:
            self._keep.append(t)
            ref = lambda t=t: t  # noqa: E731 - a strong reference for the rare tensor without weakrefs
        self._nodes[id(t)] = (ref, node)
        return node

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        in_tensors = _flat_tensors(args, []) + _flat_tensors(kwargs, [])
        versions = [t._version for t in in_tensors]  # bumped by in-place writes (add_, x[...] = y, out=)
        out = func(*args, **kwargs)
        out_tensors = _flat_tensors(out, [])
        name = _func_name(func)
        call = _Call(
            index=len(self.calls),
            name=name,
            inputs=tuple(self.node(t) for t in in_tensors),
            outputs=tuple(self.node(t) for t in out_tensors),
        )
        if any(func == m for m in METADATA_FUNCS):
            call.metadata = True
        elif any(o is i for o in out_tensors for i in in_tensors) and all(
            t._version == v for t, v in zip(in_tensors, versions)
        ):
            call.noop = True  # e.g. .contiguous() on a contiguous tensor; an in-place write is a real use
        is_linear = any(func is f for f in LINEAR_FUNCS)
        is_conv = any(func is f for f in CONV2D_FUNCS)
        if is_linear or is_conv:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor):
                call.kind = "linear" if is_linear else "conv2d"
                call.x, call.x_shape = self.node(x), tuple(x.shape)
                call.weight = self.param_names.get(id(w))
                call.weight_shape = tuple(w.shape)
                if is_conv:
                    call.groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        self.calls.append(call)
        return out


@dataclass
class _ModuleCall:
    name: str
    start: int
    end: int = -1
    x: Optional[int] = None


def _trace(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[_Recorder, list[_ModuleCall], set[int]]:
    param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    recorder = _Recorder(param_names)
    module_calls: list[_ModuleCall] = []
    open_calls: dict[int, list[_ModuleCall]] = defaultdict(list)
    handles = []

    def pre_hook(name):
        def hook(module, args, kwargs):
            x, _ = find_input(tuple(args), dict(kwargs))
            call = _ModuleCall(name, start=len(recorder.calls), x=recorder.node(x) if x is not None else None)
            module_calls.append(call)
            open_calls[id(module)].append(call)

        return hook

    def post_hook(module, args, output):
        stack = open_calls[id(module)]
        if stack:
            stack.pop().end = len(recorder.calls)

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook))
    # The image: floating-point inputs (token ids, masks and shapes are integers).
    roots = [recorder.node(t) for t in _flat_tensors(dict(inputs), []) if t.is_floating_point()]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings(), recorder:
            warnings.simplefilter("ignore")
            model(**inputs)
    except Exception as exc:
        raise PlacementError(
            f"The forward pass of {type(model).__name__} on the example input failed ({type(exc).__name__}: {exc}); "
            "pass example_inputs= that the model accepts, or name the modules to adapt in "
            "AloreConfig(target_modules=...)."
        ) from exc
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return recorder, [c for c in module_calls if c.end >= 0], set(roots)


# -- analysis --------------------------------------------------------------------------------


def _backbone_scope(model: nn.Module) -> list[str]:
    """Where adapters may go: the transformers backbones inside ``model``, else its base model.

    A model built on a backbone (UperNet, DPT, Mask2Former, DETR...) holds it as a
    ``BackboneMixin`` module: only that is adapted, not the neck or heads around it.
    Otherwise transformers' ``base_model`` (e.g. ``vit`` inside
    ``ViTForImageClassification``, ``segformer`` inside the segmentation model)
    excludes the task head. ``[""]``: the whole model.
    """
    backbone_cls = _backbone_mixin()
    if backbone_cls is not None and not isinstance(model, backbone_cls):
        names = [n for n, m in model.named_modules() if n and isinstance(m, backbone_cls)]
        outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
        if outer:
            return outer
    base = getattr(model, "base_model", model)
    if isinstance(base, nn.Module) and base is not model:
        name = next((n for n, m in model.named_modules() if m is base), "")
        return [name]
    return [""]


def _backbone_mixin() -> Optional[type]:
    try:
        from transformers.backbone_utils import BackboneMixin
    except ImportError:  # transformers before the module moved
        try:
            from transformers.utils.backbone_utils import BackboneMixin
        except ImportError:
            return None
    return BackboneMixin


def _within(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


class _Analysis:
    def __init__(self, model: nn.Module, recorder: _Recorder, module_calls: list[_ModuleCall], roots: set[int]):
        self.model = model
        self.calls = recorder.calls
        self.module_calls = module_calls
        self.roots = roots
        self.modules = dict(model.named_modules())
        self.users: dict[int, list[int]] = defaultdict(list)  # node -> calls that take it (not metadata, not no-ops)
        for call in self.calls:
            if call.metadata or call.noop:
                continue
            for node in set(call.inputs):
                self.users[node].append(call.index)
        self.derived = self._input_derived()
        # parameter name -> calls that take it; tied parameters share their calls
        self.weight_uses: dict[str, list[int]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.weight_uses[name] = self.users.get(recorder.node(p), [])
        self.calls_of: dict[str, list[_ModuleCall]] = defaultdict(list)
        for mc in module_calls:
            self.calls_of[mc.name].append(mc)
        self.block_roots = {
            f"{parent}.{child}" if parent else child
            for parent, module in self.modules.items()
            if isinstance(module, nn.ModuleList)
            for child, _ in module.named_children()
        }

    def _input_derived(self) -> set[int]:
        derived = set(self.roots)
        for call in self.calls:  # calls are in execution order
            if not call.metadata and any(n in derived for n in call.inputs):
                derived.update(call.outputs)
        return derived

    # -- classification --------------------------------------------------------------
    def consumer_groups(self) -> dict[int, list[_Call]]:
        groups: dict[int, list[_Call]] = defaultdict(list)
        for call in self.calls:
            if call.kind is not None and call.x is not None:
                groups[call.x].append(call)
        return groups

    def reaches(self, calls: list[_Call], names: set[str], depth: int, stop: frozenset = frozenset()) -> bool:
        """Whether an output of ``calls`` reaches a call in ``names`` before another layer or a ``stop`` call."""
        frontier = [(n, 0) for c in calls for n in c.outputs]
        seen = set()
        while frontier:
            node, d = frontier.pop()
            if node in seen or d > depth:
                continue
            seen.add(node)
            for idx in self.users.get(node, ()):
                nxt = self.calls[idx]
                if nxt.name in names:
                    return True
                if (nxt.kind is not None and nxt.weight is not None) or nxt.name in stop:
                    continue  # another layer (or a norm): the search stops there
                frontier.extend((o, d + 1) for o in nxt.outputs)
        return False

    def classify(self, x: int, calls: list[_Call]) -> tuple[str, str]:
        """(kind, reason): kind in KINDS, or "other" with the reason it is not adapted."""
        if x in self.roots:
            return "other", "reads the model input (stem or patch embedding)"
        if x not in self.derived:
            return "other", "does not depend on the image (a constant such as a position-bias table, or a text input)"
        if any(c.weight is None for c in calls):
            return "other", (
                "a consumer's weight is computed at every call (e.g. weight standardisation), so it cannot absorb "
                "an adapter"
            )
        if self.reaches(calls, _ATTENTION_FUNCS, _ATTENTION_DEPTH):
            return "attention", ""
        widen = all(c.weight_shape[0] > c.weight_shape[1] * c.groups for c in calls)
        if all(c.kind == "linear" for c in calls):
            if widen or self.reaches(calls, _ACTIVATIONS, _ACTIVATION_DEPTH, _NORMS):
                return "mlp", ""
            return "other", "a projection with no activation after it (fc2, an output projection, a head)"
        pointwise = all(c.kind == "conv2d" and c.groups == 1 and c.weight_shape[2:] == (1, 1) for c in calls)
        keep = all(c.weight_shape[0] >= c.weight_shape[1] for c in calls)
        if pointwise and keep:
            if self.reaches(calls, _GATES, _ACTIVATION_DEPTH, _NORMS):
                return "other", "a squeeze-and-excitation gate (a sigmoid of its output scales the features)"
            return "pointwise", ""
        if pointwise:
            return "other", "1x1 convolution(s) that reduce the channels"
        if all(c.kind == "conv2d" and c.groups == 1 for c in calls) and keep:
            return "conv", ""
        return "other", "grouped, depthwise or channel-reducing convolution(s)"

    # -- exactness ---------------------------------------------------------------------
    def internal_problem(self, mc: _ModuleCall, x: int) -> Optional[str]:
        """Why the adapter on ``x`` cannot be folded inside this module call; None if it can."""
        consumers: list[_Call] = []
        for idx in self.users.get(x, ()):
            if not mc.start <= idx < mc.end:
                continue
            call = self.calls[idx]
            if call.noop:
                continue
            if call.kind is None or call.x != x or call.weight is None:
                return f"{call.name} reads it"
            if call.kind == "conv2d" and call.groups != 1:
                return f"'{call.weight}' is a grouped convolution"
            if not _within(call.weight, mc.name):
                return f"'{call.weight}' is outside the module"
            consumers.append(call)
        if not consumers:
            return "no linear or conv2d reads it"
        if len({c.kind for c in consumers}) > 1:
            return "both linear and conv2d layers read it (they act on different axes)"
        return None

    def foreign_weight_use(self, weights: Iterable[str], allowed: set[int]) -> Optional[str]:
        """A reason if a weight is used by a call outside ``allowed`` (tied, or transformed before use)."""
        for w in weights:
            node_uses = self.weight_uses.get(w, [])
            for idx in node_uses:
                if idx not in allowed:
                    return f"'{w}' is also used by {self.calls[idx].name} elsewhere (tied or transformed weight)"
        return None

    def in_blocks(self, name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in self.block_roots for i in range(1, len(parts) + 1))


def find_placement(
    model: nn.Module,
    example_inputs: Optional[Mapping[str, Any]] = None,
    num_experts: Optional[int] = None,
) -> Placement:
    """Trace one forward pass of ``model`` and find where the paper's adapters go.

    Args:
        model: A model (not yet wrapped by PEFT).
        example_inputs: Keyword arguments of one forward pass; by default a
            random image built from the model's config (:func:`example_inputs`).
        num_experts: If given, tensors whose width it does not divide are
            skipped (with the reason) instead of failing later.

    Returns:
        The :class:`Placement`; ``placement.targets`` goes into
        ``AloreConfig(target_modules=...)``.

    Raises:
        PlacementError: No example input can be built, or the forward pass fails.
    """
    if example_inputs is None:
        example_inputs = globals()["example_inputs"](model)
    recorder, module_calls, roots = _trace(model, example_inputs)
    a = _Analysis(model, recorder, module_calls, roots)
    scope = _backbone_scope(model)
    placement = Placement(scope=scope, model_class=type(model).__name__, _all_names=tuple(a.modules))
    groups = []
    for x, calls in a.consumer_groups().items():
        weights = list(dict.fromkeys(c.weight or "<computed>" for c in calls))
        kind, reason = a.classify(x, calls)
        groups.append((x, calls, weights, [_module_of(w) for w in weights], kind, reason))
    chosen = _choose(a, placement, scope, [g for g in groups if g[4] in ("attention", "mlp", "pointwise")], num_experts)
    convs = [g for g in groups if g[4] == "conv"]
    if chosen:
        reason = "a k x k convolution: adapted only in networks with no attention, MLP or pointwise convolution"
        placement.skipped.extend(Skipped(layers, "other", reason) for _, _, _, layers, _, _ in convs)
    else:  # a plain k x k CNN: adapters on the inputs of its dense convolutions
        chosen = _choose(a, placement, scope, convs, num_experts)
    placement.skipped.extend(Skipped(g[3], g[4], g[5]) for g in groups if g[4] == "other")
    placement.sites = _resolve_nesting(a, list(chosen.values()))
    return placement


def _choose(a: _Analysis, placement: Placement, scope: list[str], groups: list, num_experts: Optional[int]):
    """Sites for the classified ``groups`` in scope; the others are added to ``placement.skipped``."""
    chosen: dict[str, Site] = {}
    for x, calls, weights, layers, kind, _ in groups:
        if not all(any(_within(layer, s) for s in scope) for layer in layers):
            where = ", ".join(scope)
            placement.skipped.append(Skipped(layers, kind, f"outside the backbone or base model ({where})"))
            continue
        if not all(a.in_blocks(layer) for layer in layers):
            placement.skipped.append(Skipped(layers, kind, "not inside a repeated block (an nn.ModuleList element)"))
            continue
        width = calls[0].x_shape[-1] if calls[0].kind == "linear" else calls[0].x_shape[1]
        if num_experts is not None and width % num_experts:
            placement.skipped.append(
                Skipped(layers, kind, f"width {width} is not divisible by num_experts={num_experts}")
            )
            continue
        sites, why_not = _place(a, x, calls, weights, layers, kind, width)
        if sites is None:
            placement.skipped.append(Skipped(layers, kind, why_not))
            continue
        for site in sites:
            chosen.setdefault(site.target, site)  # a layer read from several tensors gets one adapter
    return chosen


def _place(a: _Analysis, x: int, calls: list[_Call], weights: list[str], layers: list[str], kind: str, width: int):
    """The smallest exact container for tensor ``x``, else its consumer layers; (sites, None) or (None, reason)."""
    # Candidate containers: modules called on exactly this tensor that hold every consumer.
    candidates: dict[str, list[_ModuleCall]] = defaultdict(list)
    for mc in a.module_calls:
        if mc.x == x and mc.name and mc.name not in layers and all(_within(layer, mc.name) for layer in layers):
            candidates[mc.name].append(mc)
    problems: list[str] = []
    for name in sorted(candidates, key=lambda n: (-n.count("."), n)):  # deepest first
        module = a.modules[name]
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        # Every call of the container must take an adapted tensor and fold exactly.
        problem = None
        for mc in a.calls_of[name]:
            if mc.x is None:
                problem = "it is also called without a tensor input"
                break
            problem = a.internal_problem(mc, mc.x)
            if problem:
                break
        if problem is None:
            # The consumers' weights may be used only by the consumer calls on the container's input.
            allowed = {i for mc in a.calls_of[name] for i in range(mc.start, mc.end) if a.calls[i].x == mc.x}
            problem = a.foreign_weight_use(weights, allowed)
        if problem is None:
            problem = _block_width_problem(module, calls[0].kind, width)
        if problem is None:
            why = f"its input feeds only {', '.join(_relative(l, name) for l in layers)}: one adapter, folded into each"
            return [Site(name, "block", kind, layers, width, why)], None
        problems.append(f"{name}: {problem}")
    # Fall back to the consumer layers themselves.
    sites = []
    for layer in layers:
        module = a.modules.get(layer)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            return None, (
                f"'{layer}' is a {type(module).__name__}, not a torch.nn.Linear/Conv2d, and no container reads "
                f"the tensor alone ({'; '.join(problems) or 'none is called on it'})"
            )
        allowed = {i for mc in a.calls_of[layer] for i in range(mc.start, mc.end)}
        problem = a.foreign_weight_use([w for w in weights if _module_of(w) == layer], allowed)
        if problem:
            return None, problem
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return None, f"'{layer}' is a grouped convolution"
        why = "no container reads this tensor alone" + (f" ({problems[0]})" if problems else "")
        why += ": a sequential adapter on the layer itself" + (" (one per consumer)" if len(layers) > 1 else "")
        sites.append(Site(layer, "layer", kind, [layer], width, why))
    return sites, None


def _block_width_problem(container: nn.Module, kind: str, width: int) -> Optional[str]:
    """Why :class:`~alore_peft.block.AloreBlock` would give this container another width than its input's.

    The block takes its width as :func:`alore_peft.trace.probe_container` picks it.
    """
    found = probe_container(container)
    if found is None:
        return "it holds no torch.nn.Linear or Conv2d"
    ref_name, ref_width = found.ref_name, found.in_dim
    ref = container.get_submodule(ref_name)
    ref_kind = "linear" if isinstance(ref, nn.Linear) else "conv2d"
    if (ref_kind, ref_width) != (kind, width):
        return f"an adapter on it would take the width of '{ref_name}' ({ref_width}), not its input's ({width})"
    return None


def _resolve_nesting(a: _Analysis, sites: list[Site]) -> list[Site]:
    """A container that holds another target gives way to its consumer layers.

    (Its adapter would be folded into layers that carry adapters of their own.)
    """
    out: list[Site] = []
    targets = {s.target for s in sites}
    for s in sites:
        nested = [t for t in targets if t != s.target and t.startswith(s.target + ".")]
        if s.placement == "block" and nested:
            for layer in s.consumers:
                if layer not in targets:
                    why = f"'{s.target}' also holds the target '{nested[0]}': an adapter on the layer instead"
                    out.append(Site(layer, "layer", s.kind, [layer], s.width, why))
            continue
        out.append(s)
    return out
