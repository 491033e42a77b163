"""``AutoPeftModelForImageClassification``: base model and adapter in one call.

PEFT 0.21 has ``AutoPeftModelFor...`` classes for text tasks only (causal LM,
seq2seq, sequence/token classification, question answering, feature
extraction), none for image classification. This is the same two-step load
for image classifiers: the base model named by the adapter's
``base_model_name_or_path`` (a local folder or a Hub id) through
``transformers.AutoModelForImageClassification``, then the adapter through
``peft.PeftModel.from_pretrained``. It works for any PEFT adapter; importing
``alore_peft`` makes ALoRE adapters loadable.
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

        peft_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision)
        base_path = base_model_name_or_path or peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(
                f"The adapter config in {pretrained_model_name_or_path!r} does not name its base model "
                "(base_model_name_or_path is empty); pass base_model_name_or_path='path/or/hub-id' to "
                "AutoPeftModelForImageClassification.from_pretrained."
            )
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
        base_model = AutoModelForImageClassification.from_pretrained(base_path, **kwargs)
        return PeftModel.from_pretrained(
            base_model,
            pretrained_model_name_or_path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=config,
            revision=revision,
        )
