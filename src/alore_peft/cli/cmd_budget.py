"""``alore budget (--base BASE | --model-type T) --budget N``: every (r, num_experts) that fits a budget."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from ..adapter_files import CliError
from ..targets import parse_targets
from ._common import markdown, parse_count, positive_int

HELP = "list (r, num_experts) that fit a parameter budget"
DESCRIPTION = (
    "List every (r, num_experts) whose ALoRE adapter fits a trainable-parameter budget, with exact counts "
    "(r * sum(d_out + d_in) + n^3 shared rules; modules_to_save not counted) and the rank dW can reach, "
    "min(d_out, d_in, n^2 r). Reads only the model's config: no weights are loaded."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", help="local model folder (only its config.json is read)")
    source.add_argument("--model-type", help="transformers model type with its default config, e.g. vit (ViT-B/16)")
    p.add_argument("--budget", type=parse_count, required=True, help="trainable parameters, e.g. 150000, 150k, 1.5M")
    p.add_argument(
        "--targets",
        nargs="+",
        metavar="NAME",
        help="module names to adapt, matched as name suffixes (default: the model type's preset); a single value "
        "holding a regex character (* + ? ( ) [ ] { } | \\ ^ $) is a regex on full module names",
    )
    p.add_argument("--mode", choices=("sequential", "parallel"), default="sequential", help="adapter placement")
    p.add_argument("--no-share-rules", action="store_true", help="one rule tensor per layer instead of one shared")
    p.add_argument("--max-experts", type=positive_int, default=64, help="largest num_experts listed (default 64)")
    p.add_argument("--sort", choices=("params", "rank"), default="params", help="row order (default params)")
    p.add_argument("--top", type=positive_int, default=15, help="rows shown (default 15)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")


def _targets_text(targets: Any) -> str:
    return repr(targets) if isinstance(targets, str) else repr(sorted(targets))


def run(args: argparse.Namespace) -> int:
    from ..budget import plan_budget

    config = None
    if args.base:
        folder = Path(args.base)
        if not (folder.is_dir() and (folder / "config.json").is_file()):
            raise CliError(f"--base {args.base!r} is not a local model folder with a config.json; pass such a folder.")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.base, local_files_only=True)
    try:
        targets = parse_targets(args.targets) if args.targets else None
        rows = plan_budget(
            budget=args.budget,
            model_type=None if config is not None else args.model_type,
            config=config,
            target_modules=targets,
            mode=args.mode,
            share_rules=not args.no_share_rules,
            max_experts=args.max_experts,
            sort=args.sort,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if not rows:
        raise CliError(
            f"nothing fits --budget {args.budget:,}: even r=1 needs more. Raise --budget or adapt fewer modules "
            "(--targets)."
        )
    records = [row.as_dict() for row in rows[: args.top]]
    if args.format == "json":
        print(json.dumps(records, indent=2))
        return 0
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
        return 0
    top = rows[0]
    source = args.base or f"model_type={args.model_type!r} (transformers' default config)"
    targets_text = _targets_text(top.settings["target_modules"])
    print(
        f"{source}: {top.layers} {top.settings['mode']} ALoRE layers on {targets_text}; "
        f"{len(rows)} (r, num_experts) fit {args.budget:,} parameters (sorted by {args.sort}; modules_to_save not "
        "counted)."
    )
    table = [
        {
            "r": row.r,
            "num_experts": row.num_experts,
            "trainable": f"{row.trainable:,}",
            "of budget": f"{100 * row.budget_used:.1f}%",
            "rules": f"{row.rule_params:,}",
            "rank bound": str(row.min_rank) if row.min_rank == row.max_rank else f"{row.min_rank}-{row.max_rank}",
        }
        for row in rows[: args.top]
    ]
    print(markdown(table, list(table[0])))
    print(
        f"\nFirst row as a config: AloreConfig(r={top.r}, num_experts={top.num_experts}, "
        f"mode={top.settings['mode']!r}, target_modules={targets_text})"
    )
    return 0
