"""``AloreModel``: injects ALoRE layers by module name and owns the shared rules.

Every call that changes the user's model is all or nothing:

- **injection** (``get_peft_model``, ``add_adapter``, ``load_adapter``): every
  target is checked before any module is touched (layer types, the mode,
  ``num_experts`` against each update's shape, block containers traced); if
  anything still fails while the adapter is being created, the model's module
  tree, its parameters' ``requires_grad``, its train/eval flags and the
  tuner's shared rules are put back exactly as they were;
- **merging and unmerging** (``merge_adapter``, ``merge_and_unload``,
  ``unmerge_adapter``, disabling merged adapters): every layer is checked
  (foldable, not tied to another module, invertible, finite with
  ``safe_merge``) before any weight is written.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Optional, Sequence

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from . import functional
from .block import AloreBlock, check_block_mode, probe_block
from .config import AloreConfig
from .layer import AloreLayer, Conv2d, Linear, RuleMixes, check_conv, check_divisible
from .placement import PlacementError, find_placement
from .presets import DEFAULT_TARGET_MODULES, default_targets, missing_targets_message
from .trace import ContainerProbe

__all__ = ["AloreModel"]


def _layer_class(target: nn.Module) -> Optional[type[AloreLayer]]:
    if isinstance(target, nn.Linear):
        return Linear
    if isinstance(target, nn.Conv2d):
        return Conv2d
    return None


class AloreModel(BaseTuner):
    """PEFT tuner for ALoRE. Create it through ``peft.get_peft_model``.

    With ``share_rules=True`` the rule matrices of an adapter live here, in
    ``alore_rules[adapter_name]`` (saved once as ``base_model.alore_rules``),
    and every layer of that adapter reads and trains the same tensor. The
    rules follow their adapter's layers: their dtype after PEFT's adapter
    dtype cast, their ``requires_grad`` whenever adapters are set, frozen,
    loaded, enabled or disabled.
    """

    prefix: str = "alore_"
    tuner_layer_cls = AloreLayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    uses_shared_state = True

    def _pre_injection_hook(self, model: nn.Module, config: AloreConfig, adapter_name: str) -> None:
        self.alore_rules = nn.ParameterDict({})  # adapter name -> (n, n, n)
        if "_rule_mixes" not in self.__dict__:
            self.__dict__["_rule_mixes"] = RuleMixes()  # shared with every layer; see forward

    # -- forward: every adapter's rules mixed once per model forward ------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.model.forward(*args, **kwargs)
        with self._rule_mixes.scope():
            return self.model.forward(*args, **kwargs)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """What ``PeftModel.forward`` and ``generate`` run inside: one rule mix per adapter for the whole call."""
        if torch.compiler.is_compiling():
            yield
            return
        with self._rule_mixes.scope():
            yield

    def _prepare_adapter_config(self, peft_config: AloreConfig, model_config: dict) -> AloreConfig:
        """With ``target_modules=None``: the paper's placement, traced from the model (:mod:`alore_peft.placement`).

        A model that cannot be traced (no example input can be built from its
        config, e.g. a timm model) falls back to its preset
        (:mod:`alore_peft.presets`). The resolved targets are what
        ``adapter_config.json`` records, so loading never traces.
        """
        if peft_config.target_modules is not None:
            return peft_config
        model = getattr(self, "model", None)
        model_type = model_config.get("model_type")
        traced_error = None
        targets = None
        try:
            placement = find_placement(model, num_experts=peft_config.num_experts)
        except PlacementError as exc:
            traced_error = str(exc)
        else:
            if placement.sites:
                self.placement = placement
                targets = placement.targets
            else:
                traced_error = "tracing found no tensor to adapt:\n" + placement.table()
        if targets is None:
            targets = default_targets(model_type, model)
        if targets is None:
            raise ValueError(f"{missing_targets_message(model_type, model)}\n(Tracing the model: {traced_error})")
        peft_config.target_modules = set(targets) if isinstance(targets, (list, tuple, set)) else targets
        return peft_config

    def print_placement(self) -> None:
        """Print where the adapters sit: the traced placement and why, or the adapted modules."""
        placement = getattr(self, "placement", None)
        if placement is not None:
            print(placement.table())
            return
        lines = ["module | placement | mode | width"]
        for name, layer in self._alore_layers():
            kind = "block" if isinstance(layer, AloreBlock) else "layer"
            modes = ", ".join(sorted(set(layer.mode.values())))
            lines.append(f"{name} | {kind} | {modes} | {layer.in_dim}")
        print("\n".join(lines))

    # -- injection: check every target first, roll back if anything still fails -------
    def _prepare_model(self, peft_config: AloreConfig, model: nn.Module) -> None:
        """Check every target this config matches before PEFT touches any module."""
        self._injection_plan = self._plan_injection(peft_config, model)

    def _plan_injection(self, config: AloreConfig, model: nn.Module) -> dict[str, Optional[ContainerProbe]]:
        """``{module key: probe for a container target, None otherwise}``; raises on the first bad target."""
        adapted = [key + "." for key, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        plan: dict[str, Optional[ContainerProbe]] = {}
        for key, target in model.named_modules():
            if not key or any(key.startswith(prefix) for prefix in adapted):
                continue
            other_method = isinstance(target, BaseTunerLayer) and not isinstance(target, AloreLayer)
            if self._check_target_module_exists(config, key) and not other_method:
                plan[key] = self._check_target(config, key, target)
        return plan

    def _check_target(self, config: AloreConfig, key: str, target: nn.Module) -> Optional[ContainerProbe]:
        """Raise a clear error if ``config`` cannot adapt ``target``; for a container, return its probe."""
        where = f"module '{key}'"
        if isinstance(target, AloreLayer):
            target.check_config(config, key)
            return None
        if isinstance(target, nn.Conv2d):
            check_conv(target, key)
            taps = target.kernel_size[0] * target.kernel_size[1]
            shape = functional.delta_shape(config.mode, target.in_channels, target.out_channels, taps)
            check_divisible(config.num_experts, config.mode, shape, where)
            return None
        if isinstance(target, nn.Linear):
            shape = functional.delta_shape(config.mode, target.in_features, target.out_features)
            check_divisible(config.num_experts, config.mode, shape, where)
            return None
        if config.mode != "sequential":
            raise ValueError(
                f"Target module '{key}' is a {type(target).__module__}.{type(target).__name__}; in "
                f"mode={config.mode!r} ALoRE can adapt torch.nn.Linear and torch.nn.Conv2d only. Use "
                "mode='sequential' to place one adapter on this container's input (block placement), or "
                "target the layers inside it."
            )
        check_block_mode(config, target, key)
        self._check_no_nested_targets(config, target, key)
        probed = probe_block(target, key)
        check_divisible(config.num_experts, config.mode, (probed.in_dim, probed.in_dim), where)
        return probed

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        snapshot = _Snapshot(model, self)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            self._trace_pending_blocks()
        except BaseException:
            snapshot.restore()
            raise
        finally:
            self._injection_plan = {}
        self._sync_rules_requires_grad()

    def _create_and_replace(
        self,
        config: AloreConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        plan = getattr(self, "_injection_plan", {})
        # A module matched by a state dict rather than the config is checked now.
        probed = plan[current_key] if current_key in plan else self._check_target(config, current_key, target)
        if config.share_rules and adapter_name not in self.alore_rules:
            # Created once every target has passed its checks; any parameter tells the device.
            weight = getattr(target, "weight", None)
            if not isinstance(weight, torch.Tensor):
                weight = next(target.parameters(), None)
            rules = functional.init_rules(config.num_experts, config.rule_init)
            if weight is not None and weight.device.type != "meta":
                rules = rules.to(weight.device)
            self.alore_rules[adapter_name] = nn.Parameter(rules)
        if isinstance(target, AloreLayer):
            target.update_layer(adapter_name, config, module_name=current_key)
            return
        layer_cls = _layer_class(target)
        if layer_cls is None:
            new_module = AloreBlock(
                target, adapter_name, config, self.alore_rules, module_name=current_key, probed=probed,
                rule_mixes=self._rule_mixes,
            )
        else:
            new_module = layer_cls(
                target, adapter_name, config, shared_rules=self.alore_rules, module_name=current_key,
                rule_mixes=self._rule_mixes,
            )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_no_nested_targets(self, config: AloreConfig, container: nn.Module, key: str) -> None:
        """Refuse a container target that also holds targets: its merge would fold into adapted weights."""
        nested = [
            f"{key}.{name}"
            for name, _ in container.named_modules()
            if name and self._check_target_module_exists(config, f"{key}.{name}")
        ]
        if nested:
            raise ValueError(
                f"target_modules matches both the container '{key}' and module(s) inside it ({', '.join(nested[:3])}"
                f"{', ...' if len(nested) > 3 else ''}). An adapter on the container's input is folded into the "
                "layers inside it, so they cannot carry adapters of their own: keep either the container name or "
                "the inner names in target_modules."
            )

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if not isinstance(new_module, AloreLayer):
            # Unloading (a block's container, or a module kept by modules_to_save): it goes back as it is.
            # (PEFT's version would copy a `weight` attribute, which a container does not have.)
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _get_module_names_tied_with_embedding(self) -> list[str]:
        # PEFT asks transformers for the input embeddings; vision models without any (DETR-style detectors)
        # raise NotImplementedError: nothing is tied to an embedding there.
        try:
            return super()._get_module_names_tied_with_embedding()
        except NotImplementedError:
            return []

    # -- block placement: trace before anything is merged ---------------------------
    def _alore_layers(self) -> list[tuple[str, AloreLayer]]:
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, AloreLayer)]

    def _trace_pending_blocks(self) -> None:
        """Trace every block with the model's real arguments: one dummy image through the model.

        Only for models that declare their image input (a transformers vision
        config with ``num_channels`` and ``image_size``); otherwise the blocks are
        traced at the first real forward pass. Traced here, a block's first real
        call already runs the path every later call runs.
        """
        pending = [
            m
            for _, m in self._alore_layers()
            if isinstance(m, AloreBlock) and (m.trace is None or m.trace.source != "forward")
        ]
        if not pending:
            return
        pixel_values = _dummy_pixel_values(self.model)
        if pixel_values is None:
            return
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model(pixel_values=pixel_values)
        except Exception:  # e.g. adapter weights still on the meta device while loading
            return
        finally:
            for m, mode in modes:
                m.training = mode
                if isinstance(m, AloreLayer):
                    m._clear_cache()  # a dummy call's folded weights are nobody's to keep
        bad = [m for m in pending if m.trace is not None and m.trace.source == "forward" and not m.trace.foldable]
        if bad:
            raise ValueError(bad[0].unfoldable_message(bad[0].trace))

    # -- merging: check every layer before any weight changes ------------------------
    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        self._trace_pending_blocks()
        self._check_untied()

    def _check_untied(self) -> None:
        """Refuse to merge into a weight that another module shares (tied weights)."""
        owners: dict[int, list[str]] = {}
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for param_name, param in module.named_parameters(recurse=False):
                owners.setdefault(id(param), []).append(f"{module_name}.{param_name}" if module_name else param_name)
        for layer_name, layer in self._alore_layers():
            inside = f"{layer_name}.base_layer."
            for name, weight in layer.consumer_weights():
                others = [o for o in owners.get(id(weight), []) if not o.startswith(inside)]
                if others:
                    raise ValueError(
                        f"Cannot merge the ALoRE adapter on '{layer_name}': the weight it folds into "
                        f"('{inside}{name}') is the same tensor as {others[:3]} (tied or shared weights), so merging "
                        "would also change what those modules compute. No weight was changed. Untie it first (e.g. "
                        "module.weight = torch.nn.Parameter(module.weight.detach().clone()) for one of them), or "
                        "keep the adapter unmerged."
                    )

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Merge the adapters into the weights of every layer, or into none if any layer cannot be merged."""
        self._check_merge_allowed()
        layers = self._alore_layers()
        for _, layer in layers:
            layer.check_merge(adapter_names, safe_merge)
        for _, layer in layers:
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        """Unmerge every layer, or none if any merged update cannot be inverted."""
        layers = self._alore_layers()
        for _, layer in layers:
            layer.check_unmerge()
        for _, layer in layers:
            layer.unmerge()

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge:
            self._check_merge_allowed()
            for _, layer in self._alore_layers():
                layer.check_merge(adapter_names, safe_merge)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        if not enabled:
            # Disabled adapters must not stay merged: unmerge every layer now, or none.
            self.unmerge_adapter()
        super()._enable_adapter_layers(enabled)
        self._sync_rules_requires_grad()

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not available for ALoRE; see the error for what to do instead."""
        raise NotImplementedError(
            "add_weighted_adapter cannot combine ALoRE adapters: each adapter has its own rule matrices, so a "
            "weighted sum of several adapters' updates is in general no ALoRE update with the same num_experts. "
            "Activate several adapters at once instead (model.base_model.set_adapter(['a', 'b']): their updates add "
            "up, and each one's alpha sets its weight), or merge them into the base weights together "
            "(model.merge_adapter(['a', 'b']))."
        )

    # -- shared rules follow their adapter's layers ------------------------------------
    def _adapter_b(self, adapter_name: str) -> list[nn.Parameter]:
        return [m.alore_B[adapter_name] for _, m in self._alore_layers() if adapter_name in m.alore_B]

    def _sync_rules_requires_grad(self) -> None:
        for name, rules in self.alore_rules.items():
            factors = self._adapter_b(name)
            if factors:
                rules.requires_grad_(any(b.requires_grad for b in factors))

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        factors = self._adapter_b(adapter_name)
        rules = self.alore_rules[adapter_name] if adapter_name in self.alore_rules else None
        if factors and rules is not None and rules.dtype != factors[0].dtype:
            self.alore_rules[adapter_name] = nn.Parameter(
                rules.detach().to(factors[0].dtype), requires_grad=rules.requires_grad
            )

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_rules_requires_grad()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._sync_rules_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.alore_rules:
            del self.alore_rules[adapter_name]
        self._sync_rules_requires_grad()

    # -- loading -----------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: AloreConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = model.state_dict()
        mismatched = [
            f"{key}: adapter file has {tuple(value.shape)}, this model needs {tuple(own[key].shape)}"
            for key, value in remapped.items()
            if key in own and own[key].shape != value.shape
        ]
        if mismatched:
            _roll_back(model, adapter_name)
            shown = "\n  ".join(mismatched[:5]) + ("\n  ..." if len(mismatched) > 5 else "")
            raise ValueError(
                f"The ALoRE adapter '{adapter_name}' does not fit this base model ({len(mismatched)} tensor(s) of "
                f"another shape; it was probably trained on a model of another width):\n  {shown}\n"
                "The base model was left unchanged. Load the adapter onto the model it was trained on "
                f"(base_model_name_or_path={config.base_model_name_or_path!r})."
            )
        return remapped


class _Snapshot:
    """What an injection may change in the user's model, to put back if it fails."""

    _LAYER_DICTS = AloreLayer.adapter_layer_names + AloreLayer.other_param_names

    def __init__(self, model: nn.Module, tuner: AloreModel) -> None:
        modules = list(model.modules())
        self.children = [(m, dict(m._modules)) for m in modules]
        self.modes = [(m, m.training) for m in modules]
        self.params = [(p, p.requires_grad) for p in model.parameters()]
        self.layers = [
            (m, {attr: set(getattr(m, attr)) for attr in self._LAYER_DICTS}, m._active_adapter, m._disable_adapters)
            for m in modules
            if isinstance(m, AloreLayer)
        ]
        self.tuner = tuner
        self.rules = set(tuner.alore_rules) if hasattr(tuner, "alore_rules") else set()

    def restore(self) -> None:
        for module, children in self.children:
            module._modules.clear()
            module._modules.update(children)
        for layer, keys, active, disabled in self.layers:
            for attr, names in keys.items():
                table = getattr(layer, attr)
                for key in [k for k in table if k not in names]:
                    del table[key]
            layer._active_adapter = active
            layer._disable_adapters = disabled
            layer._clear_cache()
        for param, requires_grad in self.params:
            param.requires_grad_(requires_grad)
        for module, mode in self.modes:
            module.training = mode
        rules = getattr(self.tuner, "alore_rules", None)
        if rules is not None:
            for name in [k for k in rules if k not in self.rules]:
                del rules[name]


def _dummy_pixel_values(model: nn.Module) -> torch.Tensor | None:
    """One zero image of the size a transformers vision model declares, or ``None``."""
    config = getattr(model, "config", None)
    if getattr(model, "main_input_name", None) != "pixel_values" or config is None:
        return None
    channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None)
    if not isinstance(channels, int) or size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None or param.device.type == "meta":
        return None
    return torch.zeros(1, channels, height, width, dtype=param.dtype, device=param.device)


def _roll_back(model: nn.Module, adapter_name: str) -> None:
    """Remove a half-loaded adapter so the user's model is as it was before loading."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, AloreModel):
        return
    if list(tuner.peft_config) == [adapter_name]:
        tuner.unload()  # restores the original modules inside the user's model object
    else:
        tuner.delete_adapter(adapter_name)
