"""``AloreConfig``: what an ALoRE adapter is, checked before any module is touched."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME

from ._registration import ALORE_PEFT_TYPE

__all__ = ["AloreConfig", "MODES", "COMPUTE_PATHS", "RULE_INITS", "check_adapter_file"]

MODES = ("sequential", "parallel")
COMPUTE_PATHS = ("auto", "factored", "fold")
RULE_INITS = ("orthogonal", "normal")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class AloreConfig(PeftConfig):
    """Configuration of an ALoRE adapter (Aggregating Low Rank Experts).

    The update of an adapted layer is
    ``dW = s * sum_{i=1..n} A_i (x) (B_i @ C_i)`` with ``n = num_experts``
    rule matrices ``A_i`` (``n x n``), expert factors ``B_i`` and ``C_i`` of
    rank ``r`` and scale ``s = alpha / r``.

    Args:
        r: Rank of every expert's low-rank factor ``B_i @ C_i``. An adapted
            layer has ``r * (d_in + d_out)`` expert parameters whatever ``n``.
        num_experts: Number of experts ``n``, which is also the Kronecker
            size: it must divide the adapted dimensions. ``dW`` can reach rank
            ``min(d, n**2 * r)``.
        alpha: Scale numerator: the update is multiplied by ``s = alpha / r``
            (as ``lora_alpha`` in LoRA), so ``alpha = r`` gives ``s = 1``.
        dropout: Dropout probability on the adapter's input branch.
        mode: ``"sequential"`` (the paper's): the adapter transforms the
            target's input, ``target(x + s * dW x)``, merged as
            ``W' = W (I + s dW)``. ``"parallel"`` (LoRA-like):
            ``target(x) + s * dW x``, merged as ``W' = W + s dW``.
        share_rules: One set of rule matrices for every layer of the adapter
            (the paper's choice: ``n**3`` parameters once); ``False`` gives each
            layer its own.
        target_modules: Module names (suffix match) or a regex to adapt.
            ``nn.Linear`` and ``nn.Conv2d`` targets are adapted directly; any
            other module (a container such as a ViT block's ``attention``) gets
            block placement in sequential mode: one adapter on its input,
            shared by every layer that reads it. ``None`` uses the paper's
            placement for known model types (``alore_peft.presets``).
        exclude_modules: Module names or a regex never to adapt.
        layers_to_transform: Only adapt these layer indices.
        layers_pattern: Name of the layer container (e.g. ``"layers"``) used
            with ``layers_to_transform``.
        modules_to_save: Extra modules trained in full and saved with the
            adapter (e.g. a new classifier head).
        init_weights: ``True``: an exact identity at step 0 (all ``B_i = 0``;
            ``C_i`` and the rules random). ``False``: every factor random, a
            non-identity adapter for tests.
        rule_init: How rule matrices start: ``"orthogonal"`` (default; unit
            singular values, different per expert) or ``"normal"``.
        compute_path: ``"auto"`` (default): linear layers and blocks run
            ``"factored"`` while training (``dW`` never built: three token-sized
            matmuls per adapter), except where the rules' ``(n^2 r)^2`` mixing
            costs more per token than the layer's weight (e.g. ``n = 16, r = 8``
            on a 768-wide layer): there the cost model picks per call
            (:func:`alore_peft.functional.prefer_fold`); convolutions fold; in
            eval mode with gradients off every layer serves from its folded weights,
            ``W (I + s dW)`` or ``W + s dW``, cached until a weight changes (the
            merged model's cost, for one extra copy of each adapted weight).
            ``"factored"``: never fold, never cache (convolutions in parallel
            mode still apply ``dW`` as a kernel). ``"fold"``: always fold,
            also while training.
    """

    r: int = field(default=4, metadata={"help": "Rank of each expert's low-rank factor."})
    num_experts: int = field(default=4, metadata={"help": "Number of experts n (the Kronecker size)."})
    alpha: float = field(default=4.0, metadata={"help": "Scale numerator: s = alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input branch."})
    mode: Literal["sequential", "parallel"] = field(
        default="sequential", metadata={"help": "'sequential' (on the target's input) or 'parallel' (LoRA-like)."}
    )
    share_rules: bool = field(default=True, metadata={"help": "Share the rule matrices across all adapted layers."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex to adapt; None uses model-type defaults."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex to exclude."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Layer container name used with layers_to_transform."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Identity at init (True) or random (False)."})
    rule_init: Literal["orthogonal", "normal"] = field(
        default="orthogonal", metadata={"help": "Initialisation of the rule matrices."}
    )
    compute_path: Literal["auto", "factored", "fold"] = field(
        default="auto", metadata={"help": "'auto', 'factored' or 'fold' (see the class docstring)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ALORE_PEFT_TYPE
        if not _is_positive_int(self.r):
            raise ValueError(f"AloreConfig.r must be a positive integer (the expert rank), got r={self.r!r}; try r=4.")
        if not _is_positive_int(self.num_experts):
            raise ValueError(
                f"AloreConfig.num_experts must be a positive integer that divides the adapted dimensions, got "
                f"num_experts={self.num_experts!r}; try num_experts=4."
            )
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(
                f"AloreConfig.alpha must be a finite number (the update is scaled by alpha / r), got "
                f"alpha={self.alpha!r}; try alpha=4.0."
            )
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(
                f"AloreConfig.dropout must be a probability in [0, 1), got dropout={self.dropout!r}; use 0.0 to "
                "disable it."
            )
        for name, allowed in (("mode", MODES), ("compute_path", COMPUTE_PATHS), ("rule_init", RULE_INITS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"AloreConfig.{name} must be one of {', '.join(repr(a) for a in allowed)}, got {name}={value!r}."
                )
        for name in ("share_rules", "init_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AloreConfig.{name} must be True or False, got {name}={getattr(self, name)!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and isinstance(self.layers_to_transform, (int, list)):
            raise ValueError(
                "AloreConfig.layers_to_transform cannot be combined with a regex target_modules string; put the "
                "layer indices into the regex, or pass target_modules as a list of names."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"AloreConfig.layers_pattern={self.layers_pattern!r} needs layers_to_transform (the layer indices "
                "to adapt), e.g. layers_to_transform=[10, 11]."
            )

    @property
    def scaling(self) -> float:
        """The scale ``s = alpha / r`` applied to ``dW``."""
        return self.alpha / self.r

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load a config and, for a local adapter folder, check its weights file first.

        PEFT injects the adapter into the base model before it reads the weights;
        checking a local ``adapter_model.safetensors`` here (:func:`check_adapter_file`)
        means a truncated or corrupted file, or one with NaN or infinite weights,
        is refused before the base model is touched. An adapter on the Hub is
        not checked here: PEFT downloads its weights only after injecting it.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        weights = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isdir(folder) and os.path.exists(weights):
            check_adapter_file(weights)
        return config


def check_adapter_file(path: str) -> None:
    """Read every tensor of a safetensors adapter file; raise a clear error if it is damaged.

    Refused: a file safetensors cannot read, tensors whose bytes differ from
    the SHA-256 digests written when the adapter was saved, and NaN or
    infinite weights. A file without digests loads after a one-line notice.
    See :mod:`alore_peft.adapter_metadata`.
    """
    from .adapter_metadata import verify_adapter_file

    verify_adapter_file(path)
