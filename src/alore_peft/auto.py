"""``AutoPeftModelForImageClassification``: base model and adapter in one call.

PEFT 0.21 has ``AutoPeftModelFor...`` classes for text tasks only (causal LM,
seq2seq, sequence/token classification, question answering, feature
extraction), none for image classification. This is the same two-step load
for image classifiers: the base model named by the adapter's
``base_model_name_or_path`` (a local folder, a Hub id, or an offline
backbone's stable name such as ``alore-peft-offline:dinov2-small-112``,
prepared in the cache on first use) through
``transformers.AutoModelForImageClassification``, then the adapter through
``peft.PeftModel.from_pretrained``. When the adapter folder holds a trained
classifier head (``modules_to_save``), the base's head is sized to it and
named with the class names the adapter recorded. It works for any PEFT
adapter; importing ``alore_peft`` makes ALoRE adapters loadable.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from peft import PeftConfig, PeftModel

__all__ = ["AutoPeftModelForImageClassification"]


class AutoPeftModelForImageClassification:
    """Load an image classifier and its adapter from the adapter folder alone.

    Example:
        >>> model = AutoPeftModelForImageClassification.from_pretrained("runs/vit-alore")  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EnvironmentError(
            "AutoPeftModelForImageClassification is not instantiated directly; use "
            "AutoPeftModelForImageClassification.from_pretrained(adapter_dir)."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Optional[PeftConfig] = None,
        revision: Optional[str] = None,
        base_model_name_or_path: Optional[str] = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base image classifier, then the adapter onto it.

        Args:
            pretrained_model_name_or_path: Folder (or Hub id) holding
                ``adapter_config.json`` and the adapter weights.
            adapter_name: Name given to the loaded adapter.
            is_trainable: Load the adapter trainable (default: inference mode).
            config: An already loaded adapter config (default: read it from
                ``pretrained_model_name_or_path``).
            revision: Revision of the adapter (and, unless the config names one,
                of the base model) on the Hub.
            base_model_name_or_path: Load this base model instead of the one the
                adapter config names (e.g. after moving the base model's folder).
            **kwargs: Passed to ``AutoModelForImageClassification.from_pretrained``
                (e.g. ``dtype``, ``device_map``).

        Returns:
            A ``peft.PeftModel`` around the base classifier.
        """
        from transformers import AutoModelForImageClassification

        from ._noise import expected_warnings_hidden, from_pretrained_with_new_head, progress_bars_hidden
        from .adapter_metadata import classifier_head
        from .offline import backbones

        peft_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision)
        base_path = base_model_name_or_path or peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(
                f"The adapter config in {pretrained_model_name_or_path!r} does not name its base model "
                "(base_model_name_or_path is empty); pass base_model_name_or_path='path/or/hub-id' to "
                "AutoPeftModelForImageClassification.from_pretrained."
            )
        if backbones.is_portable_name(base_path):
            base_path = str(_offline_backbone(base_path))
        looks_local = os.path.isabs(base_path) or base_path.startswith((".", "~"))
        if looks_local and not os.path.isdir(os.path.expanduser(base_path)):
            raise ValueError(
                f"The adapter in {pretrained_model_name_or_path!r} was trained on the base model in the local folder "
                f"{base_path!r}, which does not exist; pass base_model_name_or_path='...' with the folder's new "
                "location."
            )
        base_revision = getattr(peft_config, "revision", None) or revision
        if base_revision is not None:
            kwargs.setdefault("revision", base_revision)
        # A classifier head saved with the adapter (modules_to_save) replaces the base's: size the base's
        # to match, with the class names the adapter recorded, and do not report it as missing.
        weights = os.path.join(str(pretrained_model_name_or_path), "adapter_model.safetensors")
        head = classifier_head(weights) if os.path.isfile(weights) else None
        if head is not None and "num_labels" not in kwargs and "id2label" not in kwargs:
            num_labels, labels = head
            kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
            if labels is not None:
                kwargs.update(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
        saved = list(peft_config.modules_to_save or []) if head is not None else []
        with progress_bars_hidden():
            base_model, _ = from_pretrained_with_new_head(
                AutoModelForImageClassification, base_path, [f"{name}." for name in saved], **kwargs
            )
        with expected_warnings_hidden():
            return PeftModel.from_pretrained(
                base_model,
                pretrained_model_name_or_path,
                adapter_name=adapter_name,
                is_trainable=is_trainable,
                config=config,
                revision=revision,
            )


def _offline_backbone(name: str):
    """The local folder of an offline backbone recorded by its stable name (prepared in the cache if missing)."""
    from .offline import OfflinePreparationError, backbones

    try:
        return backbones.resolve(name)
    except (OfflinePreparationError, ValueError) as error:
        raise ValueError(
            f"The adapter's base model is the offline backbone {name!r} ({backbones.describe(name)}), which could not "
            f"be prepared here ({error}). Rebuild it with:\n{backbones.rebuild_instructions(name)}\nthen pass "
            "base_model_name_or_path='./base'."
        ) from error
