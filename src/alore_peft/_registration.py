"""The only module that touches PEFT internals.

PEFT keys its method tables by members of the ``PeftType`` enum, which has no
public way to grow. ALoRE adds one member, ``ALORE``, and then uses PEFT's
public ``register_peft_method``. Both steps are idempotent (safe to run in
every DDP worker, on re-import and after ``importlib.reload``).

Verified against the PEFT range pinned in ``pyproject.toml``.
"""

from __future__ import annotations

import enum

import peft
from peft.utils import PeftType, register_peft_method

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
    """Register ALoRE's config and tuner with PEFT once per process."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    if PEFT_TYPE_TO_TUNER_MAPPING.get(ALORE_PEFT_TYPE) is model_cls:
        return
    if ALORE_PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        # A reloaded alore_peft: replace the stale classes.
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

        for table in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            table.pop(ALORE_PEFT_TYPE, None)
    register_peft_method(name=_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
