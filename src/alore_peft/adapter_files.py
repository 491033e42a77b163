"""Reading an ALoRE adapter folder, and loading it onto its base model, for the ``alore`` commands.

An adapter folder is what ``PeftModel.save_pretrained`` writes:
``adapter_config.json`` and ``adapter_model.safetensors``. :func:`read_adapter`
reads both without loading any model; :func:`load_peft` loads the base model
from a local folder (never downloading) and the adapter onto it through PEFT,
so every check of the adapter against the base is the tuner's own (a base of
another width is refused with the shapes that differ, and left unchanged).
Every user error is a :class:`CliError` whose message names the value and the fix.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from . import functional
from .adapter_metadata import read_labels

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "CliError",
    "adapter_counts",
    "adapter_layers",
    "load_base",
    "load_peft",
    "read_adapter",
    "resolve_base",
    "training_images",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# alore-train keeps a few evaluation images here, next to the adapter/ folder, for `alore inspect`.
TRAINING_IMAGES = "eval_images"


class CliError(Exception):
    """A user error: printed as ``alore CMD: error: MESSAGE`` with exit status 2."""


def read_adapter(adapter_dir: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """The adapter's config dict and ``{tensor name: shape}``, from its files alone."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise CliError(
            f"adapter directory {adapter_dir!r} does not exist. Pass the folder written by "
            "model.save_pretrained(...) (it holds adapter_config.json and adapter_model.safetensors)."
        )
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CliError(
            f"{adapter_dir!r} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter folder. Pass the folder written "
            "by model.save_pretrained(...)."
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CliError(f"{config_path} is not valid JSON ({exc}); save the adapter again.") from exc
    if config.get("peft_type") != "ALORE":
        raise CliError(
            f"{config_path} describes a {config.get('peft_type')!r} adapter, not an ALoRE one (peft_type 'ALORE'); "
            "this command only reads ALoRE adapters."
        )
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CliError(
            f"{adapter_dir!r} has no {ADAPTER_WEIGHTS}. Save the adapter with model.save_pretrained(...) (safetensors "
            "is the default)."
        )
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CliError(f"{weights} cannot be read ({type(exc).__name__}: {exc}); save the adapter again.") from exc
    return config, shapes


def _natural_key(name: str) -> list:
    """Sort key that orders ``layer.2`` before ``layer.10``."""
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def adapter_layers(config: dict, shapes: dict[str, tuple[int, ...]]) -> list[dict]:
    """One record per adapted module, from the tensor shapes: ``B (n, q_out, r)``, ``C (n, r, q_in)``."""
    prefix = "base_model.model."
    layers = []
    for key, b_shape in shapes.items():
        if not key.endswith(".alore_B"):
            continue
        path = key[: -len(".alore_B")]
        c_shape = shapes.get(path + ".alore_C")
        if c_shape is None or len(b_shape) != 3 or len(c_shape) != 3:
            raise CliError(
                f"adapter tensor {key} has no matching {path}.alore_C of shape (n, r, d_in/n); the file is damaged."
            )
        n, q_out, r = b_shape
        own_rules = shapes.get(path + ".alore_A")
        d_out, d_in = n * q_out, n * c_shape[2]
        layers.append(
            {
                "module": path[len(prefix) :] if path.startswith(prefix) else path,
                "num_experts": n,
                "r": r,
                "d_out": d_out,
                "d_in": d_in,
                "params": functional.expert_parameters(d_out, d_in, r)
                + (functional.rule_parameters(n) if own_rules else 0),
                "rank_bound": functional.rank_bound(d_out, d_in, n, r),
            }
        )
    return sorted(layers, key=lambda layer: _natural_key(layer["module"]))


def adapter_counts(shapes: dict[str, tuple[int, ...]], layers: list[dict]) -> dict[str, int]:
    """Parameter counts by kind (ALoRE experts and rules, ``modules_to_save``) from the tensor shapes."""

    def numel(shape: tuple[int, ...]) -> int:
        out = 1
        for s in shape:
            out *= s
        return out

    alore = {k: v for k, v in shapes.items() if k.rsplit(".", 1)[-1] in ("alore_A", "alore_B", "alore_C")}
    shared = {k: v for k, v in shapes.items() if ".alore_rules" in k}
    other = {k: v for k, v in shapes.items() if k not in alore and k not in shared}
    counts = {
        "alore_params": sum(numel(v) for v in alore.values()) + sum(numel(v) for v in shared.values()),
        "expert_params": sum(numel(v) for k, v in alore.items() if not k.endswith(".alore_A")),
        "rule_params": sum(numel(v) for k, v in alore.items() if k.endswith(".alore_A"))
        + sum(numel(v) for v in shared.values()),
        "modules_to_save_params": sum(numel(v) for v in other.values()),
        "layers": len(layers),
    }
    counts["total_params"] = counts["alore_params"] + counts["modules_to_save_params"]
    return counts


def resolve_base(adapter_dir: str, config: dict, base: Optional[str] = None) -> str:
    """The local base model folder: ``base`` (``--base``) or the adapter's ``base_model_name_or_path``.

    An offline backbone's stable name (``alore-peft-offline:dinov2-small-112``)
    resolves to its folder in ``alore-train``'s cache, converted there from
    the installed wheel on first use (nothing is downloaded).
    """
    chosen = base or config.get("base_model_name_or_path")
    if not chosen:
        raise CliError(
            f"no base model: {adapter_dir}/{ADAPTER_CONFIG} has no base_model_name_or_path. Pass --base with "
            "the local model folder the adapter was trained on."
        )
    from .offline import backbones

    if backbones.is_portable_name(chosen):
        return str(_offline_backbone(chosen))
    folder = Path(chosen).expanduser()
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        source = "--base" if base else f"base_model_name_or_path in {ADAPTER_CONFIG}"
        raise CliError(
            f"base model {chosen!r} (from {source}) is not a local model folder with a config.json; this command "
            "never downloads. Pass --base with the folder the adapter was trained on (one written by save_pretrained)."
        )
    return str(folder)


def _offline_backbone(name: str) -> Path:
    """The cache folder of an offline backbone recorded by its stable name, converted locally if missing."""
    from .offline import OfflinePreparationError, backbones

    try:
        return backbones.resolve(name)
    except (OfflinePreparationError, ValueError) as exc:
        raise CliError(
            f"the adapter's base model is the offline backbone {name!r} ({backbones.describe(name)}), which could not "
            f"be prepared here ({exc}). Rebuild it with: {'; '.join(backbones.rebuild_instructions(name).splitlines())}; "
            "then pass --base ./base."
        ) from exc


def load_base(base: str, config: dict, shapes: dict[str, tuple[int, ...]], adapter_dir: Optional[str] = None) -> Any:
    """Load the base with the class the adapter was trained on, its head sized (and named) as the adapter's."""
    import transformers

    kwargs: dict[str, Any] = {"local_files_only": True}
    class_name = (config.get("auto_mapping") or {}).get("base_model_class")
    model_cls = getattr(transformers, class_name, None) if class_name else None
    heads = [v for k, v in shapes.items() if k.endswith("classifier.weight") and len(v) == 2]
    if model_cls is None:
        model_cls = transformers.AutoModelForImageClassification if heads else transformers.AutoModel
    if heads:
        kwargs["num_labels"] = heads[0][0]  # the trained head replaces the base's one
        labels = read_labels(Path(adapter_dir) / ADAPTER_WEIGHTS) if adapter_dir else None
        if labels is not None and len(labels) == heads[0][0]:
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {name: i for i, name in enumerate(labels)}
    # transformers reports weights missing from the base (e.g. a new head) as a warning; the
    # adapter usually brings them, so report only the ones it does not.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = model_cls.from_pretrained(base, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CliError(
            f"cannot load base model {base!r} as {model_cls.__name__} ({type(exc).__name__}: {exc}). Pass --base "
            "with the model folder the adapter was trained on."
        ) from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    uncovered = sorted(k for k in info.get("missing_keys", ()) if f"base_model.model.{k}" not in shapes)
    if uncovered:
        print(
            f"note: {len(uncovered)} weight(s) of {model_cls.__name__} are neither in {base} nor in the adapter and "
            f"were initialised at random: {uncovered[:4]}{' ...' if len(uncovered) > 4 else ''}",
            file=sys.stderr,
        )
    return model


def load_peft(adapter_dir: str, base: Optional[str] = None) -> tuple[Any, dict, dict, str]:
    """The adapter loaded onto its base, in eval mode: ``(peft_model, config, shapes, base folder)``.

    The fit of the adapter to the base is PEFT's and the tuner's check: a base
    of another architecture or width is refused (and left unchanged) with the
    modules and shapes that differ.
    """
    config, shapes = read_adapter(adapter_dir)
    base_dir = resolve_base(adapter_dir, config, base)
    model = load_base(base_dir, config, shapes, adapter_dir)
    from peft import PeftModel

    import alore_peft  # noqa: F401  (registers ALoRE with PEFT)

    from ._noise import expected_warnings_hidden

    try:
        with expected_warnings_hidden():
            peft_model = PeftModel.from_pretrained(model, adapter_dir)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CliError(
            f"cannot load adapter {adapter_dir!r} onto base {base_dir!r}: {exc} Pass --base with the model folder "
            "the adapter was trained on."
        ) from exc
    peft_model.eval()
    return peft_model, config, shapes, base_dir


def training_images(adapter_dir: str) -> Optional[tuple[list[Path], Optional[int]]]:
    """The evaluation images ``alore-train`` kept next to this adapter, and the image size it trained at.

    Returns:
        ``(image files, image size or None)`` when ``adapter_dir`` is the
        ``adapter/`` folder of an ``alore-train`` run that kept images, else ``None``.
    """
    run = Path(adapter_dir).resolve().parent
    folder = run / TRAINING_IMAGES
    if not ((run / "train_args.json").is_file() and folder.is_dir()):
        return None
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not images:
        return None
    try:
        image_size = json.loads((run / "train_args.json").read_text()).get("image_size")
    except json.JSONDecodeError:
        image_size = None
    return images, image_size if isinstance(image_size, int) else None
