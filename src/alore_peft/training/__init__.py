"""Fine-tune image classifiers with ALoRE: an Accelerate loop, data loading and recipes.

Run it as ``alore-train`` (or ``python -m alore_peft.training``); from Python::

    from alore_peft.training import TrainArgs, train
    results = train(TrainArgs(model_config="tiny-vit", dataset="path/to/saved_dataset", max_steps=2))

``datasets``, ``tqdm``, ``pyyaml`` and (for the curves) ``matplotlib`` are
needed: ``pip install 'alore-peft[train]'``.
"""

from .args import TrainArgs, build_parser, parse_args, resolve_args
from .loop import SimulatedInterruption, adapter_digest, main, train
from .recipes import available_recipes, load_recipe

__all__ = [
    "SimulatedInterruption",
    "TrainArgs",
    "adapter_digest",
    "available_recipes",
    "build_parser",
    "load_recipe",
    "main",
    "parse_args",
    "resolve_args",
    "train",
]
