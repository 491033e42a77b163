"""``AloreModel``: injects ALoRE layers by module name and owns the shared rules."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import functional as F
from .block import AloreBlock
from .config import AloreConfig
from .layer import LAYER_TYPES, AloreLayer
from .presets import DEFAULT_TARGET_MODULES, default_targets, missing_targets_message

__all__ = ["AloreModel"]


class AloreModel(BaseTuner):
    """PEFT tuner for ALoRE. Create it through ``peft.get_peft_model``.

    With ``share_rules=True`` the rule matrices of an adapter live here, in
    ``alore_rules[adapter_name]`` (saved once as ``base_model.alore_rules``),
    and every layer of that adapter reads and trains the same tensor.
    """

    prefix: str = "alore_"
    tuner_layer_cls = AloreLayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    uses_shared_state = True

    def _pre_injection_hook(self, model: nn.Module, config: AloreConfig, adapter_name: str) -> None:
        self.alore_rules = nn.ParameterDict({})  # adapter name -> (n, n, n)

    def _prepare_adapter_config(self, peft_config: AloreConfig, model_config: dict) -> AloreConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            targets = default_targets(model_type, getattr(self, "model", None))
            if targets is None:
                raise ValueError(missing_targets_message(model_type, getattr(self, "model", None)))
            peft_config.target_modules = set(targets) if isinstance(targets, (list, tuple, set)) else targets
        return peft_config

    def _create_and_replace(
        self,
        config: AloreConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        if config.share_rules and adapter_name not in self.alore_rules:
            # A container has no weight of its own: any parameter tells the device.
            weight = getattr(target, "weight", None)
            if not isinstance(weight, torch.Tensor):
                weight = next(target.parameters(), None)
            rules = F.init_rules(config.num_experts, config.rule_init)
            if weight is not None and weight.device.type != "meta":
                rules = rules.to(weight.device)
            self.alore_rules[adapter_name] = nn.Parameter(rules)
        if isinstance(target, AloreLayer):
            target.update_layer(adapter_name, config, module_name=current_key)
            return
        layer_cls = LAYER_TYPES.get(type(target))
        if layer_cls is None:
            if config.mode != "sequential":
                supported = ", ".join(f"torch.nn.{t.__name__}" for t in LAYER_TYPES)
                raise ValueError(
                    f"Target module '{current_key}' is a {type(target).__module__}.{type(target).__name__}; in "
                    f"mode={config.mode!r} ALoRE can adapt {supported} only. Use mode='sequential' to place one "
                    "adapter on this container's input (block placement), or target the layers inside it."
                )
            self._check_no_nested_targets(config, target, current_key)
            layer_cls = AloreBlock
        new_module = layer_cls(target, adapter_name, config, shared_rules=self.alore_rules, module_name=current_key)
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
        if isinstance(child, AloreBlock) and new_module is child.get_base_layer():
            # Unloading a block: the container goes back as it is. (PEFT's version would
            # copy a `weight` attribute, which a container does not have.)
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    # -- block placement: trace and check before anything is merged ---------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._trace_pending_blocks()

    def _blocks(self) -> list[tuple[str, AloreBlock]]:
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, AloreBlock)]

    def _trace_pending_blocks(self) -> None:
        """Trace blocks that a lone probe tensor could not run, with one dummy image through the model.

        Only for models that declare their image input (a transformers vision
        config with ``num_channels`` and ``image_size``); otherwise the blocks are
        traced at the first real forward pass.
        """
        pending = [m for _, m in self._blocks() if m.trace is None]
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
        bad = [m for m in pending if m.trace is not None and not m.trace.foldable]
        if bad:
            raise ValueError(bad[0]._unfoldable_message(bad[0].trace))

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        self._trace_pending_blocks()
        for _, block in self._blocks():
            block.consumer_parameters()  # raises before any weight changes if a block cannot be folded

    # -- shared rules follow the adapter's state -------------------------------
    def _set_rules_requires_grad(self, adapter_names: Sequence[str], requires_grad: bool) -> None:
        for name, rules in self.alore_rules.items():
            if name in adapter_names:
                rules.requires_grad_(requires_grad)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name, rules in self.alore_rules.items():
            rules.requires_grad_(name in active and not inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._set_rules_requires_grad(names, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.alore_rules:
            del self.alore_rules[adapter_name]

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
