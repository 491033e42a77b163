"""``TrainArgs``: every setting of a training run, and the command line built from it.

Values are resolved in three layers, later ones winning:

1. the defaults written here (a quick offline run on CPU),
2. a recipe (``--recipe vtab1k`` or a YAML path), see :mod:`alore_peft.training.recipes`,
3. flags given explicitly on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union, get_args, get_origin, get_type_hints

__all__ = ["TrainArgs", "build_parser", "parse_args", "resolve_args", "AUGMENTATIONS", "SELECTIONS"]

AUGMENTATIONS = ("none", "flip", "crop_flip")
SELECTIONS = ("best", "last")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainArgs:
    """Settings of one ``alore-train`` run. Each field is also a ``--flag``.

    Args:
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
        r: ALoRE expert rank.
        num_experts: ALoRE experts ``n`` (the Kronecker size).
        alpha: ALoRE scale numerator (``s = alpha / r``; the default 16 gives
            s = 4 at r = 4: with lr 3e-3, the setting the evidence study's
            validation grid chose for every adapter on DINOv2-S, docs/results.md).
        adapter_dropout: Dropout on the adapter input.
        mode: ``"sequential"`` (the paper's) or ``"parallel"``.
        target_modules: Comma-separated module names, or one regex; ``None``
            uses the preset of the backbone's ``model_type`` (the paper's placement).
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
            one under ``output_dir/checkpoints``.
        stop_after_steps: Raise :class:`SimulatedInterruption` after this many
            optimizer steps, to test resuming.
        merge: Merge the adapter into the backbone at the end, check it predicts
            like the unmerged model and save it.
        plot: Write ``training_curves.png``.
        progress: Show a progress bar on the main process.
        push_to_hub: Push the adapter to the Hub repository ``hub_model_id``.
        hub_model_id: Hub repository for ``push_to_hub``.
        hub_private: Create the Hub repository as private.
        rank_report: Each process writes ``ranks/rank<N>.json`` (world size,
            backend, data indices seen, adapter hash): a check of a
            multi-process setup.
        cache_dir: Where the offline default model and data are prepared;
            ``None``: ``$ALORE_PEFT_CACHE`` or ``~/.cache/alore_peft``.
    """

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
    augmentation: str = "none"
    # adapter
    r: int = 4
    num_experts: int = 4
    alpha: float = 16.0
    adapter_dropout: float = 0.0
    mode: str = "sequential"
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
    mixed_precision: str = "no"
    seed: int = 42
    cpu: bool = False
    num_workers: int = 0
    # outputs and control
    output_dir: str = "runs/alore"
    selection: str = "best"
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
    # Which recipe filled the values in (set by resolve_args, for the record).
    recipe: Optional[str] = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        _check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check_choice("mode", self.mode, ("sequential", "parallel"))
        positive = ("batch_size", "eval_batch_size", "epochs", "gradient_accumulation_steps", "logging_steps", "r")
        for name in positive + ("num_experts",):
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

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"--{_flag(name)} must be one of {', '.join(allowed)}; got {value!r}.")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind: type):
    """Parse ``kind``, with ``none``/``null`` meaning ``None`` (to clear a recipe value)."""

    def parse(text: str):
        if text.strip().lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def _field_type(hint: Any) -> tuple[type, bool]:
    """``(base type, is optional)`` of a field's annotation."""
    if get_origin(hint) is Union:
        inner = [a for a in get_args(hint) if a is not type(None)]
        return inner[0], True
    return hint, False


def _field_help(name: str) -> str:
    """The ``Args:`` entry of ``name`` in the TrainArgs docstring (one source for code and --help)."""
    lines = (TrainArgs.__doc__ or "").splitlines()
    prefix = f"        {name}: "
    for i, line in enumerate(lines):
        if line.startswith(prefix):
            text = [line[len(prefix) :]]
            for follow in lines[i + 1 :]:
                if not follow.startswith("            "):
                    break
                text.append(follow.strip())
            return " ".join(text).replace("%", "%%")
    return ""


def build_parser() -> argparse.ArgumentParser:
    """The ``alore-train`` argument parser; every flag defaults to "not given"."""
    parser = argparse.ArgumentParser(
        prog="alore-train",
        description=(
            "Fine-tune an image classifier with an ALoRE adapter (Accelerate loop). Without arguments it trains the "
            "offline DINOv2 ViT-S/14 on an offline Fashion-MNIST low-data split. Precedence: built-in defaults < "
            "--recipe < explicit flags."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--recipe",
        help="A recipe name (vtab1k, fgvc) or a YAML file of TrainArgs values; explicit flags override it.",
    )
    hints = get_type_hints(TrainArgs)
    for spec in dataclasses.fields(TrainArgs):
        if not spec.metadata.get("cli", True):
            continue
        kind, optional = _field_type(hints[spec.name])
        flag = "--" + _flag(spec.name)
        default = spec.default
        text = f"{_field_help(spec.name)} (default: {default!r})"
        if kind is bool:
            # --merge / --no-merge style switches.
            parser.add_argument(flag, dest=spec.name, action="store_true", help=text)
            negative = "--no-" + _flag(spec.name)
            parser.add_argument(negative, dest=spec.name, action="store_false", help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=spec.name, type=_optional(kind) if optional else kind, help=text)
    return parser


def resolve_args(explicit: dict[str, Any], recipe: Optional[str] = None) -> TrainArgs:
    """Combine defaults, a recipe and explicit values into :class:`TrainArgs`.

    Args:
        explicit: Field values given explicitly (they win over the recipe).
        recipe: Recipe name or YAML path, or ``None``.

    Returns:
        The resolved arguments.
    """
    from .recipes import load_recipe

    values: dict[str, Any] = {}
    if recipe is not None:
        values.update(load_recipe(recipe))
        values["recipe"] = recipe
    # --model and --model-config are one choice: giving either replaces the recipe's.
    if "model" in explicit or "model_config" in explicit:
        values.pop("model", None)
        values.pop("model_config", None)
    values.update(explicit)
    return TrainArgs(**values)


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainArgs:
    """Parse a command line into :class:`TrainArgs` (defaults < recipe < flags)."""
    namespace = vars(build_parser().parse_args(argv))
    recipe = namespace.pop("recipe", None)
    return resolve_args(namespace, recipe)
