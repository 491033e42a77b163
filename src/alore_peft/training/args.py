"""``TrainArgs``: every setting of a training run, and the ``alore-train`` command line built from it.

Values are resolved in three layers, later ones winning:

1. the defaults written here (a quick offline run on CPU),
2. a recipe (``--recipe vtab1k`` or a YAML path), see :mod:`alore_peft.training.recipes`,
3. flags given explicitly on the command line.

The adapter fields (``r``, ``num_experts``, ``alpha``, ``adapter_dropout``,
``mode``, ``share_rules``, ``rule_init``, ``compute_path``) are
:class:`~alore_peft.AloreConfig`'s: their types, defaults and help come from
it (``alpha`` defaults to 16 here, see its help).

The command line is ``transformers.HfArgumentParser`` over :class:`TrainArgs`
(flags, types, ``Literal`` choices, ``--no-X`` for switches that default to
on). Three things it cannot express are added to the parser it builds:

- "not given": HfArgumentParser gives every flag its field's default, so a
  recipe's value could not be told from a default the user never typed; the
  defaults are replaced by ``argparse.SUPPRESS`` (and written into the help);
- ``none`` for an optional value (``--image-size none`` clears a recipe's
  value): the optional fields' types accept it;
- ``--no-X`` for switches that default to off (``--no-cpu`` undoes a recipe's
  ``cpu: true``).

Help text is one source: the ``Args:`` entries of the dataclass docstrings
(this one, and ``AloreConfig``'s for the adapter fields).
"""

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from ..config import AloreConfig

__all__ = [
    "ADAPTER_FIELDS",
    "AUGMENTATIONS",
    "SELECTIONS",
    "TrainArgs",
    "build_parser",
    "flag_table",
    "parse_args",
    "resolve_args",
]

AUGMENTATIONS = ("none", "flip", "crop_flip")
SELECTIONS = ("best", "last")
MIXED_PRECISION = ("no", "fp16", "bf16")

# TrainArgs field -> the AloreConfig field it is (the adapter settings a training run exposes).
ADAPTER_FIELDS = {
    "r": "r",
    "num_experts": "num_experts",
    "alpha": "alpha",
    "adapter_dropout": "dropout",
    "mode": "mode",
    "share_rules": "share_rules",
    "rule_init": "rule_init",
    "compute_path": "compute_path",
}
_ALORE_FIELDS = {f.name: f for f in dataclasses.fields(AloreConfig)}
_ALORE_TYPES = get_type_hints(AloreConfig)


def _docstring_entries(doc: Optional[str]) -> dict[str, str]:
    """The ``Args:`` entries of a Google-style docstring, ``{name: text on one line}``."""
    entries: dict[str, str] = {}
    name = None
    for line in (doc or "").splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if indent == 8 and ":" in stripped and not stripped.startswith(("``", "-")):
            head, _, text = stripped.partition(":")
            if head.replace("_", "").isalnum():
                name = head
                entries[name] = text.strip()
                continue
        if name is not None and indent >= 12 and stripped:
            entries[name] += " " + stripped
        elif indent < 8 and stripped:
            name = None
    return entries


def _alore_type(name: str) -> Any:
    """The type annotation of the AloreConfig field behind the TrainArgs field ``name``."""
    return _ALORE_TYPES[ADAPTER_FIELDS[name]]


def _adapter_field(name: str, **override: Any) -> Any:
    """A TrainArgs field copied from AloreConfig's: its default (unless overridden) and its help."""
    source = _ALORE_FIELDS[ADAPTER_FIELDS[name]]
    default = override.get("default", source.default)
    return field(default=default, metadata={"help": _docstring_entries(AloreConfig.__doc__)[source.name]})


@dataclass
class TrainArgs:
    """Settings of one ``alore-train`` run. Each field is also a ``--flag``.

    The adapter fields ``r``, ``num_experts``, ``alpha``, ``adapter_dropout``
    (``dropout``), ``mode``, ``share_rules``, ``rule_init`` and ``compute_path``
    are :class:`~alore_peft.AloreConfig`'s, documented there; ``alpha``
    defaults to 16 here (see ``alpha`` below).

    Args:
        recipe: A recipe name (``vtab1k``, ``fgvc``) or a YAML file of TrainArgs
            values, applied by ``parse_args`` / ``resolve_args`` under the
            explicit flags; on a ``TrainArgs`` it records which recipe was used.
        dataset: A Hub dataset name, a local image folder (``imagefolder`` layout:
            one sub-folder per class, optionally under ``train/``, ``test/``...),
            or a folder written by ``datasets.save_to_disk``. ``None``: the offline
            Fashion-MNIST low-data split (prepared in the cache on first use).
        dataset_config: Configuration name of a Hub dataset.
        train_split: Split to train on; ``"a+b"`` concatenates splits.
        eval_split: Split evaluated after every epoch (drives ``selection="best"``);
            ``""`` disables per-epoch evaluation.
        test_split: Split evaluated once at the end with the selected adapter;
            ``""`` reuses ``eval_split``.
        image_column: Column holding the images.
        label_column: Column holding integer (ideally ``ClassLabel``) labels.
        max_train_samples: Keep only the first N training examples (smoke runs).
        max_eval_samples: Keep only the first N examples of the eval/test splits.
        offline_train_size: Training examples of the offline default split.
        offline_val_size: Validation examples of the offline default split.
        offline_test_size: Test examples of the offline default split.
        model: An ``AutoModelForImageClassification`` Hub id or local folder;
            ``None`` (and no ``model_config``): the offline DINOv2 ViT-S/14.
        model_config: Build a randomly initialised model instead: ``"tiny-vit"``
            or a path to a ``config.json`` (offline smoke runs).
        image_size: Square input side; ``None`` keeps the image processor's size.
        augmentation: ``"none"``, ``"flip"`` (random horizontal flip) or
            ``"crop_flip"`` (random resized crop + flip, the FGVC standard).
        alpha: Scale numerator as in AloreConfig (``s = alpha / r``), but 16 by
            default (s = 4 at r = 4): with lr 3e-3, the setting the evidence
            study's validation grid chose for every adapter on DINOv2-S
            (docs/results.md). AloreConfig's own default is 4 (s = 1).
        target_modules: Comma-separated module names, or one regex (a value
            holding any of ``* + ? ( ) [ ] { } | \\ ^ $``); ``None`` uses the
            preset of the backbone's ``model_type`` (the paper's placement).
        modules_to_save: Comma-separated modules trained in full and saved with
            the adapter; ``None`` finds the classifier head (the ``Linear`` with
            ``num_labels`` outputs).
        learning_rate: Peak AdamW learning rate (see ``alpha``).
        weight_decay: AdamW weight decay.
        batch_size: Training batch size per process.
        eval_batch_size: Evaluation batch size per process.
        epochs: Training epochs.
        warmup_epochs: Linear warm-up length, in epochs (may be fractional).
        max_steps: Stop after this many optimizer steps (the schedule spans them).
        gradient_accumulation_steps: Batches per optimizer step.
        max_grad_norm: Clip the gradient norm to this (``0`` disables clipping).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (Accelerate's autocast).
        seed: Seed of initialisation, data order and augmentation.
        cpu: Run on CPU even if a GPU is present (also makes multi-process
            runs use DDP over gloo).
        num_workers: DataLoader worker processes.
        output_dir: Where checkpoints, metrics, plots, the adapter and the merged
            model are written.
        selection: ``"best"`` keeps the adapter with the best eval accuracy,
            ``"last"`` the final one.
        logging_steps: Log the training loss every N optimizer steps.
        checkpoint_steps: Also save a resumable checkpoint every N optimizer steps
            (one is always saved at the end of each epoch).
        keep_checkpoints: Keep only the newest N checkpoints (``0`` keeps all).
        resume_from_checkpoint: A checkpoint folder, or ``"latest"`` for the newest
            complete one under ``output_dir/checkpoints``.
        stop_after_steps: Raise :class:`SimulatedInterruption` after this many
            optimizer steps, to test resuming.
        merge: Merge the adapter into the backbone at the end, check it predicts
            like the unmerged model and save it (``--no-merge`` skips this).
        plot: Write ``training_curves.png`` (``--no-plot`` skips it).
        progress: Show a progress bar on the main process (``--no-progress`` hides it).
        push_to_hub: Push the adapter folder (weights, config, model card) to the
            Hub repository ``hub_model_id``.
        hub_model_id: Hub repository for ``push_to_hub``.
        hub_private: Create the Hub repository as private.
        rank_report: Each process writes ``ranks/rank<N>.json`` (world size,
            backend, data indices seen, adapter hash): a check of a
            multi-process setup.
        cache_dir: Where the offline default model and data are prepared;
            ``None``: ``$ALORE_PEFT_CACHE`` or ``~/.cache/alore_peft``.
    """

    recipe: Optional[str] = None
    # data
    dataset: Optional[str] = None
    dataset_config: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    offline_train_size: int = 500
    offline_val_size: int = 100
    offline_test_size: int = 1000
    # model
    model: Optional[str] = None
    model_config: Optional[str] = None
    image_size: Optional[int] = None
    augmentation: Literal["none", "flip", "crop_flip"] = "none"
    # adapter: AloreConfig's fields (type, default and help from it)
    r: _alore_type("r") = _adapter_field("r")
    num_experts: _alore_type("num_experts") = _adapter_field("num_experts")
    alpha: _alore_type("alpha") = _adapter_field("alpha", default=16.0)  # help: TrainArgs' docstring
    adapter_dropout: _alore_type("adapter_dropout") = _adapter_field("adapter_dropout")
    mode: _alore_type("mode") = _adapter_field("mode")
    share_rules: _alore_type("share_rules") = _adapter_field("share_rules")
    rule_init: _alore_type("rule_init") = _adapter_field("rule_init")
    compute_path: _alore_type("compute_path") = _adapter_field("compute_path")
    target_modules: Optional[str] = None
    modules_to_save: Optional[str] = None
    # optimisation
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    eval_batch_size: int = 64
    epochs: int = 3
    warmup_epochs: float = 0.5
    max_steps: Optional[int] = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 42
    cpu: bool = False
    num_workers: int = 0
    # outputs and control
    output_dir: str = "runs/alore"
    selection: Literal["best", "last"] = "best"
    logging_steps: int = 10
    checkpoint_steps: Optional[int] = None
    keep_checkpoints: int = 2
    resume_from_checkpoint: Optional[str] = None
    stop_after_steps: Optional[int] = None
    merge: bool = True
    plot: bool = True
    progress: bool = True
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_private: bool = False
    rank_report: bool = False
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        _check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        positive = ("batch_size", "eval_batch_size", "epochs", "gradient_accumulation_steps", "logging_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{_flag(name)} must be a positive integer, got {getattr(self, name)!r}.")
        for name in ("max_steps", "checkpoint_steps", "stop_after_steps", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{_flag(name)} must be a positive integer or left unset, got {value!r}.")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be positive, got {self.learning_rate!r}; the recipes use 1e-3.")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError(
                "--warmup-epochs, --weight-decay and --max-grad-norm must not be negative, got "
                f"{self.warmup_epochs!r}, {self.weight_decay!r} and {self.max_grad_norm!r}."
            )
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"--image-size must be a positive number of pixels, got {self.image_size!r}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push-to-hub needs --hub-model-id (e.g. --hub-model-id your-name/vit-alore-flowers).")
        if self.model is not None and self.model_config is not None:
            raise ValueError(
                f"Give either --model ({self.model!r}, pretrained weights) or --model-config "
                f"({self.model_config!r}, random weights from a config), not both."
            )
        self.alore_config()  # AloreConfig's own checks of the adapter fields, with its messages

    def alore_config(self, **extra: Any) -> AloreConfig:
        """The :class:`AloreConfig` of the adapter fields (plus ``extra`` AloreConfig fields)."""
        values = {ADAPTER_FIELDS[name]: getattr(self, name) for name in ADAPTER_FIELDS}
        try:
            return AloreConfig(**values, **extra)
        except ValueError as error:  # name the flag, not the config field
            message = str(error)
            for name, source in ADAPTER_FIELDS.items():
                message = message.replace(f"AloreConfig.{source} ", f"--{_flag(name)} ")
            raise ValueError(message) from error

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"--{_flag(name)} must be one of {', '.join(allowed)}; got {value!r}.")


def _help_texts() -> dict[str, str]:
    """Help of every TrainArgs field: its docstring entry, else AloreConfig's (adapter fields)."""
    own = _docstring_entries(TrainArgs.__doc__)
    return {f.name: own.get(f.name) or f.metadata.get("help", "") for f in dataclasses.fields(TrainArgs)}


def _optional(kind: Any):
    """Parse ``kind``, with ``none``/``null`` meaning ``None`` (to clear a recipe value)."""

    def parse(text: str):
        if text.strip().lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``alore-train`` argument parser; a flag not given is absent from the parsed namespace."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        TrainArgs,
        prog="alore-train",
        description=(
            "Fine-tune an image classifier with an ALoRE adapter (Accelerate loop). Without arguments it trains the "
            "offline DINOv2 ViT-S/14 on an offline Fashion-MNIST low-data split. Precedence: built-in defaults < "
            "--recipe < explicit flags."
        ),
        formatter_class=argparse.HelpFormatter,
    )
    hints = get_type_hints(TrainArgs)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainArgs)}
    helps = _help_texts()
    for action in parser._actions:
        if action.dest not in defaults:
            continue
        name = action.dest
        negative = any(option.startswith("--no") for option in action.option_strings)
        optional = get_origin(hints[name]) is Union and type(None) in get_args(hints[name])
        if optional and action.type is not None:
            action.type = _optional(action.type)
        # Only the canonical spelling (--flag-name) in the help; --flag_name still parses.
        action.option_strings[:] = [s for s in action.option_strings if "_" not in s] or action.option_strings
        text = helps[name].replace("%", "%%")
        action.help = f"turn off --{_flag(name)}" if negative else f"{text} (default: {defaults[name]!r})"
        action.default = argparse.SUPPRESS
    for name, default in defaults.items():
        if hints[name] is bool and default is False:
            negative = parser.add_argument(
                f"--no-{_flag(name)}", dest=name, action="store_false", default=argparse.SUPPRESS,
                help=f"turn off --{_flag(name)}",
            )  # fmt: skip
            # Listed right after its positive flag, as HfArgumentParser places the ones it adds.
            for actions in (parser._actions, parser._optionals._group_actions):
                actions.remove(negative)
                position = next(i for i, a in enumerate(actions) if a.dest == name)
                actions.insert(position + 1, negative)
    return parser


def flag_table() -> list[tuple[str, Any, str]]:
    """``(flags, default, help)`` per TrainArgs field, as ``--help`` shows them (for the docs)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainArgs)}
    hints = get_type_hints(TrainArgs)
    helps = _help_texts()
    rows = []
    for name, default in defaults.items():
        flags = f"--{_flag(name)}"
        if hints[name] is bool:
            flags += f" / --no-{_flag(name)}"
        rows.append((flags, default, helps[name]))
    return rows


def resolve_args(explicit: dict[str, Any], recipe: Optional[str] = None) -> TrainArgs:
    """Combine defaults, a recipe and explicit values into :class:`TrainArgs`.

    Args:
        explicit: Field values given explicitly (they win over the recipe).
        recipe: Recipe name or YAML path, or ``None``.

    Returns:
        The resolved arguments.

    Raises:
        ValueError: If the recipe sets a field TrainArgs does not have, or a value is invalid.
    """
    from .recipes import load_recipe, recipe_path

    values: dict[str, Any] = {}
    if recipe is not None:
        loaded = load_recipe(recipe)
        known = {f.name for f in dataclasses.fields(TrainArgs)} - {"recipe"}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(
                f"Recipe {str(recipe_path(recipe))!r} sets unknown field(s) {unknown}; valid fields are the "
                f"alore-train flags with '_' for '-': {', '.join(sorted(known))}."
            )
        values.update(loaded)
        values["recipe"] = recipe
    # --model and --model-config are one choice: giving either replaces the recipe's.
    if "model" in explicit or "model_config" in explicit:
        values.pop("model", None)
        values.pop("model_config", None)
    values.update(explicit)
    return TrainArgs(**values)


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainArgs:
    """Parse a command line into :class:`TrainArgs` (defaults < recipe < flags)."""
    explicit = vars(build_parser().parse_args(argv))
    return resolve_args(explicit, explicit.get("recipe"))
