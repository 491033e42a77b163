"""The only module that touches PEFT internals.

PEFT keys its method tables by members of the ``PeftType`` enum, which has no
public way to grow. ALoRE adds one member, ``ALORE``, and then uses PEFT's
public ``register_peft_method``. Both steps are idempotent (safe to run in
every DDP worker, on re-import and after ``importlib.reload``).

Two ``PeftModel`` methods are wrapped, because PEFT offers no hook for what
ALoRE adapters need written next to their weights:

- ``save_pretrained`` writes ``adapter_model.safetensors`` with the fixed
  metadata ``{"format": "pt"}``. The wrapper lets it save, then adds the
  per-tensor SHA-256 digests (and the class names) to the metadata of each
  saved ALoRE adapter file (:mod:`alore_peft.adapter_metadata`), so that
  ``AloreConfig.from_pretrained`` can refuse a file whose bytes changed.
- ``create_or_update_model_card`` writes PEFT's empty card template. The
  wrapper lets it run, then writes ALoRE's card (:mod:`alore_peft.hub`).
  The ``Trainer`` saves through ``save_pretrained``, so it gets both.
- ``push_to_hub`` (transformers' ``PushToHubMixin``) saves through
  ``save_pretrained`` too, but then replaces ``README.md`` with the
  repository's card or transformers' empty template. For ALoRE adapters the
  wrapper saves into a temporary folder, writes ALoRE's card naming the
  repository, and uploads that folder with ``huggingface_hub``.

The wrappers act only when the model holds an ALoRE adapter (other PEFT
methods go through PEFT's code alone, unchanged), keep the wrapped method's
signature and docstring, and wrap PEFT's original exactly once (re-import and
``importlib.reload`` replace the wrapper instead of stacking a second one).

Loading an ALoRE adapter without ``import alore_peft`` fails inside PEFT with
``KeyError: 'ALORE'``: PEFT looks ``peft_type`` up in its method table before
any code from the adapter's package could run, and offers no fallback there.
The adapter's card says to install and import ``alore-peft``.

Verified against the PEFT range pinned in ``pyproject.toml``.
"""

from __future__ import annotations

import enum
import functools
import inspect
import os
import tempfile

import peft
from peft.utils import SAFETENSORS_WEIGHTS_NAME, PeftType, register_peft_method

__all__ = ["ALORE_PEFT_TYPE", "register"]

_NAME = "ALORE"
SUPPORTED_PEFT = ("0.21", "0.22")  # [lower, upper) major.minor


def _extend_peft_type(name: str) -> PeftType:
    """Add ``name`` to ``PeftType`` (a ``str`` enum) unless it is already there."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    # The order matters: EnumType.__setattr__ refuses names already in the member map.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def _check_peft_version() -> None:
    major_minor = tuple(int(p) for p in peft.__version__.split(".")[:2])
    low = tuple(int(p) for p in SUPPORTED_PEFT[0].split("."))
    high = tuple(int(p) for p in SUPPORTED_PEFT[1].split("."))
    if not low <= major_minor < high:
        raise ImportError(
            f"alore_peft supports peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]} but peft=={peft.__version__} is "
            f"installed; install a supported version with: pip install 'peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]}'"
        )


_check_peft_version()
ALORE_PEFT_TYPE = _extend_peft_type(_NAME)
assert isinstance(ALORE_PEFT_TYPE, enum.Enum) and PeftType(_NAME) is ALORE_PEFT_TYPE


def register(config_cls, model_cls) -> None:
    """Register ALoRE's config and tuner with PEFT once per process, and wrap the PeftModel methods."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    _wrap_peft_model()

    if PEFT_TYPE_TO_TUNER_MAPPING.get(ALORE_PEFT_TYPE) is model_cls:
        return
    if ALORE_PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        # A reloaded alore_peft: replace the stale classes.
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

        for table in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            table.pop(ALORE_PEFT_TYPE, None)
    register_peft_method(name=_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)


def _holds_alore(model) -> bool:
    return any(config.peft_type == ALORE_PEFT_TYPE for config in getattr(model, "peft_config", {}).values())


def _save_pretrained_wrapper(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not _holds_alore(self):
            return
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        if not (values["is_main_process"] and values["safe_serialization"]):
            return
        from .adapter_metadata import write_metadata

        for name in values["selected_adapters"] or list(self.peft_config):
            if self.peft_config[name].peft_type != ALORE_PEFT_TYPE:
                continue
            folder = values["save_directory"] if name == "default" else os.path.join(values["save_directory"], name)
            write_metadata(os.path.join(folder, SAFETENSORS_WEIGHTS_NAME), base_model=self.get_base_model())

    return save_pretrained


def _model_card_wrapper(original):
    @functools.wraps(original)
    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        if _holds_alore(self):
            from .hub import write_model_card

            write_model_card(output_dir, self)

    return create_or_update_model_card


def _push_to_hub_wrapper(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def push_to_hub(self, *args, **kwargs):
        if not _holds_alore(self):
            return original(self, *args, **kwargs)
        from huggingface_hub import HfApi, ModelCard

        from .hub import write_model_card

        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        api = HfApi(token=values.get("token"))
        repo_id = api.create_repo(values["repo_id"], private=values.get("private"), exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            card = write_model_card(folder, self, repo_id=repo_id)  # its loading code names the repository
            if values.get("tags"):
                loaded = ModelCard.load(card)
                loaded.data.tags = sorted(set(loaded.data.tags or []) | set(values["tags"]))
                loaded.save(card)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=values.get("commit_message") or "Upload ALoRE adapter",
                commit_description=values.get("commit_description"),
                revision=values.get("revision"),
                create_pr=values.get("create_pr", False),
            )

    return push_to_hub


def _wrap_peft_model() -> None:
    """Wrap ``PeftModel``'s ``save_pretrained``, ``create_or_update_model_card`` and ``push_to_hub`` once."""
    from peft import PeftModel

    for attribute, make in (
        ("save_pretrained", _save_pretrained_wrapper),
        ("create_or_update_model_card", _model_card_wrapper),
        ("push_to_hub", _push_to_hub_wrapper),
    ):
        current = getattr(PeftModel, attribute)
        original = getattr(current, "__alore_original__", current)
        wrapper = make(original)
        wrapper.__alore_original__ = original
        setattr(PeftModel, attribute, wrapper)
