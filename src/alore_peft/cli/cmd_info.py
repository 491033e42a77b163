"""``alore info ADAPTER_DIR``: describe an adapter folder from its files alone."""

from __future__ import annotations

import argparse
import json

from ..adapter_files import adapter_counts, adapter_layers, read_adapter
from ._common import markdown

HELP = "describe an adapter folder from its files alone"
DESCRIPTION = (
    "Print an ALoRE adapter's config, parameter counts and adapted layers, read from adapter_config.json and "
    "adapter_model.safetensors only (no base model needed)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", help="adapter folder written by save_pretrained")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    config, shapes = read_adapter(args.adapter_dir)
    layers = adapter_layers(config, shapes)
    counts = adapter_counts(shapes, layers)
    if args.json:
        print(json.dumps({"config": config, "counts": counts, "layers": layers}, indent=2))
        return 0
    keys = ("r", "num_experts", "alpha", "mode", "share_rules", "dropout", "rule_init", "compute_path")
    print(f"ALoRE adapter: {args.adapter_dir}")
    print(f"  base_model_name_or_path: {config.get('base_model_name_or_path')}")
    base_class = (config.get("auto_mapping") or {}).get("base_model_class")
    if base_class:
        print(f"  base model class: {base_class}")
    for key in keys:
        if key in config:
            print(f"  {key}: {config[key]}")
    if config.get("r"):
        print(f"  scale s = alpha / r: {config.get('alpha', 0) / config['r']:g}")
    print(f"  target_modules: {config.get('target_modules')}")
    print(f"  modules_to_save: {config.get('modules_to_save')}")
    print(
        f"parameters: {counts['alore_params']:,} ALoRE ({counts['expert_params']:,} expert factors + "
        f"{counts['rule_params']:,} rules) + {counts['modules_to_save_params']:,} in modules_to_save = "
        f"{counts['total_params']:,}"
    )
    print(f"adapted layers ({counts['layers']}):")
    print(markdown(layers, ("module", "d_out", "d_in", "num_experts", "r", "params", "rank_bound")))
    return 0
