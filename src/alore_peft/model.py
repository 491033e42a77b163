"""``AloreModel``: injects ALoRE layers by module name and owns the shared rules."""

from __future__ import annotations

from typing import Sequence

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import functional as F
from .config import AloreConfig
from .layer import LAYER_TYPES, AloreLayer
from .presets import DEFAULT_TARGET_MODULES, missing_targets_message

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
            if model_type not in self.target_module_mapping:
                raise ValueError(missing_targets_message(model_type))
            peft_config.target_modules = set(self.target_module_mapping[model_type])
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
            weight = getattr(target, "weight", None)
            rules = F.init_rules(config.num_experts, config.rule_init)
            if weight is not None and weight.device.type != "meta":
                rules = rules.to(weight.device)
            self.alore_rules[adapter_name] = nn.Parameter(rules)
        if isinstance(target, AloreLayer):
            target.update_layer(adapter_name, config, module_name=current_key)
            return
        layer_cls = LAYER_TYPES.get(type(target))
        if layer_cls is None:
            supported = ", ".join(f"torch.nn.{t.__name__}" for t in LAYER_TYPES)
            raise ValueError(
                f"Target module '{current_key}' is a {type(target).__module__}.{type(target).__name__}; ALoRE can "
                f"adapt {supported}. Remove it from target_modules (or add it to exclude_modules)."
            )
        new_module = layer_cls(target, adapter_name, config, shared_rules=self.alore_rules, module_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

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


def _roll_back(model: nn.Module, adapter_name: str) -> None:
    """Remove a half-loaded adapter so the user's model is as it was before loading."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, AloreModel):
        return
    if list(tuner.peft_config) == [adapter_name]:
        tuner.unload()  # restores the original modules inside the user's model object
    else:
        tuner.delete_adapter(adapter_name)
