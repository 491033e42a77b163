"""Default ALoRE targets per ``model_type`` (used when ``target_modules=None``)."""

from __future__ import annotations

__all__ = ["DEFAULT_TARGET_MODULES", "missing_targets_message"]

# model_type -> module-name suffixes adapted by default.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "vit": ["q_proj", "v_proj"],
}


def missing_targets_message(model_type: str | None) -> str:
    """The error for a model with no known default targets."""
    known = ", ".join(sorted(DEFAULT_TARGET_MODULES))
    return (
        f"AloreConfig.target_modules is None and model_type={model_type!r} has no default ALoRE targets "
        f"(known: {known}). Pass the names of the modules to adapt, e.g. "
        "AloreConfig(target_modules=['q_proj', 'v_proj']) for linear layers by name suffix, or a regex string such "
        "as target_modules=r'.*\\.attention\\.(q|v)_proj'; print(model) lists the module names."
    )
